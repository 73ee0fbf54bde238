"""Load a DiT transformer (Flux.1, SD3/SD3.5, PixArt) from local files, never from a hub.

Sources:
  * a diffusers model folder (config.json + diffusion_pytorch_model*.safetensors, sharded or not) or a pipeline
    folder with a ``transformer/`` subfolder;
  * a single-file checkpoint in the original layout ComfyUI keeps in models/diffusion_models (BFL Flux, SD3/SD3.5
    MMDiT, PixArt), optionally prefixed ``model.diffusion_model.``, possibly fp8 (also ComfyUI "scaled fp8");
  * a single file whose keys are already in diffusers layout.

Single files are converted to diffusers keys (with diffusers' own converters for Flux and SD3, with a local mapping
for PixArt, for which diffusers ships none), then loaded strictly into a model whose config is a published base config
(``configs/*.json``) with every size field that the weights determine replaced by the value read from them.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .errors import WeightsError

FAMILIES = ("flux", "sd3", "pixart")
VARIANT_FAMILY = {
    "flux-dev": "flux", "flux-schnell": "flux",
    "sd3-medium": "sd3", "sd3.5-medium": "sd3", "sd3.5-large": "sd3",
    "pixart-sigma": "pixart", "pixart-alpha": "pixart",
}
DEFAULT_VARIANT = {"flux": "flux-dev", "sd3": "sd3-medium", "pixart": "pixart-sigma"}
FAMILY_CLASS = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel", "pixart": "PixArtTransformer2DModel"}
CONFIG_DIR = Path(__file__).parent / "configs"

_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))


@dataclass
class LoadedTransformer:
    family: str  # "flux" | "sd3" | "pixart"
    variant: str  # e.g. "flux-dev", "sd3.5-large", "pixart-sigma" (best effort)
    model: torch.nn.Module  # diffusers transformer, eval(), requires_grad False, in the requested dtype


# ----------------------------------------------------------------------------------------------------------------
# Public API


def load_transformer(source: str, family: str | None = None, dtype: torch.dtype = torch.float32,
                     device: str = "cpu", config_overrides: dict | None = None) -> LoadedTransformer:
    """Load the transformer at `source` (folder or single file).

    `family` may be a family ("flux", "sd3", "pixart") or a variant name ("sd3.5-large", ...); when given, the
    weights must belong to it. `config_overrides` replaces fields of the inferred config of a single-file checkpoint
    (for fields the weights cannot determine, e.g. the head count of a non-standard PixArt).
    """
    want_family, want_variant = _parse_family(family)
    path = Path(str(source)).expanduser()
    shown = source if len(source) <= 200 else source[:200] + "..."
    try:
        found, is_dir = path.exists(), path.is_dir()
    except OSError as e:  # e.g. a name longer than the file system allows
        raise WeightsError(f"model path not usable: {shown} ({e.strerror})") from None
    if not found:
        raise WeightsError(f"model path not found: {shown}")
    if is_dir:
        fam, variant, model = _load_folder(path, want_family, dtype)
    else:
        fam, variant, model = _load_single_file(path, want_family, want_variant, dtype, config_overrides)
    _finalize_tensors(model, dtype)
    model = model.to(device).eval().requires_grad_(False)
    return LoadedTransformer(fam, want_variant or variant, model)


def detect_family(state_dict_keys: Iterable[str]) -> str:
    """Family of a checkpoint from its key names (original or diffusers layout, with or without prefix)."""
    keys = _strip_prefix_keys(list(state_dict_keys))
    keyset = set(keys)
    if any(k.startswith(("double_blocks.", "single_blocks.", "single_transformer_blocks.")) for k in keys):
        return "flux"
    if {"x_embedder.weight", "context_embedder.weight", "norm_out.linear.weight"} <= keyset:
        return "flux"  # diffusers layout without single blocks
    if any(k.startswith("joint_blocks.") for k in keys):
        return "sd3"
    if "pos_embed.proj.weight" in keyset and any(re.match(r"transformer_blocks\.\d+\.attn\.add_q_proj\.", k)
                                                 for k in keys):
        return "sd3"
    if any(re.match(r"blocks\.\d+\.cross_attn\.", k) for k in keys):
        return "pixart"
    if any(k.startswith("adaln_single.") for k in keys) and any(k.startswith("caption_projection.") for k in keys):
        return "pixart"
    shown = ", ".join(sorted(keys)[:4]) or "no keys"
    raise WeightsError(f"unrecognised checkpoint: its keys match none of {', '.join(FAMILIES)} (first keys: {shown})")


# ----------------------------------------------------------------------------------------------------------------
# Diffusers folders


def _load_folder(path: Path, want_family: str | None, dtype: torch.dtype):
    pipeline_class = ""
    folder = path
    if not (folder / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        folder = path / "transformer"
        index = path / "model_index.json"
        if index.is_file():
            pipeline_class = str(_read_json(index).get("_class_name", ""))
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise WeightsError(f"{path} is not a diffusers model folder: no config.json (nor transformer/config.json)")
    config = _read_json(config_file)
    class_name = str(config.get("_class_name", ""))
    fam = {v: k for k, v in FAMILY_CLASS.items()}.get(class_name)
    if fam is None and class_name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_single":
        fam = "pixart"  # PixArt folders saved before diffusers had a dedicated class
    if fam is None:
        raise WeightsError(f"{config_file}: model class {class_name or '(none)'!r} is not a supported transformer "
                           f"(expected one of {', '.join(FAMILY_CLASS.values())})")
    if want_family and fam != want_family:
        raise WeightsError(f"family mismatch: {folder} looks like {fam}, not {want_family}")
    weights = [p for p in folder.iterdir() if p.name.startswith("diffusion_pytorch_model")
               and p.name.endswith((".safetensors", ".bin"))]
    if not weights:
        raise WeightsError(f"{folder} has a config.json but no diffusion_pytorch_model*.safetensors weights")
    import diffusers
    from safetensors import SafetensorError

    cls = getattr(diffusers, FAMILY_CLASS[fam])
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
    return fam, _variant_from_config(fam, dict(model.config), pipeline_class), model


def _variant_from_config(fam: str, cfg: dict, pipeline_class: str = "") -> str:
    if fam == "flux":
        return "flux-dev" if cfg.get("guidance_embeds") else "flux-schnell"
    if fam == "sd3":
        if cfg.get("dual_attention_layers"):
            return "sd3.5-medium"
        return "sd3.5-large" if cfg.get("qk_norm") else "sd3-medium"
    if "Alpha" in pipeline_class:
        return "pixart-alpha"
    if "Sigma" in pipeline_class:
        return "pixart-sigma"
    extra = cfg.get("use_additional_conditions")
    if extra is None:
        extra = cfg.get("sample_size") == 128
    return "pixart-alpha" if extra else "pixart-sigma"


# ----------------------------------------------------------------------------------------------------------------
# Single files


def _load_single_file(path: Path, want_family: str | None, want_variant: str | None, dtype: torch.dtype,
                      config_overrides: dict | None):
    sd = _strip_prefix(_read_state_dict(path, dtype))
    fam = detect_family(sd.keys())
    if want_family and fam != want_family:
        raise WeightsError(f"family mismatch: {path.name} looks like {fam}, not {want_family}")
    hints: dict = {}
    if fam == "flux" and any(k.startswith("double_blocks.") or k.startswith("single_blocks.") for k in sd):
        sd = _convert_flux(sd, path)
    elif fam == "sd3" and any(k.startswith("joint_blocks.") for k in sd):
        sd = _convert_sd3(sd, path)
    elif fam == "pixart" and any(k.startswith("blocks.") for k in sd):
        sd, hints = _convert_pixart(sd, path)
    config = _infer_config(fam, sd, hints)
    variant = want_variant or _variant_from_config(fam, config, hints.get("pipeline", ""))
    base = _base_config(variant)
    config = {**base, **config, **(config_overrides or {})}
    return fam, variant, _build(fam, config, sd, path)


def _read_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    name = path.name.lower()
    if name.endswith(_SAFETENSORS_SUFFIXES):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                raw = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise WeightsError(f"{path} is truncated or corrupt, not a readable safetensors file "
                               f"({_first_line(e)})") from None
    elif name.endswith(_TORCH_SUFFIXES):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for bad pickles / zip archives
            raise WeightsError(f"{path} is truncated or corrupt, not a readable torch checkpoint "
                               f"({_first_line(e)})") from None
        for wrapper in ("state_dict", "model", "module", "ema"):
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
        if not isinstance(obj, dict):
            raise WeightsError(f"{path} does not contain a state dict")
        raw = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    else:
        raise WeightsError(f"unsupported weights file {path.name}: expected .safetensors (or .pt/.pth/.ckpt)")
    return _dequantize(raw, dtype)


def _dequantize(raw: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast floating tensors to `dtype`; fp8 is upcast exactly. ComfyUI "scaled fp8" files store, next to each fp8
    `x.weight`, a `x.scale_weight` to multiply it by (and `x.scale_input`/`scaled_fp8` markers, unused here)."""
    out = {}
    for k, t in raw.items():
        if k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input")):
            continue
        if t.is_floating_point():
            scale_key = k[: -len("weight")] + "scale_weight" if k.endswith(".weight") else None
            if scale_key in raw:
                t = t.to(torch.float32) * raw[scale_key].to(torch.float32)
            t = t.to(dtype)
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


def _run_converter(convert, sd: dict, path: Path) -> dict:
    remaining = dict(sd)
    try:
        converted = convert(remaining)
    except KeyError as e:
        raise WeightsError(f"{path.name}: incomplete checkpoint, missing key {e.args[0]!r}") from None
    except (RuntimeError, IndexError, ValueError) as e:
        raise WeightsError(f"{path.name}: cannot convert to diffusers layout: {_first_line(e)}") from None
    if remaining:
        raise WeightsError(f"{path.name}: unexpected keys {_few(remaining)}")
    return converted


def _convert_flux(sd: dict, path: Path) -> dict:
    """BFL layout -> diffusers, with diffusers' converter.

    That converter splits each single block's fused `linear1` (q, k, v, mlp) with sizes fixed for the 3072-wide
    published model. So the fused tensors are split here, at the width read from `img_in`, and the converter gets
    shape-only placeholders on the meta device in their place, whose outputs are then replaced.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert

    if "img_in.weight" not in sd:
        raise WeightsError(f"{path.name}: incomplete Flux checkpoint, missing key 'img_in.weight'")
    hidden = sd["img_in.weight"].shape[0]
    sd = dict(sd)
    split: dict[str, torch.Tensor] = {}
    for key in [k for k in sd if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", k)]:
        i, kind = key.split(".")[1], key.rsplit(".", 1)[1]
        fused = sd[key]
        if fused.shape[0] <= 3 * hidden:
            raise WeightsError(f"{path.name}: {key} has {fused.shape[0]} rows, expected more than 3 x {hidden}")
        q, k_, v, mlp = torch.split(fused, [hidden, hidden, hidden, fused.shape[0] - 3 * hidden])
        prefix = f"single_transformer_blocks.{i}."
        split.update({f"{prefix}attn.to_q.{kind}": q, f"{prefix}attn.to_k.{kind}": k_,
                      f"{prefix}attn.to_v.{kind}": v, f"{prefix}proj_mlp.{kind}": mlp})
        sd[key] = torch.empty((4 * 3072 + 3 * 3072, *fused.shape[1:]), device="meta", dtype=fused.dtype)
    converted = _run_converter(convert, sd, path)
    converted.update({k: v.contiguous() for k, v in split.items()})
    return {k: v.contiguous() for k, v in converted.items()}


def _convert_sd3(sd: dict, path: Path) -> dict:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers as convert

    return {k: v.contiguous() for k, v in _run_converter(convert, sd, path).items()}


# PixArt original -> diffusers names (key facts of both layouts; diffusers ships no single-file converter for it).
_PIXART_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
}
_PIXART_BLOCK = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}


def _convert_pixart(sd: dict, path: Path) -> tuple[dict, dict]:
    """PixArt-alpha/sigma original layout -> diffusers. Returns (state dict, hints for the config)."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    hints: dict = {}
    pos = sd.pop("pos_embed", None)  # a fixed sin-cos table; diffusers recomputes it from the config
    if pos is not None:
        hints["pos_embed"] = pos
    y_embedding = sd.pop("y_embedder.y_embedding", None)  # learned null caption, unused by diffusers
    if y_embedding is not None:  # its length is the caption token count: 120 for alpha, 300 for sigma
        hints["pipeline"] = {120: "PixArtAlpha", 300: "PixArtSigma"}.get(y_embedding.shape[0], "")
    if "final_layer.scale_shift_table" in sd:
        out["scale_shift_table"] = sd.pop("final_layer.scale_shift_table")
    for key in list(sd):
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if m:
            i, name, kind = m.groups()
            dst = f"transformer_blocks.{i}."
            if name == "attn.qkv":
                for part, t in zip(("to_q", "to_k", "to_v"), sd.pop(key).chunk(3)):
                    out[f"{dst}attn1.{part}.{kind}"] = t
            elif name == "cross_attn.kv_linear":
                for part, t in zip(("to_k", "to_v"), sd.pop(key).chunk(2)):
                    out[f"{dst}attn2.{part}.{kind}"] = t
            elif name in _PIXART_BLOCK:
                out[f"{dst}{_PIXART_BLOCK[name]}.{kind}"] = sd.pop(key)
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.scale_shift_table", key)
        if m:
            out[f"transformer_blocks.{m.group(1)}.scale_shift_table"] = sd.pop(key)
            continue
        stem, _, kind = key.rpartition(".")
        if stem in _PIXART_TOP:
            out[f"{_PIXART_TOP[stem]}.{kind}"] = sd.pop(key)
    if sd:
        raise WeightsError(f"{path.name}: unexpected keys {_few(sd)}")
    return {k: v.contiguous() for k, v in out.items()}, hints


# ----------------------------------------------------------------------------------------------------------------
# Config inference (from diffusers-layout keys and shapes)


def _base_config(variant: str) -> dict:
    cfg = _read_json(CONFIG_DIR / f"{variant}.json")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _count(sd: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _head_dim(sd: dict, norm_key: str, hidden: int, base_head_dim: int, min_heads: int = 4) -> int:
    """Head size: exact from a per-head q-norm weight when the model has one (all Flux, SD3.5); else the published
    head size when `hidden` is a multiple of it giving at least `min_heads` heads (all published models; MMDiT
    always has 64-wide heads, one per block of depth, so SD3 passes 1); else 4 heads, the convention of this
    project's small test models. `config_overrides` covers anything else."""
    if norm_key in sd:
        return int(sd[norm_key].shape[0])
    if hidden % base_head_dim == 0 and hidden // base_head_dim >= min_heads:
        return base_head_dim
    if hidden % 4:
        raise WeightsError(f"cannot infer the attention head count of a {hidden}-wide model; "
                           "pass config_overrides={'num_attention_heads': ..., 'attention_head_dim': ...}")
    return hidden // 4


def _require(sd: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise WeightsError(f"incomplete checkpoint: missing keys {', '.join(missing[:4])}")


def _infer_config(fam: str, sd: dict, hints: dict) -> dict:
    if fam == "flux":
        _require(sd, "x_embedder.weight", "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight",
                 "proj_out.weight")
        hidden, in_channels = sd["x_embedder.weight"].shape
        norm_key = next((k for k in ("transformer_blocks.0.attn.norm_q.weight",
                                     "single_transformer_blocks.0.attn.norm_q.weight") if k in sd), "")
        head_dim = _head_dim(sd, norm_key, hidden, 128)
        out_channels = sd["proj_out.weight"].shape[0]
        return dict(
            patch_size=1, in_channels=in_channels, out_channels=None if out_channels == in_channels else out_channels,
            num_layers=_count(sd, "transformer_blocks."), num_single_layers=_count(sd, "single_transformer_blocks."),
            attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
            joint_attention_dim=sd["context_embedder.weight"].shape[1],
            pooled_projection_dim=sd["time_text_embed.text_embedder.linear_1.weight"].shape[1],
            guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in sd,
            axes_dims_rope=_flux_axes(head_dim))
    if fam == "sd3":
        _require(sd, "pos_embed.proj.weight", "context_embedder.weight",
                 "time_text_embed.text_embedder.linear_1.weight", "proj_out.weight")
        hidden, in_channels, patch, _ = sd["pos_embed.proj.weight"].shape
        head_dim = _head_dim(sd, "transformer_blocks.0.attn.norm_q.weight", hidden, 64, min_heads=1)
        layers = _count(sd, "transformer_blocks.")
        cfg = dict(
            patch_size=patch, in_channels=in_channels, out_channels=sd["proj_out.weight"].shape[0] // patch ** 2,
            num_layers=layers, attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
            joint_attention_dim=sd["context_embedder.weight"].shape[1],
            caption_projection_dim=sd["context_embedder.weight"].shape[0],
            pooled_projection_dim=sd["time_text_embed.text_embedder.linear_1.weight"].shape[1],
            dual_attention_layers=[i for i in range(layers) if f"transformer_blocks.{i}.attn2.to_q.weight" in sd],
            qk_norm=None)
        if "transformer_blocks.0.attn.norm_q.weight" in sd:
            cfg["qk_norm"] = "layer_norm" if "transformer_blocks.0.attn.norm_q.bias" in sd else "rms_norm"
        if "pos_embed.pos_embed" in sd:
            cfg["pos_embed_max_size"] = math.isqrt(sd["pos_embed.pos_embed"].shape[1])
        return cfg
    # pixart
    _require(sd, "pos_embed.proj.weight", "caption_projection.linear_1.weight", "proj_out.weight",
             "transformer_blocks.0.attn2.to_k.weight")
    hidden, in_channels, patch, _ = sd["pos_embed.proj.weight"].shape
    head_dim = _head_dim(sd, "transformer_blocks.0.attn1.norm_q.weight", hidden, 72)
    cfg = dict(
        patch_size=patch, in_channels=in_channels, out_channels=sd["proj_out.weight"].shape[0] // patch ** 2,
        num_layers=_count(sd, "transformer_blocks."), attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        cross_attention_dim=sd["transformer_blocks.0.attn2.to_k.weight"].shape[1],
        caption_channels=sd["caption_projection.linear_1.weight"].shape[1],
        use_additional_conditions="adaln_single.emb.resolution_embedder.linear_1.weight" in sd,
        norm_elementwise_affine="transformer_blocks.0.norm1.weight" in sd)
    pos = hints.get("pos_embed")
    if pos is not None:  # the original's fixed table gives the training resolution and its interpolation scale
        grid = math.isqrt(pos.shape[-2])
        cfg["sample_size"] = grid * patch
        cfg["interpolation_scale"] = _pixart_interpolation(pos, grid)
    return cfg


def _flux_axes(head_dim: int) -> list[int]:
    """RoPE axes (no weights encode them): the published [16, 56, 56] for head size 128; in general the first (index)
    axis gets min(16, head_dim / 4) and the two spatial axes split the rest, e.g. 64 -> [16, 24, 24], 16 -> [4, 6, 6].
    """
    first = min(16, head_dim // 4)
    rest = (head_dim - first) // 2
    return [first, rest, rest] if first + 2 * rest == head_dim else [head_dim - 2 * rest, rest, rest]


def _pixart_interpolation(pos: torch.Tensor, grid: int) -> float:
    """Find which interpolation scale produced the checkpoint's sin-cos table (PixArt used 0.5, 1, 2 or 4)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    table = pos.reshape(-1, pos.shape[-1]).double()
    for scale in (1, 2, 0.5, 4, max(grid * 2 // 64, 1)):
        ref = get_2d_sincos_pos_embed(table.shape[-1], grid, base_size=grid, interpolation_scale=scale,
                                      output_type="pt")
        if ref.shape == table.shape and torch.allclose(ref.double(), table, atol=1e-2):
            return scale
    return max(grid * 2 // 64, 1)  # diffusers' default for a sample size of grid * 2


# ----------------------------------------------------------------------------------------------------------------
# Model construction


def _build(fam: str, config: dict, sd: dict, path: Path) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, FAMILY_CLASS[fam])
    try:
        from diffusers.models.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - older/newer diffusers
        no_init_weights = nullcontext
    try:
        with no_init_weights():  # parameters are allocated but not initialised: the checkpoint replaces them
            model = cls.from_config(config)
    except (TypeError, ValueError, AssertionError) as e:
        raise WeightsError(f"{path.name}: inferred {fam} config is invalid: {_first_line(e)}") from None
    expected = set(model.state_dict().keys())
    missing, unexpected = expected - sd.keys(), sd.keys() - expected
    if missing or unexpected:
        parts = ([f"missing keys {_few(missing)}"] if missing else []) + \
                ([f"unexpected keys {_few(unexpected)}"] if unexpected else [])
        raise WeightsError(f"{path.name}: weights do not fit the {fam} model: {'; '.join(parts)}")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        msg = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise WeightsError(f"{path.name}: weights do not fit the inferred {fam} config: {msg}") from None
    return model


# ----------------------------------------------------------------------------------------------------------------
# Helpers


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
    if family in (None, "", "auto"):
        return None, None
    if family in FAMILIES:
        return family, None
    if family in VARIANT_FAMILY:
        return VARIANT_FAMILY[family], family
    raise WeightsError(f"unknown family {family!r}: expected one of {', '.join(FAMILIES + tuple(VARIANT_FAMILY))}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _few(keys: Iterable[str], n: int = 4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
