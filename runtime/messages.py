"""The pool's message schema: every request, reply and rank operation as a msgspec Struct.

A header is decoded straight into its Struct, which checks types, ranges and lengths in one place; unknown fields
are refused. Tensors travel as raw frames beside the header (protocol.py), listed in its `tensors`.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta, Struct

VERSION = 2
PING_INTERVAL_S = 1.0    # a client waiting for a reply pings at least this often ...
CLIENT_TIMEOUT_S = 15.0  # ... and the pool cancels the jobs of a client silent for this long (gone)
MAX_SEED = (1 << 63) - 1  # the engine's largest seed (ComfyUI's node folds larger ones into this range)

Id = Annotated[str, Meta(min_length=1, max_length=128)]
Name = Annotated[str, Meta(min_length=1, max_length=64)]
Token = Annotated[str, Meta(min_length=1, max_length=256)]
Key = Annotated[str, Meta(min_length=1, max_length=8192)]
Degree = Annotated[int, Meta(ge=1, le=4096)]
DtypeName = Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]


class TensorSpec(Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: Name
    dtype: DtypeName
    shape: Annotated[list[Annotated[int, Meta(ge=0, lt=1 << 40)]], Meta(max_length=8)]
    at: Annotated[int, Meta(ge=0, lt=1 << 40)] | None = None  # byte offset in the message's shared buffer (no frame)


class _Message(Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    v: int = VERSION
    id: Id
    tensors: Annotated[list[TensorSpec], Meta(max_length=64)] = []


class _Request(_Message, kw_only=True):
    client: Token | None = None  # the sending client's session token: its jobs are its own
    ts: float | None = None      # signing time and a one-time nonce (required when messages are signed)
    nonce: Annotated[str, Meta(min_length=16, max_length=64)] | None = None


# ------------------------------------------------------------------------------------------------ requests
class LoadModel(_Request, tag="load_model"):
    source: Annotated[str, Meta(min_length=1, max_length=4096)]
    family: Name | None = None
    dtype: Literal["fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2"] = "fp32"  # fp8: stored so, computed in bf16
    parallel: ParallelFields | None = None  # load for these degrees: with PipeFusion each rank reads its stage only


class Unload(_Request, tag="unload"):
    key: Key


class CacheFields(Struct, forbid_unknown_fields=True):
    threshold: Annotated[float, Meta(ge=0)] = 0.0
    warmup: Annotated[int, Meta(ge=0, le=100000)] = 1
    max_consecutive: Annotated[int, Meta(ge=0, le=100000)] = 0
    first_blocks: Annotated[int, Meta(ge=0, le=100000)] = 1
    mask: Annotated[list[bool], Meta(max_length=100000)] | None = None


class SampleFields(Struct, forbid_unknown_fields=True):
    height: Annotated[int, Meta(ge=1, le=16384)]
    width: Annotated[int, Meta(ge=1, le=16384)]
    steps: Annotated[int, Meta(ge=1, le=10000)]
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] = 0
    batch_size: Annotated[int, Meta(ge=1, le=4096)] = 1
    cfg: Annotated[float, Meta(ge=-1e4, le=1e4)] = 1.0
    guidance: Annotated[float, Meta(ge=-1e4, le=1e4)] | None = None
    sampler: Name = "default"
    denoise: Annotated[float, Meta(gt=0, le=1)] = 1.0
    cache: CacheFields | None = None
    frames: Annotated[int, Meta(ge=1, le=100000)] = 1  # pixel frames of a video model (Wan: 4k+1)
    shift: Annotated[float, Meta(gt=0, le=1e4)] | None = None  # the scheduler's flow shift (None: the published one)
    compile: bool = False  # regional torch.compile of the repeated blocks, kept by the pool across jobs


class ParallelFields(Struct, forbid_unknown_fields=True):
    dp: Degree = 1
    cfg: Degree = 1
    pipefusion: Degree = 1
    ring: Degree = 1
    ulysses: Degree = 1
    num_patches: Degree = 1
    warmup_steps: Annotated[int, Meta(ge=0, le=10000)] = 1
    shard: Degree = 1
    shard_keep: Annotated[int, Meta(ge=0, le=1)] = 0


class DebugFields(Struct, forbid_unknown_fields=True):
    """Test hook, honoured only by workers started with XDIT_RUNTIME_TEST_HOOKS=1: fail on one rank at one step."""
    raise_on_rank: Annotated[int, Meta(ge=0)]
    at_step: Annotated[int, Meta(ge=1)] = 1


class LoraFields(Struct, forbid_unknown_fields=True):
    """One LoRA of a job's set: a .safetensors file the ComfyUI side resolved in its loras folder, and its strength."""
    path: Annotated[str, Meta(min_length=1, max_length=4096, pattern=r"(?i)\.(safetensors|sft)$")]
    strength: Annotated[float, Meta(ge=-100, le=100)] = 1.0


Loras = Annotated[list[LoraFields], Meta(max_length=64)]


class Sample(_Request, tag="sample"):
    key: Key
    request: SampleFields
    parallel: ParallelFields = msgspec.field(default_factory=ParallelFields)
    preview: bool = False
    debug: DebugFields | None = None
    loras: Loras = []  # applied in order on the model before sampling (the base weights when empty)


CondRefs = Annotated[dict[Name, Annotated[str, Meta(pattern="^[0-9a-f]{32}$")]], Meta(max_length=16)]
# ComfyUI block kind -> indices of the blocks a skip-layer call passes through (SkipLayerGuidance)
SkipBlocks = Annotated[dict[Literal["double_block", "single_block"],
                            Annotated[list[Annotated[int, Meta(ge=0, le=4096)]], Meta(max_length=4096)]],
                       Meta(max_length=2)]


class RunFields(Struct, forbid_unknown_fields=True):
    """The sampling run a forward belongs to (an id the client makes up, kept apart per client by the server): its
    forwards share the context cache's entries. With the step cache (the forward's `cache`), where the call sits:
    the step of `steps` (0-based) and, per row of the call's batch, whether the cache measures it (the positive
    rows)."""
    id: Id
    step: Annotated[int, Meta(ge=0, le=100000)] | None = None
    steps: Annotated[int, Meta(ge=1, le=100000)] | None = None
    measured: Annotated[list[bool], Meta(min_length=1, max_length=4096)] | None = None


class Forward(_Request, tag="forward"):
    """One transformer forward (Parallel DiT Model): per-call tensors `x` and `timestep` (the engine's convention,
    [B]) as frames; the conditioning by content hash (role -> hash: cond, pooled, cond_mask), each uploaded once
    as a frame named "c:<hash>" and kept on the pool (bounded LRU) for the calls after it."""
    key: Key
    conds: CondRefs = {}
    guidance: Annotated[float, Meta(ge=-1e4, le=1e4)] | None = None
    parallel: ParallelFields = msgspec.field(default_factory=ParallelFields)
    debug: DebugFields | None = None
    buffer: Token | None = None  # the token of this client's shared buffer, where tensors with `at` lie
    skip_blocks: SkipBlocks = {}
    cache: CacheFields | None = None  # the step cache across the forwards of `run`
    run: RunFields | None = None


class OpenBuffer(_Request, tag="open_buffer"):
    """A local client asks rank 0 (on the direct socket only) for a shared-memory buffer of `nbytes` for its
    forwards' tensors: the reply names a memfd of rank 0 (pid, fd) and a random token, which the buffer's first
    bytes hold too; the client opens it through /proc (the kernel lets only the pool's own user in)."""
    nbytes: Annotated[int, Meta(ge=1, lt=1 << 40)]


class Cancel(_Request, tag="cancel"):
    target: Id
    admin: Token | None = None  # the pool's admin secret: cancel any client's job


class Status(_Request, tag="status"):
    refresh: bool = False


class Ping(_Request, tag="ping"):
    """A waiting client's liveness probe: answered at once; it also tells the pool the client is still there."""


class Shutdown(_Request, tag="shutdown"):
    admin: Token | None = None


Request = Union[LoadModel, Unload, Sample, Forward, OpenBuffer, Cancel, Status, Ping, Shutdown]
QUEUED = (LoadModel, Unload, Sample, Forward)


# ------------------------------------------------------------------------------------------------ replies
class Accepted(_Message, tag="accepted"):
    position: int
    boot: str = ""  # the pool instance's random id: a client that later hears another one knows its job was lost


class Progress(_Message, tag="progress"):
    step: int
    total: int
    step_seconds: float
    elapsed: float


class Result(_Message, tag="result"):
    data: dict[str, Any] = {}


class Error(_Message, tag="error", kw_only=True):
    id: Id | None = None
    kind: str
    message: str
    rank: int | None = None


Reply = Union[Accepted, Progress, Result, Error]


# ------------------------------------------------------------------------------------------------ rank operations
class LoadOp(Struct, tag="load", forbid_unknown_fields=True):
    key: Key
    source: str
    family: str | None
    dtype: str
    parallel: ParallelFields | None = None


class UnloadOp(Struct, tag="unload", forbid_unknown_fields=True):
    key: Key


class SampleOp(Struct, tag="sample", forbid_unknown_fields=True):
    key: Key
    request: SampleFields
    parallel: ParallelFields
    preview: bool
    debug: DebugFields | None = None
    loras: Loras = []


class ForwardOp(Struct, tag="forward", forbid_unknown_fields=True):
    key: Key
    conds: dict[str, str]
    guidance: float | None
    parallel: ParallelFields
    debug: DebugFields | None = None
    skip_blocks: dict[str, list[int]] = {}
    cache: CacheFields | None = None
    run: RunFields | None = None
    owner: str = ""  # the client whose run it is (runs are kept apart per client)


class PingOp(Struct, tag="ping", forbid_unknown_fields=True):
    pass


class ShutdownOp(Struct, tag="shutdown", forbid_unknown_fields=True):
    pass


Op = Union[LoadOp, UnloadOp, SampleOp, ForwardOp, PingOp, ShutdownOp]


class Outcome(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What one rank reports after an operation (or at start-up)."""
    ok: bool
    rank: int
    pid: int
    kind: str = ""
    message: str = ""
    host: str = ""
    rss_bytes: int = 0
    peak_rss_bytes: int = 0                  # host RSS high-water mark since the operation began (0: unknown)
    cuda_allocated_bytes: int | None = None
    cuda_reserved_bytes: int | None = None
    cuda_peak_bytes: int | None = None       # device high-water mark since the operation began
    load: dict[str, Any] | None = None       # a load's report on this rank (comfyui_xdit.frugal.LoadReport)


def message_type(cls: type) -> str:
    return cls.__struct_config__.tag


REQUEST_TYPES = tuple(message_type(c) for c in Request.__args__)
REPLY_TYPES = tuple(message_type(c) for c in Reply.__args__)
request_decoder = msgspec.json.Decoder(Request)
reply_decoder = msgspec.json.Decoder(Reply)
json_encoder = msgspec.json.Encoder()
op_decoder = msgspec.msgpack.Decoder(Op)
outcome_decoder = msgspec.msgpack.Decoder(Outcome)
msgpack_encoder = msgspec.msgpack.Encoder()
