"""Load a DiT transformer of any registered family (comfyui_xdit/families) from local files, never from a hub.

Sources:
  * a diffusers model folder (config.json + diffusion_pytorch_model*.safetensors, sharded or not) or a pipeline
    folder with a ``transformer/`` subfolder; the family is the config's class;
  * a single-file checkpoint in the layout ComfyUI keeps in models/diffusion_models (the original release formats),
    optionally prefixed ``model.diffusion_model.``, possibly fp8 (also ComfyUI "scaled fp8");
  * a single file whose keys are already in diffusers layout.

A single file's family is the one whose key patterns it matches; it is converted to diffusers keys by the family's
converter (diffusers' own where it ships one), then loaded strictly into a model whose config is a published base
config (``configs/*.json``) with every size field that the weights determine replaced by the value read from them.
"""
from __future__ import annotations

import importlib.util
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from . import families
from .errors import WeightsError
from .families.checkpoint import few as _few
from .families.checkpoint import first_line as _first_line
from .families.spec import Family

CONFIG_DIR = Path(__file__).parent / "configs"

_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))


@dataclass
class LoadedTransformer:
    family: str  # a registered family's name
    variant: str  # e.g. "flux-dev", "sd3.5-large", "pixart-sigma" (best effort)
    model: torch.nn.Module  # diffusers transformer, eval(), requires_grad False, in the requested dtype


@dataclass
class Description:
    """What a checkpoint is, read without its weights (shapes are enough): family, config (the variant's published
    config with every field the shapes determine), variant."""
    family: Family
    config: dict
    variant: str


# ----------------------------------------------------------------------------------------------------------------
# Public API


def load_transformer(source: str, family: str | None = None, dtype: torch.dtype = torch.float32,
                     device: str = "cpu", config_overrides: dict | None = None) -> LoadedTransformer:
    """Load the transformer at `source` (folder or single file).

    `family` may be a family ("flux", "sd3", ...) or a variant name ("sd3.5-large", ...); when given, the weights
    must belong to it. `config_overrides` replaces fields of the inferred config of a single-file checkpoint (for
    fields the weights cannot determine, e.g. the head count of a non-standard PixArt).
    """
    want_family, want_variant = _parse_family(family)
    if split_pair(source) is not None:
        raise WeightsError("two expert files load from safetensors only (each read in part): "
                           f"{source[:200]}")
    path, is_dir = existing_path(source)
    if is_dir:
        fam, variant, model = _load_folder(path, want_family, want_variant, dtype)
    else:
        fam, variant, model = _load_single_file(path, want_family, want_variant, dtype, config_overrides)
    _finalize_tensors(model, dtype)
    model = model.to(device).eval().requires_grad_(False)
    return LoadedTransformer(fam, variant, model)


def existing_path(source: str) -> tuple[Path, bool]:
    """(path, is a folder) of a model source that exists; else a one-line WeightsError."""
    path = Path(str(source)).expanduser()
    shown = source if len(source) <= 200 else source[:200] + "..."
    try:
        found, is_dir = path.exists(), path.is_dir()
    except OSError as e:  # e.g. a name longer than the file system allows
        raise WeightsError(f"model path not usable: {shown} ({e.strerror})") from None
    if not found:
        raise WeightsError(f"model path not found: {shown}")
    return path, is_dir


def detect_family(state_dict_keys: Iterable[str]) -> str:
    """Family of a checkpoint from its key names (original or diffusers layout, with or without prefix)."""
    keys = _strip_prefix_keys(list(state_dict_keys))
    fam = families.detect(keys)
    if fam is None:
        shown = ", ".join(sorted(keys)[:4]) or "no keys"
        raise WeightsError(f"unrecognised checkpoint: its keys match none of {', '.join(families.names())} "
                           f"(first keys: {shown})")
    return fam.name


def describe(shapes: dict) -> Description:
    """Family, config and variant of a single-file checkpoint from its tensors' shapes alone (names -> shape
    tuples or tensors): the same conversion and inference as loading, on meta tensors."""
    sd = {k: v if isinstance(v, torch.Tensor) else torch.empty(tuple(v), device="meta")
          for k, v in _strip_prefix(dict(shapes)).items()
          if k != "scaled_fp8" and not k.endswith(_QUANT_MARKERS)}  # what loading drops (_dequantize)
    fam = families.get(detect_family(sd.keys()))
    hints: dict = {}
    if fam.convert is not None and fam.is_original(set(sd)):
        sd, hints = fam.convert(sd, "checkpoint")
    inferred = fam.infer_config(sd, hints)
    variant = fam.variant_of(inferred, hints.get("pipeline", ""))
    return Description(fam, {**_base_config(fam, variant), **inferred}, variant)


PAIR = " + "  # a model source naming two expert files: "HIGH + LOW" (high-noise first)


def pair_source(high: str, low: str) -> str:
    """The source naming two single files that are the two experts of one model (Wan 2.2 A14B)."""
    return f"{high}{PAIR}{low}"


def split_pair(source: str) -> tuple[str, str] | None:
    """(high, low) of a two-expert source, or None (a path that exists as given is never split)."""
    if PAIR not in str(source) or Path(str(source)).expanduser().exists():
        return None
    high, _, low = str(source).partition(PAIR)
    return high, low


def resolve_variant(fam: Family, config: dict, pipeline: str, requested: str | None, name: str) -> str:
    """The variant to load as: the requested one when the files (`config`) can be it (a family with
    `refuse_variant` checks; a one-line WeightsError when they cannot), else the one they are."""
    detected = fam.variant_of(config, pipeline)
    if requested and fam.refuse_variant is not None:
        why = fam.refuse_variant(config, detected, requested)
        if why:
            raise WeightsError(f"{name}: {why}")
    return requested or detected


def expert_folders(path: Path) -> tuple[Path, Path] | None:
    """(transformer/, transformer_2/) of a pipeline folder holding two experts (Wan 2.2 A14B), else None."""
    first, second = path / "transformer", path / "transformer_2"
    if not (path / "config.json").is_file() and (first / "config.json").is_file() \
            and (second / "config.json").is_file():
        return first, second
    return None


def folder_config(path: Path) -> tuple[Family, dict, str]:
    """(family, config, pipeline class) of a diffusers model or pipeline folder, from its config files. A pipeline
    folder with two experts (transformer/ and transformer_2/, one architecture) gives the first's config with
    `boundary_ratio` (model_index.json's; None when it names none)."""
    pipeline_class = ""
    folder = path
    index: dict = {}
    if not (folder / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        folder = path / "transformer"
        if (path / "model_index.json").is_file():
            index = _read_json(path / "model_index.json")
            pipeline_class = str(index.get("_class_name", ""))
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise WeightsError(f"{path} is not a diffusers model folder: no config.json (nor transformer/config.json)")
    config = _read_json(config_file)
    class_name = str(config.get("_class_name", ""))
    fam = families.by_class(class_name, config)
    if fam is None:
        classes = ", ".join(f.diffusers_class for f in families.families().values())
        raise WeightsError(f"{config_file}: model class {class_name or '(none)'!r} is not a supported transformer "
                           f"(expected one of {classes})")
    pair = expert_folders(path)
    if pair is not None:
        second = _read_json(pair[1] / "config.json")
        strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        if second.get("_class_name") != class_name or strip(second) != strip(config):
            raise WeightsError(f"{path}: transformer/ and transformer_2/ are not two experts of one architecture "
                               "(their config.json differ)")
        if not fam.experts:
            raise WeightsError(f"{path}: a pipeline folder with transformer_2/ is not supported for {fam.name}")
        config = {**config, "boundary_ratio": index.get("boundary_ratio")}
    return fam, config, pipeline_class


# ----------------------------------------------------------------------------------------------------------------
# Diffusers folders


def _load_folder(path: Path, want_family: str | None, want_variant: str | None, dtype: torch.dtype):
    fam, folder_cfg, pipeline_class = folder_config(path)
    folder = path if (path / "config.json").is_file() else path / "transformer"
    if want_family and fam.name != want_family:
        raise WeightsError(f"family mismatch: {folder} looks like {fam.name}, not {want_family}")
    if "boundary_ratio" in folder_cfg:
        raise WeightsError(f"{path}: a pipeline folder of two experts loads from safetensors weights only "
                           "(diffusion_pytorch_model*.safetensors in transformer/ and transformer_2/)")
    weights = [p for p in folder.iterdir() if p.name.startswith("diffusion_pytorch_model")
               and p.name.endswith((".safetensors", ".bin"))]
    if not weights:
        raise WeightsError(f"{folder} has a config.json but no diffusion_pytorch_model*.safetensors weights")
    import diffusers
    from safetensors import SafetensorError

    cls = getattr(diffusers, fam.diffusers_class)
    if getattr(cls, "_keep_in_fp32_modules", None) and importlib.util.find_spec("accelerate") is None:
        # diffusers' from_pretrained needs accelerate for such a class (Wan): the folder's config and weights files
        # through the single-file construction instead
        config = {k: v for k, v in _read_json(folder / "config.json").items() if not k.startswith("_")}
        sd: dict = {}
        for file in sorted(weights):
            sd.update(_read_state_dict(file, dtype))
        return (fam.name, resolve_variant(fam, config, pipeline_class, want_variant, path.name),
                _build(fam, config, sd, folder))
    try:
        # low_cpu_mem_usage needs accelerate; asking for it without accelerate only earns a warning
        model = cls.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                    low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
        chain, cause = [], e
        while cause is not None and len(chain) < 8:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        bad = next((c for c in chain if isinstance(c, SafetensorError)), None)
        if bad is not None or "Unable to load weights from checkpoint file" in str(e):
            detail = _first_line(bad) if bad is not None else "unreadable weights file"
            names = ", ".join(sorted(p.name for p in weights)[:3]) + (", ..." if len(weights) > 3 else "")
            raise WeightsError(f"weights in {folder} ({names}) are truncated or corrupt ({detail})") from None
        raise WeightsError(f"cannot load diffusers folder {folder}: {_first_line(e)}") from None
    return fam.name, resolve_variant(fam, dict(model.config), pipeline_class, want_variant, path.name), model




# ----------------------------------------------------------------------------------------------------------------
# Single files


def _load_single_file(path: Path, want_family: str | None, want_variant: str | None, dtype: torch.dtype,
                      config_overrides: dict | None):
    sd = _strip_prefix(_read_state_dict(path, dtype))
    fam = families.get(detect_family(sd.keys()))
    if want_family and fam.name != want_family:
        raise WeightsError(f"family mismatch: {path.name} looks like {fam.name}, not {want_family}")
    hints: dict = {}
    if fam.convert is not None and fam.is_original(set(sd)):
        sd, hints = fam.convert(sd, path.name)
    config = fam.infer_config(sd, hints)
    variant = resolve_variant(fam, config, hints.get("pipeline", ""), want_variant, path.name)
    config = {**_base_config(fam, variant), **config, **(config_overrides or {})}
    return fam.name, variant, _build(fam, config, sd, path)


def _read_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    name = path.name.lower()
    if name.endswith(_SAFETENSORS_SUFFIXES):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                raw = {k: f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata()
        except SafetensorError as e:
            raise WeightsError(f"{path} is truncated or corrupt, not a readable safetensors file "
                               f"({_first_line(e)})") from None
        refusal = quant_refusal(path.name, quant_formats(raw, metadata))
        if refusal:
            raise WeightsError(refusal)
    elif name.endswith(_TORCH_SUFFIXES):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for bad pickles / zip archives
            raise WeightsError(f"{path} is truncated or corrupt, not a readable torch checkpoint "
                               f"({_first_line(e)})") from None
        obj = unwrap_state_dict(obj)
        if not isinstance(obj, dict):
            raise WeightsError(f"{path} does not contain a state dict")
        raw = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    else:
        raise WeightsError(f"unsupported weights file {path.name}: expected .safetensors (or .pt/.pth/.ckpt)")
    return _dequantize(raw, dtype)


def unwrap_state_dict(obj):
    """The state dict inside a torch checkpoint that wraps it (training checkpoints: state_dict, model, ...)."""
    for wrapper in ("state_dict", "model", "module", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            return obj[wrapper]
    return obj


_QUANT_MARKERS = (".scale_weight", ".scale_input", ".input_scale", ".weight_scale", ".comfy_quant")
# The newer ComfyUI's quantised layers (its comfy/quant_ops.py QUANT_ALGOS): each carries `<layer>.comfy_quant`, a
# uint8 tensor of UTF-8 JSON whose "format" says how `<layer>.weight` is stored (float8_e4m3fn, float8_e5m2, mxfp8,
# nvfp4, int8_tensorwise, convrot_w4a4, asym_w4a8_int8, awq_w4a16, ...); some files list the same per layer in
# their safetensors metadata instead, `_quantization_metadata` = {"layers": {layer: {"format": ...}}}.
QUANT_MARKER, QUANT_METADATA = ".comfy_quant", "_quantization_metadata"
READABLE_QUANT = ("float8_e4m3fn", "float8_e5m2")  # fp8 with one scale per tensor: upcast, times its scale


def quant_formats(tensors: dict, metadata: dict | None) -> dict[str, str]:
    """Layer -> ComfyUI quantisation format, from the `.comfy_quant` markers among `tensors` (name -> tensor; other
    names are ignored) and a safetensors file's metadata. An unreadable marker is the format "unreadable"."""
    out: dict[str, str] = {}
    listed = (metadata or {}).get(QUANT_METADATA)
    if listed is not None:
        try:
            layers = json.loads(listed).get("layers", {})
        except (ValueError, AttributeError):
            layers = {"(file metadata)": "unreadable"}
        for layer, conf in (layers.items() if isinstance(layers, dict) else ()):
            out[layer] = str(conf.get("format", "unknown")) if isinstance(conf, dict) else "unreadable"
    for key, marker in tensors.items():
        if not key.endswith(QUANT_MARKER):
            continue
        try:
            conf = json.loads(bytes(marker.to(torch.uint8).flatten().tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RuntimeError, NotImplementedError):
            conf = None  # not JSON, or a marker on the meta device (its bytes unknown)
        out[key[: -len(QUANT_MARKER)]] = str(conf.get("format", "unknown")) if isinstance(conf, dict) else \
            "unreadable"
    return out


def quant_refusal(name: str, formats: dict[str, str]) -> str | None:
    """One line refusing a file with layers in a ComfyUI quantisation format the engine does not read, naming the
    formats and how many layers use each; None when every marked layer is fp8 (read as `_dequantize` does)."""
    unread: dict[str, int] = {}
    for fmt in formats.values():
        if fmt not in READABLE_QUANT:
            unread[fmt] = unread.get(fmt, 0) + 1
    if not unread:
        return None
    what = ", ".join(f"{fmt} ({n} layer{'s' if n > 1 else ''})" for fmt, n in sorted(unread.items()))
    return (f"{name} is quantised by ComfyUI as {what} (its .comfy_quant markers), which the pool cannot load: use "
            "a bf16, fp16 or fp8 checkpoint (float8 with one scale per tensor)")


def file_quant_refusal(path: str | Path) -> str | None:
    """quant_refusal for a safetensors file, from its header, metadata and markers (no weights read); also a
    float8 weight scaled per row or block (ComfyUI's mxfp8 and like files) is refused."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            markers = {k: f.get_tensor(k) for k in keys if k.endswith(QUANT_MARKER)}
            metadata = f.metadata()
            scales = {k: f.get_slice(k).get_shape() for k in keys if k.endswith((".weight_scale", ".scale_weight"))}
    except SafetensorError as e:
        raise WeightsError(f"{path} is truncated or corrupt, not a readable safetensors file "
                           f"({_first_line(e)})") from None
    refusal = quant_refusal(path.name, quant_formats(markers, metadata))
    if refusal:
        return refusal
    for key, shape in sorted(scales.items()):
        if _numel(shape) != 1:
            return _block_scale_refusal(path.name, key, shape)
    return None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _block_scale_refusal(name: str, key: str, shape) -> str:
    return (f"{name}: {key} scales its weight per row or block (shape {list(shape)}, e.g. ComfyUI's mxfp8), which "
            "the pool cannot load: use a bf16, fp16 or fp8 checkpoint (float8 with one scale per tensor)")


def _dequantize(raw: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast floating tensors to `dtype`; fp8 is upcast exactly. ComfyUI "scaled fp8" files store, next to each fp8
    `x.weight`, a `x.scale_weight` to multiply it by (and `x.scale_input`/`scaled_fp8` markers, unused here); its
    newer mixed-precision files (per-layer float8 with a `x.weight_scale`, optional `x.input_scale` and
    `x.comfy_quant` metadata) are read the same way. Other quantized formats (int8 blocks, NVFP4) are refused."""
    out = {}
    for k, t in raw.items():
        if k.endswith((".weight_scale_2", ".pre_quant_scale")):
            raise WeightsError(f"quantized weights with {k.rsplit('.', 1)[1]} (e.g. NVFP4) are not supported; "
                               "use a bf16, fp16 or fp8 checkpoint")
        if k == "scaled_fp8" or k.endswith(_QUANT_MARKERS):
            continue
        if k.endswith(".weight"):
            scale_key = next((s for s in (k[: -len("weight")] + "scale_weight", k + "_scale") if s in raw), None)
        else:
            scale_key = None
        if t.is_floating_point():
            if scale_key is not None:
                if raw[scale_key].numel() != 1:  # per row or block: not this element-wise product
                    raise WeightsError(_block_scale_refusal(k.rsplit(".", 1)[0], scale_key,
                                                            tuple(raw[scale_key].shape)))
                t = t.to(torch.float32) * raw[scale_key].to(torch.float32)
            t = t.to(dtype)
        elif scale_key is not None:
            raise WeightsError(f"{k} is quantized as {str(t.dtype).replace('torch.', '')} with a scale, which is not "
                               "supported; use a bf16, fp16 or fp8 checkpoint")
        out[k] = t
    return out


_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.", "module.")


def _strip_prefix_keys(keys: list[str]) -> list[str]:
    return list(_strip_prefix(dict.fromkeys(keys)).keys())


def _strip_prefix(sd: dict) -> dict:
    """Drop a wrapper prefix. With `model.diffusion_model.` (ComfyUI/SAI all-in-one files) only those keys are kept:
    the others belong to text encoders or the VAE. Other prefixes are stripped when every key carries them."""
    lead = _PREFIXES[0]
    if any(k.startswith(lead) for k in sd):
        return {k[len(lead):]: v for k, v in sd.items() if k.startswith(lead)}
    for prefix in _PREFIXES[1:]:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _base_config(fam: Family, variant: str) -> dict:
    try:
        name = fam.variant(variant).config
    except KeyError:
        name = fam.default_variant.config
    cfg = _read_json(CONFIG_DIR / name)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------------------------
# Model construction


def _build(fam: Family, config: dict, sd: dict, path: Path) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, fam.diffusers_class)
    try:
        from diffusers.models.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - older/newer diffusers
        no_init_weights = nullcontext
    try:
        with no_init_weights():  # parameters are allocated but not initialised: the checkpoint replaces them
            model = cls.from_config(config)
    except (TypeError, ValueError, AssertionError) as e:
        raise WeightsError(f"{path.name}: inferred {fam.name} config is invalid: {_first_line(e)}") from None
    expected = set(model.state_dict().keys())
    missing, unexpected = expected - sd.keys(), sd.keys() - expected
    if missing or unexpected:
        parts = ([f"missing keys {_few(missing)}"] if missing else []) + \
                ([f"unexpected keys {_few(unexpected)}"] if unexpected else [])
        raise WeightsError(f"{path.name}: weights do not fit the {fam.name} model: {'; '.join(parts)}")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        msg = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise WeightsError(f"{path.name}: weights do not fit the inferred {fam.name} config: {msg}") from None
    return model


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def parameter_shapes(fam: Family, config: dict, tiny: bool = False) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parameters of the model loading builds from `config` (a single-file checkpoint's
    `describe` config; `tiny`: a built-in tiny model's constructor kwargs), constructed on the meta device."""
    import diffusers

    from .tiny import construct

    with torch.device("meta"):
        model = construct(fam, config) if tiny else getattr(diffusers, fam.diffusers_class).from_config(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _finalize_tensors(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """In place: bring stray floating tensors (e.g. recomputed position tables) to `dtype` (unlike `model.to(dtype)`,
    without touching the others or a diffusers warning), and copy tensors that safetensors left at unaligned
    addresses, where CPU kernels take other code paths: the loaded model then computes bit for bit like the same
    model built in memory."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or t.device.type != "cpu":
                    continue
                cast = t.is_floating_point() and t.dtype != dtype
                if cast or t.data_ptr() % 64:
                    new = t.to(dtype) if cast else t.clone()
                    store[name] = torch.nn.Parameter(new, requires_grad=False) if isinstance(
                        t, torch.nn.Parameter) else new


def _parse_family(family: str | None) -> tuple[str | None, str | None]:
    try:
        fam, variant = families.parse(family)
    except KeyError as e:
        raise WeightsError(str(e.args[0])) from None
    return (fam.name if fam else None), (variant.name if variant else None)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {_first_line(e)}") from None
