"""Which scaled-dot-product-attention kernel a device runs.

On CUDA, torch's default order tries flash before cuDNN, although cuDNN attention is about twice as fast at
DiT shapes on H100 (../shared/gpu.md: 0.42 ms against 0.84 ms at Flux 1024px). The engine runs its forwards
under `preferred_attention`, which puts cuDNN first and keeps the others as fallbacks for shapes or dtypes
cuDNN rejects. `XDIT_ATTENTION` (auto, cudnn, flash, efficient, math) pins one backend first instead.

Separately, diffusers has its own attention dispatcher (`DIFFUSERS_ATTN_BACKEND`, `attention_backend(...)`,
`model.set_attention_backend(...)`) whose backends (flex, flash-attn, sage, ...) need not call SDPA at all.
`diffusers_native_dispatch` makes it take its native SDPA path, which is where the engine's parallel attention
hooks in (parallel/sequence.py).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, ContextManager

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


@functools.cache
def _diffusers_dispatch() -> tuple[Any, Any]:
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend
    except ImportError:  # a diffusers without a dispatcher: its processors call SDPA themselves
        return None, None
    return AttentionBackendName.NATIVE, attention_backend


def diffusers_native_backend() -> Any:
    """diffusers' native (SDPA) attention backend name, or None for a diffusers without a dispatcher."""
    return _diffusers_dispatch()[0]


def diffusers_native_dispatch() -> ContextManager:
    """Context in which diffusers' dispatcher defaults to native SDPA, whatever backend is active (the env var
    DIFFUSERS_ATTN_BACKEND, `attention_backend(...)`, `set_attention_backend`); restored on exit. Processors
    that name their own backend (`_attention_backend`) need that attribute overridden as well."""
    native, attention_backend = _diffusers_dispatch()
    return contextlib.nullcontext() if native is None else attention_backend(native)
