"""Model family adapters: one per diffusers transformer class, all adapted the same way."""
from __future__ import annotations

import torch

from ..errors import XDiTError
from .base import Conditioning, FamilyAdapter
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sd3 import SD3Adapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {"flux": FluxAdapter, "sd3": SD3Adapter, "pixart": PixArtAdapter}


def make_adapter(family: str, model: torch.nn.Module, variant: str = "") -> FamilyAdapter:
    if family not in ADAPTERS:
        raise XDiTError(f"unknown family {family!r}: expected one of {', '.join(ADAPTERS)}")
    return ADAPTERS[family](model, variant)


__all__ = ["ADAPTERS", "Conditioning", "FamilyAdapter", "make_adapter"]
