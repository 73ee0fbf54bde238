"""Rank 0: a ZeroMQ ROUTER front end and the job loop.

Two threads, one socket each:
  I/O thread   owns the ROUTER socket: checks every message, queues jobs (FIFO across clients), answers
               status, ping and cancel at once (also while a job runs), forwards replies the job thread hands it,
               and cancels the running job of a client that stopped pinging (gone).
  main thread  takes jobs in order, broadcasts each to every rank, runs it through the Executor, replies
               through an inproc PAIR to the I/O thread. When idle it sends heartbeats, which keep the other
               ranks' waits under the process-group timeout and refresh their memory figures.
Jobs belong to the client that sent them (its session token): only that client, or a holder of the pool's admin
secret, may cancel them.
"""
from __future__ import annotations

import collections
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from . import protocol
from .executor import Executor, model_key
from .fanout import Fanout
from .messages import (CLIENT_TIMEOUT_S, Accepted, Cancel, Forward, ForwardOp, LoadModel, LoadOp, Op, Outcome,
                       Ping, PingOp, Progress, Sample, SampleOp, Shutdown, ShutdownOp, Status, Unload, UnloadOp)
from .protocol import AuthError, ProtocolError
from .security import ReplayGuard

log = logging.getLogger("comfyui_xdit_runtime.server")
PROGRESS_POLL_S = 0.005  # while a sample runs, the I/O thread sends queued progress at least this often
IDLE_POLL_S = 0.1  # otherwise it wakes this often (and at once for a message or a reply) to check clients


@dataclass
class Job:
    id: str
    identity: bytes | None          # socket to reply to (None: internal heartbeat)
    owner: str                      # the client's session token (or its socket identity)
    kind: str                       # request type, or "ping" / "shutdown"
    op: Op                          # what every rank receives
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)


class Rank0Server:
    def __init__(self, executor: Executor, fanout: Fanout, address: str, secret: bytes | None = None,
                 max_bytes: int = protocol.DEFAULT_MAX_BYTES, heartbeat_s: float = 2.0, info: dict | None = None,
                 admin_secret: bytes | None = None, client_timeout_s: float = CLIENT_TIMEOUT_S):
        self.executor, self.fanout = executor, fanout
        self.address, self.secret, self.max_bytes, self.heartbeat_s = address, secret, max_bytes, heartbeat_s
        self.admin_secret, self.client_timeout_s = admin_secret, client_timeout_s
        self.info = info or {}
        self._replay = ReplayGuard() if secret else None
        self.boot = secrets.token_hex(8)  # this pool instance, in accepted and ping replies
        self._cond = threading.Condition()
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

    # ---------------------------------------------------------------- main thread
    def serve(self, startup_outcomes: list[Outcome]) -> None:
        self._ranks = self._rank_rows(startup_outcomes)
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
        io = threading.Thread(target=self._io_loop, name="xdit-pool-io", daemon=True)
        io.start()
        log.info("rank 0 serving on %s", self.address)
        try:
            while True:
                job = self._next_job()
                if not self._execute(job):
                    break
        except BaseException as e:
            self._fail_all("pool", f"the pool failed: {type(e).__name__}: {e}")
            raise
        finally:
            time.sleep(0.2)  # let the I/O thread forward the last replies
            self._io_stop.set()
            io.join(timeout=5)
            self._out.close()

    def _next_job(self) -> Job:
        with self._cond:
            while True:
                if not self._queue:
                    self._cond.wait(self.heartbeat_s)
                if not self._queue:
                    return Job("heartbeat", None, "", "ping", PingOp())
                job = self._queue.popleft()
                if job.identity is not None and job.kind != "shutdown" and self._gone(job.owner):
                    log.warning("dropped %s job %s: its client stopped answering", job.kind, job.id)
                    continue
                self._current = job
                return job

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
        with self._cond:
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
            self._out.send_multipart([job.identity, *protocol.encode(header, tensors, self.secret)], copy=False)

    def _fail_all(self, kind: str, message: str) -> None:
        with self._cond:
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
        with self._cond:
            now = time.time()
            return {"healthy": not self._stopping, "world_size": len(self._ranks), **self.info,
                    "ranks": [{**{k: v for k, v in r.items() if k != "updated"},
                               "age_s": round(now - r["updated"], 3)} for r in self._ranks],
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
        with self._cond:
            job = self._current
            if job is None or job.identity is None or job.kind == "shutdown" or job.cancel.is_set():
                return
            if not self._gone(job.owner):
                return
            job.cancel.set()
        log.warning("cancelling %s job %s: its client stopped answering", job.kind, job.id)

    def _handle(self, identity: bytes, frames: list) -> None:
        try:
            msg = protocol.decode(frames, self.secret, self.max_bytes)
            h = msg.header
            if self._replay is not None:
                self._replay.check(h.ts, h.nonce)
        except AuthError as e:
            log.warning("dropped a message that failed authentication: %s", e)
            return
        except ProtocolError as e:
            log.warning("rejected a message: %s", str(e)[:300])
            self._reply_now(identity, protocol.error(e.request_id, "protocol", str(e)))
            return
        owner = h.client or identity.hex()
        rid = h.id
        with self._cond:
            self._seen[owner] = time.monotonic()
            stopping = self._stopping
        if isinstance(h, Ping):
            self._reply_now(identity, protocol.result(rid, alive=True, boot=self.boot))
        elif stopping and not isinstance(h, Status):
            self._reply_now(identity, protocol.error(rid, "shutdown", "the pool is shutting down"))
        elif isinstance(h, (LoadModel, Unload, Sample, Forward)):
            kind = msg.type
            if isinstance(h, Unload) and msg.tensors:
                self._reply_now(identity, protocol.error(rid, "protocol", "unload takes no tensors"))
                return
            self._enqueue(Job(rid, identity, owner, kind, self._make_op(h), msg.tensors))
            with self._cond:
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
    def _make_op(h: LoadModel | Unload | Sample | Forward) -> Op:
        if isinstance(h, LoadModel):
            return LoadOp(model_key(h.source, h.family, h.dtype, h.parallel), h.source, h.family, h.dtype, h.parallel)
        if isinstance(h, Unload):
            return UnloadOp(h.key)
        if isinstance(h, Forward):
            return ForwardOp(h.key, dict(h.conds), h.guidance, h.parallel, h.debug)
        return SampleOp(h.key, h.request, h.parallel, h.preview, h.debug, h.loras)

    def _enqueue(self, job: Job) -> None:
        with self._cond:
            self._queue.append(job)
            self._cond.notify()

    def _cancel(self, target: str, owner: str, admin: bool) -> str:
        with self._cond:
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
        with self._cond:
            self._stopping = True
            dropped = list(self._queue)
            self._queue.clear()
            if self._current is not None:
                self._current.cancel.set()
            self._queue.append(job)
            self._cond.notify()
        for j in dropped:
            if j.identity is not None:
                self._reply_now(j.identity, protocol.error(j.id, "shutdown", "the pool is shutting down"))

