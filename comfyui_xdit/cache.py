"""First-block residual cache: skip the remaining transformer blocks on steps where the first blocks barely changed.

Every step computes the first block(s). Their image-stream residual (output minus input) is compared with the one
of the last fully computed step: relative change = sum|r - r_ref| / sum|r_ref|. Below the threshold the other
blocks are not run and the residual they added at the last computed step is added instead; otherwise they run
and both residuals are refreshed. Warm-up steps always compute, reuses in a row can be capped, and a static
per-step mask (from an analyser profile) can replace the threshold.

The decision is the same on every rank. In one model call it is made from the positive branch's first-call
measurement, all-reduced over the world (sequence-parallel shards, data-parallel batches; the negative half of
cfg parallel contributes zeros), and a serially computed negative branch reuses it. Under PipeFusion, stage 0
decides at the start of each step from the previous step's measurement (the only one every stage can have
before the step's patches start) and passes the decision down the pipeline; each stage caches the residual of
its own blocks per patch, and the stages' residuals add up to the whole model's.

Blocks are adapted by replacing each block's `forward` on the instance for the job (its hooks still run); the
transformer's own forward is untouched.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

from .errors import XDiTError
from .parallel.plan import positions as plan_positions


@dataclass
class CacheSettings:
    threshold: float = 0.0          # reuse when the first blocks' residual changed less than this (relative)
    warmup: int = 1                 # first steps always computed
    max_consecutive: int = 0        # most reuses in a row (0: no limit)
    first_blocks: int = 1           # blocks always computed
    mask: list[bool] | None = None  # per step: True computes, False reuses (replaces the threshold)

    def check(self, steps: int, blocks: int) -> None:
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise XDiTError(f"cache threshold must be a number >= 0, got {self.threshold!r}")
        for name in ("warmup", "max_consecutive", "first_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise XDiTError(f"cache {name} must be an integer >= 0, got {value!r}")
        if self.warmup < 1:
            raise XDiTError("cache warmup must be >= 1: the first step has nothing to reuse")
        if not 1 <= self.first_blocks < blocks:
            raise XDiTError(f"cache first_blocks must be between 1 and {blocks - 1} (the model has {blocks} "
                            f"blocks), got {self.first_blocks}")
        if self.mask is not None and len(self.mask) != steps:
            raise XDiTError(f"cache mask has {len(self.mask)} entries for {steps} steps")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> "CacheSettings":
        if not isinstance(d, dict):
            raise XDiTError("cache settings must be an object")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise XDiTError(f"unknown cache settings {sorted(unknown)}")
        mask = d.get("mask")
        if mask is not None:
            if not isinstance(mask, list) or not all(isinstance(m, (bool, int)) for m in mask):
                raise XDiTError("cache mask must be a list of booleans (true: compute the step)")
            mask = [bool(m) for m in mask]
        return cls(**{**d, "mask": mask})


def parse_mask(text: str) -> list[bool]:
    """'1,1,0,1' (or '1101') -> [True, True, False, True]."""
    chars = [c for c in text.replace(",", "").replace(" ", "")]
    if not chars or any(c not in "01" for c in chars):
        raise XDiTError(f"cache mask must be 0s and 1s (1: compute the step), got {text!r}")
    return [c == "1" for c in chars]


def mask_from_curve(curve: list[float], threshold: float, warmup: int = 1, max_consecutive: int = 0) -> list[bool]:
    """Static mask from a per-step change curve (curve[t]: relative change from step t-1 to t, as the analyser
    reports it): reuse a step while the change accumulated since the last computed step stays under threshold."""
    mask, acc, run = [], 0.0, 0
    for t, c in enumerate(curve):
        acc += 0.0 if not math.isfinite(c) else c
        reuse = t >= warmup and acc < threshold and not (max_consecutive and run >= max_consecutive)
        mask.append(not reuse)
        run = run + 1 if reuse else 0
        if not reuse:
            acc = 0.0
    return mask


def mask_from_profile(path: str, threshold: float, steps: int, warmup: int = 1, max_consecutive: int = 0,
                      kind: str = "residual") -> list[bool]:
    """Static mask from an analyser profile.json: its per-step curve of `kind` (mean over prompts and layers),
    resampled to `steps` if the profile was taken with another step count."""
    try:
        with open(path) as f:
            profile = json.load(f)
        curve = profile["curves"][kind]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise XDiTError(f"cannot read a per-step '{kind}' curve from profile {path}: {e}") from None
    if len(curve) != steps:  # relative change per step scales with the step size: rescale by step count
        scale = len(curve) / steps
        curve = [0.0] + [curve[min(len(curve) - 1, max(1, round(t * scale)))] * scale for t in range(1, steps)]
    return mask_from_curve([float(c) if c is not None else float("nan") for c in curve], threshold, warmup,
                           max_consecutive)


@dataclass
class StepPolicy:
    """The reuse rule; every rank applies it to the same inputs and so reaches the same decisions."""

    settings: CacheSettings
    warmup: int                       # steps always computed (settings.warmup, or more under PipeFusion)
    run: int = 0                      # reuses in a row so far
    computed_once: bool = False
    reused: list[int] = field(default_factory=list)

    def measures(self, step: int) -> bool:
        """Whether the decision for `step` needs the all-reduced measurement."""
        return self.settings.mask is None and step >= self.warmup and self.computed_once

    def decide(self, step: int, rel: float | None) -> bool:
        s = self.settings
        reuse = step >= self.warmup and self.computed_once
        if reuse:
            reuse = (not s.mask[step]) if s.mask is not None else (rel is not None and rel < s.threshold)
        if reuse and s.max_consecutive and self.run >= s.max_consecutive:
            reuse = False
        self.run = self.run + 1 if reuse else 0
        if reuse:
            self.reused.append(step)
        else:
            self.computed_once = True
        return reuse


def _stream_in(key: str | int, position: int, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A block's stream input, given by name (or position) or passed positionally."""
    if isinstance(key, str) and key in kwargs:
        return kwargs[key]
    i = key if isinstance(key, int) else position
    return args[i] if i < len(args) else None


class BlockCache:
    """The blocks this process runs, with the cache in their forwards. `first` of them (0 on later PipeFusion
    stages) always compute and are measured; the rest are reused as one span.

    Slots keep residuals apart per model call: the call index within the step (serial CFG runs two), or under
    PipeFusion (branch, patch) set by the loop. `agree(t)` sums a tensor over every rank (None: one process);
    `contributes`: whether this process's first call of a step is the measured branch.
    """

    def __init__(self, adapter, blocks: list[torch.nn.Module], settings: CacheSettings, first: int,
                 agree: Callable[[torch.Tensor], torch.Tensor] | None = None, contributes: bool = True,
                 pipelined: bool = False, warmup: int | None = None):
        self.adapter, self.blocks, self.first = adapter, blocks, first
        self.policy = StepPolicy(settings, max(settings.warmup, warmup or 0))
        self.agree, self.contributes, self.pipelined = agree, contributes, pipelined
        self.step, self.call, self.slot = 0, 0, None
        self.reuse = False
        self.ref: dict = {}      # slot -> first blocks' residual at the last computed step
        self.res: dict = {}      # slot -> the span's residual at the last computed step
        self.acc: torch.Tensor | None = None  # pipelined: (sum|r - ref|, sum|ref|) of this step's patches
        self.rows: torch.Tensor | None = None  # the measured rows of this call's batch (None: all of them)
        self.fresh = False       # this call computes whatever was decided (its slot has nothing to reuse)
        self._block0_in = self._span_in = None
        self.device = next(blocks[0].parameters()).device

    @property
    def reused(self) -> list[int]:
        return self.policy.reused

    # --- the job's step boundaries ---
    def end_step(self) -> None:
        self.step += 1
        self.call = 0

    def decide_ahead(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> bool:
        """PipeFusion stage 0, before step `self.step`: decide from the previous step's measurement."""
        rel = None
        if self.policy.measures(self.step):
            acc = self.acc if self.acc is not None else torch.zeros(2, dtype=torch.float64, device=self.device)
            num, den = (reduce(acc) if reduce is not None else acc).tolist()  # the one host sync of the step
            rel = num / den if den > 0 else None
        self.acc = None
        self.reuse = self.policy.decide(self.step, rel)
        return self.reuse

    def follow(self, reuse: bool) -> None:
        """Later PipeFusion stages: take the decision stage 0 made for this step."""
        self.reuse = reuse
        if reuse:
            self.policy.reused.append(self.step)

    # --- the blocks ---
    @contextlib.contextmanager
    def installed(self) -> Iterator["BlockCache"]:
        before = [block.__dict__.get("forward") for block in self.blocks]  # a compiled forward (compile.py)
        for j, block in enumerate(self.blocks):
            block.forward = self._make_forward(j, block.forward, self.adapter.block_list(block))
        try:
            yield self
        finally:
            for block, forward in zip(self.blocks, before):
                if forward is None:
                    del block.forward  # back to the class's forward
                else:
                    block.forward = forward

    def _make_forward(self, j: int, original: Callable, blocks) -> Callable:
        """The block's forward with the cache; `blocks`: its declared list (which inputs are its streams, in which
        order it returns them). The cache follows the main stream; a reused block passes the others through.
        Residuals are taken in the layout of the block that ends them: a span from separate image and text streams
        to a joint one (e.g. double then single blocks) starts from the streams joined as the joint one is."""
        last = len(self.blocks) - 1
        names = [key for key, _ in blocks.inputs]
        main_streams = blocks.inputs[0][1]
        pos = plan_positions(self.blocks[j])

        def inputs(args, kwargs) -> list:
            return [_stream_in(k, pos.get(k, i) if isinstance(k, str) else k, args, kwargs)
                    for i, k in enumerate(names)]

        def by_streams(values) -> dict:
            return {streams: v for (_, streams), v in zip(blocks.inputs, values) if v is not None}

        def forward(*args, **kwargs):
            key = self.slot if self.pipelined else self.call
            if j == 0:
                self._block0_in = by_streams(inputs(args, kwargs))
            if j < self.first:
                out = original(*args, **kwargs)
                if j == self.first - 1:
                    main, second = self.adapter.block_streams(out, blocks)
                    self._after_first(main - _joined(self._block0_in, main_streams), key)
                    self._span_in = by_streams((main, second))
                    if j == last:
                        self.call += 1
                return out
            if j == self.first:
                self._span_in = by_streams(inputs(args, kwargs))
            if self.reuse and not self.fresh:
                streams = inputs(args, kwargs)
                if j == last:
                    streams[0] = streams[0] + self.res[key]
                    self.call += 1
                return streams[0] if blocks.outputs is None else tuple(streams[i] for i in blocks.outputs)
            out = original(*args, **kwargs)
            if j == last:
                self.res[key] = self.adapter.block_streams(out, blocks)[0] - _joined(self._span_in, main_streams)
                self.call += 1
            return out

        return forward

    def _after_first(self, r: torch.Tensor, key) -> None:
        ref = self.ref.get(key)
        measured = self.contributes and ref is not None and ref.shape == r.shape and not self.fresh
        if measured and self.rows is not None:
            r_m, ref_m = r[self.rows], ref[self.rows]
            measured = r_m.shape[0] > 0
        else:
            r_m, ref_m = r, ref
        if self.pipelined:
            if measured and key[0] == 0:
                part = torch.stack([(r_m - ref_m).abs().sum(), ref_m.abs().sum()]).double()
                self.acc = part if self.acc is None else self.acc + part
        elif self.call == 0:  # the step's first call decides for all its calls
            self._decide(torch.stack([(r_m - ref_m).abs().sum(), ref_m.abs().sum()]).double() if measured else None)
        if not self.reuse or self.fresh:
            self.ref[key] = r

    def _decide(self, vals: torch.Tensor | None) -> None:
        """The step's decision from this process's (sum|r - ref|, sum|ref|), None: nothing measured here."""
        rel = None
        if self.policy.measures(self.step):
            if vals is None:
                vals = torch.zeros(2, dtype=torch.float64, device=self.device)
            if self.agree is not None:
                vals = self.agree(vals)
            num, den = vals.tolist()  # the one host sync of the step
            rel = num / den if den > 0 else None
        self.reuse = self.policy.decide(self.step, rel)

    def abstain(self) -> None:
        """A process that runs no rows in this call: it joins the step's decision (measuring nothing), so that
        every process keeps the same policy and the same collectives."""
        if not self.pipelined and self.call == 0:
            self._decide(None)
        self.call += 1


def _joined(by_streams: dict[tuple[str, ...], torch.Tensor], streams: tuple[str, ...]) -> torch.Tensor:
    """The tensor of `streams` (one stream, or a joint stream in this order) from tensors recorded per stream
    tuple: itself, or its streams' tensors concatenated along the token dimension."""
    if streams in by_streams:
        return by_streams[streams]
    singles = {s[0]: t for s, t in by_streams.items() if len(s) == 1}
    if not all(s in singles for s in streams):
        raise XDiTError(f"step cache: cannot form the {'+'.join(streams)} stream from the "
                        f"{', '.join('+'.join(s) for s in by_streams)} streams of an earlier block")
    return torch.cat([singles[s] for s in streams], dim=1)


def model_blocks(adapter) -> list[torch.nn.Module]:
    """The transformer blocks this process holds that the step cache spans, in execution order."""
    return [b for bl in adapter.plan.blocks if bl.cached for b in getattr(adapter.model, bl.name)]


@contextlib.contextmanager
def job_cache(adapter, settings: CacheSettings | None, agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
              contributes: bool = True) -> Iterator[BlockCache | None]:
    """The cache installed on the whole model for one job (None: no cache)."""
    if settings is None:
        yield None
        return
    with BlockCache(adapter, model_blocks(adapter), settings, settings.first_blocks, agree, contributes).installed() \
            as cache:
        yield cache
