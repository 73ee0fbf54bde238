"""Built-in tiny models: real diffusers classes at small sizes with deterministic random weights.

They exist for tests, the demo and CI: a 256x256, 8-step run takes seconds on one CPU core.
"""
from __future__ import annotations

import math

import torch

from . import families
from .errors import XDiTError

TINY_TEXT_TOKENS = 16
_WEIGHT_SEED = 20241122


def is_tiny(name: str) -> bool:
    return name in families.tiny_models()


def build_tiny(name: str, dtype: torch.dtype = torch.float32, **overrides) -> tuple[str, torch.nn.Module]:
    """Return (family, model) for a built-in tiny model (each family declares its own); `overrides` change
    constructor kwargs (e.g. depth)."""
    tiny = families.tiny_models()
    if name not in tiny:
        raise XDiTError(f"unknown model {name!r}: expected one of {', '.join(tiny)} or a path")
    family, kwargs = tiny[name]
    model = construct(family, {**kwargs, **overrides})
    fill_deterministic(model, _WEIGHT_SEED)
    if dtype != torch.float32:
        model = model.to(dtype)
    return family.name, model.eval().requires_grad_(False)


def construct(family: families.Family, kwargs: dict) -> torch.nn.Module:
    """A tiny model of `family` with its constructor kwargs, weights as torch initialises them (on the meta device
    when built under it)."""
    import diffusers

    return family.build(kwargs, "") if family.build is not None else getattr(diffusers, family.diffusers_class)(**kwargs)


@torch.no_grad()
def fill_deterministic(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with values from a seeded generator (independent of torch's init code).

    Matrices get N(0, 1/fan_in), vectors (biases, norms) small values around their init, so activations stay O(1).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        values = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            p.copy_(values / math.sqrt(fan_in))
        elif name.endswith("weight"):  # norm scales
            p.copy_(1.0 + 0.1 * values)
        else:
            p.copy_(0.02 * values)
