"""Which scaled-dot-product-attention kernel a device runs.

On CUDA, torch's default order tries flash before cuDNN, although cuDNN attention is about twice as fast at
DiT shapes on H100 (../shared/gpu.md: 0.42 ms against 0.84 ms at Flux 1024px). The engine runs its forwards
under `preferred_attention`, which puts cuDNN first and keeps the others as fallbacks for shapes or dtypes
cuDNN rejects. `XDIT_ATTENTION` (auto, cudnn, flash, efficient, math) pins one backend first instead.
"""
from __future__ import annotations

import contextlib
import os
from typing import ContextManager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ORDER = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def cuda_backend_order(first: str = "auto") -> list[SDPBackend]:
    """SDPA backends in priority order; `first` (a key of ORDER, or auto = cudnn) leads."""
    first = "cudnn" if first in ("", "auto") else first
    if first not in ORDER:
        raise ValueError(f"unknown attention backend {first!r}: one of auto, {', '.join(ORDER)}")
    return [ORDER[first], *(b for name, b in ORDER.items() if name != first)]


def preferred_attention(device: torch.device | str, first: str | None = None) -> ContextManager:
    """Context that makes SDPA calls on this device try the fastest kernel first; no-op off CUDA."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(cuda_backend_order(first or os.environ.get("XDIT_ATTENTION", "auto")), set_priority=True)
