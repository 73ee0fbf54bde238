"""Weight sharding for inference with torch's FSDP2 (`fully_shard`): each transformer block, and the rest of the
model (embedders, final layer) as the root, is split over the ranks of the mesh's shard group.

Rule: `shard N` splits the weights over N ranks that already split the work, the innermost N ranks of the mesh
(Ulysses, then Ring, PipeFusion, CFG, DP): N must be the product of the innermost degrees (ulysses 2: 2;
cfg 2 x ulysses 2: 2 or 4). It adds no ranks. Given alone (every other degree 1), shard N runs on N ranks that
all compute the same step ("replica" mesh dim): memory pooling without a speed-up. Not with PipeFusion, whose
stages hold different blocks (there is nothing common to split) and call each block once per patch.

Every parameter is split along its first dimension in FSDP2's layout (torch.chunk: ceil(rows / N) rows per rank,
the last ranks may hold fewer or none); `kept_slice` says which rows a rank keeps. A block's weights are gathered
before its forward and freed after it (or kept, `shard_keep`); the next block's gather is issued first
(`set_modules_to_forward_prefetch`). All-gathers are counted in the job's comm report as "fsdp_gather".
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather
from torch.distributed.tensor import DTensor

from ..errors import ConfigError
from .comm import Comm
from .config import ParallelConfig, check_shard_degree, shard_degrees  # noqa: F401 (re-exported)

GATHER_KIND = "fsdp_gather"


def shard_dims(config: ParallelConfig, dims: tuple[str, ...]) -> tuple[str, ...]:
    """The innermost mesh dims (of `dims`, outermost first) whose degrees multiply to the shard degree."""
    product = 1
    for i in range(len(dims) - 1, -1, -1):
        size = config.replicas if dims[i] == "replica" else getattr(config, dims[i])
        product *= size
        if product == config.shard:
            return dims[i:]
    raise ConfigError(f"no innermost mesh dimensions multiply to the shard degree {config.shard}")


def kept_slice(full_shape: tuple[int, ...] | torch.Size, rank: int, degree: int) -> slice | None:
    """The rows (dim 0) of a parameter of `full_shape` that member `rank` of a shard group of `degree` keeps
    (FSDP2's torch.chunk layout); None when it keeps none (its local shard is empty padding)."""
    if degree == 1:
        return slice(0, full_shape[0])
    rows = full_shape[0]
    per = math.ceil(rows / degree)
    start = rank * per
    return slice(start, min(start + per, rows)) if start < rows else None


class CountingAllGather(DefaultAllGather):
    """FSDP2's all-gather, with the bytes this rank sends added to the current job's Comm. float8 buffers (a
    group of fp8-stored weights only) travel as bytes: gloo has no float8 types."""

    def __init__(self) -> None:
        self.comm: Comm | None = None

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        if self.comm is not None:
            self.comm.sent[GATHER_KIND] += input_tensor.numel() * input_tensor.element_size() * (
                dist.get_world_size(group) - 1)
        if input_tensor.dtype.itemsize == 1 and input_tensor.is_floating_point():
            output_tensor, input_tensor = output_tensor.view(torch.uint8), input_tensor.view(torch.uint8)
        return super().__call__(output_tensor, input_tensor, group, async_op)


@dataclass
class ShardLayout:
    degree: int
    ranks: tuple[int, ...]   # global ranks of this rank's shard group
    keep: bool               # gathered weights kept after the forward (this job's choice)
    groups: list[torch.nn.Module]  # the FSDP modules: blocks in execution order, then the root
    counter: CountingAllGather

    def kept_slice(self, full_shape: tuple[int, ...]) -> slice | None:
        """The rows of a parameter of `full_shape` this rank keeps."""
        return kept_slice(full_shape, self.ranks.index(dist.get_rank()), self.degree)


def block_chains(adapter) -> list[list[torch.nn.Module]]:
    """The model's blocks as runs executed one after the other: consecutive blocks join a run when their block
    lists hang off the same module (Flux: double then single blocks); Wan 2.2's two experts make a run each."""
    parent = {id(c): m for m in adapter.model.modules() for c in m.children()}

    def owner(block: torch.nn.Module):
        return parent.get(id(parent.get(id(block))))

    chains: list[list[torch.nn.Module]] = []
    for bl in adapter.plan.blocks:
        for block in getattr(adapter.model, bl.name):
            if chains and owner(chains[-1][-1]) is owner(block):
                chains[-1].append(block)
            else:
                chains.append([block])
    return chains


def shard_model(adapter, pm) -> ShardLayout:
    """Shard the model over `pm`'s shard group (idempotent for the same layout; another layout needs a reload)."""
    model = adapter.model
    config = pm.config
    ranks = tuple(dist.get_process_group_ranks(pm.group("shard")))
    keep = bool(config.shard_keep)
    layout: ShardLayout | None = getattr(model, "_xdit_fsdp", None)
    if layout is not None:
        if (layout.degree, layout.ranks) != (config.shard, ranks):
            raise ConfigError(f"this model was sharded for shard {layout.degree} over ranks {list(layout.ranks)}; "
                              f"load it again for shard {config.shard}")
        return layout
    if getattr(model, "_xdit_stage", None) is not None:
        raise ConfigError("this model was split into pipefusion stages; load it again to shard it")
    chains = block_chains(adapter)
    reshard = not keep
    for chain in chains:
        for block in chain:
            fully_shard(block, mesh=pm.shard_mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=pm.shard_mesh, reshard_after_forward=reshard)
    for chain in chains:  # issue the next block's all-gather before this block computes
        for block, nxt in zip(chain, chain[1:]):
            block.set_modules_to_forward_prefetch([nxt])
    groups = [b for chain in chains for b in chain] + [model]
    counter = CountingAllGather()
    for module in groups:
        module.set_custom_all_gather(counter)
    counter.comm = pm.comm
    layout = ShardLayout(config.shard, ranks, keep, groups, counter)
    model._xdit_fsdp = layout
    return layout


@contextlib.contextmanager
def sharded_job(adapter, pm) -> Iterator[ShardLayout | None]:
    """For one job: shard the model if the job has a shard degree (a model an earlier job sharded keeps its
    layout under a job without one: every rank still calls each block in step, so the gathers pair up), count
    its gathers in the job's comm report, and free weights kept gathered (`shard_keep`) when the job ends."""
    layout = shard_model(adapter, pm) if pm.config.shard > 1 else sharded_layout(adapter.model)
    if layout is not None:
        layout.counter.comm = pm.comm
        keep = bool(pm.config.shard_keep)
        if layout.keep != keep:  # this job's choice (an earlier job's may differ)
            for module in layout.groups:
                module.set_reshard_after_forward(not keep, recurse=False)
            layout.keep = keep
    try:
        yield layout
    finally:
        if layout is not None and layout.keep:
            for module in layout.groups:
                module.reshard()


@contextlib.contextmanager
def full_size_stand_ins(module: torch.nn.Module) -> Iterator[None]:
    """While active, `module`'s sharded parameters are replaced by zeros of their full shape (for checks that run
    a submodule outside the model's forward, e.g. the attention processor probe); restored afterwards."""
    swapped = []
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if isinstance(p, DTensor):
                swapped.append((sub, name, p))
                sub._parameters[name] = torch.nn.Parameter(
                    torch.zeros(p.shape, dtype=p.dtype, device=p.to_local().device), requires_grad=False)
    try:
        yield
    finally:
        for sub, name, p in swapped:
            sub._parameters[name] = p


def sharded_layout(model: torch.nn.Module) -> ShardLayout | None:
    return getattr(model, "_xdit_fsdp", None)


def _own_parameters(module: torch.nn.Module, others: set[int]) -> list[torch.Tensor]:
    """Parameters of `module` that no other FSDP module in `others` (by id) manages."""
    skip = {id(p) for m in module.modules() if id(m) in others and m is not module for p in m.parameters()}
    return [p for p in module.parameters() if id(p) not in skip]


def gather_volume(layout: ShardLayout) -> dict[int, int]:
    """Analytic bytes this rank sends to gather each FSDP module once (by module id): its parameters' padded
    shards, ceil(rows / N) rows each, to the N - 1 others."""
    n = layout.degree
    others = {id(m) for m in layout.groups}
    out = {}
    for module in layout.groups:
        total = 0
        for p in _own_parameters(module, others):
            shape = p.shape
            total += math.ceil(shape[0] / n) * math.prod(shape[1:]) * p.element_size()
        out[id(module)] = total * (n - 1)
    return out


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes this process holds (a sharded parameter's local shard)."""
    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total


def fill_local_shards(model: torch.nn.Module, read_rows: Callable[[str, slice], torch.Tensor],
                      layout: ShardLayout) -> None:
    """Copy into every sharded parameter the rows this rank keeps, as `read_rows(name, rows)` returns them (for
    a loader that reads only those rows of each tensor). Parameter names are the model's unsharded names."""
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        rows = layout.kept_slice(tuple(p.shape))
        if rows is not None and local.numel():
            local[: rows.stop - rows.start].copy_(read_rows(name, rows))


__all__ = ["ShardLayout", "check_shard_degree", "fill_local_shards", "gather_volume", "kept_slice",
           "local_parameter_bytes", "shard_model", "shard_degrees", "sharded_layout"]
