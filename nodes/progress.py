"""Runs one pool job for a node: the job waits on a helper thread while ComfyUI's thread reports progress and
previews and polls for the user's cancel, which it forwards to the pool."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

import torch

POLL_SECONDS = 0.05
CANCEL_WAIT_SECONDS = 60.0


class _JobThread:
    """One long-lived daemon thread running the jobs' waits in order (the pool client keeps one socket per calling
    thread). A daemon: Python's exit does not wait for a job (a ThreadPoolExecutor's thread it joins before the
    atexit handlers, which stop the pool, could run)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="xdit-job", daemon=True)
                self._thread.start()
        self._queue.put((future, fn, args, kwargs))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args, kwargs = self._queue.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # noqa: BLE001 - handed to the waiting node
                    future.set_exception(e)


_JOBS = _JobThread()
_running = 0
_idle = threading.Condition()


def running_jobs() -> int:
    """Jobs whose node is waiting in run_job now."""
    return _running


def wait_idle(timeout: float) -> bool:
    """Wait until no node waits in run_job (its job ended or was cancelled); False on timeout."""
    with _idle:
        return _idle.wait_for(lambda: _running == 0, timeout)


def run_job(client: Any, key: str, fields: dict, tensors: dict[str, torch.Tensor], parallel: dict,
            on_step: Callable[[int, int, torch.Tensor | None], None] | None = None,
            check_interrupt: Callable[[], None] | None = None, preview: bool = False,
            loras: list[dict] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Sample on the pool; returns the latents and the result's fields (timings, steps the cache reused).
    `on_step(step, total, preview)` and `check_interrupt()` run on the calling thread; if either raises, the pool
    job is cancelled, and the exception propagates once the pool has stopped it."""
    global _running
    with _idle:
        _running += 1
    try:
        return _run_job(client, key, fields, tensors, parallel, on_step, check_interrupt, preview, loras)
    finally:
        with _idle:
            _running -= 1
            _idle.notify_all()


def _run_job(client, key, fields, tensors, parallel, on_step, check_interrupt, preview, loras):
    events: queue.Queue = queue.Queue()
    rid = client.new_request_id()

    def progress(p) -> None:
        events.put((p.step, p.total, p.preview))

    future = _JOBS.submit(client.sample_with_info, key, fields, tensors, parallel=parallel, on_progress=progress,
                          preview=preview, request_id=rid, **({"loras": loras} if loras else {}))
    try:
        while True:
            try:
                step, total, prev = events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if future.done():
                    break
            else:
                if on_step is not None:
                    on_step(step, total, prev)
            if check_interrupt is not None:
                check_interrupt()
    except BaseException:
        try:
            client.cancel(rid, timeout=10.0)
        except Exception:  # noqa: BLE001 - the pool may be gone; the job's own error then ends it
            pass
        try:
            future.result(timeout=CANCEL_WAIT_SECONDS)
        except BaseException:  # noqa: BLE001 - the cancel's JobCancelled, expected
            pass
        raise
    return future.result()
