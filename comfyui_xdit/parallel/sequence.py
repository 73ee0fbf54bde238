"""Install sequence parallelism on an unmodified diffusers transformer with forward hooks and processor wrappers.

Hooks at the family's token-plan points (parallel/plan.py) split the tokens into this rank's shard and gather the
final projection's output, so the transformer's own forward runs on local tokens. Every self-attention processor is wrapped so that its SDPA
call (direct, or through diffusers' attention dispatcher, held on its native SDPA path whatever backend diffusers
is set to) runs USP attention instead: the processors themselves stay diffusers' own. A processor that computes
attention without SDPA is refused (wrap_attention) rather than left to attend to its own shard.
"""
from __future__ import annotations

import contextlib
import functools
import types
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..adapters import FamilyAdapter
from ..attention_backend import diffusers_native_backend, diffusers_native_dispatch
from ..compile import attention_handle, release_handle
from ..errors import ConfigError
from . import plan as plan_mod
from .attention import USPAttention
from .plan import ShardView, shard_range, shard_sizes  # noqa: F401 - re-exported


class _SDPAOverride(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention calls made inside a processor to `attn` and counts them; `tap(q, k,
    v, out)`, when given, sees every call's inputs and output (the redundancy analyser)."""

    def __init__(self, attn, tap=None):
        super().__init__()
        self.attn, self.tap = attn, tap
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            out = self.attn(*args, **kwargs)
            if self.tap is not None:
                q, k, v = (kwargs[n] if n in kwargs else args[i] for i, n in enumerate(("query", "key", "value")))
                self.tap(q, k, v, out)
            return out
        return func(*args, **kwargs)


def _not_rerouted(name: str, cls: type) -> str:
    return (f"attention processor {cls.__name__} of {name} computed attention without "
            "F.scaled_dot_product_attention, so parallel sampling cannot distribute it (each rank would attend "
            "to its own tokens only): use a processor that calls F.scaled_dot_product_attention or diffusers' "
            "dispatch_attention_fn")


def _rerouted_call(processor, attn, args: tuple, kwargs: dict, replacement, tap):
    """The base processor's __call__ with diffusers' dispatcher on native SDPA and every SDPA call routed to
    `replacement`; a call that routed none computed its attention some other way and raises ConfigError."""
    base = processor._xdit_base
    override = _SDPAOverride(replacement, tap)
    with diffusers_native_dispatch(), override:
        out = base.__call__(processor, attn, *args, **kwargs)
    if override.calls == 0:
        raise ConfigError(_not_rerouted(processor._xdit_name, base))
    return out


_WRAPPED: dict[type, type] = {}
# Read by diffusers' processors (dispatch_attention_fn(backend=self._attention_backend, parallel_config=...)):
# the wrapped copy always asks for native SDPA and never for diffusers' own context parallelism.
_NATIVE_BACKEND = property(lambda self: diffusers_native_backend(), lambda self, value: None)
_NO_PARALLEL_CONFIG = property(lambda self: None, lambda self, value: None)


def _wrapped_class(cls: type) -> type:
    """A subclass of a processor class whose __call__ runs inside _SDPAOverride with diffusers' dispatcher on
    native SDPA (signature kept: diffusers inspects it to route keyword arguments). Wrapping a wrapped processor
    replaces its SDPA (one level only); an `_xdit_tap` attribute on the attention module is passed to the
    override whoever wrapped it."""
    cls = getattr(cls, "_xdit_base", cls)
    if cls not in _WRAPPED:
        def __call__(self, attn, *args, **kwargs):
            if torch.compiler.is_compiling():  # traced: the replacement is one opaque op (compile.py)
                return _traced_call(self, attn, args, kwargs)
            return _rerouted_call(self, attn, args, kwargs, self._xdit_attention(), getattr(attn, "_xdit_tap", None))

        functools.update_wrapper(__call__, cls.__call__)
        _WRAPPED[cls] = type(f"SequenceParallel{cls.__name__}", (cls,), {
            "__call__": __call__, "_xdit_base": cls, "_attention_backend": _NATIVE_BACKEND,
            "_parallel_config": _NO_PARALLEL_CONFIG, "_xdit_traced": staticmethod(_traced_function(cls))})
    return _WRAPPED[cls]


# Under torch.compile the processor's call is traced, and the compiler cannot trace a torch-function mode that
# sees every op. The traced call is instead the base processor's own __call__ code run with other globals: its `F`
# is a copy of torch.nn.functional whose scaled_dot_product_attention is the opaque op, and its
# `dispatch_attention_fn` takes diffusers' native path (BSHD in and out, a [B, S_k] mask widened) into the same op.
# The processor in progress is found on a stack the traced call pushes (the compiler keeps the stack's effects).
_ROUTE: list = []


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if is_causal or dropout_p or enable_gqa:
        raise NotImplementedError("parallel attention supports non-causal attention only")
    return torch.ops.xdit.rerouted_attention(query, key, value, attn_mask, scale, _ROUTE[-1]._xdit_handle)


def _routed_dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
    if attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape[0] == query.shape[0] \
            and attn_mask.shape[1] == key.shape[1]:
        attn_mask = attn_mask[:, None, None]
    out = _routed_sdpa(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask,
                       dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return out.transpose(1, 2)


_ROUTED_F = types.ModuleType("xdit_routed_functional")
_ROUTED_F.__dict__.update({k: v for k, v in vars(F).items() if not k.startswith("__")})
_ROUTED_F.scaled_dot_product_attention = _routed_sdpa
_TRACED: dict[type, Callable | None] = {}


def _traced_function(base: type) -> Callable | None:
    """base.__call__ with the routed globals (None: its code reaches SDPA neither through `F` nor through
    `dispatch_attention_fn`)."""
    if base not in _TRACED:
        fn = base.__call__
        if not isinstance(fn, types.FunctionType):
            _TRACED[base] = None
            return None
        names = set(fn.__code__.co_names)
        routed = dict(fn.__globals__)
        if routed.get("F") is F and {"F", "scaled_dot_product_attention"} <= names:
            routed["F"] = _ROUTED_F
        if "dispatch_attention_fn" in routed and "dispatch_attention_fn" in names:
            routed["dispatch_attention_fn"] = _routed_dispatch
        traced = None
        if routed.get("F") is _ROUTED_F or routed.get("dispatch_attention_fn") is _routed_dispatch:
            traced = types.FunctionType(fn.__code__, routed, fn.__name__, fn.__defaults__, fn.__closure__)
            traced.__kwdefaults__ = fn.__kwdefaults__
        _TRACED[base] = traced
    return _TRACED[base]


def _traced_call(processor, attn, args: tuple, kwargs: dict):
    fn = processor._xdit_traced  # made with the wrapped class (the compiler cannot make functions); None is
    # refused before the compiled call (compile.py)
    _ROUTE.append(processor)
    out = fn(processor, attn, *args, **kwargs)
    _ROUTE.pop()
    return out


def _probe_inputs(module: torch.nn.Module, masked: bool = False) -> dict[str, torch.Tensor]:
    """Two image tokens (and one text token where the module projects text or cross-attends) of zeros; `masked`:
    with an all-true text mask [1, 1] (for a processor that requires one, HunyuanVideo 1.5's)."""
    from ..weight_storage import compute_dtype_of

    p, dtype = next(module.parameters()), compute_dtype_of(module)

    def zeros(n: int, dim: int) -> torch.Tensor:
        return torch.zeros(1, n, dim, device=p.device, dtype=dtype)

    kwargs = {"hidden_states": zeros(2, getattr(module, "query_dim", None) or module.to_q.in_features)}
    if getattr(module, "added_kv_proj_dim", None) is not None:
        kwargs["encoder_hidden_states"] = zeros(1, module.added_kv_proj_dim)
    elif getattr(module, "is_cross_attention", False):
        kwargs["encoder_hidden_states"] = zeros(1, getattr(module, "cross_attention_dim", None)
                                                or module.to_k.in_features)  # WanAttention names no width
    if masked and "encoder_hidden_states" in kwargs:
        kwargs["attention_mask"] = torch.ones(1, 1, dtype=torch.bool, device=p.device)
    return kwargs


def _probe(module: torch.nn.Module, processor) -> str | None:
    """Run a wrapped processor once on dummy tokens with plain local SDPA (no collectives, no tap): why it fails
    the reroute check, or None."""
    from .shard import full_size_stand_ins

    error = None
    for masked in (False, True):  # a processor that requires a text mask gets an all-true one
        try:
            with torch.no_grad(), full_size_stand_ins(module):  # a sharded module's weights at full size
                _rerouted_call(processor, module, (), _probe_inputs(module, masked), F.scaled_dot_product_attention,
                               None)
        except ConfigError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - a processor that cannot be checked cannot be trusted either
            error = error or e
            continue
        return None
    first = (str(error).splitlines() or [""])[0]
    return (f"attention processor {processor._xdit_base.__name__} of {processor._xdit_name} could not be "
            f"checked for parallel sampling: {type(error).__name__}: {first}")


def _agree(failures: list[str]) -> list[str]:
    """Every rank's failures, on every rank of the default process group (one flag all-reduce when none)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return failures
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1.0 if failures else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return []
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, failures)
    return [f for rank_failures in every for f in rank_failures]


def wrap_attention(modules, make_attention, root: torch.nn.Module | None = None, where: str = "",
                   collective: bool = False) -> Callable[[], None]:
    """Wrap the processors of (module, streams) pairs: make_attention(module, streams) returns a zero-argument
    callable giving the SDPA replacement for one call. Returns a function that restores the processors.

    Whatever attention backend diffusers is set to, a wrapped processor's dispatcher takes the native SDPA path,
    which is rerouted; a processor call that reroutes no SDPA call raises ConfigError. Each wrapped processor is
    first checked once here on dummy tokens (local SDPA), and a failure raises ConfigError before anything runs;
    with `collective` (called on every rank of the default process group) the ranks agree on it first, so all of
    them raise the same error, whichever stage holds the module. A processor that passes that check and later
    reroutes nothing (its path depends on the input) raises in that call, on the ranks running it: under USP
    all ranks of the group, under PipeFusion one stage only. `root` names the modules in messages, `where`
    (e.g. a pipeline stage) is added to the name."""
    names = {id(m): n for n, m in root.named_modules()} if root is not None else {}
    where = f" ({where})" if where else ""
    originals, failures = [], []
    for module, streams in modules:
        inner = module.processor
        cls = _wrapped_class(type(inner))
        wrapped = cls.__new__(cls)
        wrapped.__dict__.update(inner.__dict__)
        wrapped._xdit_attention = make_attention(module, streams)
        wrapped._xdit_name = names.get(id(module), type(module).__name__) + where
        wrapped._xdit_handle = attention_handle(wrapped._xdit_attention)
        originals.append((module, inner, wrapped))
        module.processor = wrapped
        failure = _probe(module, wrapped)
        if failure is not None:
            failures.append(failure)

    def restore() -> None:
        for module, inner, wrapped in originals:
            release_handle(wrapped._xdit_handle)
            module.processor = inner

    if collective:
        failures = _agree(failures)
    if failures:
        restore()
        raise ConfigError(failures[0])
    return restore


@contextlib.contextmanager
def sequence_parallel(adapter: FamilyAdapter, pm):
    """While active, every forward of adapter.model runs on this rank's share of the tokens (the family's token
    plan says where they are split and gathered) and returns the full output on every sequence-parallel rank."""
    parts, rank = pm.config.sp, pm.rank("sp")
    comm, group = pm.comm, pm.group("sp")
    view = ShardView(parts, rank, lambda t, sizes, dim: comm.all_gather(t, sizes, group, dim=dim, kind="gather"))
    model = adapter.model
    # wrapped (and checked, on every rank) before any hook is installed: a refused processor leaves nothing behind
    restore = wrap_attention(plan_mod.attention_modules(model, adapter.plan),
                             lambda module, streams: (lambda: USPAttention(pm, plan_mod.lengths(view, streams))),
                             root=model, collective=True)
    try:
        handles = plan_mod.install(model, adapter.plan, view)
    except BaseException:
        restore()
        raise
    try:
        yield view
    finally:
        plan_mod.remove(handles)
        restore()
