"""The one reader of safetensors headers: loading (frugal.py), LoRA checks (lora.py) and the nodes' queue-time
geometry (nodes/geometry.py) all take a file's tensor names, shapes and dtypes from `read_header`, without reading
any weight. Each caller words the refusal in its own terms; the reason (HeaderError's message) is this module's."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


class HeaderError(ValueError):
    """Not a readable safetensors header; the message is the reason, without the file's name."""


@dataclass(frozen=True)
class TensorEntry:
    shape: tuple[int, ...]
    dtype: str                  # the safetensors name ("BF16", "F8_E4M3", ...); SAFETENSORS_DTYPES maps the known ones
    offsets: tuple[int, int]    # [start, end) in the data section, which begins after the 8 + header_bytes


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorEntry]
    metadata: dict
    header_bytes: int
    file_bytes: int

    @property
    def described_bytes(self) -> int:
        """The file's length as the header describes it."""
        return 8 + self.header_bytes + max((t.offsets[1] for t in self.tensors.values()), default=0)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}


def read_header(path: str | os.PathLike) -> Header:
    """The header of a safetensors file (OSError where the file cannot be read, HeaderError where it is not a
    safetensors header). The tensors are not checked against the file's length: `described_bytes` is for that."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError(f"{size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise HeaderError(f"its header length ({n} bytes) exceeds the file ({size} bytes)")
        try:
            meta = json.loads(f.read(n))
        except ValueError:
            raise HeaderError("its header is not valid JSON") from None
    if not isinstance(meta, dict):
        raise HeaderError("its header is not a JSON object")
    try:
        tensors = {k: _entry(v) for k, v in meta.items() if k != "__metadata__" and isinstance(v, dict)}
    except (TypeError, ValueError):
        raise HeaderError("a tensor's shape or offsets in its header are not integers") from None
    metadata = meta.get("__metadata__")
    return Header(tensors, metadata if isinstance(metadata, dict) else {}, n, size)


def _entry(v: dict) -> TensorEntry:
    start, end = (int(o) for o in v.get("data_offsets", (0, 0)))
    return TensorEntry(tuple(int(d) for d in v.get("shape", ())), str(v.get("dtype", "")), (start, end))
