"""Checkpoints from ComfyUI's model folders, and the variant of one (for the sampling settings on ComfyUI's
side) read from its key names or config without loading weights."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .families import DEFAULT_VARIANT, TINY_VARIANT, VARIANTS

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
    """Model variant (flux-dev, flux-schnell, sd3.5-large, pixart-sigma, ...) of a checkpoint. `family` may be a
    family or a variant chosen by the user; a family narrows the detection, a variant is returned as is."""
    if family in VARIANTS:
        return family
    if path in TINY_VARIANT:
        return TINY_VARIANT[path]
    p = Path(path)
    if p.is_dir():
        return _folder_variant(p)
    keys = _keys(p)
    from comfyui_xdit.weights import detect_family

    fam = detect_family(keys)
    if family not in (None, "", "auto") and family != fam:
        raise ValueError(f"{p.name} looks like a {fam} model, not {family}")
    if fam == "flux":
        return "flux-dev" if any("guidance_in." in k or "guidance_embedder." in k for k in keys) else "flux-schnell"
    if fam == "pixart":
        alpha = any(k.startswith(("csize_embedder.", "ar_embedder.")) or "resolution_embedder." in k for k in keys)
        return "pixart-alpha" if alpha else "pixart-sigma"
    return DEFAULT_VARIANT[fam]


def _folder_variant(p: Path) -> str:
    from comfyui_xdit.weights import FAMILY_CLASS, _variant_from_config

    cfg_path = p / "config.json" if (p / "config.json").is_file() else p / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    pipeline = ""
    if (p / "model_index.json").is_file():
        pipeline = str(json.loads((p / "model_index.json").read_text()).get("_class_name", ""))
    fam = {v: k for k, v in FAMILY_CLASS.items()}.get(cfg.get("_class_name"), "pixart")
    return _variant_from_config(fam, cfg, pipeline)


def _keys(p: Path) -> list[str]:
    """Tensor names from the file's header; a damaged or truncated file raises CheckpointError naming it."""
    from .geometry import tensor_shapes

    return list(tensor_shapes(p))
