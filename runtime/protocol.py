"""Wire format between clients and rank 0.

A message is a list of ZeroMQ frames:
  frame 0      JSON header: one of the Structs of messages.py ({"v": 2, "type": ..., "id": ..., "tensors": [...]})
  frames 1..n  raw little-endian bytes of each tensor listed in the header, in order
  last frame   HMAC-SHA256 over all previous frames, only when a shared secret is configured
A tensor whose spec has `at` has no frame: its bytes lie at that offset of the message's shared buffer (a local
client's forwards and their replies, shared_buffer.py); the buffer is named by the header and checked by the pool.
No pickle: tensors are rebuilt from their declared dtype and shape; the header is decoded into its Struct, which
checks every field (unknown fields, wrong types, out-of-range numbers, NaN and over-long strings are refused).
"""
from __future__ import annotations

import hashlib
import hmac
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import msgspec
import torch

from . import messages
from .messages import VERSION, TensorSpec

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEM_BYTES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}
DEFAULT_MAX_BYTES = 1 << 30  # whole message; configurable per server and client
MAX_HEADER_BYTES = 1 << 20
MAC_BYTES = 32
REQUEST_TYPES = messages.REQUEST_TYPES
REPLY_TYPES = messages.REPLY_TYPES


class ProtocolError(Exception):
    """A message that cannot be accepted. `request_id` is set when the header was readable."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


class AuthError(ProtocolError):
    """Missing or wrong HMAC, or a replayed message: dropped without a reply."""


class BufferMissing(ProtocolError):
    """A tensor lies in a shared buffer the receiver does not hold for the sender (evicted, or never made)."""


SHARED_MIN_BYTES = 4096  # smaller tensors go as frames even when a shared buffer is at hand
SHARED_ALIGN = 64


@dataclass
class Message:
    header: msgspec.Struct
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return type(self.header).__struct_config__.tag

    @property
    def id(self) -> str | None:
        return self.header.id


class _Envelope(msgspec.Struct):
    """The fields read before the header's own type is known (for the error reply's id and a clear refusal)."""
    v: Any = None
    type: Any = None
    id: Any = None


_envelope_decoder = msgspec.json.Decoder(_Envelope)


def _mac(secret: bytes, frames: Sequence) -> bytes:
    """HMAC over the frames, each prefixed by its length so frame boundaries are authenticated too."""
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for f in frames:
        buf = memoryview(f)
        h.update(struct.pack("<Q", buf.nbytes))
        h.update(buf)
    return h.digest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, a view where it is a contiguous CPU tensor (few torch calls: each can cost a tenth of a
    millisecond when the caches are cold, as after a forward)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.to("cpu").contiguous()
    if not t.numel():
        return memoryview(b"")
    t = t.detach()
    return memoryview((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()).cast("B")


def _align(n: int) -> int:
    return -(-n // SHARED_ALIGN) * SHARED_ALIGN


def encode(header: msgspec.Struct, tensors: dict[str, torch.Tensor] | None = None,
           secret: bytes | None = None, shared: memoryview | None = None) -> list:
    """Frames for one message; tensor frames are zero-copy views (keep them alive until sent). With `shared` (the
    data region of a shared buffer), tensors of SHARED_MIN_BYTES or more are copied into it while they fit (one copy,
    straight from a GPU tensor too) and listed with their offset instead of a frame."""
    tensors = tensors or {}
    specs, frames = [], []
    at = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise ProtocolError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        dtype = DTYPE_NAMES[t.dtype]
        nbytes = t.numel() * ITEM_BYTES[dtype]
        if shared is not None and nbytes >= SHARED_MIN_BYTES and at + nbytes <= shared.nbytes:
            torch.frombuffer(shared, dtype=t.dtype, count=t.numel(), offset=at).view(t.shape).copy_(t.detach())
            specs.append(TensorSpec(name, dtype, list(t.shape), at))
            at = _align(at + nbytes)
            continue
        specs.append(TensorSpec(name, dtype, list(t.shape)))
        frames.append(_tensor_bytes(t))
    header = msgspec.structs.replace(header, tensors=specs)
    frames.insert(0, messages.json_encoder.encode(header))
    if secret is not None:
        frames.append(_mac(secret, frames))
    return frames


def _frame_buffer(f) -> memoryview:
    return f.buffer if hasattr(f, "buffer") else memoryview(f)


def _valid_id(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= 128 else None


SharedLookup = Callable[[msgspec.Struct], "memoryview | None"]


def decode(frames: Sequence, secret: bytes | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
           decoder: msgspec.json.Decoder = messages.request_decoder,
           allowed_types: Sequence[str] = REQUEST_TYPES, shared: SharedLookup | None = None) -> Message:
    """Check and rebuild one message (frames: bytes or zmq.Frame). Raises ProtocolError/AuthError. `shared`: the
    shared buffer a decoded header names, if the receiver holds one for it (tensors with `at` are copied out of it)."""
    bufs = [_frame_buffer(f) for f in frames]
    if not bufs:
        raise ProtocolError("empty message")
    if secret is not None:
        if len(bufs) < 2 or bufs[-1].nbytes != MAC_BYTES:
            raise AuthError("message has no HMAC frame")
        if not hmac.compare_digest(_mac(secret, bufs[:-1]), bytes(bufs[-1])):
            raise AuthError("HMAC mismatch")
        bufs = bufs[:-1]
    if bufs[0].nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {bufs[0].nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    raw = bytes(bufs[0])
    total = sum(b.nbytes for b in bufs)
    try:  # a good header of a known type is decoded once; any other is read again for a precise refusal
        header = decoder.decode(raw) if total <= max_bytes else None
    except (RecursionError, msgspec.ValidationError, msgspec.DecodeError):
        header = None
    if header is not None and header.v == VERSION and _valid_id(header.id) is not None:
        return _with_tensors(header, bufs[1:], header.id, shared)
    try:
        env = _envelope_decoder.decode(raw)
    except RecursionError:
        raise ProtocolError("header nests too deeply") from None
    except msgspec.ValidationError:  # (a DecodeError too: caught first)
        raise ProtocolError("header is not a JSON object") from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"header is not valid JSON (NaN and Infinity are not JSON): {e}") from None
    rid = _valid_id(env.id)
    if total > max_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_bytes}", rid)
    if env.v != VERSION:
        raise ProtocolError(f"unsupported protocol version {str(env.v)[:20]!r} (expected {VERSION})", rid)
    if env.type not in allowed_types:
        raise ProtocolError(f"unknown message type {str(env.type)[:40]!r} (expected one of "
                            f"{', '.join(allowed_types)})", rid)
    if rid is None and env.type != "error":
        raise ProtocolError("message id must be a string of 1 to 128 characters")
    try:
        header = decoder.decode(raw)
    except RecursionError:
        raise ProtocolError("header nests too deeply", rid) from None
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ProtocolError(f"bad {env.type} message: {e}", rid) from None
    return _with_tensors(header, bufs[1:], rid, shared)


def _with_tensors(header: msgspec.Struct, data: Sequence[memoryview], rid: str | None,
                  shared: SharedLookup | None) -> Message:
    """The message of a decoded header and its data frames (and shared-buffer ranges), each checked against its
    declared spec."""
    specs = header.tensors
    framed = sum(spec.at is None for spec in specs)
    if len(data) != framed:
        more = f" ({len(specs) - framed} more lie in a shared buffer)" if framed < len(specs) else ""
        raise ProtocolError(f"header lists {framed} tensors but {len(data)} data frames came{more}", rid)
    region = None
    if framed < len(specs):
        region = shared(header) if shared is not None else None
        if region is None:
            raise BufferMissing("the message's tensors lie in a shared buffer this side does not hold for it", rid)
    tensors, frames = {}, iter(data)
    for spec in specs:
        if spec.name in tensors:
            raise ProtocolError(f"tensor {spec.name!r} appears twice", rid)
        expected = math.prod(spec.shape) * ITEM_BYTES[spec.dtype]
        if spec.at is None:
            buf = next(frames)
        elif spec.at + expected > region.nbytes:
            raise ProtocolError(f"tensor {spec.name!r}: bytes {spec.at}..{spec.at + expected} lie outside the shared "
                                f"buffer of {region.nbytes}", rid)
        else:
            buf = region[spec.at:spec.at + expected]
        if buf.nbytes != expected:
            raise ProtocolError(f"tensor {spec.name!r}: {buf.nbytes} bytes for shape {spec.shape} {spec.dtype} "
                                f"(expected {expected})", rid)
        tensors[spec.name] = _rebuild(buf, DTYPES[spec.dtype], spec.shape)
    return Message(header, tensors)


def decode_reply(frames: Sequence, secret: bytes | None = None, max_bytes: int = 1 << 40,
                 shared: SharedLookup | None = None) -> Message:
    return decode(frames, secret, max_bytes, messages.reply_decoder, REPLY_TYPES, shared)


def _rebuild(buf: memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """Copy the frame into a fresh, writable tensor that owns its bytes (a bytearray: malloc-aligned)."""
    if not buf.nbytes:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(buf), dtype=dtype).reshape(shape)


MAX_ERROR_CHARS = 2000  # an error reply's message is cut to this many characters


def error(request_id: str | None, kind: str, message: str, rank: int | None = None) -> messages.Error:
    text = str(message)
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + "..."
    return messages.Error(id=_valid_id(request_id), kind=kind, message=text, rank=rank)


def result(request_id: str, **data: Any) -> messages.Result:
    return messages.Result(id=request_id, data=data)


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_forward_tensors(tensors: dict[str, torch.Tensor], request_id: str | None) -> None:
    """A forward's per-call tensors refused before they reach the ranks: `x` a float tensor of 4 dimensions (5 for
    video) none of them empty, `timestep` a float tensor of one finite value per sample. ProtocolError otherwise."""
    x, t = tensors.get("x"), tensors.get("timestep")
    if x is None or t is None:
        raise ProtocolError("a forward takes the tensors x and timestep", request_id)
    if x.dtype not in FLOAT_DTYPES or x.ndim not in (4, 5) or 0 in x.shape:
        raise ProtocolError(f"a forward's x must be a float tensor [B, C, (F,) H, W] with no empty dimension, got "
                            f"{DTYPE_NAMES[x.dtype]} {list(x.shape)}", request_id)
    if t.dtype not in FLOAT_DTYPES or list(t.shape) != [x.shape[0]] or not bool(torch.isfinite(t).all()):
        raise ProtocolError(f"a forward's timestep must have one value per sample (finite, float, shape "
                            f"[{x.shape[0]}]), got {DTYPE_NAMES[t.dtype]} {list(t.shape)}", request_id)
