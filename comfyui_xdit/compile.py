"""Regional torch.compile of the repeated transformer blocks, under every parallel method.

Each block class is compiled once (one compiled `forward` per class, shared by every instance: with torch's
inlining of built-in modules the parameters are graph inputs, so the blocks of a class reuse one graph). Only the
block's own `forward` is compiled; its forward hooks (the token plan's splits and gathers, FSDP's unshard, the
PipeFusion stage hooks) and the step cache's wrapper run eagerly around it. This differs from diffusers'
`compile_repeated_blocks`, which compiles each block's whole call, hooks included: the engine's hooks hold
collectives and Python state that must not be traced. The classes are the model's `_repeated_blocks` where diffusers
declares them, otherwise the classes of the family's block lists.

Inside a block, the attention processors are the engine's wrappers (parallel/sequence.py). Their distributed
attention (Ulysses all-to-all, Ring exchange, PipeFusion's K/V buffers) is one opaque custom op,
`xdit::rerouted_attention`: the compiled graph calls it and the compiler never looks inside, so the collectives run
exactly as they do eagerly and the graph has no break. Its meta function says the output has the query's shape
with the value's head dim.
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import ConfigError

_ATTENTIONS: dict[int, Callable] = {}  # key -> the processor whose SDPA replacement the op calls
_KEYS: dict[int, torch.Tensor] = {}     # id(processor) -> its key as a 0-d int64 tensor (a graph input)


@torch.library.custom_op("xdit::rerouted_attention", mutates_args=())
def rerouted_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                       scale: float | None, handle: torch.Tensor) -> torch.Tensor:
    attention = _ATTENTIONS[int(handle)]
    out = attention(query, key, value, attn_mask=attn_mask, scale=scale)
    return out.contiguous()


@rerouted_attention.register_fake
def _(query, key, value, attn_mask, scale, handle):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def attention_handle(replacement: Callable[[], Callable]) -> torch.Tensor:
    """A key under which the op finds `replacement()` (the per-call SDPA replacement of one wrapped processor)."""
    key = len(_ATTENTIONS)
    _ATTENTIONS[key] = lambda *args, **kwargs: replacement()(*args, **kwargs)
    return torch.tensor(key, dtype=torch.int64)


def release_handle(handle: torch.Tensor) -> None:
    _ATTENTIONS.pop(int(handle), None)


_COMPILED: dict[Callable, Callable] = {}  # a block class's forward function -> its compiled version (process-wide)
_ACTIVE: list[torch.nn.Module] = []       # the blocks running their compiled forward now
CALLS = [0]                               # compiled block forwards run in this process (tests)


def inside_compiled_blocks() -> set[int]:
    """ids of the modules inside the blocks that run compiled now (the context cache leaves them alone)."""
    return {id(m) for block in _ACTIVE for m in block.modules()}


def repeated_blocks(adapter) -> list[torch.nn.Module]:
    """The blocks compiled: the modules of the classes the model declares in `_repeated_blocks`, otherwise the
    blocks of the family's block lists."""
    model = adapter.model
    declared = set(getattr(model, "_repeated_blocks", None) or ())
    if declared:
        # an FSDP-sharded block's class is a subclass named FSDP<name>: match the class it was made from too
        return [m for m in model.modules() if {c.__name__ for c in type(m).__mro__} & declared]
    return [b for bl in adapter.plan.blocks for b in getattr(model, bl.name)]


# Compiled forms kept per block class: every shape and layout a pool serves is one (or two: a block's input strides
# can differ between its first and later instances); torch's default of 8 is too few for a pool's lifetime.
RECOMPILE_LIMIT = 64
_LIMIT_HIT = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", ())  # (a torch without it raises Unsupported)


def _compiled(fn: Callable) -> Callable:
    if fn not in _COMPILED:
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[fn]


def _forward(block: torch.nn.Module, compiled: Callable) -> Callable:
    name = type(block).__name__
    attentions = [m for m in block.modules() if hasattr(m, "processor")]

    def forward(*args, **kwargs):
        CALLS[0] += 1
        for m in attentions:  # checked here, eagerly: an error raised while tracing loses its message
            base = getattr(m.processor, "_xdit_base", None)
            if base is not None and m.processor._xdit_traced is None:
                raise ConfigError(f"torch.compile: attention processor {base.__name__} of {name} reaches attention "
                                  "neither through F.scaled_dot_product_attention nor through dispatch_attention_fn, "
                                  "so its parallel attention cannot be routed in a compiled block: turn compile off")
        try:
            return compiled(block, *args, **kwargs)
        except _LIMIT_HIT:
            raise ConfigError(f"torch.compile: {name} has been compiled for {RECOMPILE_LIMIT} shapes and layouts "
                              "in this process, the most kept: turn compile off or restart the pool") from None
        except torch._dynamo.exc.Unsupported as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(f"torch.compile cannot compile {name} under this layout (turn compile off): "
                              f"{first}") from None

    return forward


class compiled_blocks:
    """Context: while active, each repeated block's forward is its class's compiled forward (one compilation per
    class, shape and layout for the life of the process, reused by later jobs). Enter it before the step cache or
    anything else that wraps a block's forward; on exit the blocks get back the forward they had."""

    def __init__(self, adapter, enabled: bool = True):
        self.adapter, self.enabled = adapter, enabled
        self.blocks: list[torch.nn.Module] = []

    def __enter__(self) -> "compiled_blocks":
        if not self.enabled:
            return self
        for block in repeated_blocks(self.adapter):
            if "forward" in block.__dict__:
                raise ConfigError(f"cannot compile {type(block).__name__}: its forward is already replaced")
            block.forward = _forward(block, _compiled(type(block).forward))
            self.blocks.append(block)
            _ACTIVE.append(block)
        return self

    def __exit__(self, *exc) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        _ACTIVE[:] = [b for b in _ACTIVE if not any(b is mine for mine in self.blocks)]
        self.blocks = []
