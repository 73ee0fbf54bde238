"""LoRA on a loaded transformer, patched into the weights where they live and taken out again exactly.

A LoRA file (safetensors only: nothing is unpickled) is brought to the model's diffusers module names by diffusers'
own LoRA loaders (the pipeline mixins' `lora_state_dict`, which detect and convert the ComfyUI/kohya, BFL/ai-toolkit,
musubi/LightX2V and diffusers/PEFT formats). Those converters keep each low-rank pair: a fused original layer
(Flux's qkv, linear1) becomes per-projection pairs that share the down matrix and split the up matrix by rows, so
every full delta ``up @ down`` is exactly the matching rows of the fused one.

Applying a set of (file, strength): every file is read and checked against the full model's parameter names and
shapes first (one-line error naming the file and the first key that does not fit; nothing changes), then each
parameter this process holds (its PipeFusion stage; an FSDP shard's rows, see `_local_part`) is backed up once and
patched in float32: ``w + strength * scale * up @ down`` (scale alpha/rank where the file gives alpha, else 1; a
`lora_B.bias` / ComfyUI `diff_b` adds to the bias), stored back in the parameter's own dtype (fp8 included).
Another set restores the backups bit for bit first; no checkpoint is read again.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import WeightsError

# family -> diffusers LoRA loader (its pipeline mixin); a family without one takes diffusers/PEFT keys as they are
LOADERS = {
    "flux": "FluxLoraLoaderMixin",
    "flux2": "Flux2LoraLoaderMixin",
    "sd3": "SD3LoraLoaderMixin",
    "qwen-image": "QwenImageLoraLoaderMixin",
    "wan": "WanLoraLoaderMixin",
    "z-image": "ZImageLoraLoaderMixin",
}
# key fragments of adapter types that are not low-rank pairs: refused
_REFUSED = (("hada_w1", "LoHa"), ("hada_w2", "LoHa"), ("lokr_w1", "LoKr"), ("lokr_w2", "LoKr"),
            ("dora_scale", "DoRA"), (".oft_", "OFT"), ("glora_", "GLoRA"))
_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.", "model.diffusion_model.")
_SKIPPED = ("text_encoder", "text_encoder_2", "lora_te", "lora_te1_", "lora_te2_", "text_encoders.")  # CLIP/T5 parts
_MAX_FILE_BYTES = 1 << 36


@dataclass(frozen=True)
class LoraSpec:
    path: str
    strength: float


@dataclass
class LoraFile:
    """One file in the model's names: weight key -> (up, down, scale); bias key -> delta."""
    path: str
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return Path(self.path).name

    def keys(self) -> list[str]:
        return sorted({*self.pairs, *self.biases})


# ----------------------------------------------------------------------------------------------------- reading
def read_lora(path: str, family: str, shapes: dict[str, tuple[int, ...]] | None = None) -> LoraFile:
    """Read and convert one LoRA file for a model of `family` (full parameter shapes `shapes`: a family whose
    original-layout files are converted needs them); one-line WeightsError on anything it cannot use."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = _checked_file(path)
    try:
        raw = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"LoRA {p.name}: truncated or not a safetensors file ({_first_line(e)})") from None
    return convert_lora(raw, family, str(p), shapes)


def _checked_file(path: str) -> Path:
    p = Path(path)
    name = p.name
    if not name.lower().endswith((".safetensors", ".sft")):
        raise WeightsError(f"LoRA {name}: only .safetensors LoRA files are read (no pickles)")
    try:
        if not p.is_file():
            raise WeightsError(f"LoRA {name}: file not found: {path}")
        if p.stat().st_size > _MAX_FILE_BYTES:
            raise WeightsError(f"LoRA {name}: file too large for a LoRA")
    except OSError as e:
        raise WeightsError(f"LoRA {name}: not readable ({e.strerror})") from None
    return p


def fit_problem(path: str, family: str, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What `apply_loras` would refuse this file for, on a model of `family` whose full parameter shapes are
    `shapes` (one line), or None. For queue-time checks: the file is converted on the meta device from its header
    (its scalars, vectors and full-weight deltas read, the pairs not), and read whole only when diffusers' converter
    needs the pairs' values; either way the same conversion and check as applying it."""
    try:
        try:
            lora = convert_lora(_header_tensors(_checked_file(path)), family, path, shapes)
        except Exception:  # noqa: BLE001 - a converter that reads values: the real conversion decides
            lora = read_lora(path, family, shapes)
        check_fits(lora, shapes, family)
    except WeightsError as e:
        return str(e)
    return None


def _header_tensors(p: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, matrices as meta tensors of their shapes (full-weight `.diff` deltas read: the conversion
    drops the all-zero ones), everything else read."""
    from safetensors import safe_open

    from .safetensors_header import SAFETENSORS_DTYPES, read_header

    out = {}
    with safe_open(str(p), framework="pt", device="cpu") as f:
        for k, info in read_header(p).tensors.items():
            dtype = SAFETENSORS_DTYPES.get(info.dtype, torch.float32)
            out[k] = torch.empty(info.shape, dtype=dtype, device="meta") \
                if len(info.shape) >= 2 and not k.endswith(".diff") else f.get_tensor(k)
    return out


def refusal(keys: Iterable[str]) -> str | None:
    """Why a file with these key names is not a LoRA the engine applies (LoKr, LoHa, DoRA, ...), or None."""
    for k in keys:
        for frag, kind in _REFUSED:
            if frag in k:
                return f"{kind} adapters are not supported, only LoRA (up/down pairs); first such key {k}"
    return None


def convert_lora(raw: dict[str, torch.Tensor], family: str, path: str = "lora",
                 shapes: dict[str, tuple[int, ...]] | None = None) -> LoraFile:
    """A LoRA state dict (any supported format) in the model's diffusers names (`shapes`: the full model's parameter
    shapes, for a family whose original-layout files are converted here, see `_from_original_layout`)."""
    name = Path(path).name
    refused = refusal(raw)
    if refused:
        raise WeightsError(f"LoRA {name}: {refused}")
    sd = {k: v for k, v in raw.items() if not k.startswith(_SKIPPED)}  # text-encoder parts: model-only LoRA
    # all-zero full-weight and bias deltas change nothing (LightX2V files carry zeroed norm diffs, which diffusers'
    # converters leave out): dropped here, so that only a delta with an effect that would be lost is refused
    sd = {k: v for k, v in sd.items() if not (k.endswith((".diff", ".diff_b")) and not v.any())}
    if not sd:
        raise WeightsError(f"LoRA {name}: no diffusion-model keys in the file (first key: "
                           f"{next(iter(sorted(raw)), 'none')})")
    sd = _from_original_layout(sd, family, name, shapes)
    sd = _with_diffusers_loader(sd, family, name)
    return _collect(sd, name, path)


# rows of one tagged stand-in: module number * _TAG + row number (exact in float64)
_TAG = float(1 << 24)
# a pair's parts in an original-layout file, as ComfyUI reads them (kohya and ComfyUI names, PEFT pair names)
_ORIGINAL_PARTS = ((".lora_up.weight", "up"), (".lora_down.weight", "down"), (".lora_B.weight", "up"),
                   (".lora_A.weight", "down"), (".alpha", "alpha"), (".diff_b", "bias"))


class _Checkpoint(dict):
    """An original-layout state dict for one of diffusers' single-file converters: a key the converter pops that it
    lacks comes back as a marker (all -1), so the converter walks the whole model whatever the LoRA covers; every
    popped key is recorded."""

    def __init__(self, items: dict, marker: torch.Tensor):
        super().__init__(items)
        self.marker, self.popped = marker, []

    def pop(self, key, *default):
        self.popped.append(key)
        return super().pop(key) if key in self else self.marker.clone()


def _run_layout(convert, sizing: dict[str, int], tagged: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    marker = torch.full((6, 1), -1.0, dtype=torch.float64)  # 6 rows: the converters cut rows in 2 and 3 parts
    items = {k: torch.full((n or 6, 1), -1.0, dtype=torch.float64) for k, n in sizing.items()}
    ckpt = _Checkpoint({**items, **tagged}, marker)
    return convert(ckpt), ckpt.popped


def _from_original_layout(sd: dict, family: str, name: str, shapes: dict | None) -> dict:
    """A family whose original-layout LoRA files diffusers' LoRA loader leaves as they are (SD3's kohya
    `lora_unet_joint_blocks_*` and ComfyUI `diffusion_model.joint_blocks.*`): the keys naming an original module
    (kohya's name is the module's with dots as underscores, as ComfyUI matches it) become diffusers/PEFT keys.

    The delta of a pair is up @ down, and diffusers' single-file converter only renames, cuts and reorders rows
    (fused qkv cut in three, scale/shift halves swapped), so the converter itself moves each pair's up rows: it is
    given a checkpoint whose tensors are row tags (module number and row), every module the file does not cover a
    marker, and each diffusers weight it returns names its module and rows; the down matrix and alpha stay the
    module's. Works on meta tensors (the queue-time check). Other keys are left as they are."""
    from . import families

    try:
        layout = families.get(family).lora_layout
    except KeyError:
        return sd
    if layout is None or not any(k.startswith(("lora_unet_", "diffusion_model.", "model.diffusion_model."))
                                 for k in sd):
        return sd
    if shapes is None:
        raise WeightsError(f"LoRA {name}: converting its {family} original-layout keys needs the model's shapes")
    convert, sizing = layout(shapes)
    try:
        _, popped = _run_layout(convert, sizing, {})
    except (KeyError, RuntimeError, IndexError, ValueError) as e:
        raise WeightsError(f"LoRA {name}: does not fit the {family} model's layout ({_first_line(e)})") from None
    modules = {k.rsplit(".", 1)[0] for k in popped if k.endswith((".weight", ".bias"))}
    kohya = {"lora_unet_" + m.replace(".", "_"): m for m in modules}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for k, v in sd.items():
        suffix = next(((sfx, part) for sfx, part in _ORIGINAL_PARTS if k.endswith(sfx)), None)
        stem = k[: -len(suffix[0])] if suffix else k
        for prefix in ("model.diffusion_model.", "diffusion_model."):
            if stem.startswith(prefix):
                stem = stem[len(prefix):]
                break
        module = kohya.get(stem, stem if stem in modules else None)
        if module is None:
            out[k] = v  # not an original module: diffusers' loader and the checks below decide
            continue
        if suffix is None:
            raise WeightsError(f"LoRA {name}: unsupported key {k} (only lora_up/lora_down, lora_A/lora_B, alpha and "
                               "diff_b are applied)")
        parts.setdefault(module, {})[suffix[1]] = v
    if not parts:
        return sd
    tagged, order = {}, sorted(parts)
    for j, module in enumerate(order):
        for part, key in (("up", ".weight"), ("bias", ".bias")):
            if part in parts[module]:
                rows = parts[module][part].shape[0]
                tagged[module + key] = (torch.arange(rows, dtype=torch.float64) + j * _TAG)[:, None]
    converted, popped = _run_layout(convert, sizing, tagged)
    left = sorted(k for k in tagged if k not in set(popped))
    if left:
        raise WeightsError(f"LoRA {name}: diffusers' {family} converter does not read {left[0]}")
    for key, tags in converted.items():
        tags = tags.reshape(-1)
        if not bool((tags >= 0).any()):
            continue
        ids = torch.unique(torch.div(tags, _TAG, rounding_mode="floor"))
        if bool((tags < 0).any()) or len(ids) != 1:  # a diffusers weight made of several: not a row move
            raise WeightsError(f"LoRA {name}: diffusers' {family} converter combines rows into {key}")
        g, rows = parts[order[int(ids[0])]], torch.remainder(tags, _TAG).long()
        target = key.rsplit(".", 1)[0]
        if key.endswith(".bias"):
            out[f"{target}.diff_b"] = _rows(g["bias"], rows)
            continue
        if "down" not in g:
            raise WeightsError(f"LoRA {name}: {order[int(ids[0])]} has a lora up matrix without its pair")
        out[f"{target}.lora_B.weight"], out[f"{target}.lora_A.weight"] = _rows(g["up"], rows), g["down"]
        if "alpha" in g:
            out[f"{target}.alpha"] = g["alpha"]
    for module in order:
        if "up" not in parts[module] and ("down" in parts[module] or "alpha" in parts[module]):
            what = "lora down matrix" if "down" in parts[module] else "alpha"
            raise WeightsError(f"LoRA {name}: {module} has a {what} without its pair")
    return out


def _rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of `t` (a meta tensor: one of that shape)."""
    if t.is_meta:
        return torch.empty((len(rows), *t.shape[1:]), dtype=t.dtype, device="meta")
    return t.index_select(0, rows)


def _with_diffusers_loader(sd: dict, family: str, name: str) -> dict:
    loader_name = LOADERS.get(family)
    if loader_name is None:
        return sd
    import diffusers.loaders.lora_pipeline as lp

    loader = getattr(lp, loader_name)
    if family == "flux" and any(k.startswith("diffusion_model.") and ".lora_A." in k for k in sd):
        # ComfyUI's own layout with PEFT pair names: the kohya path of diffusers' Flux loader reads it once the
        # pairs carry kohya's names
        sd = {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in sd.items()}
    records = _Records()
    logs = [logging.getLogger(f"diffusers.loaders.{n}") for n in ("lora_pipeline", "lora_conversion_utils")]
    saved = [(lg.level, lg.propagate) for lg in logs]
    for lg in logs:  # what they say at info level too, kept from the console
        lg.addHandler(records)
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
    try:
        out = loader.lora_state_dict(dict(sd), return_alphas=True) if family == "flux" else \
            loader.lora_state_dict(dict(sd))
    except (KeyError, ValueError, RuntimeError, IndexError, AssertionError, NotImplementedError, TypeError) as e:
        if isinstance(e, KeyError) and e.args:
            detail = f"missing key {e.args[0]}"
        elif isinstance(e, AssertionError) and not str(e):  # e.g. kohya Flux: split sizes of Flux.1 (3072 wide)
            detail = f"diffusers' {family} LoRA converter's fixed sizes do not fit this model"
        else:  # diffusers' messages may spread over lines ("Incompatible keys detected: \n\n <keys>")
            detail = " ".join(str(e).split()) or type(e).__name__
            detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise WeightsError(f"LoRA {name}: does not fit a {family} model ({detail})") from None
    finally:
        for lg, (level, propagate) in zip(logs, saved):
            lg.removeHandler(records)
            lg.setLevel(level)
            lg.propagate = propagate
    if records.dropped:  # diffusers filtered keys it cannot convert: refuse rather than apply part of the file
        raise WeightsError(f"LoRA {name}: has keys diffusers' {family} LoRA conversion drops ({records.dropped[0]})")
    if isinstance(out, tuple):
        state, alphas = out[0], (out[1] or {})
        state = {**state, **{k: v for k, v in alphas.items()}}
    else:
        state = out
    return state


class _Records(logging.Handler):
    """Collects what diffusers' LoRA converters say when they leave keys out."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.dropped: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        low = text.lower()
        if ("unsupported" in low or "do not handle" in low or "not supported" in low) and "all zeros" not in low:
            self.dropped.append(text.splitlines()[0][:200])


def _collect(sd: dict, name: str, path: str) -> LoraFile:
    """Group converted keys into (up, down, scale) per weight and bias deltas; anything else is an error."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        key = k
        while key.startswith(_PREFIXES):  # diffusers' Qwen converter prefixes an already prefixed PEFT key again
            key = key[len(next(p for p in _PREFIXES if key.startswith(p))):]
        for suffix, part in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"),
                             (".lora_up.weight", "up"), (".lora_B.bias", "bias"), (".diff_b", "bias"),
                             (".alpha", "alpha")):
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[part] = v
                break
        else:
            raise WeightsError(f"LoRA {name}: unsupported key {k} (only lora_A/lora_B, lora_down/lora_up, alpha and "
                               "bias deltas are applied)")
    out = LoraFile(path)
    for module in sorted(groups):
        g = groups[module]
        if ("up" in g) != ("down" in g):
            raise WeightsError(f"LoRA {name}: {module} has a lora {'up' if 'up' in g else 'down'} matrix without "
                               "its pair")
        if "up" in g:
            up, down = g["up"], g["down"]
            if up.ndim < 2 or down.ndim < 2 or up.flatten(1).shape[1] != down.shape[0]:
                raise WeightsError(f"LoRA {name}: {module} has up {tuple(up.shape)} and down {tuple(down.shape)} "
                                   "of different ranks")
            scale = 1.0
            if "alpha" in g:
                scale = float(g["alpha"].float().reshape(-1)[0]) / down.shape[0]
            out.pairs[module + ".weight"] = (up, down, scale)
        elif "alpha" in g:
            raise WeightsError(f"LoRA {name}: {module}.alpha without a lora pair")
        if "bias" in g:
            out.biases[module + ".bias"] = g["bias"]
    if not out.pairs and not out.biases:
        raise WeightsError(f"LoRA {name}: no LoRA weights in the file")
    return out


# ----------------------------------------------------------------------------------------------------- checking
def check_fits(lora: LoraFile, shapes: dict[str, tuple[int, ...]], family: str = "") -> None:
    """Every key of `lora` names a parameter of the full model with a delta of its shape; else one line naming the
    file and the first key that does not fit."""
    what = f"the {family} model" if family else "the model"
    for key in lora.keys():
        shape = shapes.get(key)
        if shape is None:
            raise WeightsError(f"LoRA {lora.name} does not match {what}: no parameter {key} (wrong family or model?)")
        if key in lora.biases:
            got = tuple(lora.biases[key].shape)
        else:
            up, down, _ = lora.pairs[key]
            got = (up.shape[0], math.prod(down.shape[1:]))
            shape = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else shape
        if tuple(got) != tuple(shape):
            raise WeightsError(f"LoRA {lora.name} does not match {what}: {key} is {tuple(shapes[key])} in the "
                               f"model but the LoRA's delta is {tuple(got)} (another model size?)")


# ----------------------------------------------------------------------------------------------------- names
def record_layout(model: torch.nn.Module) -> None:
    """Before a model drops blocks (PipeFusion stages): remember every parameter's shape and each block's original
    path, so that LoRA keys keep their meaning on a stage that holds only some of the blocks. Idempotent."""
    if getattr(model, "_xdit_full_shapes", None) is not None:
        return
    for name, module in model.named_modules():
        if name and not hasattr(module, "_xdit_path"):
            module._xdit_path = name
    model._xdit_full_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}


def full_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    shapes = getattr(model, "_xdit_full_shapes", None)
    return dict(shapes) if shapes is not None else {n: tuple(p.shape) for n, p in held_parameters(model)}


def held_parameters(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Parameter]]:
    """(name in the full model, parameter) for every parameter this process holds."""
    stack = [(model, "")]
    while stack:
        module, path = stack.pop()
        path = getattr(module, "_xdit_path", path)
        for n, p in module._parameters.items():
            if p is not None:
                yield (f"{path}.{n}" if path else n), p
        for n, child in module._modules.items():
            if child is not None:
                stack.append((child, f"{path}.{n}" if path else n))


# ----------------------------------------------------------------------------------------------------- patching
@dataclass
class _State:
    signature: tuple = ()
    backups: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> original local values (CPU)


def signature(specs: Sequence[LoraSpec]) -> tuple:
    """What identifies a LoRA set (with the file's size and time, so that a rewritten file is read again)."""
    sig = []
    for s in specs:
        if s.strength == 0.0:
            continue
        try:
            st = os.stat(s.path)
            sig.append((os.path.realpath(s.path), float(s.strength), st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append((s.path, float(s.strength), -1, -1))
    return tuple(sig)


def set_key(sig: tuple) -> str:
    """A short name of a LoRA set's signature ("" for none): with the model's key, what the weights now are."""
    if not sig:
        return ""
    import hashlib

    return hashlib.sha256(repr(sig).encode()).hexdigest()[:16]


def applied(model: torch.nn.Module) -> tuple:
    state = getattr(model, "_xdit_lora", None)
    return state.signature if state is not None else ()


def apply_loras(model: torch.nn.Module, family: str, specs: Sequence[LoraSpec]) -> dict:
    """Make `model` the base model plus exactly this LoRA set (in order; strength 0 entries left out). Reads and
    checks every file before touching a weight; restores the previous set's parameters bit for bit. Returns
    {"loras": number applied, "patched": parameters patched here, "changed": whether weights changed, "key": the
    set's key (set_key)}."""
    state: _State = model.__dict__.setdefault("_xdit_lora", _State())
    sig = signature(specs)
    if sig == state.signature:
        return {"loras": len(sig), "patched": 0, "changed": False, "key": set_key(sig)}
    shapes = full_shapes(model)
    files = [(read_lora(s.path, family, shapes), float(s.strength)) for s in specs if s.strength != 0.0]
    for lora, _ in files:
        check_fits(lora, shapes, family)
    held = dict(held_parameters(model))
    touched = sorted({k for lora, _ in files for k in lora.keys() if k in held})
    keep = set(touched)
    state.signature = ("incomplete",)  # until every parameter is done (the backups stay the base values)
    with torch.no_grad():
        for key in [k for k in state.backups if k not in keep]:  # changed by the old set only: the base again
            base = state.backups.pop(key)
            if key not in held:  # its block was dropped since (a PipeFusion stage after the set was applied)
                continue
            local, _ = _local_part(held[key])
            local.copy_(base.to(local.device))
        for key in touched:
            local, index = _local_part(held[key])
            if key not in state.backups:
                state.backups[key] = local.detach().to("cpu", copy=True)
            _patch(local, state.backups[key], index, tuple(held[key].shape), key, files)
    state.signature = sig
    return {"loras": len(files), "patched": len(touched), "changed": True, "key": set_key(sig)}


def _patch(local: torch.Tensor, base: torch.Tensor, index: tuple[slice, ...] | None, shape: tuple[int, ...],
           key: str, files: list[tuple[LoraFile, float]]) -> None:
    """local = base + strength * delta of every file, in order, in float32 (an fp16, bf16 or fp8 parameter is
    upcast, patched and stored back in its dtype). A pair's strength and scale go into its up matrix, so each pair
    is one addmm over the weight; on an fp32 parameter the first one reads the base values and writes the
    parameter in one pass."""
    base = base.to(local.device)
    direct = local.dtype == torch.float32 and local.is_contiguous() and index is None
    w = local if direct else base.to(torch.float32, copy=True).contiguous()  # never the kept base values
    src = base if direct else None  # None: w already holds the values to add to
    for lora, strength in files:
        if key in lora.biases:
            d = lora.biases[key].to(w.device, torch.float32) * strength
            d = d[index] if index is not None else d
            torch.add(src, d, out=w) if src is not None else w.add_(d)
        elif key in lora.pairs:
            up, down, scale = lora.pairs[key]
            up = up.flatten(1).to(w.device, torch.float32) * (scale * strength)
            down = down.flatten(1).to(w.device, torch.float32)
            if index is not None:  # a shard: the rows (and columns) of the full delta it holds
                d = (up @ down).reshape(shape)[index]
                torch.add(src, d, out=w) if src is not None else w.add_(d)
            elif src is not None:
                torch.addmm(src.reshape(w.shape[0], -1), up, down, out=w.view(w.shape[0], -1))
            else:
                w.view(w.shape[0], -1).addmm_(up, down)
        else:
            continue
        src = None
    if w is not local:
        local.copy_(w.to(local.dtype))


def _local_part(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...] | None]:
    """The tensor this process stores for `param` and where it sits in the full parameter. Hook for sharded
    weights: an FSDP2 DTensor patches only its local shard (the rows of the full delta it holds)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # type: ignore[assignment]
    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return param.to_local(), tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return param.data, None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
