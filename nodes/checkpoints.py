"""Checkpoints from ComfyUI's model folders, and the variant of one (for the sampling settings on ComfyUI's
side) read from its key names or config without loading weights."""
from __future__ import annotations

import os
from pathlib import Path

from .families import TINY_VARIANT, VARIANTS
from .geometry import tensor_shapes

FOLDERS = ("diffusion_models", "unet", "checkpoints")
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
TINY_MODELS = tuple(TINY_VARIANT)  # built-in random-weight models: a check of the set-up without downloads


def _folder_paths():
    import folder_paths

    return folder_paths


def _folder_names(fp) -> list[str]:
    known = getattr(fp, "folder_names_and_paths", {})
    return [f for f in FOLDERS if f in known or not known]


def list_checkpoints() -> list[str]:
    """Weight files in diffusion_models, unet and checkpoints, diffusers folders in the first two, then the
    built-in tiny models."""
    fp = _folder_paths()
    names: list[str] = []
    for folder in _folder_names(fp):
        try:
            files = fp.get_filename_list(folder)
        except Exception:  # noqa: BLE001 - a folder kind this ComfyUI does not know
            continue
        names += [f for f in files if f.lower().endswith(WEIGHT_SUFFIXES)]
        if folder != "checkpoints":
            for root in _folder_roots(fp, folder):
                names += _diffusers_folders(root)
    seen: set[str] = set()
    out = [n for n in names if not (n in seen or seen.add(n))]
    return sorted(out) + list(TINY_MODELS)


def _folder_roots(fp, folder: str) -> list[str]:
    try:
        return list(fp.get_folder_paths(folder))
    except Exception:  # noqa: BLE001
        return []


def _diffusers_folders(root: str) -> list[str]:
    out = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return out
    for e in entries:
        if e.is_dir() and (os.path.isfile(os.path.join(e.path, "config.json"))
                           or os.path.isfile(os.path.join(e.path, "transformer", "config.json"))):
            out.append(e.name + "/")
    return out


def resolve(name: str) -> str:
    """Full path of a listed checkpoint (tiny model names pass through)."""
    if name in TINY_MODELS:
        return name
    fp = _folder_paths()
    for folder in _folder_names(fp):
        if name.endswith("/"):
            for root in _folder_roots(fp, folder):
                path = os.path.join(root, name.rstrip("/"))
                if os.path.isdir(path):
                    return path
            continue
        try:
            path = fp.get_full_path(folder, name)
        except Exception:  # noqa: BLE001
            path = None
        if path:
            return path
    raise FileNotFoundError(f"checkpoint {name!r} is not in ComfyUI's {', '.join(FOLDERS)} folders")


def detect_variant(path: str, family: str | None = None) -> str:
    """Model variant (flux-dev, flux-schnell, sd3.5-large, pixart-sigma, ...) of a checkpoint, from its config or
    its key names (the family's quick rule; no weights loaded). `family` may be a family or a variant chosen by
    the user; a family narrows the detection, a variant is returned as is."""
    from comfyui_xdit.weights import split_pair

    if split_pair(path) is not None:  # two expert files: the engine reads their headers (refusing what they are not)
        from comfyui_xdit.frugal import open_checkpoint

        variant = open_checkpoint(path, None if family in (None, "", "auto") else family).variant
        if variant not in VARIANTS:
            raise ValueError(f"two experts of {variant}, which this ComfyUI has no model class for")
        return variant
    if family in VARIANTS:
        return family
    if path in TINY_VARIANT:
        return TINY_VARIANT[path]
    from comfyui_xdit import families
    from comfyui_xdit.weights import detect_family, folder_config

    p = Path(path)
    if p.is_dir():
        fam, cfg, pipeline = folder_config(p)
        variant = fam.variant_of(cfg, pipeline)
    else:
        keys = set(tensor_shapes(p))
        fam = families.get(detect_family(keys))
        variant = fam.variant_of_keys(keys) if fam.variant_of_keys else fam.default_variant.name
        if fam.variant_of_keys is None and any(v.latent is not None for v in fam.variants):
            variant = _variant_from_shapes(p, fam, variant)  # variants with latents of their own (Wan 2.2 TI2V)
    if family not in (None, "", "auto") and family != fam.name:
        raise ValueError(f"{p.name} looks like a {fam.name} model, not {family}")
    if variant not in VARIANTS:
        raise ValueError(f"{p.name} is a {variant} model, which this ComfyUI has no model class for")
    return variant


def _variant_from_shapes(p: Path, fam, default: str) -> str:
    """The variant the file's config says, inferred from its tensor shapes (no weights read)."""
    from comfyui_xdit.errors import WeightsError
    from comfyui_xdit.weights import describe

    try:
        return fam.variant_of(describe(tensor_shapes(p)).config, "")
    except (WeightsError, KeyError, TypeError):
        return default


# ------------------------------------------------------------------------------------------------ LoRA files
LORA_SUFFIXES = (".safetensors", ".sft")  # the pool reads nothing it would have to unpickle


def lora_names() -> list[str]:
    import folder_paths

    try:
        return [n for n in folder_paths.get_filename_list("loras") if n.lower().endswith(LORA_SUFFIXES)]
    except Exception:  # noqa: BLE001 - a ComfyUI without a loras folder kind
        return []


class LoraNodeError(Exception):
    """One clear message for ComfyUI's error dialog."""


def resolve_lora(name: str) -> str:
    """The file of `name` in ComfyUI's loras folders (ComfyUI's own lookup, which keeps names inside them)."""
    import folder_paths

    if not isinstance(name, str) or not name.lower().endswith(LORA_SUFFIXES):
        raise LoraNodeError(f"Parallel LoRA: {name!r} is not a .safetensors LoRA file")
    path = folder_paths.get_full_path("loras", name)
    if path is None or not os.path.isfile(path):
        raise LoraNodeError(f"Parallel LoRA: {name} is not in ComfyUI's loras folders")
    real = os.path.realpath(path)
    roots = [os.path.realpath(r) for r in folder_paths.get_folder_paths("loras")]
    if not any(os.path.commonpath([real, r]) == r for r in roots if os.path.isdir(r)) and \
            not any(os.path.commonpath([os.path.abspath(path), os.path.abspath(r)]) == os.path.abspath(r)
                    for r in folder_paths.get_folder_paths("loras")):
        raise LoraNodeError(f"Parallel LoRA: {name} resolves outside ComfyUI's loras folders")
    return os.path.abspath(path)
