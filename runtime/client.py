"""Client of a worker pool: one DEALER socket per calling thread, request ids, timeouts.

Replies are matched to requests by id, so a thread may issue a request (e.g. `cancel`) from inside another
request's progress callback. A waiting client pings the pool every PING_INTERVAL_S: a pool silent for
LIVENESS_TIMEOUT_S is gone (PoolDied), and the pings tell the pool the client is still there (it cancels the jobs
of clients that stop). With a supervisor (a launcher.Pool), every request first makes sure the pool runs, and
waits notice at once when the pool's processes die. A local client sends forwards to the pool's direct socket
(named in its ping reply), where rank 0's main thread answers them itself; everything else, pings included, goes
to the pool's address. There each thread also opens a shared-memory buffer (shared_buffer.py) when it can: the
forwards' latents and results then cross it (a copy in, a copy out), not loopback TCP."""
from __future__ import annotations

import collections
import logging
import math
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import msgspec
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import messages, protocol
from .messages import PING_INTERVAL_S
from .cond_cache import UPLOAD_PREFIX, content_hash
from .errors import JobCancelled, PoolDied, PoolError, PoolRestarted, PoolTimeout, raise_for_error
from .protocol import AuthError, Message, ProtocolError
from .security import as_secret, is_local_address
from .shared_buffer import SharedBuffer

log = logging.getLogger("comfyui_xdit_runtime.client")
POLL_SLICE_MS = 100
MAX_REMEMBERED_UPLOADS = 256
LIVENESS_TIMEOUT_S = 6.0  # a pool that sends nothing for this long (pings unanswered) is gone
RECONNECT_GRACE_S = 0.5  # a pool that closed the connection and does not take it again within this has lost rank 0
DEATH_REPLY_GRACE_S = 1.0  # a supervised pool seen dead: how long its own error reply (naming the rank) may take
MIN_BUFFER_BYTES = 1 << 20  # a shared buffer's smallest size (it is made 1.25x the latents, in whole MiB)


class Supervisor(Protocol):
    def ensure_running(self) -> int: ...  # returns a generation number that changes on each (re)start
    def is_alive(self) -> bool: ...
    def failure_text(self) -> str: ...


@dataclass
class Progress:
    request_id: str
    step: int
    total: int
    step_seconds: float
    elapsed: float
    preview: torch.Tensor | None  # current latents, ComfyUI convention, downsampled (when asked for)


class _ThreadState:
    def __init__(self, sock: zmq.Socket, generation: int, monitor: zmq.Socket | None = None):
        self.sock = sock
        self.monitor = monitor  # the main socket's connection events: rank 0's process closing it is a death
        self.generation = generation
        self.sent = self.heard = time.monotonic()  # last message sent to / received from the pool
        self.boot: str | None = None  # the pool instance that answers the request waited for
        self.active: set[str] = set()
        self.mailbox: dict[str, collections.deque[Message]] = {}
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        if monitor is not None:
            self.poller.register(monitor, zmq.POLLIN)
        self.direct: zmq.Socket | None = None  # connected to the pool's direct socket (forwards only)
        self.direct_boot: str | None = None    # the pool instance that named it
        self.direct_asked = False              # the pool was asked for it (direct stays None if it has none)
        self.buffer: SharedBuffer | None = None  # mapped from rank 0, for the forwards on the direct socket
        self.buffer_failed = False               # this pool instance gave none, or it could not be mapped


class PoolClient:
    def __init__(self, address: str, secret: str | bytes | None = None, *, timeout: float = 30.0,
                 max_bytes: int = protocol.DEFAULT_MAX_BYTES, supervisor: Supervisor | None = None,
                 admin_secret: str | bytes | None = None, liveness_timeout: float = LIVENESS_TIMEOUT_S,
                 direct: bool = True, shared_memory: bool = True):
        """`admin_secret`: the pool's admin secret, to cancel other clients' jobs and to shut the pool down.
        `direct`: send forwards to the pool's direct socket when the pool is local (False: through its address).
        `shared_memory`: there, pass their tensors in a shared buffer when the pool's one can be mapped (False:
        frames)."""
        self.address = address
        self.direct = direct and is_local_address(address)
        self.shared_memory = shared_memory
        self.timeout = timeout  # default for short requests (status, load, cancel...); sample waits unbounded
        self.liveness_timeout = liveness_timeout
        self.session = secrets.token_hex(16)  # this client's jobs are its own: only it may cancel them
        self._secret = as_secret(secret)
        admin = as_secret(admin_secret)
        self._admin = None if admin is None else admin.decode("utf-8", "surrogateescape")
        self._max_bytes = max_bytes
        self._supervisor = supervisor
        self._ctx = zmq.Context.instance()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()
        self._loads: dict[str, tuple] = {}  # key -> load arguments, to reload after restart
        self._uploaded: dict[str, None] = {}  # conditioning hashes the pool holds, as far as this client knows
        self._forward_header: tuple[str, Any] = ("", None)  # the last forward's fields and their checked header

    # ---------------------------------------------------------------- public API
    @staticmethod
    def new_request_id() -> str:
        return uuid.uuid4().hex

    def load(self, source: str, family: str | None = None, dtype: str = "fp32",
             timeout: float | None = None, parallel: dict[str, int] | None = None) -> dict[str, Any]:
        """Load (or find cached) a model on every rank. Returns {"key", "cached", "seconds", ...}; a fresh load
        also "ranks": per rank its load report (bytes read and kept, peak host RSS, device peak). With `parallel`
        degrees of PipeFusion > 1 each rank reads only its stage's blocks, and the key serves those degrees only."""
        msg = self._request(self._build(messages.LoadModel, source=source, family=family, dtype=dtype,
                                        parallel=parallel or None),
                            timeout=timeout if timeout is not None else max(self.timeout, 600.0))
        info = dict(msg.header.data)
        with self._lock:
            self._loads[info["key"]] = (source, family, dtype, None, parallel)
        return info

    def load_model(self, source: str, family: str | None = None, dtype: str = "fp32",
                   parallel: dict[str, int] | None = None) -> str:
        """Load a model on the pool; returns its key. Loading the same model again costs nothing."""
        return self.load(source, family, dtype, parallel=parallel)["key"]

    def unload(self, key: str) -> bool:
        with self._lock:
            self._loads.pop(key, None)
        return bool(self._request(self._build(messages.Unload, key=key)).header.data.get("unloaded"))

    def sample(self, key: str, request_fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None,
               parallel: dict[str, int] | None = None, on_progress: Callable[[Progress], None] | None = None,
               preview: bool = False, timeout: float | None = None, request_id: str | None = None,
               debug: dict | None = None, loras: list[dict] | None = None) -> torch.Tensor:
        """Sample on the pool; returns latents [B, C, H/8, W/8] float32. `timeout` (seconds, None = no limit)
        covers queueing and sampling. If `on_progress` raises, the job is cancelled and the error re-raised.
        A model lost to a pool restart is loaded again once, transparently."""
        return self.sample_with_info(key, request_fields, tensors, parallel, on_progress, preview, timeout,
                                     request_id, debug, loras)[0]

    def sample_with_info(self, key: str, request_fields: dict[str, Any],
                         tensors: dict[str, torch.Tensor] | None = None, parallel: dict[str, int] | None = None,
                         on_progress: Callable[[Progress], None] | None = None, preview: bool = False,
                         timeout: float | None = None, request_id: str | None = None,
                         debug: dict | None = None, loras: list[dict] | None = None
                         ) -> tuple[torch.Tensor, dict[str, Any]]:
        """`sample`, also returning the result's fields: seconds (on rank 0), progress_seconds (spent sending
        progress). `loras`: [{"path", "strength"}, ...] patched into the model for this job (none: the base)."""
        fields = dict(key=key, request=request_fields, parallel=parallel or {}, preview=preview, debug=debug or None,
                      loras=list(loras or []))
        rid = request_id or self.new_request_id()

        def on_message(msg: Message) -> None:
            if on_progress is None:
                return
            h = msg.header
            info = Progress(rid, h.step, h.total, h.step_seconds, h.elapsed, msg.tensors.get("preview"))
            try:
                on_progress(info)
            except BaseException:
                try:
                    self.cancel(rid, timeout=5.0)
                except PoolError:
                    pass
                raise

        for attempt in range(2):
            try:
                msg = self._request(self._build(messages.Sample, id=rid, **fields), tensors, timeout=timeout,
                                    on_message=on_message, allow_unbounded=True)
                return msg.tensors["latents"], dict(msg.header.data)
            except PoolError as e:
                with self._lock:
                    args = self._loads.get(key)
                if e.kind != "unknown_model" or args is None or attempt:
                    raise
                log.info("model %s is gone from the pool (restart?): loading it again", key)
                self.load(*args)
                rid = self.new_request_id()
        raise AssertionError("unreachable")

    def forward(self, key: str, x: torch.Tensor, timestep: torch.Tensor, conds: dict[str, torch.Tensor],
                guidance: float | None = None, parallel: dict[str, int] | None = None,
                timeout: float | None = None, debug: dict | None = None,
                hashes: dict[str, str] | None = None, restart: bool = True,
                skip_blocks: dict[str, list[int]] | None = None, cache: dict | None = None,
                run: dict | None = None) -> torch.Tensor:
        """`forward_with_info` without the reply's fields."""
        return self.forward_with_info(key, x, timestep, conds, guidance, parallel, timeout, debug, hashes,
                                      restart, skip_blocks, cache, run)[0]

    def forward_with_info(self, key: str, x: torch.Tensor, timestep: torch.Tensor, conds: dict[str, torch.Tensor],
                          guidance: float | None = None, parallel: dict[str, int] | None = None,
                          timeout: float | None = None, debug: dict | None = None,
                          hashes: dict[str, str] | None = None, restart: bool = True,
                          skip_blocks: dict[str, list[int]] | None = None, cache: dict | None = None,
                          run: dict | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """One transformer forward on the pool and the reply's fields (seconds: the pool's time for it), in the
        engine's conventions (model-space x, engine timesteps [B]).
        `conds` (cond, pooled, cond_mask) go by content hash: uploaded with the first call that needs them and
        again only when the pool no longer holds them (evicted, restarted). `hashes`: their content_hash values
        when the caller knows them (the pool checks every upload against its hash). A model lost to a restart is
        loaded again once. `restart=False` (the later calls of one sampling run): a pool that is not running is not
        started again, and one that lost the model (restarted) is not given it again; both are PoolDied.
        `skip_blocks`: ComfyUI block kind -> indices of blocks passed through in this call (SkipLayerGuidance).
        `cache` (CacheFields) and `run` (RunFields: id, step, steps, measured): the step cache across the forwards
        of one sampling run; the reply's `reused` says whether this call's step reused the cached residual."""
        refs = {role: (hashes or {}).get(role) or content_hash(t) for role, t in conds.items()}
        fields = dict(key=key, conds=refs, guidance=guidance, parallel=parallel or {}, debug=debug or None,
                      skip_blocks=skip_blocks or {}, cache=cache, run=run)
        with self._lock:
            known = set(self._uploaded)
        # the fields of a sampling run's calls repeat: their checked header is built once, then given a new id
        memo = repr(sorted(fields.items()))
        header = self._forward_header if self._forward_header[0] == memo else (memo, self._build(messages.Forward,
                                                                                             **fields))
        self._forward_header = header
        shared = self.shared_memory
        for attempt in range(3):
            tensors = {"x": x, "timestep": timestep}
            tensors.update({UPLOAD_PREFIX + d: conds[r] for r, d in refs.items() if d not in known})
            try:
                msg = self._request(msgspec.structs.replace(header[1], id=self.new_request_id()), tensors,
                                    timeout=timeout, allow_unbounded=True, direct=self.direct, ensure=restart,
                                    shared_bytes=x.numel() * x.element_size() if shared else 0)
            except PoolTimeout as e:
                raise PoolTimeout(self._forward_timeout_text(timeout), e.kind) from None
            except PoolError as e:
                if e.kind == "cond_missing" and not attempt:
                    known = set()  # the pool lost them: send them all again
                    continue
                if isinstance(e, PoolRestarted) and restart and attempt < 2:
                    known = set()  # went to a pool that had died (while idle): a forward can go again, to the new one
                    continue
                if e.kind == "buffer_missing" and attempt < 2:
                    # evicted by other clients' buffers before it came: this call goes in frames, which cannot miss;
                    # the next one opens another buffer
                    self._drop_buffer(self._state(False))
                    shared = False
                    continue
                with self._lock:
                    args = self._loads.get(key)
                if e.kind == "unknown_model" and not restart:
                    raise PoolDied(f"the pool at {self.address} restarted during this sampling run and no longer "
                                   "holds the model", "died") from None
                if e.kind == "unknown_model" and args is not None and attempt < 2:
                    self.load(*args)
                    known = set()
                    continue
                if isinstance(e, PoolDied):
                    with self._lock:
                        self._uploaded.clear()
                raise
            with self._lock:
                for digest in refs.values():
                    self._uploaded.pop(digest, None)
                    self._uploaded[digest] = None
                while len(self._uploaded) > MAX_REMEMBERED_UPLOADS:
                    self._uploaded.pop(next(iter(self._uploaded)))
            return msg.tensors["out"], dict(msg.header.data)
        raise AssertionError("unreachable")

    def _forward_timeout_text(self, timeout: float | None) -> str:
        """Why a forward got no reply in time: the pool's status names a rank of rank 0's host that is stopped or
        gone; otherwise a rank may be hung in a collective (the pool gives up on it after its --pg-timeout)."""
        head = f"no reply to a forward from the pool at {self.address} within {timeout:g} s"
        try:
            ranks = self.status(timeout=2.0).get("ranks", [])
        except PoolError:
            return f"{head}, and no answer to a status request either: the pool is unreachable or frozen"
        odd = [f"rank {r['rank']} (pid {r.get('pid')}) is {r['state']}" for r in ranks
               if r.get("state") not in (None, "running")]
        if odd:
            return f"{head}: {'; '.join(odd)} (a frozen peer; the pool fails the forward after its --pg-timeout)"
        return (f"{head}: every rank runs, so the forward is slow or a rank is hung in a collective (the pool fails "
                "it after its --pg-timeout)")

    def pool_alive(self) -> bool:
        """False when this client's supervised pool has stopped (a rank died); True without a supervisor."""
        return self._supervisor is None or self._supervisor.is_alive()

    def cancel(self, request_id: str, timeout: float | None = None) -> str:
        """Cancel a queued or running job of this client (any client's, with the admin secret). Returns "running",
        "queued" or "unknown"; another client's job raises PoolError (kind "forbidden")."""
        return self._request(self._build(messages.Cancel, target=request_id, admin=self._admin), timeout=timeout,
                             ensure=False).header.data["state"]

    def status(self, refresh: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """Health, loaded models, queue length, per-rank pid and memory. `refresh` asks every rank anew
        (queued behind running jobs); otherwise figures are from the last job or heartbeat."""
        return self._request(self._build(messages.Status, refresh=refresh), timeout=timeout).header.data["status"]

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the pool: running job cancelled, queued jobs answered with an error, every rank exits. A pool with
        an admin secret takes this only from a client that has it."""
        self._request(self._build(messages.Shutdown, admin=self._admin), timeout=timeout, ensure=False)

    def close(self) -> None:
        with self._lock:
            for s in self._sockets:
                s.close(linger=0)
            self._sockets.clear()
        self._local = threading.local()

    # ---------------------------------------------------------------- plumbing
    def _state(self, ensure: bool) -> _ThreadState:
        generation = 0
        if self._supervisor is not None and ensure:
            generation = self._supervisor.ensure_running()
        state = getattr(self._local, "state", None)
        if state is not None and (self._supervisor is None or not ensure or state.generation == generation):
            return state
        if state is not None:  # the pool restarted: replies to the old socket will never come
            self._drop_direct(state)
            self._forget(state.sock)
            if state.monitor is not None:
                self._forget(state.monitor)
        sock = self._connect(self.address)
        self._local.state = _ThreadState(sock, generation, self._monitor(sock))
        return self._local.state

    def _monitor(self, sock: zmq.Socket) -> zmq.Socket | None:
        """A socket receiving `sock`'s connect and disconnect events (at a name of its own: pyzmq's default, from the
        socket's descriptor, can still be bound for a socket just closed). None for inproc, or where it fails."""
        if self.address.startswith("inproc://"):
            return None
        name = f"inproc://xdit-monitor-{secrets.token_hex(8)}"
        try:
            sock.monitor(name, zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            monitor = self._ctx.socket(zmq.PAIR)
            monitor.setsockopt(zmq.LINGER, 0)
            monitor.connect(name)
        except zmq.ZMQError as e:  # the 6 s silence still finds a dead pool
            log.warning("no connection monitor for the pool at %s: %s", self.address, e)
            return None
        with self._lock:
            self._sockets.append(monitor)
        return monitor

    @staticmethod
    def _connection_lost(state: _ThreadState) -> bool:
        """Read the main socket's connection events: True when the last one says the pool closed the connection (its
        rank 0 process ended), False once connected (again)."""
        lost = False
        while state.monitor is not None and state.monitor.poll(0):
            event = recv_monitor_message(state.monitor)["event"]
            lost = event == zmq.EVENT_DISCONNECTED if event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CONNECTED) else lost
        return lost

    def _connect(self, address: str) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        with self._lock:
            self._sockets.append(sock)
        return sock

    def _forget(self, sock: zmq.Socket) -> None:
        with self._lock:
            if sock in self._sockets:
                self._sockets.remove(sock)
        sock.close(linger=0)

    def _direct_socket(self, state: _ThreadState) -> zmq.Socket | None:
        """This thread's socket to the pool's direct socket, asked of the pool once (a ping names it)."""
        if not state.direct_asked:
            state.direct_asked = True
            reply = self._request(self._build(messages.Ping, id="ping-" + self.new_request_id()), ensure=False)
            endpoint, boot = reply.header.data.get("direct"), reply.header.data.get("boot")
            if isinstance(endpoint, str) and is_local_address(endpoint) and boot:
                state.direct, state.direct_boot = self._connect(endpoint), boot
                state.poller.register(state.direct, zmq.POLLIN)
        return state.direct

    def _drop_direct(self, state: _ThreadState) -> None:
        """Forget the direct socket (the pool that named it is gone): the next forward asks again."""
        if state.direct is not None:
            state.poller.unregister(state.direct)
            self._forget(state.direct)
        state.direct, state.direct_boot, state.direct_asked = None, None, False
        self._drop_buffer(state)
        state.buffer_failed = False

    @staticmethod
    def _drop_buffer(state: _ThreadState) -> None:
        if state.buffer is not None:
            state.buffer.close()
            state.buffer = None

    def _shared_buffer(self, state: _ThreadState, nbytes: int) -> SharedBuffer | None:
        """This thread's shared buffer for forwards of `nbytes` of latents, opened (or made larger) on the direct
        socket; None when the pool gives none or it cannot be mapped here (then frames carry the tensors)."""
        if state.buffer is not None and state.buffer.nbytes >= nbytes:
            return state.buffer
        if state.buffer_failed or nbytes > self._max_bytes:
            return None
        self._drop_buffer(state)
        size = max(MIN_BUFFER_BYTES, -(-(nbytes * 5 // 4) // MIN_BUFFER_BYTES) * MIN_BUFFER_BYTES)
        try:
            reply = self._request(self._build(messages.OpenBuffer, nbytes=min(size, self._max_bytes)), ensure=False,
                                  direct=True)
            state.buffer = SharedBuffer.attach(**reply.header.data)
        except PoolDied:
            raise
        except (PoolError, OSError, ValueError, TypeError) as e:
            log.info("no shared buffer from the pool at %s (%s): forwards send frames", self.address, e)
            state.buffer_failed = True
        return state.buffer

    def _build(self, cls: type, **fields: Any) -> msgspec.Struct:
        """A request of this client, checked against the pool's schema before it is sent."""
        fields.setdefault("id", self.new_request_id())
        bad = _non_finite(fields)
        if bad:
            raise PoolError(f"bad {messages.message_type(cls)} request: {bad} must be a finite number", "config")
        try:
            return msgspec.convert({**fields, "client": self.session}, cls)
        except msgspec.ValidationError as e:
            raise PoolError(f"bad {messages.message_type(cls)} request: {e}", "config") from None

    def _send(self, state: _ThreadState, header: msgspec.Struct, tensors: dict[str, torch.Tensor] | None = None,
              sock: zmq.Socket | None = None, buffer: SharedBuffer | None = None):
        stamp = dict(ts=time.time(), nonce=secrets.token_hex(16))  # signed once only
        if buffer is not None:
            stamp["buffer"] = buffer.token
        header = msgspec.structs.replace(header, **stamp)
        frames = protocol.encode(header, tensors, self._secret, None if buffer is None else buffer.data)
        (sock or state.sock).send_multipart(frames, copy=False)
        state.sent = time.monotonic()

    def _request(self, header: msgspec.Struct, tensors: dict[str, torch.Tensor] | None = None,
                 timeout: float | None = None, on_message: Callable[[Message], None] | None = None,
                 ensure: bool = True, allow_unbounded: bool = False, direct: bool = False,
                 shared_bytes: int = 0) -> Message:
        """`direct`: send it to the pool's direct socket when the pool has one (a forward: no accepted reply, so the
        pool instance to watch for is the one that named the socket). `shared_bytes`: there, carry the tensors in
        this thread's shared buffer, sized for this many bytes of latents (0: in frames)."""
        if timeout is None and not allow_unbounded:
            timeout = self.timeout
        state = self._state(ensure)
        sock = self._direct_socket(state) if direct else None
        buffer = self._shared_buffer(state, shared_bytes) if sock is not None and shared_bytes else None
        rid, what = header.id, messages.message_type(type(header))
        state.active.add(rid)
        state.mailbox[rid] = collections.deque()
        done = False
        try:
            if len(state.active) == 1:
                self._connection_lost(state)  # what happened before this request is not its news
            self._send(state, header, tensors, sock, buffer)
            if len(state.active) == 1:  # the pool's silence counts from the first request waited for
                state.heard, state.boot = state.sent, state.direct_boot if sock is not None else None
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                msg = self._next(state, rid, deadline, what)
                if msg.type == "progress" and on_message is not None:
                    on_message(msg)
                elif msg.type == "error":
                    done = True
                    raise_for_error(msg.header)
                elif msg.type == "result":
                    done = True
                    return msg
        except PoolError as e:
            if isinstance(e, PoolDied) or e.kind == "pool":  # the pool failed: its direct socket is dead with it
                self._drop_direct(state)
                if not isinstance(e, PoolRestarted):  # a supervised pool going down: the next request starts a new
                    self._await_exit()                # one rather than reach this one
            raise
        finally:
            state.active.discard(rid)
            state.mailbox.pop(rid, None)
            if not done and buffer is not None:  # the pool may still write this forward's result into it
                self._drop_buffer(state)
            if not done and isinstance(header, messages.QUEUED):
                self._abandon(state, rid)

    def _await_exit(self, limit: float = 30.0) -> None:
        """The pool failed and is going down: with a supervisor, wait until it is gone, so the next request starts a
        new pool instead of reaching the dying one."""
        deadline = time.monotonic() + limit
        while self._supervisor is not None and self._supervisor.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _abandon(self, state: _ThreadState, rid: str) -> None:
        """Gave up waiting (timeout, pool gone, interrupted): cancel the job, without waiting for the answer."""
        try:
            self._send(state, self._build(messages.Cancel, target=rid, admin=self._admin))
        except (zmq.ZMQError, PoolError):
            pass

    def _check_instance(self, state: _ThreadState, msg: Message, what: str) -> None:
        """A pool restarted at the same address answers pings too, but has never heard of the job waited for."""
        h = msg.header
        boot = h.boot if msg.type == "accepted" else (
            h.data.get("boot") if msg.type == "result" and str(msg.id).startswith("ping-") else None)
        if msg.type == "result" and str(msg.id).startswith("ping-") and h.data.get("failed"):
            raise PoolDied(str(h.data["failed"]), "died")  # the pool is going down: what was asked will not come
        if not boot:
            return
        if state.boot is None:
            state.boot = boot
        elif boot != state.boot:
            raise PoolRestarted(f"the pool at {self.address} restarted during {what}: the request was lost", "died")

    def _next(self, state: _ThreadState, rid: str, deadline: float | None, what: str) -> Message:
        """The next reply for `rid`, stashing replies that belong to other requests of this thread; pings the pool
        while nothing comes."""
        while True:
            box = state.mailbox.get(rid)
            if box:
                return box.popleft()
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise PoolTimeout(f"no reply to {what} from the pool at {self.address} within the timeout",
                                  "timeout")
            if now - state.heard > self.liveness_timeout:
                raise PoolDied(f"the pool at {self.address} stopped answering during {what} (nothing for "
                               f"{now - state.heard:.0f} s): it died or is unreachable", "died")
            if now - state.sent >= PING_INTERVAL_S:
                self._send(state, self._build(messages.Ping, id="ping-" + self.new_request_id()))
            ready = state.poller.poll(POLL_SLICE_MS)
            if not ready:
                if self._supervisor is not None and not self._supervisor.is_alive():
                    if state.poller.poll(DEATH_REPLY_GRACE_S * 1000):  # rank 0's word on it first (which rank)
                        continue
                    raise PoolDied(f"the pool stopped during {what}: {self._supervisor.failure_text()}", "died")
                continue
            for sock, _ in ready:
                if sock is state.monitor:
                    if self._connection_lost(state):
                        self._lost(state, rid, what)
                else:
                    self._receive(state, sock, what)

    def _lost(self, state: _ThreadState, rid: str, what: str) -> None:
        """The pool closed the main connection. What it sent before is still read; a pool that takes the connection
        again at once is there (it dropped this one: a message over its limit); one that does not has lost rank 0."""
        for sock in (state.sock, state.direct):
            while sock is not None and sock.poll(0):
                self._receive(state, sock, what)
        if state.mailbox.get(rid):
            return
        deadline = time.monotonic() + RECONNECT_GRACE_S
        while (left := deadline - time.monotonic()) > 0:
            if state.monitor.poll(max(1, int(left * 1000))) and \
                    recv_monitor_message(state.monitor)["event"] == zmq.EVENT_CONNECTED:
                return
        raise PoolDied(f"the pool at {self.address} closed its connection during {what} and does not take it "
                       "again: its rank 0 ended (killed, crashed or stopped)", "died")

    def _receive(self, state: _ThreadState, sock: zmq.Socket, what: str) -> None:
        """Read one reply into its request's mailbox (unreadable or unauthenticated replies are dropped)."""
        frames = sock.recv_multipart(copy=False)
        buffer = state.buffer if sock is state.direct else None
        try:
            msg = protocol.decode_reply(frames, self._secret, shared=None if buffer is None else lambda h: buffer.data)
        except AuthError as e:
            log.warning("dropped a reply that failed authentication: %s", e)
            return
        except ProtocolError as e:
            log.warning("dropped an unreadable reply: %s", e)
            return
        state.heard = time.monotonic()
        self._check_instance(state, msg, what)
        if msg.id in state.active:
            state.mailbox[msg.id].append(msg)
        elif msg.id is None and msg.type == "error":
            raise PoolError(f"the pool rejected {what}: {msg.header.message}", msg.header.kind)


def _non_finite(value: Any, path: str = "") -> str | None:
    """The path of the first NaN or infinite number in nested fields, if any."""
    if isinstance(value, float) and not math.isfinite(value):
        return path.lstrip(".") or "value"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite(v, f"{path}.{k}" if isinstance(k, str) else f"{path}[{k}]")
        if found:
            return found
    return None


__all__ = ["PoolClient", "Progress", "PoolError", "PoolDied", "PoolTimeout", "JobCancelled"]
