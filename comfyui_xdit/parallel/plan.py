"""The one interpreter of token plans (families/spec.py: TokenPlan), for sequence parallelism and PipeFusion alike.

`install(adapter, view)` puts forward hooks on the unmodified transformer at the plan's split and gather points:
every split point hands its tensor to the view, which keeps this rank's tokens of that stream (a contiguous,
balanced shard; under PipeFusion first the current patch's tokens); every gather point hands the local output to
the view, which puts it back together. The view also remembers each stream's full length in the forward in
progress, so the per-rank lengths of every attention's sequence are known without a collective.
"""
from __future__ import annotations

import fnmatch
import inspect
from typing import Callable, Protocol

import torch

from ..errors import ConfigError
from ..families.spec import Gather, Split, TokenPlan


def shard_sizes(n: int, parts: int) -> list[int]:
    """Contiguous, balanced shard lengths (the first n % parts shards get one more)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def shard_range(sizes: list[int], index: int) -> slice:
    start = sum(sizes[:index])
    return slice(start, start + sizes[index])


class TokenView(Protocol):
    def begin(self) -> None: ...                                              # a new forward starts
    def take(self, stream: str | tuple[str, ...], t: torch.Tensor, dim: int) -> torch.Tensor: ...  # this rank's part
    def sizes(self, stream: str) -> list[int]: ...                           # local lengths per sp rank
    def gather(self, t: torch.Tensor, spec: Gather) -> torch.Tensor: ...     # the whole output from local parts


class ShardView:
    """Sequence parallelism: each stream split into `parts` contiguous shards, this rank keeping shard `rank`."""

    def __init__(self, parts: int, rank: int, all_gather: Callable[[torch.Tensor, list[int], int], torch.Tensor]):
        self.parts, self.rank, self._all_gather = parts, rank, all_gather
        self.full: dict[str, int] = {}

    def begin(self) -> None:
        self.full = {}

    def record(self, stream: str, n: int) -> None:
        seen = self.full.setdefault(stream, n)
        if seen != n:
            raise ConfigError(f"token plan: the {stream} stream has {seen} tokens at one split point and {n} at "
                              "another")

    def take(self, stream: str | tuple[str, ...], t: torch.Tensor, dim: int) -> torch.Tensor:
        if not isinstance(stream, str):
            return take_joint(self, stream, t, dim, self.full)
        self.record(stream, t.shape[dim])
        sizes = self.sizes(stream)
        part = shard_range(sizes, self.rank)
        return t.narrow(dim, part.start, sizes[self.rank])

    def sizes(self, stream: str) -> list[int]:
        return shard_sizes(self.full.get(stream, 0), self.parts)

    def gather(self, t: torch.Tensor, spec: Gather) -> torch.Tensor:
        per_rank = [[self.sizes(s)[r] for s in spec.streams] for r in range(self.parts)]
        whole = self._all_gather(t, [sum(p) for p in per_rank], spec.dim)
        return regroup(whole, per_rank, spec.dim)


def take_joint(view: TokenView, streams: tuple[str, ...], t: torch.Tensor, dim: int,
               full: dict[str, int]) -> torch.Tensor:
    """A joint tensor (the streams one after another along `dim`, at their `full` lengths): each stream's part
    taken by the view as that stream, concatenated in the same order."""
    lengths = [full.get(s) for s in streams]
    if None in lengths or sum(lengths) != t.shape[dim]:
        known = ", ".join(f"{s} {n if n is not None else '?'}" for s, n in zip(streams, lengths))
        raise ConfigError(f"token plan: a joint {'+'.join(streams)} tensor has {t.shape[dim]} tokens, its streams "
                          f"hold {known} (each stream's length comes from an earlier split point)")
    return torch.cat([view.take(s, part, dim) for s, part in zip(streams, t.split(lengths, dim=dim))], dim=dim)


def regroup(t: torch.Tensor, per_rank: list[list[int]], dim: int) -> torch.Tensor:
    """Rank-major [r0: s0, s1, ...; r1: s0, s1, ...] along `dim` -> stream-major [s0 of every rank; s1 ...]."""
    if len(per_rank[0]) == 1:
        return t
    pieces = t.split([n for p in per_rank for n in p], dim=dim)
    streams = len(per_rank[0])
    return torch.cat([pieces[r * streams + s] for s in range(streams) for r in range(len(per_rank))], dim=dim)


def resolve(model: torch.nn.Module, pattern: str) -> list[tuple[str, torch.nn.Module]]:
    """Modules whose path matches a plan path ("" the model itself, "*" one path component; any fnmatch pattern
    within a component, e.g. "blocks.[0]" the first block only)."""
    if pattern == "":
        return [("", model)]
    return [(n, m) for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, pattern)
            and n.count(".") == pattern.count(".")]


def _matches(split: Split, t) -> bool:
    return isinstance(t, torch.Tensor) and (split.ndim is None or t.ndim == split.ndim)


def positions(module: torch.nn.Module) -> dict[str, int]:
    """Position of each forward parameter (for inputs passed positionally), from the class's forward: an instance's
    replacement (a skipped block's pass-through, taking *args) keeps the block's calling convention."""
    params = list(inspect.signature(type(module).forward).parameters)[1:]  # without self
    return {name: i for i, name in enumerate(params)}


def _input_hook(view: TokenView, splits: dict[str | int, Split], positions: dict[str, int]):
    def hook(module, args, kwargs):
        args = list(args)
        for key, split in splits.items():
            if isinstance(key, str) and key in kwargs:
                if _matches(split, kwargs[key]):
                    kwargs[key] = view.take(split.stream, kwargs[key], split.dim)
                continue
            i = key if isinstance(key, int) else positions.get(key)
            if i is not None and i < len(args) and _matches(split, args[i]):
                args[i] = view.take(split.stream, args[i], split.dim)
        return tuple(args), kwargs

    return hook


def _output_hook(view: TokenView, splits: dict[int | None, Split]):
    def hook(module, args, out):
        if None in splits:
            return view.take(splits[None].stream, out, splits[None].dim) if _matches(splits[None], out) else out
        out = list(out)
        for i, split in splits.items():
            if _matches(split, out[i]):
                out[i] = view.take(split.stream, out[i], split.dim)
        return tuple(out)

    return hook


def _gather_hook(view: TokenView, spec: Gather):
    def hook(module, args, out):
        return view.gather(out, spec) if _matches(Split("", spec.dim, spec.ndim), out) else out

    return hook


def install(model: torch.nn.Module, plan: TokenPlan, view: TokenView, gathers: bool = True) -> list:
    """Hooks for every split (and, with `gathers`, gather) point of the plan; returns their handles. A plan path
    that matches no module is an error (the plan does not fit this model)."""
    handles = [model.register_forward_pre_hook(lambda module, args: view.begin())]
    try:
        for path, splits in plan.inputs.items():
            for _, module in _resolved(model, path):
                handles.append(module.register_forward_pre_hook(
                    _input_hook(view, splits, positions(module)), with_kwargs=True))
        for path, splits in plan.outputs.items():
            for _, module in _resolved(model, path):
                handles.append(module.register_forward_hook(_output_hook(view, splits)))
        if gathers:
            for path, spec in plan.gathers.items():
                for _, module in _resolved(model, path):
                    handles.append(module.register_forward_hook(_gather_hook(view, spec)))
    except BaseException:
        remove(handles)
        raise
    return handles


def _resolved(model: torch.nn.Module, path: str) -> list[tuple[str, torch.nn.Module]]:
    found = resolve(model, path)
    if not found and not any(c in path for c in "*?["):  # a pattern may match nothing (a stage without those blocks)
        raise ConfigError(f"token plan: {type(model).__name__} has no module {path!r}")
    return found


def remove(handles: list) -> None:
    for h in handles:
        h.remove()


def attention_modules(model: torch.nn.Module, plan: TokenPlan) -> list[tuple[torch.nn.Module, tuple[str, ...]]]:
    """(module, streams of its sequence) for every self-attention module of the plan, in model order."""
    streams_of: dict[int, tuple[str, ...]] = {}
    for pattern, streams in plan.attention.items():
        for _, module in resolve(model, pattern):
            streams_of.setdefault(id(module), streams)
    return [(m, streams_of[id(m)]) for _, m in model.named_modules() if id(m) in streams_of]


def lengths(view: TokenView, streams: tuple[str, ...]) -> list[int]:
    """Tokens per sp rank of a sequence made of these streams' local parts."""
    per_stream = [view.sizes(s) for s in streams]
    return [sum(p[r] for p in per_stream) for r in range(len(per_stream[0]))]
