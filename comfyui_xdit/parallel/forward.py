"""One transformer forward per call (ComfyUI's samplers drive the loop): the batch ComfyUI forms (cond and uncond
rows together, or larger batches) split over DP and the CFG halves, Ulysses x Ring inside the forward, the weights
FSDP2-sharded over the shard group (every rank of it calls the model on every forward). Every rank ends with the
whole output. PipeFusion needs the whole loop (its stale K/V span steps) and is refused here. The step cache spans
the calls of a run (comfyui_xdit.forward_cache): the caller keeps the run's RunCache and says where each call sits."""
from __future__ import annotations

import contextlib

from typing import Mapping, Sequence

import torch

from ..adapters import Conditioning, FamilyAdapter
from ..cache import CacheSettings
from ..errors import ConfigError, XDiTError
from ..forward_cache import RunCache, RunStep
from ..skip_layers import skipped_blocks
from .config import ParallelConfig, heads_advice
from .mesh import get_mesh
from .sequence import sequence_parallel, shard_range, shard_sizes
from .shard import sharded_job


def _tokens(adapter: FamilyAdapter, x: torch.Tensor) -> int:
    frames = x.shape[2] if x.ndim == 5 else 1
    return frames * (x.shape[-2] // adapter.patch) * (x.shape[-1] // adapter.patch)


def check_forward(adapter: FamilyAdapter, x: torch.Tensor, t: torch.Tensor, config: ParallelConfig) -> None:
    """Refusals that need the call's shapes; identical on every rank, before any collective."""
    config.validate()
    if config.pipefusion > 1:
        raise ConfigError("PipeFusion needs the whole sampling loop: use Parallel Sampler for pipefusion_degree > 1 "
                          "(Parallel DiT Model runs Ulysses, Ring, CFG and DP per forward)")
    want = 5 if adapter.latent.dims == 3 else 4
    if x.ndim != want:
        raise XDiTError(f"{adapter.family} forward takes latents of {want} dimensions, got {list(x.shape)}")
    if x.shape[1] != adapter.latent_channels:
        raise XDiTError(f"{adapter.family} forward takes {adapter.latent_channels} channels, got {x.shape[1]}")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise XDiTError(f"timestep must have one value per sample ([{x.shape[0]}]), got {list(t.shape)}")
    down = adapter.latent.downscale
    adapter.check_size(x.shape[-2] * down, x.shape[-1] * down)
    if config.ulysses > 1 and adapter.num_heads % config.ulysses:
        raise ConfigError(f"the model has {adapter.num_heads} attention heads, not divisible by the Ulysses degree "
                          f"{config.ulysses} ({heads_advice(adapter.num_heads)})")
    if config.sp > _tokens(adapter, x):
        raise ConfigError(f"a latent of {list(x.shape)} has {_tokens(adapter, x)} image tokens, fewer than the "
                          f"sequence-parallel degree {config.sp}")


def run_cache(adapter: FamilyAdapter, settings: CacheSettings | None, steps: int, config: ParallelConfig
              ) -> RunCache:
    """A sampling run's caches for forward_call with this config (made on every rank alike): the context cache,
    and the step cache with `settings`. Its decision sums the measured rows over every rank; ranks that repeat
    another's work (shard alone) add nothing."""
    if config.world_size == 1 or settings is None:
        return RunCache(adapter, settings, steps, None)
    pm = get_mesh(config, adapter.device.type)
    return RunCache(adapter, settings, steps, pm.comm.all_reduce_sum, contributes=pm.rank("replica") == 0)


@torch.no_grad()
def forward_call(adapter: FamilyAdapter, x: torch.Tensor, t: torch.Tensor, c: Conditioning,
                 config: ParallelConfig | None = None, sent: dict[str, int] | None = None,
                 skip: Mapping[str, Sequence[int]] | None = None,
                 run: tuple[RunCache, RunStep | None] | None = None) -> torch.Tensor:
    """The model's output for model-space latents x (ComfyUI's layout of the family: a frame axis of 1 where its
    latent format has one) at engine timesteps t [B], float32, same layout as x. With a config of world size > 1,
    call it on every rank of the default process group with the same arguments; `sent`, when given, receives the
    bytes this rank sent to other ranks, per kind of exchange. `skip`: ComfyUI block kind -> indices of blocks that
    pass their streams through in this call (SkipLayerGuidance; comfyui_xdit.skip_layers). `run`: the caches of
    this call's sampling run (run_cache) and, with its step cache, where the call sits in the run."""
    config = config or ParallelConfig()
    one_frame = adapter.latent.frame_axis and x.ndim == 5 and x.shape[2] == 1
    xm = (x[:, :, 0] if one_frame else x).to(adapter.device, torch.float32)
    t = t.to(adapter.device, torch.float32)
    check_forward(adapter, xm, t, config)
    b = xm.shape[0]
    adapter.check_conditioning(c, b)
    c = adapter.expand(c, b)
    if run is not None:
        run[0].check(run[1], b)
        if skip and run[1] is not None:
            raise ConfigError("the step cache and SkipLayerGuidance do not compose on Parallel DiT Model: a skipped "
                              "block would change the reused residual")
    with skipped_blocks(adapter, skip):  # refused here, on every rank alike, before any collective
        return _call(adapter, xm, t, c, config, sent, one_frame, run)


def _call(adapter: FamilyAdapter, xm: torch.Tensor, t: torch.Tensor, c: Conditioning, config: ParallelConfig,
          sent: dict[str, int] | None, one_frame: bool, run: tuple[RunCache, RunStep | None] | None
          ) -> torch.Tensor:
    b = xm.shape[0]

    def cached(rows: range) -> contextlib.AbstractContextManager:
        return run[0].call(run[1], rows) if run is not None else contextlib.nullcontext()

    if config.world_size == 1:
        with cached(range(b)):
            out = adapter.predict(xm, t, c).float()
    else:
        pm = get_mesh(config, xm.device.type)
        dp_sizes = shard_sizes(b, config.dp)
        dp_part = shard_range(dp_sizes, pm.rank("dp"))
        cfg_sizes = shard_sizes(dp_sizes[pm.rank("dp")], config.cfg)
        cfg_part = shard_range(cfg_sizes, pm.rank("cfg"))
        mine = slice(dp_part.start + cfg_part.start, dp_part.start + cfg_part.stop)
        # Every rank enters sequence_parallel, rows or none: its processor check agrees over the whole group.
        # A whole SP group has rows or none, so the forward's own collectives stay within the groups that run it;
        # a shard group wider than the SP group also spans groups with rows, whose weight gathers need every
        # member: a group without rows runs its first row and drops the result.
        shards = sharded_job(adapter, pm) if config.shard > 1 else contextlib.nullcontext()
        with shards, sequence_parallel(adapter, pm) if config.sp > 1 else contextlib.nullcontext():
            if mine.stop > mine.start:
                with cached(range(mine.start, mine.stop)):
                    out = adapter.predict(xm[mine], t[mine], c.select(mine)).float()
            else:
                if config.shard > config.sp:
                    with cached(range(0)):
                        adapter.predict(xm[:1], t[:1], c.select(slice(0, 1)))
                elif run is not None:
                    run[0].abstain(run[1])
                out = xm.new_zeros((0, *xm.shape[1:]))
        if config.cfg > 1:
            out = pm.comm.all_gather(out, cfg_sizes, pm.group("cfg"), dim=0, kind="cfg")
        if config.dp > 1:
            out = pm.comm.all_gather(out, dp_sizes, pm.group("dp"), dim=0, kind="dp_gather")
        if sent is not None:
            sent.update(pm.comm.reset())
    return out.unsqueeze(2) if one_frame else out
