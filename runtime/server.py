"""Rank 0: ZeroMQ ROUTER front ends and the job loop.

Two threads, each with its own sockets:
  I/O thread   owns the ROUTER socket at the pool's address: checks every message, queues jobs (FIFO across
               clients), answers status, ping and cancel at once (also while a job runs), forwards replies the job
               thread hands it, and cancels the running job of a client that stopped pinging (gone).
  main thread  takes jobs in order, broadcasts each to every rank, runs it through the Executor, replies
               through an inproc PAIR to the I/O thread. When idle it sends heartbeats, which keep the other
               ranks' waits under the process-group timeout and refresh their memory figures.
               It also owns the direct socket, a second ROUTER on loopback (or beside an ipc path) that takes
               forwards only: a local client sends a stock sampler's forwards there, and the main thread receives,
               runs and answers each itself, with no accepted reply and no thread hand-off (the per-call
               overhead of Parallel DiT Model). Ping replies name it; pings and cancels stay on the main socket.
               There a client may also open a shared-memory buffer (shared_buffer.py, at most MAX_BUFFERS, one per
               client): its forwards' tensors and their results then cross in it rather than in frames.
Jobs belong to the client that sent them (its session token): only that client, or a holder of the pool's admin
secret, may cancel them. The main thread also watches the other ranks of its host (rank_watch.py): one that ends
fails the pool at once, and every waiting client is told which rank it was and how it ended.
"""
from __future__ import annotations

import collections
import hmac
import logging
import os
import secrets
import select
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from . import protocol
from .executor import Executor, model_key
from .fanout import Fanout
from .messages import (CLIENT_TIMEOUT_S, Accepted, Cancel, Forward, ForwardOp, LoadModel, LoadOp, OpenBuffer, Op,
                       Outcome, Ping, PingOp, Progress, Sample, SampleOp, Shutdown, ShutdownOp, Status, Unload,
                       UnloadOp)
from .protocol import AuthError, BufferMissing, ProtocolError
from .rank_watch import RankDied, RankWatch, Terminated
from .security import ReplayGuard
from .shared_buffer import SharedBuffer

log = logging.getLogger("comfyui_xdit_runtime.server")
PROGRESS_POLL_S = 0.005  # while a sample runs, the I/O thread sends queued progress at least this often
IDLE_POLL_S = 0.1  # otherwise it wakes this often (and at once for a message or a reply) to check clients
# After answering a direct forward the main thread polls without sleeping this long: a stock sampler's next forward
# follows the reply within about a millisecond, and catching it awake saves the wake-up of a sleeping thread.
FORWARD_SPIN_S = 0.002
# shared buffers held for direct clients at once (the least recently used goes first; XDIT_POOL_MAX_BUFFERS)...
MAX_BUFFERS = max(1, int(os.environ.get("XDIT_POOL_MAX_BUFFERS") or 16))
MAX_BUFFER_BYTES = 2 << 30  # ...and their bytes in all (a forward whose buffer went is sent again in frames)
DEATH_GRACE_S = 0.5  # after a collective failed, how long to wait for a dead rank's pidfd to name it
FAILED_LINGER_S = 1.0  # a failed pool answers every request with its failure this long before rank 0 exits


@dataclass
class Job:
    id: str
    identity: bytes | None          # socket to reply to (None: internal heartbeat)
    owner: str                      # the client's session token (or its socket identity)
    kind: str                       # request type, or "ping" / "shutdown"
    op: Op                          # what every rank receives
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    direct: bool = False            # came on the direct socket: the main thread replies there itself
    shared: memoryview | None = None  # the client's shared buffer, for the result's tensors


def direct_address(address: str) -> str:
    """Where the direct socket binds for a pool at `address`: a free loopback port for tcp (never a public
    interface: only local clients use it), a sibling endpoint for ipc and inproc."""
    scheme = address.partition("://")[0]
    return "tcp://127.0.0.1:*" if scheme == "tcp" else address + "-direct"


class Rank0Server:
    def __init__(self, executor: Executor, fanout: Fanout, address: str, secret: bytes | None = None,
                 max_bytes: int = protocol.DEFAULT_MAX_BYTES, heartbeat_s: float = 2.0, info: dict | None = None,
                 admin_secret: bytes | None = None, client_timeout_s: float = CLIENT_TIMEOUT_S):
        self.executor, self.fanout = executor, fanout
        self.address, self.secret, self.max_bytes, self.heartbeat_s = address, secret, max_bytes, heartbeat_s
        self.admin_secret, self.client_timeout_s = admin_secret, client_timeout_s
        self.info = info or {}
        self._replay = ReplayGuard() if secret else None  # shared by both threads (it locks)
        self.boot = secrets.token_hex(8)  # this pool instance, in accepted and ping replies
        self._lock = threading.Lock()
        self._queue: collections.deque[Job] = collections.deque()
        self._current: Job | None = None
        self._stopping = False
        self._ranks: list[dict] = []
        self._models: list[dict] = []
        self._jobs_done = 0
        self._started = time.time()
        self._seen: dict[str, float] = {}  # owner -> monotonic time of its last message
        self._io_stop = threading.Event()
        # Progress replies: appended by the job thread, encoded and sent by the I/O thread within PROGRESS_POLL_S,
        # so a step pays for a deque append rather than a thread hand-off.
        self._progress: collections.deque[tuple[bytes, Any, dict | None]] = collections.deque()
        self._ctx = zmq.Context.instance()
        self.direct_endpoint: str | None = None  # the direct socket's address, once bound
        self._spin_until = 0.0  # monotonic time until which the idle main thread polls without sleeping
        self._buffers: collections.OrderedDict[str, SharedBuffer] = collections.OrderedDict()  # token -> buffer
        self._watch = RankWatch([])  # the other ranks of this host (serve fills it)
        self._failure: str | None = None  # once the pool is failing: the I/O thread answers every request with it
        self._failing = False

    # ---------------------------------------------------------------- main thread
    def serve(self, startup_outcomes: list[Outcome]) -> None:
        self._ranks = self._rank_rows(startup_outcomes)
        self._watch = RankWatch(self._ranks)
        if threading.current_thread() is threading.main_thread():  # torchrun stops the group: answer waiters first
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 1000)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_bytes + (1 << 16))  # hard cap: peer dropped
        self._router.bind(self.address)
        inproc = f"inproc://xdit-replies-{id(self)}"
        self._pair_in = self._ctx.socket(zmq.PAIR)
        self._pair_in.bind(inproc)
        self._out = self._ctx.socket(zmq.PAIR)
        self._out.setsockopt(zmq.LINGER, 1000)
        self._out.connect(inproc)
        # the I/O thread wakes the main thread through this PAIR when it queues a job (the main thread waits on
        # its sockets, not on the condition)
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(inproc + "-wake")
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(inproc + "-wake")
        self._direct = self._bind_direct()
        self._idle_poller = zmq.Poller()
        self._idle_poller.register(self._wake_rx, zmq.POLLIN)
        if self._direct is not None:
            self._idle_poller.register(self._direct, zmq.POLLIN)
        for fd in self._watch.fds():  # a rank of this host ended: readable at once
            self._idle_poller.register(fd, zmq.POLLIN)
        io = threading.Thread(target=self._io_loop, name="xdit-pool-io", daemon=True)
        io.start()
        log.info("rank 0 serving on %s", self.address)
        try:
            while True:
                job = self._next_job()
                if not self._execute(job):
                    break
        except BaseException as e:
            self._failing = True  # from here on a SIGTERM is not raised again
            self._failure = self._failure_text(e)
            log.error("%s", self._failure)
            self._fail_all("pool", self._failure)
            self._linger(self._failure)
            raise
        finally:
            time.sleep(0.2)  # let the I/O thread forward the last replies
            self._io_stop.set()
            io.join(timeout=5)
            self._out.close()
            self._wake_tx.close()
            self._wake_rx.close(linger=0)
            if self._direct is not None:
                self._direct.close(linger=1000)
            for buf in self._buffers.values():
                buf.close()
            self._watch.close()

    def _linger(self, failure: str) -> None:
        """Answer what comes in the next FAILED_LINGER_S with the failure (the I/O thread does so on the pool's
        address): a client sending forwards back to back learns which rank died, not only that the pool went silent."""
        deadline = time.monotonic() + FAILED_LINGER_S
        while self._direct is not None and time.monotonic() < deadline:
            if not self._direct.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                continue
            frames = self._direct.recv_multipart(copy=False)
            try:
                msg = self._checked(frames[0].bytes, frames[1:], self._reply_direct,
                                    lambda h: self._buffer_of(h, frames[0].bytes))
                if msg is not None:
                    self._reply_direct(frames[0].bytes, protocol.error(msg.header.id, "pool", failure))
            except Exception:  # noqa: BLE001 - the pool is going down anyway
                log.exception("error while refusing a message")
        self._fail_all("pool", failure)  # anything queued meanwhile

    def _on_sigterm(self, signum, frame) -> None:
        if not self._failing:  # not while the failure is being answered
            raise Terminated("the pool was stopped (SIGTERM)")

    def _failure_text(self, e: BaseException) -> str:
        """One line for the clients of a failed pool: which rank of this host died (and how) or is stopped, when
        one did or is, then the error itself."""
        if isinstance(e, RankDied):
            return f"the pool failed: {e}"
        fds = self._watch.fds()
        if fds and not isinstance(e, Terminated):  # a broken connection can come a moment before the pidfd
            poller = select.poll()
            for fd in fds:
                poller.register(fd, select.POLLIN)
            poller.poll(DEATH_GRACE_S * 1000)
        ranks = self._watch.dead() or self._watch.stopped()
        error = str(e) if isinstance(e, Terminated) else f"{type(e).__name__}: {e}"
        return f"the pool failed: {ranks} ({error})" if ranks else f"the pool failed: {error}"

    def _bind_direct(self) -> zmq.Socket | None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_bytes + (1 << 16))
        try:
            sock.bind(direct_address(self.address))
        except zmq.ZMQError as e:  # e.g. an ipc path too long: forwards then take the main socket
            log.warning("no direct socket for forwards (%s): they go through the I/O thread", e)
            sock.close(linger=0)
            return None
        self.direct_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock

    def _next_job(self) -> Job:
        """The oldest queued job, else a forward from the direct socket, else (idle for heartbeat_s) a heartbeat."""
        deadline = time.monotonic() + self.heartbeat_s
        while True:
            with self._lock:
                while self._queue:
                    job = self._queue.popleft()
                    if job.identity is not None and job.kind != "shutdown" and self._gone(job.owner):
                        log.warning("dropped %s job %s: its client stopped answering", job.kind, job.id)
                        continue
                    self._current = job
                    return job
            job = self._direct_job()
            if job is not None:
                return job
            now = time.monotonic()
            if now >= deadline:
                return Job("heartbeat", None, "", "ping", PingOp())
            for sock, _ in self._idle_poller.poll(0 if now < self._spin_until else (deadline - now) * 1000):
                if sock is self._wake_rx:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                elif isinstance(sock, int):
                    raise RankDied(self._watch.dead() or "a rank ended")

    def _direct_job(self) -> Job | None:
        """A forward waiting on the direct socket, checked as the I/O thread checks messages; anything else there is
        answered (or dropped) here. None when nothing runnable waits."""
        while self._direct is not None and self._direct.poll(0):
            frames = self._direct.recv_multipart(copy=False)
            identity = frames[0].bytes
            try:
                msg = self._checked(identity, frames[1:], self._reply_direct, lambda h: self._buffer_of(h, identity))
                if msg is None:
                    continue
                h = msg.header
                if isinstance(h, OpenBuffer):
                    self._open_buffer(identity, h)
                    continue
                if not isinstance(h, Forward):
                    self._reply_direct(identity, protocol.error(h.id, "protocol", "the direct socket takes forward "
                                                                "requests only: send the others to the pool's address"))
                    continue
                try:
                    protocol.check_forward_tensors(msg.tensors, h.id)
                except ProtocolError as e:
                    self._reply_direct(identity, protocol.error(h.id, "protocol", str(e)))
                    continue
                owner = h.client or identity.hex()
                with self._lock:
                    self._seen[owner] = time.monotonic()
                    if not self._stopping:
                        self._current = Job(h.id, identity, owner, "forward", self._make_op(h, owner), msg.tensors,
                                            direct=True, shared=self._buffer_of(h, identity))
                        return self._current
                self._reply_direct(identity, protocol.error(h.id, "shutdown", "the pool is shutting down"))
            except Exception:  # noqa: BLE001 - never let a client take the main thread down
                log.exception("error while handling a direct message")
        return None

    def _buffer_of(self, h, identity: bytes) -> memoryview | None:
        """The data region of the shared buffer a forward names, if it is its sender's. The client uses it, so it has
        mapped it: the descriptor named in the open reply is closed."""
        token = getattr(h, "buffer", None)
        buf = self._buffers.get(token) if token else None
        if buf is None or buf.owner != self._buffer_owner(h, identity):
            return None
        self._buffers.move_to_end(token)
        buf.close_fd()
        return buf.data

    @staticmethod
    def _buffer_owner(h, identity: bytes) -> str:
        """A buffer belongs to one client session and one of its sockets (each thread of a client has its own)."""
        return f"{h.client or ''}/{identity.hex()}"

    def _open_buffer(self, identity: bytes, h: OpenBuffer) -> None:
        """A new shared buffer for this client's socket (its earlier one, and the least recently used beyond
        MAX_BUFFERS, are closed)."""
        if h.nbytes > self.max_bytes:
            self._reply_direct(identity, protocol.error(h.id, "config", f"a shared buffer of {h.nbytes} bytes exceeds "
                                                        f"the pool's message limit of {self.max_bytes}"))
            return
        owner = self._buffer_owner(h, identity)
        for token in [t for t, b in self._buffers.items() if b.owner == owner]:
            self._buffers.pop(token).close()
        while self._buffers and (len(self._buffers) >= MAX_BUFFERS or
                                 sum(b.nbytes for b in self._buffers.values()) + h.nbytes > MAX_BUFFER_BYTES):
            self._buffers.popitem(last=False)[1].close()
        try:
            buf = SharedBuffer.create(h.nbytes, owner)
        except OSError as e:  # no memfd here, or no memory: the client sends frames
            self._reply_direct(identity, protocol.error(h.id, "unavailable", f"no shared buffer: {e}"))
            return
        self._buffers[buf.token] = buf
        self._reply_direct(identity, protocol.result(h.id, **buf.describe()))

    def _reply_direct(self, identity: bytes, header, tensors: dict | None = None) -> None:
        self._direct.send_multipart([identity, *protocol.encode(header, tensors, self.secret)], copy=False)

    def _gone(self, owner: str) -> bool:
        seen = self._seen.get(owner)
        return seen is None or time.monotonic() - seen > self.client_timeout_s

    def _execute(self, job: Job) -> bool:
        """Run one job on every rank and reply. False after a shutdown."""
        start = time.perf_counter()

        def progress(step: int, total: int, step_seconds: float, preview: torch.Tensor | None) -> None:
            if job.identity is not None:
                header = Progress(id=job.id, step=step, total=total, step_seconds=round(step_seconds, 6),
                                  elapsed=round(time.perf_counter() - start, 6))
                self._progress.append((job.identity, header, {"preview": preview} if preview is not None else None))

        self.fanout.send(job.op, job.tensors)
        outcomes, result, extra = self.executor.run(job.op, job.tensors, progress, job.cancel.is_set)
        with self._lock:
            self._current = None
            self._ranks = self._rank_rows(outcomes)
            self._models = [dict(v) for v in self.executor.model_info.values()]
            self._jobs_done += job.identity is not None
        failed = [o for o in outcomes if not o.ok]
        if job.identity is None:
            pass
        elif failed:
            self._send(job, self._error_reply(job.id, failed))
        elif job.kind == "status":
            self._send(job, protocol.result(job.id, status=self.status()))
        elif job.kind == "sample":
            self._send(job, protocol.result(job.id, **extra), {"latents": result})
        elif job.kind == "forward":
            self._send(job, protocol.result(job.id, **extra), {"out": result})
            if job.direct:
                self._spin_until = time.monotonic() + FORWARD_SPIN_S
        elif isinstance(job.op, LoadOp):  # each rank's load report and memory high-water marks
            ranks = [{"rank": o.rank, "peak_rss_bytes": o.peak_rss_bytes, "cuda_peak_bytes": o.cuda_peak_bytes,
                      **(o.load or {})} for o in outcomes]
            self._send(job, protocol.result(job.id, **extra, ranks=ranks))
        else:
            self._send(job, protocol.result(job.id, **extra))
        return job.kind != "shutdown"

    @staticmethod
    def _error_reply(rid: str, failed: list[Outcome]):
        cancelled = [o for o in failed if o.kind == "cancelled"]
        if cancelled:
            return protocol.error(rid, "cancelled", cancelled[0].message, None)
        first = next((o for o in failed if o.kind != "peer"), failed[0])
        return protocol.error(rid, first.kind, first.message, first.rank)

    def _send(self, job: Job, header, tensors: dict | None = None) -> None:
        if job.identity is not None:
            frames = protocol.encode(header, tensors, self.secret, job.shared)
            (self._direct if job.direct else self._out).send_multipart([job.identity, *frames], copy=False)

    def _fail_all(self, kind: str, message: str) -> None:
        with self._lock:
            jobs = ([self._current] if self._current else []) + list(self._queue)
            self._queue.clear()
            self._current = None
        for job in jobs:
            self._send(job, protocol.error(job.id, kind, message))

    @staticmethod
    def _rank_rows(outcomes: list[Outcome]) -> list[dict]:
        now = time.time()
        keep = ("rank", "pid", "host", "rss_bytes", "peak_rss_bytes", "cuda_allocated_bytes", "cuda_reserved_bytes",
                "cuda_peak_bytes")
        return [{**{k: getattr(o, k) for k in keep if getattr(o, k) not in (None, "")}, "updated": now}
                for o in outcomes]

    def status(self) -> dict[str, Any]:
        """The pool's state; a rank of this host other than rank 0 also has `state`: running, stopped or gone."""
        states = self._watch.states()
        with self._lock:
            now = time.time()
            return {"healthy": not self._stopping and self._failure is None, "world_size": len(self._ranks), **self.info,
                    "ranks": [{**{k: v for k, v in r.items() if k != "updated"}, "age_s": round(now - r["updated"], 3),
                               **({"state": states[r["rank"]]} if r.get("rank") in states else {})}
                              for r in self._ranks],
                    "models": list(self._models), "queue_length": len(self._queue),
                    "running": self._current.id if self._current else None, "jobs_done": self._jobs_done,
                    "uptime_s": round(now - self._started, 3)}

    # ---------------------------------------------------------------- I/O thread
    def _io_loop(self) -> None:
        router, pair = self._router, self._pair_in
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pair, zmq.POLLIN)
        try:
            while not self._io_stop.is_set():
                job = self._current  # only a sample sends progress: other jobs need no frequent wake-ups
                events = poller.poll((PROGRESS_POLL_S if job is not None and job.kind == "sample" else IDLE_POLL_S)
                                     * 1000)
                self._flush_progress()
                for sock, _ in events:
                    if sock is pair:
                        self._flush_progress()  # a job's progress goes out before its result
                        router.send_multipart(pair.recv_multipart(copy=False), copy=False)
                    else:
                        frames = router.recv_multipart(copy=False)
                        try:
                            self._handle(frames[0].bytes, frames[1:])
                        except Exception:  # noqa: BLE001 - never let a client take the I/O thread down
                            log.exception("error while handling a message")
                self._cancel_if_client_gone()
            self._flush_progress()
            while pair.poll(0):  # flush the last replies
                router.send_multipart(pair.recv_multipart(copy=False), copy=False)
        finally:
            pair.close()
            router.close()

    def _flush_progress(self) -> None:
        while self._progress:
            identity, header, tensors = self._progress.popleft()
            self._router.send_multipart([identity, *protocol.encode(header, tensors, self.secret)], copy=False)

    def _reply_now(self, identity: bytes, header, tensors: dict | None = None) -> None:
        self._router.send_multipart([identity, *protocol.encode(header, tensors, self.secret)], copy=False)

    def _cancel_if_client_gone(self) -> None:
        with self._lock:
            job = self._current
            if job is None or job.identity is None or job.kind == "shutdown" or job.cancel.is_set():
                return
            if not self._gone(job.owner):
                return
            job.cancel.set()
        log.warning("cancelling %s job %s: its client stopped answering", job.kind, job.id)

    def _checked(self, identity: bytes, frames: list, reply,
                 shared: protocol.SharedLookup | None = None) -> protocol.Message | None:
        """The decoded, authenticated message; None when it was refused (`reply` answers a readable refusal)."""
        try:
            msg = protocol.decode(frames, self.secret, self.max_bytes, shared=shared)
            if self._replay is not None:
                self._replay.check(msg.header.ts, msg.header.nonce)
            return msg
        except AuthError as e:
            log.warning("dropped a message that failed authentication: %s", e)
        except ProtocolError as e:
            log.warning("rejected a message: %s", str(e)[:300])
            reply(identity, protocol.error(e.request_id, "buffer_missing" if isinstance(e, BufferMissing)
                                           else "protocol", str(e)))
        return None

    def _handle(self, identity: bytes, frames: list) -> None:
        msg = self._checked(identity, frames, self._reply_now)
        if msg is None:
            return
        h = msg.header
        owner = h.client or identity.hex()
        rid = h.id
        with self._lock:
            self._seen[owner] = time.monotonic()
            stopping = self._stopping
        failure = self._failure
        if isinstance(h, Ping):
            self._reply_now(identity, protocol.result(rid, alive=failure is None, boot=self.boot,
                                                      direct=self.direct_endpoint, **({"failed": failure} if failure
                                                                                      else {})))
        elif failure is not None and not isinstance(h, (Status, Cancel)):
            self._reply_now(identity, protocol.error(rid, "pool", failure))
        elif stopping and not isinstance(h, Status):
            self._reply_now(identity, protocol.error(rid, "shutdown", "the pool is shutting down"))
        elif isinstance(h, (LoadModel, Unload, Sample, Forward)):
            kind = msg.type
            if isinstance(h, Unload) and msg.tensors:
                self._reply_now(identity, protocol.error(rid, "protocol", "unload takes no tensors"))
                return
            if isinstance(h, Forward):
                try:
                    protocol.check_forward_tensors(msg.tensors, rid)
                except ProtocolError as e:
                    self._reply_now(identity, protocol.error(rid, "protocol", str(e)))
                    return
            self._enqueue(Job(rid, identity, owner, kind, self._make_op(h, owner), msg.tensors))
            with self._lock:
                position = len(self._queue)
            self._reply_now(identity, Accepted(id=rid, position=position, boot=self.boot))
        elif isinstance(h, Status):
            if h.refresh:
                self._enqueue(Job(rid, identity, owner, "status", PingOp()))
            else:
                self._reply_now(identity, protocol.result(rid, status=self.status()))
        elif isinstance(h, Cancel):
            state = self._cancel(h.target, owner, self._is_admin(h.admin))
            if state == "forbidden":
                self._reply_now(identity, protocol.error(rid, "forbidden",
                                                         f"job {h.target} belongs to another client"))
            else:
                self._reply_now(identity, protocol.result(rid, state=state))
        elif isinstance(h, OpenBuffer):
            self._reply_now(identity, protocol.error(rid, "protocol", "open_buffer is taken on the direct socket "
                                                     "only (named in a ping reply)"))
        elif isinstance(h, Shutdown):
            if self.admin_secret is not None and not self._is_admin(h.admin):
                self._reply_now(identity, protocol.error(rid, "forbidden",
                                                         "shutting this pool down needs its admin secret"))
                return
            self._shutdown(Job(rid, identity, owner, "shutdown", ShutdownOp()))

    def _is_admin(self, token: str | None) -> bool:
        return (self.admin_secret is not None and token is not None
                and hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self.admin_secret))

    @staticmethod
    def _make_op(h: LoadModel | Unload | Sample | Forward, owner: str) -> Op:
        if isinstance(h, LoadModel):
            return LoadOp(model_key(h.source, h.family, h.dtype, h.parallel), h.source, h.family, h.dtype, h.parallel)
        if isinstance(h, Unload):
            return UnloadOp(h.key)
        if isinstance(h, Forward):
            return ForwardOp(h.key, dict(h.conds), h.guidance, h.parallel, h.debug, dict(h.skip_blocks), h.cache,
                             h.run, owner if h.run is not None else "")
        return SampleOp(h.key, h.request, h.parallel, h.preview, h.debug, h.loras)

    def _enqueue(self, job: Job) -> None:
        with self._lock:
            self._queue.append(job)
        self._wake_tx.send(b"")  # I/O thread only (its socket)

    def _cancel(self, target: str, owner: str, admin: bool) -> str:
        with self._lock:
            current = self._current
            if current is not None and current.id == target and current.identity is not None:
                if current.owner != owner and not admin:
                    return "forbidden"
                current.cancel.set()
                return "running"
            for job in self._queue:
                if job.id == target:
                    if job.owner != owner and not admin:
                        return "forbidden"
                    self._queue.remove(job)
                    break
            else:
                return "unknown"
        self._reply_now(job.identity, protocol.error(job.id, "cancelled", "cancelled before it started"))
        return "queued"

    def _shutdown(self, job: Job) -> None:
        with self._lock:
            self._stopping = True
            dropped = list(self._queue)
            self._queue.clear()
            if self._current is not None:
                self._current.cancel.set()
            self._queue.append(job)
        self._wake_tx.send(b"")
        for j in dropped:
            if j.identity is not None:
                self._reply_now(j.identity, protocol.error(j.id, "shutdown", "the pool is shutting down"))

