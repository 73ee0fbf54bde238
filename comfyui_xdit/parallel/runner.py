"""Sampling on a device mesh: data parallel over the batch, CFG branches on the two cfg halves, and sequence
parallelism (Ulysses x Ring) inside each model call. Every rank ends with the full result."""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
import torch.distributed as dist

from ..cache import job_cache
from ..context_cache import context_cache
from ..errors import Cancelled, ConfigError
from ..sampling import PreparedJob, SampleRequest, StepCallback, finish, prepare, run_loop
from .config import ParallelConfig, heads_advice
from .mesh import ParallelMesh, get_mesh
from .sequence import sequence_parallel, shard_range, shard_sizes
from .shard import sharded_job

def check_model_fit(config: ParallelConfig, adapter, req: SampleRequest) -> None:
    """Checks that depend on the model and the request; identical on every rank, before any collective."""
    heads = adapter.num_heads
    if heads % config.ulysses:
        raise ConfigError(f"the model has {heads} attention heads, not divisible by the Ulysses degree "
                          f"{config.ulysses} ({heads_advice(heads)})")
    adapter.check_request(req, config)
    tokens = adapter.image_tokens(req.height, req.width, req.frames)
    if config.sp > tokens:
        raise ConfigError(f"{req.height}x{req.width} has {tokens} image tokens, fewer than the sequence-parallel "
                          f"degree {config.sp} (ring x ulysses)")
    if config.cfg == 2 and not adapter.spec.cond.negative:
        raise ConfigError(f"cfg parallel is not available for {adapter.family}: it takes no negative prompt (no true "
                          "classifier-free guidance)")
    if config.cfg == 2 and req.cfg == 1.0:
        raise ConfigError("cfg parallel needs classifier-free guidance: a negative conditioning and cfg scale != 1")
    if config.dp > req.batch_size:
        raise ConfigError(f"data parallel degree {config.dp} is larger than the batch size {req.batch_size}")
    if config.pipefusion > 1 and getattr(adapter.model, "_xdit_fsdp", None) is not None:
        raise ConfigError("this model's weights are sharded (shard degree); load it again to run pipefusion")
    if config.pipefusion > 1:
        from .pipefusion import check_pipefusion

        check_pipefusion(config, adapter, req.height, req.width, adapter.latent_frames(req.frames))


def _local_job(job: PreparedJob, batch: slice) -> PreparedJob:
    neg = None if job.negative is None else job.negative.select(batch)
    return PreparedJob(job.x[batch], job.schedule, job.positive.select(batch), neg, job.cfg, job.cache, job.combine)


def parallel_sample(loaded, req: SampleRequest, config: ParallelConfig, callback: StepCallback | None = None,
                    should_cancel: Callable[[], bool] | None = None, step_end: Callable[[int], None] | None = None
                    ) -> tuple[torch.Tensor, list[dict[str, int]]]:
    """The job on every rank of the mesh: (latents in ComfyUI's convention, this rank's bytes sent per collective
    kind for each step). `callback` gets every step on every rank."""
    adapter = loaded.adapter
    config.validate(dist.get_world_size())
    check_model_fit(config, adapter, req)
    job = prepare(adapter, req, loaded.tiny)  # identical on every rank: the same seed and inputs
    device = job.x.device
    pm = get_mesh(config, device.type)

    batch_sizes = shard_sizes(req.batch_size, config.dp)
    local = _local_job(job, shard_range(batch_sizes, pm.rank("dp")))
    predict = _cfg_predictor(adapter, local, pm)
    is_rank0 = dist.get_rank() == 0

    reports: list[dict[str, int]] = []
    pm.comm.reset()
    contexts = context_cache(adapter.model, adapter.spec.context_modules, req.context_cache)
    if config.pipefusion > 1:
        with contexts:
            x = _pipefusion(adapter, local, pm, callback, should_cancel, reports, step_end)
        if config.dp > 1:
            x = pm.comm.all_gather(x, batch_sizes, pm.group("dp"), dim=0, kind="dp_gather")
        return finish(adapter, job.schedule, x, job.positive), reports

    def on_step(info) -> None:
        reports.append(pm.comm.reset())
        if step_end is not None:
            step_end(info.step - 1)
        if callback is not None:
            callback(info)
        flag = torch.tensor([1.0 if (is_rank0 and should_cancel is not None and should_cancel()) else 0.0],
                            device=device)
        if pm.comm.all_reduce_max(flag).item() > 0:
            raise Cancelled(f"cancelled after step {info.step}")

    sp = sequence_parallel(adapter, pm) if config.sp > 1 else contextlib.nullcontext()
    # the cache's decision: the positive branch's measurement summed over every rank (cfg's negative half adds 0)
    contributes = pm.rank("cfg") == 0 and pm.rank("replica") == 0
    cache = job_cache(adapter, local.cache, agree=pm.comm.all_reduce_sum, contributes=contributes)
    with contexts, sharded_job(adapter, pm), sp, cache as block_cache:
        x = run_loop(local, predict, on_step, block_cache)
    if config.dp > 1:
        x = pm.comm.all_gather(x, batch_sizes, pm.group("dp"), dim=0, kind="dp_gather")
    return finish(adapter, job.schedule, x, job.positive), reports


def _pipefusion(adapter, job: PreparedJob, pm: ParallelMesh, callback, should_cancel, reports, step_end
                ) -> torch.Tensor:
    from ..sampling import StepInfo
    from .pipefusion import PipelineStopped, pipefusion_loop

    if pm.config.cfg == 2:
        branches = [job.positive if pm.rank("cfg") == 0 else job.negative]
    else:
        branches = [job.positive] + ([job.negative] if job.negative is not None else [])
    is_rank0 = dist.get_rank() == 0
    total = len(job.schedule.timesteps)
    clock = [time.perf_counter()]

    def on_step(i: int, x: torch.Tensor, reused: bool = False) -> None:
        reports.append(pm.comm.reset())
        if step_end is not None:
            step_end(i)
        now = time.perf_counter()
        if callback is not None:
            callback(StepInfo(i + 1, total, now - clock[0], x, reused))
        clock[0] = now

    def stop_requested() -> bool:
        flag = torch.tensor([1.0 if (is_rank0 and should_cancel is not None and should_cancel()) else 0.0],
                            device=job.x.device)
        return pm.comm.all_reduce_max(flag, pm.group("stage")).item() > 0

    try:
        return pipefusion_loop(adapter, job, pm, on_step, branches, stop_requested)
    except PipelineStopped as e:
        raise Cancelled(str(e)) from None


def _cfg_predictor(adapter, job: PreparedJob, pm: ParallelMesh):
    """The guided prediction; with cfg parallel each half computes one branch and they swap results."""
    if pm.config.cfg == 1:
        from ..sampling import guided

        return lambda x, t: guided(adapter, x, t, job)
    branch = job.positive if pm.rank("cfg") == 0 else job.negative
    group = pm.group("cfg")

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mine = adapter.predict(x, t, branch).float()
        both = pm.comm.all_gather(mine[None], [1, 1], group, dim=0, kind="cfg")
        return job.guide(both[0], both[1])

    return predict
