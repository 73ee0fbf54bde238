"""What the forwards of one sampling run that ComfyUI's sampler drives share (Parallel DiT Model): the context
cache's entries (conditioning-only modules computed once per run, comfyui_xdit.context_cache) and the step cache.

For the step cache ComfyUI calls the model once or more per step; the caller numbers the steps (the index of the
call's sigma in the run's schedule) and names the rows whose first-block residual is measured (the positive rows,
as the Parallel Sampler measures its positive branch). A step's first call decides, from its measured rows summed
over every rank, and the step's later calls follow. Residuals are kept per call slot (the call's index within its
step) together with the slot's batch signature (batch size and measured rows); a call whose slot was last computed
for another signature computes, whatever was decided. Every input of these rules is the same on every rank, so
every rank reaches the same decisions and runs the same collectives.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .cache import BlockCache, CacheSettings, model_blocks
from .context_cache import ContextCache, context_cache
from .errors import XDiTError


@dataclass(frozen=True)
class RunStep:
    """Where a forward sits in its sampling run, for the step cache: `step` of `steps` (0-based), and per row of
    the call's batch whether it is measured (a positive row)."""
    step: int
    steps: int
    measured: tuple[bool, ...]

    def check(self, batch: int) -> None:
        if not 0 <= self.step < self.steps:
            raise XDiTError(f"step cache: step {self.step} is outside the run's {self.steps} steps")
        if len(self.measured) != batch:
            raise XDiTError(f"step cache: {len(self.measured)} measured-row flags for a batch of {batch}")


class RunCache:
    """One sampling run's caches on this process: the context cache's entries, and the step cache on its blocks
    when `settings` are given (with the run's step count)."""

    def __init__(self, adapter, settings: CacheSettings | None = None, steps: int = 0,
                 agree: Callable[[torch.Tensor], torch.Tensor] | None = None, contributes: bool = True):
        self.adapter = adapter
        self.context = ContextCache()
        self.cache: BlockCache | None = None
        if settings is not None:
            blocks = model_blocks(adapter)
            settings.check(steps, len(blocks))
            self.cache = BlockCache(adapter, blocks, settings, settings.first_blocks, agree, contributes)
        self.steps, self.contributes = steps, contributes
        self.step = -1
        self.signatures: dict[int, tuple] = {}  # call slot -> the batch signature it last computed

    @property
    def reused(self) -> list[int]:
        return self.cache.reused if self.cache is not None else []

    def check(self, at: RunStep | None, batch: int) -> None:
        if (at is None) != (self.cache is None):
            raise XDiTError("a forward of a run with the step cache names its step, and only then")
        if at is not None:
            at.check(batch)
            if at.steps != self.steps:
                raise XDiTError(f"step cache: a forward of a {at.steps}-step run in a {self.steps}-step run")
            if at.step < self.step:
                raise XDiTError(f"step cache: step {at.step} after step {self.step}: a new run needs a new run id")

    def _begin(self, at: RunStep, rows: Sequence[int] | None) -> tuple:
        """Position the step cache for one call; `rows`: this process's rows of the batch (None: none)."""
        c = self.cache
        if at.step != self.step:
            c.step, c.call, self.step = at.step, 0, at.step
        signature = (len(at.measured), at.measured)
        c.fresh = self.signatures.get(c.call) != signature
        mine = [] if rows is None else [i for i, r in enumerate(rows) if at.measured[r]]
        c.rows = torch.tensor(mine, dtype=torch.long, device=c.device)
        c.contributes = self.contributes and bool(mine)
        return signature

    @contextlib.contextmanager
    def call(self, at: RunStep | None, rows: Sequence[int]) -> Iterator[None]:
        """Around one forward of this process's `rows` (global row indices) through the model."""
        spec = self.adapter.spec
        with context_cache(self.adapter.model, spec.context_modules, kept=self.context):
            if self.cache is None:
                yield
                return
            slot, signature = self.cache.call, self._begin(at, rows)
            with self.cache.installed():
                yield
            if not self.cache.reuse or self.cache.fresh:
                self.signatures[slot] = signature

    def abstain(self, at: RunStep | None) -> None:
        """This process runs no rows in this call: it only joins the step's decision."""
        if self.cache is None:
            return
        slot, signature = self.cache.call, self._begin(at, None)
        self.cache.abstain()
        if not self.cache.reuse or self.cache.fresh:
            self.signatures[slot] = signature
