"""One entry point for a sampling job on one process or on every rank of a process group."""
from __future__ import annotations

from typing import Callable

import torch

from .attention_backend import preferred_attention
from .models import LoadedModel
from .parallel import ParallelConfig
from .sampling import SampleRequest, StepCallback, sample


class Cancelled(Exception):
    """The job was cancelled; raised on every rank at the same step boundary."""


def run_job(loaded: LoadedModel, req: SampleRequest, config: ParallelConfig | None = None,
            callback: StepCallback | None = None, should_cancel: Callable[[], bool] | None = None,
            step_end: Callable[[int], None] | None = None) -> torch.Tensor:
    """Sample `req`. With a config of world size > 1, call it on every rank of the default process group (same
    request everywhere); every rank returns the full result. `callback` and `should_cancel` are used on rank 0:
    a cancel is agreed by all ranks at the next step boundary and raises Cancelled everywhere. `step_end(i)` runs
    on every rank after its share of step i (0-based) is done (observers such as the redundancy analyser)."""
    config = config or ParallelConfig()
    device = next(loaded.adapter.model.parameters()).device
    with preferred_attention(device):  # cuDNN attention first on CUDA (or XDIT_ATTENTION); no-op elsewhere
        return _run(loaded, req, config, callback, should_cancel, step_end)


def _run(loaded: LoadedModel, req: SampleRequest, config: ParallelConfig, callback: StepCallback | None,
         should_cancel: Callable[[], bool] | None, step_end: Callable[[int], None] | None) -> torch.Tensor:
    if config.world_size == 1:
        def step(info):
            if step_end is not None:
                step_end(info.step - 1)
            if callback is not None:
                callback(info)
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cancelled after step {info.step}")

        return sample(loaded.adapter, req, tiny=loaded.tiny, callback=step)
    from .parallel.runner import parallel_sample

    return parallel_sample(loaded, req, config, callback, should_cancel, step_end)
