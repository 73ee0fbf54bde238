"""Start, watch, restart and stop a worker pool: one torchrun process group in its own session."""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .client import PoolClient
from .errors import PoolError, PoolStartError
from .protocol import DEFAULT_MAX_BYTES
from .security import ADMIN_ENV, SECRET_ENV, as_secret, check_bind_address, check_rendezvous

log = logging.getLogger("comfyui_xdit_runtime.launcher")

SCRUBBED_ENV = ("PYTORCH_CUDA_ALLOC_CONF",)  # ComfyUI's allocator settings must not leak into the workers
# a one-node pool's collectives listen on loopback only (gloo's pairs, NCCL's bootstrap and proxy sockets)
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
PR_SET_PDEATHSIG = 1
# A rank's script: registers the engine beside this runtime and runs the worker (no install needed)
RANK_SCRIPT = str(Path(__file__).resolve().with_name("bootstrap.py"))


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the starting thread's process goes away, even by SIGKILL;
    torchrun then stops its ranks. Elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return True  # no /proc: trust kill(0)



LOG_DIR_NAME = "comfyui-xdit-logs"  # in the temp folder: every pool's log, the newest KEEP_LOGS kept
KEEP_LOGS = 20


def default_log_path(folder: Path | None = None, keep: int = KEEP_LOGS) -> Path:
    """A new pool's log file in the one logs folder (XDIT_LOG_DIR, else the temp folder's comfyui-xdit-logs),
    named by start time and process; the oldest logs beyond `keep` are deleted first."""
    folder = Path(folder or os.environ.get("XDIT_LOG_DIR") or Path(tempfile.gettempdir()) / LOG_DIR_NAME)
    folder.mkdir(parents=True, exist_ok=True)
    logs = sorted(folder.glob("pool-*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:max(0, len(logs) - (keep - 1))]:
        try:
            old.unlink()
        except OSError:
            pass  # another process's, still open or gone
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return folder / f"pool-{stamp}-{os.getpid()}-{secrets.token_hex(2)}.log"

class Pool:
    """A pool of `nproc` ranks serving at `address` (default tcp://127.0.0.1:<free port>, kept across restarts).

    Multi-node: `nnodes` machines each start a Pool with the same `rdzv_endpoint` (HOST:PORT of node 0's torchrun
    rendezvous) and their `node_rank`; global ranks are node-major (node r holds ranks r*nproc ... r*nproc+nproc-1),
    so the innermost mesh dimension (Ulysses) stays within a node. Rank 0 (on node 0) serves at `address`; a node
    other than 0 only runs its ranks (`start` returns once they run; `supervise` restarts them when they exit).

    `Pool.attach(address)` wraps a pool started elsewhere: no processes to watch or restart."""

    def __init__(self, nproc: int = 1, address: str | None = None, secret: str | bytes | None = None, *,
                 device: str = "cpu", backend: str | None = None, log_path: str | os.PathLike | None = None,
                 startup_timeout: float = 300.0, pg_timeout: float = 120.0, heartbeat: float = 2.0,
                 max_message_bytes: int = DEFAULT_MAX_BYTES, env: dict[str, str] | None = None,
                 torchrun_args: list[str] | None = None, die_with_parent: bool = False,
                 admin_secret: str | bytes | None = None, client_timeout: float | None = None,
                 nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None):
        """`die_with_parent`: stop the pool when this process dies (Linux; the signal comes when the thread that
        started it ends, so start it from a long-lived thread). `admin_secret` (default: a random one this object
        keeps): what cancelling other clients' jobs and shutting the pool down take. `client_timeout`: seconds
        after which a silent client's jobs are cancelled (default: the server's)."""
        self.nproc, self.device, self.backend = nproc, device, backend
        if nnodes < 1 or not 0 <= node_rank < nnodes:
            raise PoolError(f"node rank {node_rank} is not in 0..{nnodes - 1}", "config")
        if nnodes > 1 and not rdzv_endpoint:
            raise PoolError("a pool over several nodes needs --rdzv-endpoint HOST:PORT (node 0's address)", "config")
        self.nnodes, self.node_rank, self.rdzv_endpoint = nnodes, node_rank, rdzv_endpoint
        self.die_with_parent = die_with_parent
        self._address = address
        self.secret = as_secret(secret)
        self.admin_secret = as_secret(admin_secret) or secrets.token_hex(16).encode()
        self._stop_requested = threading.Event()
        self.client_timeout = client_timeout
        self.startup_timeout, self.pg_timeout, self.heartbeat = startup_timeout, pg_timeout, heartbeat
        self.max_message_bytes = max_message_bytes
        self.extra_env = dict(env or {})
        self.torchrun_args = list(torchrun_args or [])
        self.log_path = Path(log_path) if log_path else default_log_path()
        self._proc: subprocess.Popen | None = None
        self._rank_pids: list[int] = []
        self._generation = 0
        self._attached = False
        self._lock = threading.RLock()
        self._control: PoolClient | None = None

    @classmethod
    def attach(cls, address: str, secret: str | bytes | None = None, timeout: float = 30.0,
               admin_secret: str | bytes | None = None) -> "Pool":
        """A pool started elsewhere; `admin_secret` (its XDIT_POOL_ADMIN_SECRET) lets `stop` shut it down."""
        pool = cls(address=address, secret=secret, startup_timeout=timeout, admin_secret=admin_secret)
        pool._attached = True
        if admin_secret is None:
            pool.admin_secret = None
        return pool

    @property
    def address(self) -> str:
        if self._address is None:
            self._address = f"tcp://127.0.0.1:{free_port()}"
        return self._address

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def rank_pids(self) -> list[int]:
        return list(self._rank_pids)

    def client(self, timeout: float = 30.0) -> PoolClient:
        """A client that starts or restarts this pool before each request and notices when it dies."""
        return PoolClient(self.address, self.secret, timeout=timeout, max_bytes=self.max_message_bytes,
                          supervisor=self)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        with self._lock:
            if self._attached:
                self._wait_ready(None)
                self._generation += 1
                return
            if self._proc is not None and self._proc.poll() is None:
                raise PoolError("the pool is already running", "config")
            check_bind_address(self.address, self.secret)
            if self.rdzv_endpoint:
                rdzv_host, rdzv_port = check_rendezvous(self.rdzv_endpoint, self.secret)
            else:
                rdzv_host, rdzv_port = "127.0.0.1", free_port()
            env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
            env.update(self.extra_env)
            env.setdefault("OMP_NUM_THREADS", "1")
            if self.nnodes == 1:
                env.update(LOOPBACK_ENV)
            env.setdefault("HF_HUB_OFFLINE", "1")
            env.pop(SECRET_ENV, None)
            if self.secret:
                env[SECRET_ENV] = self.secret.decode("utf-8", "surrogateescape")
            env[ADMIN_ENV] = self.admin_secret.decode("utf-8", "surrogateescape")
            # torchrun, its rendezvous store bound to the rendezvous host only (torch's binds every interface)
            # (through the bootstrap: the runtime need not be installed)
            cmd = [sys.executable, RANK_SCRIPT, "--torchrun", f"--nproc-per-node={self.nproc}",
                   f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}",  # static rendezvous: node-major ranks
                   "--master-addr", rdzv_host, "--master-port", str(rdzv_port), "--monitor-interval", "0.2",
                   *self.torchrun_args, RANK_SCRIPT, "--address", self.address,
                   "--device", self.device, "--pg-timeout", str(self.pg_timeout), "--heartbeat", str(self.heartbeat),
                   "--max-message-bytes", str(self.max_message_bytes)]
            if self.backend:
                cmd += ["--backend", self.backend]
            if self.client_timeout is not None:
                cmd += ["--client-timeout", str(self.client_timeout)]
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as logf:
                logf.write(f"\n=== starting pool: {' '.join(cmd)}\n".encode())
                logf.flush()
                self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                              start_new_session=True,
                                              preexec_fn=_die_with_parent if self.die_with_parent else None)
            if self.node_rank > 0:  # rank 0 serves on node 0; here only this node's ranks run
                self._generation += 1
                return
            try:
                status = self._wait_ready(self._proc)
            except BaseException:
                self._kill_group()
                raise
            self._rank_pids = [r["pid"] for r in status["ranks"]]
            self._generation += 1

    def _wait_ready(self, proc: subprocess.Popen | None) -> dict:
        probe = PoolClient(self.address, self.secret, timeout=1.0)
        deadline = time.monotonic() + self.startup_timeout
        try:
            while True:
                if proc is not None and proc.poll() is not None:
                    raise PoolStartError(f"the pool exited with code {proc.returncode} while starting:\n"
                                         f"{self.log_tail()}", "start")
                try:
                    return probe.status(timeout=1.0)
                except PoolError:
                    probe.close()  # a fresh socket per probe: no stale requests pile up
                if time.monotonic() > deadline:
                    raise PoolStartError(f"the pool did not answer within {self.startup_timeout:.0f} s:\n"
                                         f"{self.log_tail()}", "start")
        finally:
            probe.close()

    def _admin_client(self) -> PoolClient:
        return PoolClient(self.address, self.secret, admin_secret=self.admin_secret)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the pool to shut down, then terminate whatever is left of the process group."""
        self._stop_requested.set()
        with self._lock:
            if self._attached:
                client = self._admin_client()
                try:
                    client.shutdown(timeout=timeout)
                finally:
                    client.close()
                return
            if self._proc is None:
                return
            if self._proc.poll() is None and self.node_rank == 0:
                client = self._admin_client()
                try:
                    client.shutdown(timeout=min(timeout, 5.0))
                    self._proc.wait(timeout=timeout)
                except (PoolError, subprocess.TimeoutExpired):
                    pass
                finally:
                    client.close()
            self._kill_group()

    def _kill_group(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # the session leader's pid is the group id
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        for pid in self._rank_pids:  # ranks are in the group too; make sure none outlives it
            if _pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._rank_pids = []

    def is_alive(self) -> bool:
        """torchrun and every rank still running (attached pools: assumed alive)."""
        if self._attached:
            return True
        proc = self._proc
        return proc is not None and proc.poll() is None and all(_pid_alive(p) for p in self._rank_pids)

    def ensure_running(self) -> int:
        """Start the pool if it is not running (restart if a rank died); returns the generation."""
        with self._lock:
            if self._attached:
                if not self._generation:
                    self.start()
                return self._generation
            if not self.is_alive():
                self._kill_group()
                self.start()
            return self._generation

    def wait(self) -> int | None:
        """Block until the pool's process group exits; its exit code (None if never started or attached)."""
        proc = self._proc
        return None if proc is None else proc.wait()

    def supervise(self, on_restart=None, max_failed_starts: int = 3) -> int:
        """Keep a started pool serving at its address until `stop()` or a shutdown request: when its processes
        fail (a rank crashed or was killed), log it and start them again; models are loaded again on demand.
        Returns 0 after a stop, else the exit code once `max_failed_starts` restarts in a row failed."""
        failed = 0
        while True:
            code = self.wait()
            if self._stop_requested.is_set() or (code == 0 and not failed):  # stopped, or shut down by a client
                return 0
            message = f"the pool exited with code {code}; restarting it at {self.address}"
            log.warning("%s", message)
            self._append_log(f"=== {message}")
            if on_restart is not None:
                on_restart(message, self.log_tail(15))
            try:
                with self._lock:
                    if self._stop_requested.is_set():
                        return 0
                    self._kill_group()
                    self.start()
                failed = 0
            except PoolStartError as e:
                failed += 1
                log.error("restart %d failed: %s", failed, e)
                if failed >= max_failed_starts:
                    return code or 1
                time.sleep(min(10.0, 2.0 ** failed))

    def _append_log(self, line: str) -> None:
        try:
            with open(self.log_path, "ab") as f:
                f.write(f"\n{line}\n".encode())
        except OSError:
            pass

    def failure_text(self) -> str:
        proc = self._proc
        code = None if proc is None else proc.poll()
        gone = [f"rank {rank} (pid {pid})" for rank, pid in enumerate(self._rank_pids) if not _pid_alive(pid)]
        what = f"{', '.join(gone)} ended" if gone else f"pool process exited (code {code})"
        return f"{what}; log tail:\n{self.log_tail(15)}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "Pool":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
