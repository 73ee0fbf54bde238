"""Install sequence parallelism on an unmodified diffusers transformer with forward hooks and processor wrappers.

Hooks split the embedders' outputs into this rank's token shard and gather the final projection's output, so
the transformer's own forward runs on local tokens. Every self-attention processor is wrapped so that its SDPA
call (direct, or through diffusers' attention dispatcher) runs USP attention instead: the processors themselves
stay diffusers' own.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..adapters import FamilyAdapter
from .attention import USPAttention


def shard_sizes(n: int, parts: int) -> list[int]:
    """Contiguous, balanced shard lengths (the first n % parts shards get one more)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def shard_range(sizes: list[int], index: int) -> slice:
    start = sum(sizes[:index])
    return slice(start, start + sizes[index])


class _SDPAOverride(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention calls made inside a processor to `attn`; `tap(q, k, v, out)`, when
    given, sees every call's inputs and output (the redundancy analyser)."""

    def __init__(self, attn, tap=None):
        super().__init__()
        self.attn, self.tap = attn, tap

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = self.attn(*args, **kwargs)
            if self.tap is not None:
                q, k, v = (kwargs[n] if n in kwargs else args[i] for i, n in enumerate(("query", "key", "value")))
                self.tap(q, k, v, out)
            return out
        return func(*args, **kwargs)


_WRAPPED: dict[type, type] = {}


def _wrapped_class(cls: type) -> type:
    """A subclass of a processor class whose __call__ runs inside _SDPAOverride (signature kept: diffusers
    inspects it to route keyword arguments). Wrapping a wrapped processor replaces its SDPA (one level only);
    an `_xdit_tap` attribute on the attention module is passed to the override whoever wrapped it."""
    cls = getattr(cls, "_xdit_base", cls)
    if cls not in _WRAPPED:
        def __call__(self, attn, *args, **kwargs):
            with _SDPAOverride(self._xdit_attention(), getattr(attn, "_xdit_tap", None)):
                return cls.__call__(self, attn, *args, **kwargs)

        functools.update_wrapper(__call__, cls.__call__)
        _WRAPPED[cls] = type(f"SequenceParallel{cls.__name__}", (cls,), {"__call__": __call__, "_xdit_base": cls})
    return _WRAPPED[cls]


def wrap_attention(modules, make_attention):
    """Wrap the processors of (module, joint) pairs: make_attention(module, joint) returns a zero-argument
    callable giving the SDPA replacement for one call. Returns a function that restores the processors."""
    originals = []
    for module, joint in modules:
        inner = module.processor
        cls = _wrapped_class(type(inner))
        wrapped = cls.__new__(cls)
        wrapped.__dict__.update(inner.__dict__)
        wrapped._xdit_attention = make_attention(module, joint)
        originals.append((module, inner))
        module.processor = wrapped

    def restore() -> None:
        for module, inner in originals:
            module.processor = inner

    return restore


class _TokenState:
    """Per-forward token layout, filled in by the split hooks before any attention runs."""

    def __init__(self, parts: int, rank: int):
        self.parts, self.rank = parts, rank
        self.image: list[int] = []
        self.text: list[int] = [0] * parts


@contextlib.contextmanager
def sequence_parallel(adapter: FamilyAdapter, pm):
    """While active, every forward of adapter.model runs on this rank's share of the tokens and returns the
    full output on every sequence-parallel rank."""
    parts, rank = pm.config.sp, pm.rank("sp")
    plan = adapter.sp_plan()
    state = _TokenState(parts, rank)
    comm, group = pm.comm, pm.group("sp")

    def split_image(module, args, out):
        state.image = shard_sizes(out.shape[1], parts)
        return out[:, shard_range(state.image, rank)]

    def split_text(module, args, out):
        state.text = shard_sizes(out.shape[1], parts)
        return out[:, shard_range(state.text, rank)]

    def split_rope(module, args, out):
        n_txt = sum(state.text)
        txt, img = shard_range(state.text, rank), shard_range(state.image, rank)
        return tuple(torch.cat([t[txt], t[n_txt:][img]]) for t in out)

    def gather(module, args, out):
        return comm.all_gather(out, state.image, group, dim=1, kind="gather")

    handles = [plan.image.register_forward_hook(split_image), plan.gather.register_forward_hook(gather)]
    if plan.text is not None:
        handles.append(plan.text.register_forward_hook(split_text))
    if plan.rope is not None:
        handles.append(plan.rope.register_forward_hook(split_rope))

    restore = wrap_attention(plan.attention, lambda module, joint: (
        lambda: USPAttention(pm, [i + t for i, t in zip(state.image, state.text)] if joint else list(state.image))))
    try:
        yield state
    finally:
        for h in handles:
            h.remove()
        restore()
