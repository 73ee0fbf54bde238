"""Deferred tensors: a meta tensor that knows how to produce its values. Any torch operation on one gives another
(its shape from the meta computation, its values from replaying the operation on the inputs' values), so a
converter written for real state dicts (diffusers' single-file converters) maps a checkpoint's keys without reading
a byte of it; each converted tensor is later read alone, from the source tensors it depends on."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_map


class NotDeferrable(RuntimeError):
    """An in-place operation on a deferred tensor: its values cannot be replayed lazily."""


class DeferredTensor(torch.Tensor):
    """A meta tensor with `produce()`, a function returning its real values (on CPU)."""

    produce: Callable[[], torch.Tensor]

    @staticmethod
    def __new__(cls, meta: torch.Tensor, produce: Callable[[], torch.Tensor]):
        t = torch.Tensor._make_subclass(cls, meta.detach())
        t.produce = produce
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") or name in ("__setitem__", "copy_", "set_"):
            raise NotDeferrable(f"in-place {name} on a deferred tensor")
        with torch._C.DisableTorchFunctionSubclass():
            meta_out = func(*tree_map(_meta, args), **tree_map(_meta, kwargs))

        def replay():
            return func(*tree_map(_values, args), **tree_map(_values, kwargs))

        return _wrap(meta_out, replay)

    def __repr__(self, *, tensor_contents=None) -> str:  # noqa: D105 - never print the meta contents
        return f"DeferredTensor(shape={tuple(self.shape)}, dtype={self.dtype})"


def _meta(x):
    if isinstance(x, DeferredTensor):
        with torch._C.DisableTorchFunctionSubclass():
            return x.as_subclass(torch.Tensor)
    return x


def _values(x):
    return x.produce() if isinstance(x, DeferredTensor) else x


def _wrap(out, replay: Callable):
    if isinstance(out, torch.Tensor) and out.device.type == "meta":
        return DeferredTensor(out, replay)
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return type(out)(DeferredTensor(o, lambda i=i: replay()[i]) for i, o in enumerate(out))
    return out  # shapes, dtypes, numbers: the meta computation's answer is the answer


def deferred(shape: tuple[int, ...], dtype: torch.dtype, produce: Callable[[], torch.Tensor]) -> DeferredTensor:
    return DeferredTensor(torch.empty(shape, dtype=dtype, device="meta"), produce)


def realize(t: torch.Tensor) -> torch.Tensor:
    """The values of a deferred tensor (a plain tensor as it is); a meta tensor has none."""
    if isinstance(t, DeferredTensor):
        out = t.produce()
        with torch._C.DisableTorchFunctionSubclass():
            return out.as_subclass(torch.Tensor) if isinstance(out, DeferredTensor) else out
    if t.device.type == "meta":
        raise NotDeferrable("a meta tensor without values (a converter made it from nothing)")
    return t
