"""Wire format between clients and rank 0.

A message is a list of ZeroMQ frames:
  frame 0      JSON header {"v": 1, "type": ..., "id": ..., "tensors": [{"name", "dtype", "shape"}, ...], ...}
  frames 1..n  raw little-endian bytes of each tensor listed in the header, in order
  last frame   HMAC-SHA256 over all previous frames, only when a shared secret is configured
No pickle: tensors are rebuilt from their declared dtype and shape.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

VERSION = 1
REQUEST_TYPES = ("load_model", "unload", "sample", "cancel", "status", "shutdown")
REPLY_TYPES = ("accepted", "progress", "result", "error")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DEFAULT_MAX_BYTES = 1 << 30  # whole message; configurable per server and client
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 64
MAC_BYTES = 32


class ProtocolError(Exception):
    """A message that cannot be accepted. `request_id` is set when the header was readable."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


class AuthError(ProtocolError):
    """Missing or wrong HMAC: the message is dropped without a reply."""


@dataclass
class Message:
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.header["type"]

    @property
    def id(self) -> str | None:
        return self.header.get("id")


def _mac(secret: bytes, frames: Sequence) -> bytes:
    """HMAC over the frames, each prefixed by its length so frame boundaries are authenticated too."""
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for f in frames:
        buf = memoryview(f)
        h.update(struct.pack("<Q", buf.nbytes))
        h.update(buf)
    return h.digest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def encode(header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None,
           secret: bytes | None = None) -> list:
    """Frames for one message; tensor frames are zero-copy views (keep them alive until sent)."""
    tensors = tensors or {}
    header = {"v": VERSION, **header, "tensors": []}
    frames: list = []
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise ProtocolError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        header["tensors"].append({"name": name, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)})
        frames.append(_tensor_bytes(t))
    frames.insert(0, json.dumps(header, separators=(",", ":")).encode())
    if secret is not None:
        frames.append(_mac(secret, frames))
    return frames


def _frame_buffer(f) -> memoryview:
    return f.buffer if hasattr(f, "buffer") else memoryview(f)


def decode(frames: Sequence, secret: bytes | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
           allowed_types: Sequence[str] = REQUEST_TYPES) -> Message:
    """Check and rebuild one message (frames: bytes or zmq.Frame). Raises ProtocolError/AuthError."""
    bufs = [_frame_buffer(f) for f in frames]
    if not bufs:
        raise ProtocolError("empty message")
    if secret is not None:
        if len(bufs) < 2 or bufs[-1].nbytes != MAC_BYTES:
            raise AuthError("message has no HMAC frame")
        if not hmac.compare_digest(_mac(secret, bufs[:-1]), bytes(bufs[-1])):
            raise AuthError("HMAC mismatch")
        bufs = bufs[:-1]
    total = sum(b.nbytes for b in bufs)
    if bufs[0].nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {bufs[0].nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(bufs[0]))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    rid = header.get("id")
    rid = rid if isinstance(rid, str) and len(rid) <= 128 else None
    if total > max_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_bytes}", rid)
    if header.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {header.get('v')!r} (expected {VERSION})", rid)
    if header.get("type") not in allowed_types:
        raise ProtocolError(f"unknown message type {header.get('type')!r}", rid)
    if rid is None and header.get("type") != "error":
        raise ProtocolError("message id must be a string of at most 128 characters")
    specs = header.get("tensors", [])
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise ProtocolError(f"'tensors' must be a list of at most {MAX_TENSORS} entries", rid)
    if len(bufs) != 1 + len(specs):
        raise ProtocolError(f"header lists {len(specs)} tensors but {len(bufs) - 1} data frames came", rid)
    tensors = {}
    for spec, buf in zip(specs, bufs[1:]):
        name, dtype, shape = _check_spec(spec, rid)
        if name in tensors:
            raise ProtocolError(f"tensor {name!r} appears twice", rid)
        itemsize = torch.empty((), dtype=dtype).element_size()
        expected = math.prod(shape) * itemsize
        if buf.nbytes != expected:
            raise ProtocolError(f"tensor {name!r}: {buf.nbytes} bytes for shape {shape} {spec['dtype']} "
                                f"(expected {expected})", rid)
        tensors[name] = _rebuild(buf, dtype, shape)
    return Message(header, tensors)


def _check_spec(spec: Any, rid: str | None) -> tuple[str, torch.dtype, list[int]]:
    if not isinstance(spec, dict):
        raise ProtocolError("tensor entry is not an object", rid)
    name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ProtocolError(f"bad tensor name {name!r}", rid)
    if dtype not in DTYPES:
        raise ProtocolError(f"tensor {name!r}: dtype {dtype!r} not allowed (one of {', '.join(DTYPES)})", rid)
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
        raise ProtocolError(f"tensor {name!r}: bad shape {shape!r}", rid)
    return name, DTYPES[dtype], shape


def _rebuild(buf: memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """Copy the frame into a fresh, aligned, writable tensor."""
    out = torch.empty(shape, dtype=dtype)
    if buf.nbytes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only source buffer: we only read it
            src = torch.frombuffer(buf, dtype=torch.uint8)
        out.reshape(-1).view(torch.uint8).copy_(src)
    return out


def reply(type_: str, request_id: str | None, **fields: Any) -> dict[str, Any]:
    """A reply header."""
    return {"type": type_, "id": request_id, **fields}


def error(request_id: str | None, kind: str, message: str, rank: int | None = None) -> dict[str, Any]:
    return reply("error", request_id, kind=kind, message=message, rank=rank)
