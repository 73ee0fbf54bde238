"""One entry point for a sampling job on one process or on every rank of a process group."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed

from .attention_backend import preferred_attention
from .compile import compiled_blocks
from .errors import Cancelled
from .models import LoadedModel
from .parallel import ParallelConfig
from .sampling import SampleRequest, StepCallback, StepInfo, sample

__all__ = ["Cancelled", "JobResult", "run_job"]


@dataclass
class JobResult:
    latents: torch.Tensor                    # ComfyUI convention [B, C, H/8, W/8], float32, on every rank
    reused_steps: list[int] = field(default_factory=list)   # 0-based steps the step cache reused
    comm: list[dict[str, int]] = field(default_factory=list)  # this rank's bytes sent per collective kind, per step


def run_job(loaded: LoadedModel, req: SampleRequest, config: ParallelConfig | None = None,
            callback: StepCallback | None = None, should_cancel: Callable[[], bool] | None = None,
            step_end: Callable[[int], None] | None = None) -> JobResult:
    """Sample `req`. With a config of world size > 1, call it on every rank of the default process group (same
    request everywhere); every rank returns the full result. `callback` and `should_cancel` are used on rank 0:
    a cancel is agreed by all ranks at the next step boundary and raises Cancelled everywhere. `step_end(i)` runs
    on every rank after its share of step i (0-based) is done (observers such as the redundancy analyser)."""
    config = config or ParallelConfig()
    reused: list[int] = []
    is_rank0 = config.world_size == 1 or torch.distributed.get_rank() == 0

    def on_step(info: StepInfo) -> None:
        if info.reused:
            reused.append(info.step - 1)
        if callback is not None and is_rank0:
            callback(info)

    device = next(loaded.adapter.model.parameters()).device
    # cuDNN attention first on CUDA (or XDIT_ATTENTION; no-op elsewhere); the blocks compiled when asked: the
    # parallel wrappers and hooks installed inside are in place before the first compiled call traces a block
    with preferred_attention(device), compiled_blocks(loaded.adapter, req.compile):
        if config.world_size == 1:
            return JobResult(_serial(loaded, req, on_step, should_cancel, step_end), reused)
        from .parallel.runner import parallel_sample

        latents, comm = parallel_sample(loaded, req, config, on_step, should_cancel, step_end)
        return JobResult(latents, reused, comm)


def _serial(loaded: LoadedModel, req: SampleRequest, callback: StepCallback,
            should_cancel: Callable[[], bool] | None, step_end: Callable[[int], None] | None) -> torch.Tensor:
    def step(info: StepInfo) -> None:
        if step_end is not None:
            step_end(info.step - 1)
        callback(info)
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled after step {info.step}")

    return sample(loaded.adapter, req, tiny=loaded.tiny, callback=step)
