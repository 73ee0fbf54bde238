"""What the queue-time checks need of a checkpoint (attention heads, transformer blocks, the SD3 position table),
read from its config.json or from the tensor shapes in its header, never from its weights. The rules are those by
which the engine (comfyui_xdit.weights) infers the model's config from the same shapes. A file whose header does not
describe it (truncated, overwritten) is reported as damaged, by name."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PATCH = 2  # latent pixels per token side, for every family the engine runs (Flux packs 2x2)
_MAX_HEADER = 100 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; one line naming the file."""


@dataclass(frozen=True)
class Geometry:
    family: str
    heads: int | None              # attention heads (what Ulysses splits)
    blocks: int | None             # transformer blocks (what PipeFusion splits)
    max_side: int | None = None    # SD3: largest height or width its position table allows, in pixels
    patch: int = PATCH


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
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(p, f"{size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise _damaged(p, f"its header length ({n} bytes) exceeds the file ({size} bytes)")
        try:
            meta = json.loads(f.read(n))
        except ValueError:
            raise _damaged(p, "its header is not valid JSON") from None
    tensors = {k: v for k, v in meta.items() if k != "__metadata__" and isinstance(v, dict)}
    end = max((int(v.get("data_offsets", (0, 0))[1]) for v in tensors.values()), default=0)
    if 8 + n + end != size:
        raise _damaged(p, f"the header describes {8 + n + end} bytes, the file has {size}")
    return {k: tuple(int(d) for d in v.get("shape", ())) for k, v in tensors.items()}


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
    for wrapper in ("state_dict", "model", "module", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {p.name} does not hold a state dict ({p})")
    return {k: tuple(v.shape) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_CACHE: dict[tuple, Geometry] = {}


def geometry(path: str) -> Geometry:
    """The geometry of a listed checkpoint's resolved path, a diffusers folder or a built-in tiny model name."""
    from comfyui_xdit.tiny import TINY_MODELS

    if path in TINY_MODELS:
        family, _, kw = TINY_MODELS[path]
        return _from_config(family, kw)
    p = Path(path)
    st = p.stat()
    key = (str(p), st.st_mtime_ns, st.st_size)
    if key not in _CACHE:
        _CACHE[key] = _folder_geometry(p) if p.is_dir() else shapes_geometry(tensor_shapes(p))
    return _CACHE[key]


def _folder_geometry(p: Path) -> Geometry:
    from comfyui_xdit.weights import FAMILY_CLASS

    cfg_path = p / "config.json" if (p / "config.json").is_file() else p / "transformer" / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: {_first_line(e)}") from None
    family = {v: k for k, v in FAMILY_CLASS.items()}.get(cfg.get("_class_name"), "pixart")
    return _from_config(family, cfg)


def _from_config(family: str, cfg: dict) -> Geometry:
    layers = cfg.get("num_layers")
    if family == "flux" and layers is not None:
        layers += cfg.get("num_single_layers", 0)
    side = cfg.get("pos_embed_max_size") if family == "sd3" else None
    return Geometry(family, cfg.get("num_attention_heads"), layers, side * PATCH * 8 if side else None)


def _count(keys, pattern: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(ids) + 1 if ids else 0


def _head_dim(norm: tuple | None, hidden: int, base: int, min_heads: int) -> int | None:
    """The engine's rule: a per-head q-norm's length; else the published head size when it gives at least
    `min_heads` heads; else 4 heads (the project's small test models)."""
    if norm:
        return int(norm[0])
    if hidden % base == 0 and hidden // base >= min_heads:
        return base
    return hidden // 4 if hidden % 4 == 0 else None


def shapes_geometry(shapes: dict[str, tuple[int, ...]]) -> Geometry:
    """Geometry from the tensor shapes of a single-file checkpoint, original or diffusers layout."""
    from comfyui_xdit.weights import _strip_prefix, detect_family

    s = _strip_prefix(shapes)
    family = detect_family(s.keys())

    def first(*names: str) -> tuple | None:
        return next((s[n] for n in names if n in s), None)

    if family == "flux":
        hidden = first("img_in.weight", "x_embedder.weight")
        norm = first("double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.norm.query_norm.scale",
                     "transformer_blocks.0.attn.norm_q.weight", "single_transformer_blocks.0.attn.norm_q.weight")
        blocks = (_count(s, r"(?:double_blocks|transformer_blocks)\.(\d+)\.")
                  + _count(s, r"(?:single_blocks|single_transformer_blocks)\.(\d+)\."))
        base, min_heads, side = 128, 4, None
    elif family == "sd3":
        hidden = first("x_embedder.proj.weight", "pos_embed.proj.weight")
        norm = first("joint_blocks.0.x_block.attn.ln_q.weight", "transformer_blocks.0.attn.norm_q.weight")
        blocks = _count(s, r"(?:joint_blocks|transformer_blocks)\.(\d+)\.")
        table = first("pos_embed", "pos_embed.pos_embed")
        base, min_heads = 64, 1
        side = math.isqrt(table[1]) * PATCH * 8 if table and len(table) == 3 else None
    else:
        hidden = first("x_embedder.proj.weight", "pos_embed.proj.weight")
        norm = first("transformer_blocks.0.attn1.norm_q.weight")
        blocks = _count(s, r"(?:blocks|transformer_blocks)\.(\d+)\.")
        base, min_heads, side = 72, 4, None
    if not hidden:
        return Geometry(family, None, blocks or None, side)
    head_dim = _head_dim(norm, int(hidden[0]), base, min_heads)
    return Geometry(family, int(hidden[0]) // head_dim if head_dim else None, blocks or None, side)
