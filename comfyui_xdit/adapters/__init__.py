"""The runtime side of a model family: a FamilyAdapter binds a family's declarations (comfyui_xdit/families) to one
loaded transformer. Each family's adapter class lives in its family file."""
from __future__ import annotations

import importlib

import torch

from .. import families
from ..errors import XDiTError
from .base import Conditioning, FamilyAdapter


def make_adapter(family: str, model: torch.nn.Module, variant: str = "") -> FamilyAdapter:
    try:
        spec = families.get(family)
    except KeyError as e:
        raise XDiTError(str(e.args[0])) from None
    module, _, name = spec.adapter.partition(":")
    cls = getattr(importlib.import_module(module), name)
    return cls(spec, model, variant or spec.default_variant.name)


__all__ = ["Conditioning", "FamilyAdapter", "make_adapter"]
