"""Model sources: built-in tiny models, diffusers folders and single-file checkpoints, behind one loader."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import FamilyAdapter, make_adapter
from .errors import XDiTError
from .tiny import build_tiny, is_tiny

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    adapter: FamilyAdapter
    source: str
    tiny: bool

    @property
    def family(self) -> str:
        return self.adapter.family


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise XDiTError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(source: str, family: str | None = None, dtype: str = "fp32", device: str = "cpu",
               **tiny_overrides) -> LoadedModel:
    """Load a transformer and wrap it in its family adapter."""
    torch_dtype = parse_dtype(dtype)
    if is_tiny(source):
        fam, model = build_tiny(source, torch_dtype, **tiny_overrides)
        if family not in (None, "", "auto", fam):
            raise XDiTError(f"family mismatch: {source} is a {fam} model, not {family}")
        variant = ""
        tiny = True
    else:
        from .weights import load_transformer

        loaded = load_transformer(source, None if family in (None, "", "auto") else family, torch_dtype, device)
        fam, model, variant = loaded.family, loaded.model, loaded.variant
        tiny = False
    return LoadedModel(make_adapter(fam, model.to(device), variant), source, tiny)
