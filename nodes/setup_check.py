"""A check of the set-up that needs no downloads: Tiny Conditioning makes CONDITIONING of the shape a loaded model's
family takes (the built-in tiny models take it at the real encoders' widths, which no stock node makes without
text-encoder weights), and Setup Check compares a parallel run's latent with one GPU's (workflows/setup-check.json)."""
from __future__ import annotations

import math

import torch
from comfy_api.latest import io

from . import schemas
from .families import cond_spec
from .pool import ModelHandle
from .xdit_nodes import XDiTNodeError


def tiny_conditioning(family: str, seed: int, tokens: int) -> tuple[list, list]:
    """(positive, negative) CONDITIONING as ComfyUI's encoders shape them for `family`: one [cond [1, tokens, width],
    extras] entry each, extras holding pooled_output [1, pooled] and the distilled guidance where the family takes
    them; values drawn from a generator seeded with `seed` (the positive first, then the negative)."""
    want = cond_spec(family)
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for _ in ("positive", "negative"):
        cond = torch.randn(1, int(tokens), want.width, generator=gen)
        extras: dict = {}
        if want.pooled is not None:
            extras["pooled_output"] = torch.randn(1, want.pooled, generator=gen)
        if want.guidance is not None:
            extras["guidance"] = float(want.guidance)
        out.append([[cond, extras]])
    return out[0], out[1]


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (inf where b is all zeros and a is not)."""
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    diff, ref = torch.linalg.vector_norm(a - b).item(), torch.linalg.vector_norm(b).item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def compare(parallel: dict, reference: dict, tolerance: float) -> str:
    """The PASS line for two LATENTs that agree within `tolerance` (relative L2); XDiTNodeError otherwise."""
    a, b = _samples(parallel, "parallel"), _samples(reference, "reference")
    if a.shape != b.shape:
        raise XDiTNodeError(f"Setup check FAILED: the parallel latent is {list(a.shape)}, one GPU's is "
                            f"{list(b.shape)} (feed both samplers the same latent)")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        bad = "parallel" if not torch.isfinite(a).all() else "reference"
        raise XDiTNodeError(f"Setup check FAILED: the {bad} latent has NaN or infinite values")
    err = relative_l2(a, b)
    if not err <= tolerance:
        raise XDiTNodeError(f"Setup check FAILED: the parallel result differs from one GPU's by rel. L2 {err:.3g} "
                            f"(tolerance {tolerance:.3g}; latent {list(a.shape)}, |max diff| "
                            f"{(a.double() - b.double()).abs().max().item():.3g})")
    return f"PASS: parallel equals one GPU's result (rel. L2 {err:.3g} <= {tolerance:.3g}, latent {list(a.shape)})"


def _samples(latent, which: str) -> torch.Tensor:
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise XDiTNodeError(f"Setup check FAILED: {which} is not a LATENT")
    return latent["samples"]


class TinyConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schemas.tiny_conditioning()

    @classmethod
    def execute(cls, model, seed, tokens):
        if not isinstance(model, ModelHandle):
            raise XDiTNodeError("Tiny Conditioning: model must come from Load Parallel DiT")
        return tiny_conditioning(model.family, seed, tokens)


class SetupCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schemas.setup_check()

    @classmethod
    def execute(cls, parallel, reference, tolerance):
        line = compare(parallel, reference, float(tolerance))
        return io.NodeOutput(ui={"text": [line]})


NODES = (TinyConditioning, SetupCheck)
