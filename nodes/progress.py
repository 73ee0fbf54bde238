"""Runs one pool job for a node: the job waits on a helper thread while ComfyUI's thread reports progress and
previews and polls for the user's cancel, which it forwards to the pool."""
from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

POLL_SECONDS = 0.05
CANCEL_WAIT_SECONDS = 60.0

# One long-lived thread: the pool client keeps one socket per calling thread.
_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xdit-job")


def run_job(client: Any, key: str, fields: dict, tensors: dict[str, torch.Tensor], parallel: dict,
            on_step: Callable[[int, int, torch.Tensor | None], None] | None = None,
            check_interrupt: Callable[[], None] | None = None, preview: bool = False,
            loras: list[dict] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Sample on the pool; returns the latents and the result's fields (timings, steps the cache reused).
    `on_step(step, total, preview)` and `check_interrupt()` run on the calling thread; if either raises, the pool
    job is cancelled, and the exception propagates once the pool has stopped it."""
    events: queue.Queue = queue.Queue()
    rid = client.new_request_id()

    def progress(p) -> None:
        events.put((p.step, p.total, p.preview))

    future = _EXECUTOR.submit(client.sample_with_info, key, fields, tensors, parallel=parallel, on_progress=progress,
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
