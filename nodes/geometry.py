"""What the queue-time checks need of a checkpoint (attention heads, transformer blocks, the largest image side),
read from its config.json or from the tensor shapes in its header, never from its weights: the engine's own
conversion and config inference (comfyui_xdit.weights, the family files) run on shapes alone. A file whose header does not
describe it (truncated, overwritten) is reported as damaged, by name."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from comfyui_xdit.weights import Description

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PATCH = 2  # latent pixels per token side of the families the engine runs (Flux packs 2x2)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; one line naming the file."""


@dataclass(frozen=True)
class Geometry:
    family: str
    heads: int | None              # attention heads (what Ulysses splits)
    blocks: int | None             # transformer blocks (what PipeFusion splits)
    max_side: int | None = None    # SD3: largest height or width its position table allows, in pixels
    patch: int = PATCH
    image_input: bool = False      # a video model whose input holds image conditioning (Wan I2V: 36 channels)
    in_channels: int | None = None  # the model's input channels (Wan I2V: latent + mask + image latent)
    image_dim: int | None = None    # width of the CLIP-vision embedding it takes (Wan 2.1 I2V), None: none


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a single-file checkpoint (safetensors header, or a torch file on the meta
    device), checking that the file is whole."""
    p = Path(path)
    if p.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _safetensors_shapes(p)
    return _torch_shapes(p)


def _damaged(p: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {p.name} is damaged or truncated: {why} ({p})")


def _safetensors_shapes(p: Path) -> dict[str, tuple[int, ...]]:
    from comfyui_xdit.safetensors_header import HeaderError, read_header

    try:
        header = read_header(p)
    except HeaderError as e:
        raise _damaged(p, str(e)) from None
    if header.described_bytes != header.file_bytes:
        raise _damaged(p, f"the header describes {header.described_bytes} bytes, the file has {header.file_bytes}")
    return header.shapes()


def _torch_shapes(p: Path) -> dict[str, tuple[int, ...]]:
    import torch

    try:
        try:
            obj = torch.load(str(p), map_location="meta", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(p), map_location="meta", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad archives and pickles
        raise _damaged(p, f"not a readable torch checkpoint: {_first_line(e)}") from None
    from comfyui_xdit.weights import unwrap_state_dict

    obj = unwrap_state_dict(obj)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {p.name} does not hold a state dict ({p})")
    return {k: tuple(v.shape) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# keyed by a checkpoint's version (path, mtime, size); _SHAPES also by a tiny model's name
_CACHE: dict[tuple, Geometry] = {}
_DESCRIBED: dict[tuple, "Description"] = {}
_SHAPES: dict[tuple, tuple[str, dict[str, tuple[int, ...]]]] = {}


def _version(p: Path) -> tuple:
    st = p.stat()
    return (str(p), st.st_mtime_ns, st.st_size)


def _described(p: Path, key: tuple) -> "Description":
    """Family, config and variant of a single-file checkpoint: the engine's conversion and config inference
    (comfyui_xdit.weights.describe) on its header's shapes, once per file version."""
    from comfyui_xdit.errors import WeightsError
    from comfyui_xdit.weights import describe

    if key not in _DESCRIBED:
        refuse_quantised(p)
        try:
            _DESCRIBED[key] = describe(tensor_shapes(p))
        except WeightsError as e:
            raise CheckpointError(str(e)) from None
    return _DESCRIBED[key]


def refuse_quantised(p: Path) -> None:
    """CheckpointError naming the format when a safetensors file holds layers quantised by the newer ComfyUI in a
    way the pool does not load (its `.comfy_quant` markers; fp8 with one scale per tensor loads)."""
    from comfyui_xdit.errors import WeightsError
    from comfyui_xdit.weights import file_quant_refusal

    if not p.name.lower().endswith((".safetensors", ".sft")):
        return
    tensor_shapes(p)  # a damaged file: named as such first
    try:
        refusal = file_quant_refusal(p)
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    if refusal:
        raise CheckpointError(f"checkpoint {refusal}")


def geometry(path: str) -> Geometry:
    """The geometry of a listed checkpoint's resolved path, a diffusers folder or a built-in tiny model name."""
    from comfyui_xdit import families

    tiny = families.tiny_models()
    if path in tiny:
        fam, kw = tiny[path]
        return _from_config(fam, kw)
    from comfyui_xdit.weights import split_pair

    pair = split_pair(path)
    p = Path(pair[0] if pair is not None else path)  # two expert files: one architecture, the first's
    key = _version(p)
    if pair is not None and key not in _CACHE:
        refuse_quantised(Path(pair[1]))
    if key not in _CACHE:
        if p.is_dir():
            _CACHE[key] = _folder_geometry(p)
        else:
            d = _described(p, key)
            _CACHE[key] = _from_config(d.family, d.config)
    return _CACHE[key]


def parameter_shapes(path: str) -> tuple[str, dict[str, tuple[int, ...]]] | None:
    """(family, the full parameter shapes of the model the pool builds) for a built-in tiny model name or a
    single-file checkpoint, constructed on the meta device from its config or header; None for a diffusers folder
    (its checks wait for sampling)."""
    from comfyui_xdit import families
    from comfyui_xdit.weights import parameter_shapes as build_shapes

    tiny = families.tiny_models()
    if path in tiny:
        key: tuple = (path,)
        if key not in _SHAPES:
            fam, kw = tiny[path]
            _SHAPES[key] = fam.name, build_shapes(fam, kw, tiny=True)
        return _SHAPES[key]
    p = Path(path)
    if p.is_dir():
        return None
    key = _version(p)
    if key not in _SHAPES:
        d = _described(p, key)
        _SHAPES[key] = d.family.name, build_shapes(d.family, d.config)
    return _SHAPES[key]


def _folder_geometry(p: Path) -> Geometry:
    from comfyui_xdit.errors import WeightsError
    from comfyui_xdit.weights import folder_config

    try:
        fam, cfg, _ = folder_config(p)
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    return _from_config(fam, cfg)


def _from_config(fam, cfg: dict) -> Geometry:
    """The engine family's own reading of a config (comfyui_xdit.families: heads_of, blocks_of, max_side_of)."""
    def read(fn):
        try:
            return fn(cfg)
        except (KeyError, TypeError):
            return None

    latent = fam.latent
    try:  # the variant's own latent where it differs (Wan 2.2 TI2V 5B: 16x spatial)
        latent = fam.latent_of(fam.variant_of(cfg, ""))
    except Exception:  # noqa: BLE001 - a config the family cannot place: its family's latent
        pass
    image_input = latent.dims == 3 and cfg.get("in_channels", latent.channels) != latent.channels
    return Geometry(fam.name, read(fam.heads_of), read(fam.blocks_of), read(fam.max_side_of),
                    fam.patch * latent.downscale // 8, image_input, cfg.get("in_channels"), cfg.get("image_dim"))
