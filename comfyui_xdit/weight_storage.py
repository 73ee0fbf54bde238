"""fp8 weight storage: every Linear's weight and bias kept in float8 (e4m3fn or e5m2, ComfyUI's weight_dtype
choices) on the device and upcast to the compute dtype inside each call; the rest (norms, embeddings, convolutions)
stays in the compute dtype, and so do the embedders diffusers' layerwise casting leaves alone (the class's
`_skip_layerwise_casting_patterns` or diffusers' defaults, and `_keep_in_fp32_modules`: position and time
embedders, whose dtype some forwards read to cast their inputs). Unlike those patterns, the adaLN modulation
Linears (under "norm" names) are stored in fp8 too, as ComfyUI's fp8 weight_dtype does: they are a third of a
Flux double block.

The result equals the same fp8 weights upcast up front: F.linear gets identical operands. Not diffusers'
`enable_layerwise_casting`: its hooks re-cast a layer's parameters in place (module.to) around every call, which
under FSDP2 replaces the data of the gathered parameters, so each block's full weights stayed allocated after its
forward (measured: all of tiny-flux's Linear bytes held on each of 2 ranks, none with this module).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .errors import XDiTError

WEIGHT_DTYPES: dict[str, torch.dtype | None] = {
    "default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


class UpcastLinear(torch.nn.Linear):
    """A Linear whose parameters are stored in a narrower dtype and upcast to `compute_dtype` at each call."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x, self.weight.to(self.compute_dtype), bias)


def parse_weight_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, ""):
        return None
    if name not in WEIGHT_DTYPES:
        raise XDiTError(f"unknown weight_dtype {name!r}: expected one of {', '.join(WEIGHT_DTYPES)}")
    return WEIGHT_DTYPES[name]


def store_weights(model: torch.nn.Module, weight_dtype: str | None) -> int:
    """In place: keep every Linear's parameters in `weight_dtype` (rounded once, to nearest), computing in the
    dtype they had. Returns how many Linears were converted (0 for "default")."""
    storage = parse_weight_dtype(weight_dtype)
    if storage is None:
        return 0
    count = 0
    for name, module in _storable_linears(model):
        compute = module.weight.dtype
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(p.detach().to(storage), requires_grad=False)
        module.__class__ = UpcastLinear
        module.compute_dtype = compute
        count += 1
    return count


def _skip_patterns(model: torch.nn.Module) -> tuple[str, ...]:
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    own = getattr(model, "_skip_layerwise_casting_patterns", None)
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    return tuple(p for p in (own if own is not None else DEFAULT_SKIP_MODULES_PATTERN) if p != "norm") + keep


def _storable_linears(model: torch.nn.Module):
    """(name, Linear) pairs to store narrow, under each diffusers model in `model` (itself, or Wan 2.2's two
    experts) by that model's skip patterns."""
    roots = [model] if hasattr(model, "_skip_layerwise_casting_patterns") else \
        [m for m in model.children() if hasattr(m, "_skip_layerwise_casting_patterns")] or [model]
    for root in roots:
        patterns = _skip_patterns(root)
        for name, module in root.named_modules():
            if type(module) is torch.nn.Linear and not any(re.search(p, name) for p in patterns):
                yield name, module


def upcast_weights(model: torch.nn.Module) -> None:
    """In place: the inverse class change, parameters upcast to the compute dtype (the upcast-first reference)."""
    for module in model.modules():
        if isinstance(module, UpcastLinear):
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(p.detach().to(module.compute_dtype),
                                                                  requires_grad=False)
            module.__class__ = torch.nn.Linear
            del module.compute_dtype


def compute_dtype_of(module: torch.nn.Module) -> torch.dtype:
    """The dtype `module` computes in: an fp8-stored Linear's compute dtype, else its first parameter's."""
    for m in module.modules():
        if isinstance(m, UpcastLinear):
            return m.compute_dtype
    return next(module.parameters()).dtype
