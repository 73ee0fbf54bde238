"""Auto layout: the parallel degrees for the GPUs a pool uses, the model and the job, from a cost model.

    python -m comfyui_xdit plan --model flux2-dev --gpus 4x24GB,pcie --size 1024x1024 [--frames F] [--cfg G]

Inputs: the GPUs (count, memory per card, NVLink/P2P or PCIe between them; `parse_gpus`), the model (built on the
meta device from a built-in variant, a diffusers folder or a single-file checkpoint's header: `model_facts`) and
the job (size, frames, batch, cfg, steps: `Job`).
Candidates: every (dp, cfg, pipefusion, ring, ulysses) whose product is the GPU count, each with every shard degree
the engine allows (products of the innermost degrees; shard alone: N ranks computing the same step), in bf16
storage and, only when no bf16 layout fits, fp8; a candidate is kept when the engine's own checks accept it
(`parallel.runner.check_model_fit`: heads divisible by ulysses, tokens >= ring x ulysses, cfg 2 only with true CFG,
dp <= batch, PipeFusion's blocks and patches) and its memory per rank fits a card.
Memory per rank: memory_estimate's arithmetic (weights as stored, FSDP 1/s + two blocks, a PipeFusion stage's
blocks, activations per token of this rank's sequence, PipeFusion's K/V buffers) times the local batch.
Seconds per step: matmul and attention FLOPs from the built model's block parameters at the job's token count
(`step_flops`), at the kind's rates (a matmul's rate falling with its rows:
rate x rows / (rows + half_rows)), plus the bytes each method moves per step over the link
(Ulysses: q, k, v and the output per attention layer; Ring: K and V around the ring, hidden behind attention,
and per ring step a latency and the merge of partial outputs;
FSDP: every block's weights per forward, hidden behind compute; PipeFusion: one activation hand-off per stage,
its stages' work as shard_stage splits it), with a latency per collective.
Ranking: the fastest exact layout; PipeFusion (stale K/V: approximate) only when it is 20% faster than every exact
one or the only one that fits.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch

from .errors import ConfigError, XDiTError
from .memory_estimate import OVERHEAD_GIB, largest_matrix, stored_bytes, widest_projection
from .parallel.config import ParallelConfig

PIPEFUSION_MARGIN = 0.8  # PipeFusion (approximate) is picked over exact layouts only below this share of their time


@dataclass(frozen=True)
class DeviceKind:
    """Cost-model constants of one accelerator kind. Rates are what a model's forward achieves, not datasheet
    peaks; `source` says where each figure comes from."""
    name: str
    memory_gib: float
    matmul_flops: float         # achieved dense rate on large matmuls in the run dtype (FLOP/s)
    attention_flops: float      # achieved SDPA rate at long sequences (FLOP/s)
    half_rows: int              # rows (matmul) or queries/keys (attention) at which a kernel runs at half its rate
    hbm_bytes_s: float          # device memory bandwidth (fp8 storage's per-layer upcast)
    fast_link: float            # bytes/s one rank sends in a collective over NVLink (0: none)
    pcie_link: float            # the same over PCIe (or gloo/shared memory on CPU)
    latency_s: float            # per collective call
    element: int = 2            # bytes per activation element (bf16; CPU runs fp32)
    source: str = ""


H100_ATTENTION = 623e12 / (4608 / (4608 + 512)) ** 2  # cuDNN SDPA 623 TFLOP/s at 4608 queries and keys
H100_FORWARD = 74e12 / 0.183  # Flux.1 1024px: 74 TFLOP per forward in 0.183 s eager on the lent H100
EFFICIENCY = H100_FORWARD / 989e12  # that rate over the H100 SXM's datasheet dense bf16 (989 TFLOP/s): ~0.41

KINDS: dict[str, DeviceKind] = {k.name: k for k in (
    DeviceKind("H100", 80, H100_FORWARD, H100_ATTENTION, 512, 3.35e12, 0.8 * 450e9, 0.8 * 64e9, 20e-6,
               source="Flux.1 1024px forward 74 TFLOP in 0.183 s eager (404 TFLOP/s) and cuDNN SDPA 623 TFLOP/s at "
                      "4608 tokens, measured on the lent H100 SXM (the project's GPU notes); NVLink4 450 GB/s a "
                      "direction, PCIe 5 x16 64 GB/s (datasheets) at 80%"),
    DeviceKind("H200", 141, H100_FORWARD, H100_ATTENTION, 512, 4.8e12, 0.8 * 450e9, 0.8 * 64e9, 20e-6,
               source="the H100's chip (same rates), 141 GB HBM3e at 4.8 TB/s (datasheet)"),
    DeviceKind("A100", 80, EFFICIENCY * 312e12, 0.6 * 312e12, 512, 2.0e12, 0.8 * 300e9, 0.8 * 32e9, 20e-6,
               source="datasheet 312 TFLOP/s bf16 x the H100's achieved share; NVLink3 300 GB/s a direction; "
                      "PCIe 4 x16"),
    DeviceKind("L40", 48, EFFICIENCY * 181e12, 0.5 * 181e12, 512, 0.864e12, 0.0, 0.8 * 32e9, 30e-6,
               source="datasheet 181 TFLOP/s bf16 (L40; L40S 362) x the H100's achieved share; PCIe 4 x16 with P2P"),
    DeviceKind("L20", 48, EFFICIENCY * 119.5e12, 0.5 * 119.5e12, 512, 0.864e12, 0.0, 0.8 * 32e9, 30e-6,
               source="datasheet 119.5 TFLOP/s bf16 x the H100's achieved share; PCIe 4 x16"),
    DeviceKind("4090", 24, EFFICIENCY * 165e12, 0.5 * 165e12, 512, 1.0e12, 0.0, 12e9, 50e-6,
               source="Ada whitepaper 165 TFLOP/s fp16 (fp32 accumulate) x the H100's achieved share; no P2P on "
                      "GeForce: collectives staged through host memory (~12 GB/s, assumed)"),
    DeviceKind("CPU", 0, 111e9, 60e9, 182, 10e9, 0.0, 1.0e9, 0.75e-3, element=4,
               source="one core, fp32: matmul 68/85/96 GFLOP/s at 288/576/1152 rows (docs/benchmarks.md, fitted "
                      "111 GFLOP/s x rows/(rows+182)); gloo all-to-all 0.5/2/8 MB in 1.27/2.9/8.9 ms (same doc: "
                      "0.75 ms + 1 GB/s)"),
)}


@dataclass(frozen=True)
class GPUs:
    count: int
    kind: DeviceKind
    memory_gib: float
    link: str  # "nvlink" or "pcie" ("gloo" on CPU)
    cores: int = 0  # CPU: the cores the ranks share (0: one each)

    @property
    def bandwidth(self) -> float:
        return self.kind.fast_link if self.link == "nvlink" and self.kind.fast_link else self.kind.pcie_link

    def describe(self) -> str:
        mem = f"{self.memory_gib:g} GB" if self.kind.name != "CPU" else "CPU"
        return f"{self.count} x {mem} {self.kind.name if self.kind.name != 'CPU' else ''}".rstrip() + \
            (f" over {self.link}" if self.count > 1 else "")


def kind_for_memory(gib: float) -> DeviceKind:
    """The constants a card of this memory gets when only its memory is given."""
    for limit, name in ((24, "4090"), (32, "4090"), (48, "L40"), (80, "H100")):
        if gib <= limit:
            return KINDS[name]
    return KINDS["H200"]


def parse_gpus(spec: str) -> GPUs:
    """'4x24GB', '4x24GB,pcie', '8xH100,nvlink', '2xcpu' or '8xA100-40GB'."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*([A-Za-z0-9.]+?)(?:-(\d+(?:\.\d+)?)GB)?\s*(?:,\s*(pcie|nvlink|p2p))?\s*",
                     spec, re.IGNORECASE)
    if not m or int(m.group(1)) < 1:
        raise ConfigError(f"--gpus {spec!r}: expected COUNTxMEMORY[,pcie|nvlink] (e.g. 4x24GB,pcie), COUNTxKIND "
                          f"(one of {', '.join(KINDS)}) or COUNTxcpu")
    count, what, mem, link = int(m.group(1)), m.group(2), m.group(3), (m.group(4) or "").lower()
    size = re.fullmatch(r"(\d+(?:\.\d+)?)(?:GB|G|GIB)?", what, re.IGNORECASE)
    if size:
        gib = float(size.group(1))
        kind = kind_for_memory(gib)
    else:
        kind = next((k for n, k in KINDS.items() if n.lower() == what.lower()), None)
        if kind is None:
            raise ConfigError(f"--gpus {spec!r}: unknown kind {what!r}: one of {', '.join(KINDS)}, or a memory "
                              "size such as 24GB")
        gib = float(mem) if mem else kind.memory_gib
    if kind.name == "CPU":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or count)
        return GPUs(count, kind, float(mem) if mem else _host_gib(), "gloo", cores)
    link = "nvlink" if link == "p2p" and kind.fast_link else link  # P2P without NVLink still crosses PCIe
    return GPUs(count, kind, gib, link or ("nvlink" if kind.fast_link else "pcie"))


def _host_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 64.0


@dataclass(frozen=True)
class Job:
    height: int
    width: int
    frames: int = 1
    batch: int = 1
    cfg: float = 1.0
    steps: int = 28
    text_tokens: int | None = None  # the prompt's tokens (default: the family's typical count)


def _text(adapter, job: "Job") -> int:
    return job.text_tokens if job.text_tokens is not None else adapter.spec.cond.tokens


# ---------------------------------------------------------------------------------------------------------------
# The model, from its meta-device build


@dataclass
class ModelFacts:
    name: str
    adapter: object  # the FamilyAdapter of a meta-device build
    heads: int
    blocks: int  # pipelined blocks (what PipeFusion splits)
    experts: int  # Wan 2.2 A14B: two transformers held, one computed per step
    weights: dict[str, int]  # bytes by storage
    block_max: dict[str, int]
    upcast: dict[str, int]  # fp8: one largest matrix in bf16
    per_token: int  # activation bytes per token of a rank's sequence (bf16)
    stage_blocks: list[int] = field(default_factory=list)  # bf16 bytes per pipelined block
    stage_costs: list[int] = field(default_factory=list)  # per-token bytes per pipelined block (PipeFusion's split)
    flop_params: tuple[int, int] = (0, 0)  # parameters applied per image token and per text token (one expert)

    @property
    def params(self) -> int:
        return self.weights["bf16"] // 2


def build_meta(model: str):
    """A FamilyAdapter on the meta device for a built-in variant or family name, a diffusers folder, or a
    single-file checkpoint (its header's shapes through the engine's own conversion)."""
    from pathlib import Path

    from .bench import build_random

    p = Path(model)
    if not p.exists():
        return build_random(model, torch.bfloat16, "meta")
    from .adapters import make_adapter
    from .weights import describe, folder_config

    if p.is_dir():
        fam, config, _ = folder_config(p)
        variant = fam.variant_of(config, "")
    else:
        d = describe(_header_shapes(p))
        fam, config, variant = d.family, d.config, d.variant
    import diffusers

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            built = fam.build(config, variant) if fam.build is not None else \
                getattr(diffusers, fam.diffusers_class).from_config(config)
    finally:
        torch.set_default_dtype(default)
    return make_adapter(fam.name, built.eval().requires_grad_(False), variant)


def _header_shapes(p) -> dict[str, tuple[int, ...]]:
    if p.suffix.lower() in (".safetensors", ".sft"):
        from .safetensors_header import read_header

        return read_header(p).shapes()
    obj = torch.load(str(p), map_location="meta", weights_only=True)
    from .weights import unwrap_state_dict

    return {k: tuple(v.shape) for k, v in unwrap_state_dict(obj).items() if isinstance(v, torch.Tensor)}


@lru_cache(maxsize=16)
def model_facts(model: str) -> ModelFacts:
    return facts_of(build_meta(model), model)


def facts_of(adapter, name: str) -> ModelFacts:
    """The planner's facts of a built model (meta tensors will do)."""
    from .adapters.base import per_token_bytes

    m = adapter.model
    blocks = [b for bl in adapter.plan.blocks for b in getattr(m, bl.name)]
    piped = [b for bl in adapter.plan.blocks if bl.pipelined for b in getattr(m, bl.name)]
    hidden = adapter.hidden_size
    wide = max(widest_projection(b, hidden) for b in blocks)
    experts = 2 if getattr(adapter, "experts", False) else 1
    return ModelFacts(
        name=name, adapter=adapter, heads=adapter.num_heads, blocks=len(piped), experts=experts,
        weights={s: stored_bytes(m, s) for s in ("bf16", "fp8")},
        block_max={s: max(stored_bytes(b, s) for b in blocks) for s in ("bf16", "fp8")},
        upcast={"bf16": 0, "fp8": 2 * largest_matrix(m)}, per_token=(6 * hidden + 2 * wide) * 2,
        stage_blocks=[stored_bytes(b, "bf16") for b in piped], stage_costs=[per_token_bytes(b) for b in piped],
        flop_params=_flop_params(adapter, experts))


TEXT_STREAM = ("context", "add_", "txt_")  # parameters a joint block applies to the text tokens only
MODULATION = ("norm", "modulation", "adaLN", "scale_shift_table", "time", "_mod.")  # one row per sample, not per token
CROSS_KV = ("attn2.to_k", "attn2.to_v", "attn2.add_")  # cross-attention K/V: applied to the text tokens only


def step_flops(facts: ModelFacts, height: int, width: int, frames: int = 1, text: int | None = None
               ) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of one forward of one sample (one expert of a two-expert model), analytic:
    2 x tokens x the parameters each block applies to them (image tokens: memory_estimate's per-token bytes;
    text tokens: a joint block's text stream, or the whole block where text and image share it), and
    4 x queries x keys x hidden per attention layer (joint: image + text; video models: image self-attention
    and image x text cross-attention). Flux.1 1024px: 74.4 TFLOP, what torch's FLOP counter counts (74.38)."""
    a = facts.adapter
    image = a.image_tokens(height, width, frames)
    text = a.spec.cond.tokens if text is None else text
    joint = a.latent.dims != 3
    hidden = a.hidden_size
    img, txt = facts.flop_params
    matmul = 2 * (image * img + (text * txt if joint else 0))
    seq = image + text if joint else image
    layers = facts.blocks // facts.experts
    attention = 4 * seq * seq * hidden * layers + (0 if joint else 4 * image * text * hidden * layers)
    return float(matmul), float(attention)


def _flop_params(adapter, experts: int) -> tuple[int, int]:
    """(parameters applied per image token, per text token) summed over one expert's blocks."""
    img = txt = 0
    for bl in adapter.plan.blocks:
        for b in getattr(adapter.model, bl.name):
            per_img = per_txt = 0
            for name, p in b.named_parameters():
                if p.ndim < 2 or any(m in name for m in MODULATION):
                    continue
                if any(m in name for m in CROSS_KV):
                    continue
                if any(m in name for m in TEXT_STREAM):
                    per_txt += p.numel()
                else:
                    per_img += p.numel()
            img += per_img
            txt += per_txt or per_img  # a single-stream block applies its weights to the text tokens too
    return img // experts, txt // experts


# ---------------------------------------------------------------------------------------------------------------
# Candidates, memory, time


@dataclass(frozen=True)
class Option:
    config: ParallelConfig
    storage: str          # "bf16" or "fp8"
    seconds: float        # predicted per sampling step
    weights: int          # bytes per rank
    activations: int      # bytes per rank
    parts: tuple[tuple[str, float], ...] = ()  # seconds by what: compute, comm kinds
    fits: bool = True

    @property
    def memory(self) -> int:
        return self.weights + self.activations

    @property
    def exact(self) -> bool:
        return self.config.pipefusion == 1

    def layout(self) -> str:
        return describe_config(self.config, self.storage)


def describe_config(c: ParallelConfig, storage: str = "bf16") -> str:
    parts = [f"{n} {getattr(c, n)}" for n in ("ulysses", "ring", "cfg", "dp", "pipefusion") if getattr(c, n) > 1]
    if c.shard > 1:
        parts.append(f"shard {c.shard}")
    if storage == "fp8":
        parts.append("fp8")
    return " x ".join(parts) or "1 rank"


def candidates(world: int, heads: int) -> list[ParallelConfig]:
    """Every degree tuple with product `world` (cfg 1 or 2), each with every shard degree the engine allows,
    and shard alone over the `world` ranks."""
    from .parallel.shard import shard_degrees

    out = []
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    for cfg in (1, 2):
        for dp in divisors:
            for pf in divisors:
                for ring in divisors:
                    rest, r = divmod(world, cfg * dp * pf * ring)
                    if r or rest < 1:
                        continue
                    base = ParallelConfig(dp=dp, cfg=cfg, pipefusion=pf, ring=ring, ulysses=rest, num_patches=pf)
                    for s in shard_degrees(base) if pf == 1 else [1]:
                        out.append(replace(base, shard=s))
    if world > 1:
        out.append(ParallelConfig(shard=world))
    return out


def valid(facts: ModelFacts, config: ParallelConfig, job: Job) -> str | None:
    """None, or the engine's one-line refusal of this layout for this model and job."""
    from .parallel.runner import check_model_fit
    from .sampling import SampleRequest

    try:
        config.validate()
        if facts.experts > 1 and config.pipefusion > 1:
            raise ConfigError("pipefusion is not available for two-expert models")
        req = SampleRequest(height=job.height, width=job.width, steps=job.steps, frames=job.frames,
                            batch_size=job.batch, cfg=job.cfg)
        check_model_fit(config, facts.adapter, req)
    except ConfigError as e:
        return str(e)
    except XDiTError:
        pass  # an input problem of the job (Wan I2V's image inputs), not of the layout
    return None


def memory(facts: ModelFacts, config: ParallelConfig, job: Job, storage: str) -> tuple[int, int]:
    """(weights, activations) bytes per rank: memory_estimate's arithmetic for this combination."""
    a = facts.adapter
    image = a.image_tokens(job.height, job.width, job.frames)
    text = _text(a, job)
    local_batch = -(-job.batch // config.dp)
    sp = config.sp
    total = facts.weights[storage]
    upcast = facts.upcast[storage]
    if config.pipefusion > 1:
        from .parallel.pipefusion import partition

        d = config.pipefusion
        sizes = facts.stage_blocks
        scale = total / facts.weights["bf16"]
        starts = partition(facts.stage_costs, d, sizes, cap=sum(sizes) / d + max(sizes)) + [len(sizes)]
        stage = max(range(d), key=lambda i: sum(sizes[starts[i]:starts[i + 1]]))
        layers = starts[stage + 1] - starts[stage]
        branches = 2 if job.cfg != 1.0 and a.spec.cond.negative else 1
        kv = 2 * (branches // config.cfg) * -(-image // sp) * a.hidden_size * 2 * layers
        weights = int(total - scale * (sum(sizes) - sum(sizes[starts[stage]:starts[stage + 1]])))
        act = (-(-image // (d * sp)) + -(-text // sp)) * facts.per_token + kv
        return weights, local_batch * act + upcast
    weights = total if config.shard == 1 else -(-total // config.shard) + 2 * facts.block_max[storage]
    return weights, local_batch * -(-(image + text) // sp) * facts.per_token + upcast


def _rate(peak: float, rows: float, half: int) -> float:
    return peak * rows / (rows + half)


def step_seconds(facts: ModelFacts, config: ParallelConfig, job: Job, gpus: GPUs, storage: str = "bf16",
                 flops: tuple[float, float] | None = None) -> tuple[float, tuple[tuple[str, float], ...]]:
    """Predicted seconds of one sampling step of `job` on `gpus` under `config`, and its parts."""
    k = gpus.kind
    a = facts.adapter
    image = a.image_tokens(job.height, job.width, job.frames)
    text = _text(a, job)
    mm, attn = flops if flops is not None else step_flops(facts, job.height, job.width, job.frames, text)
    branches = 2 if job.cfg != 1.0 and a.spec.cond.negative else 1
    local_batch = -(-job.batch // config.dp)
    forwards = branches // config.cfg  # forwards per step on this rank (the batch runs in one)
    sp, pf = config.sp, config.pipefusion
    tokens = image + text
    rows = local_batch * tokens / sp / (pf if pf > 1 else 1)  # rows of this rank's matmuls per call
    work = local_batch * forwards
    keys = tokens / config.ring  # a ring rank's queries and each K/V block it receives; Ulysses keeps all keys
    queries = keys / pf
    attn_rate = _rate(_rate(k.attention_flops, queries, k.half_rows), keys, k.half_rows)
    attn_time = work * attn / (sp * pf) / attn_rate
    compute = work * mm / (sp * pf) / _rate(k.matmul_flops, rows, k.half_rows) + attn_time
    bw, lat = gpus.bandwidth, k.latency_s
    e = k.element
    layers = facts.blocks // facts.experts if facts.experts > 1 else facts.blocks
    parts: dict[str, float] = {}
    hidden = a.hidden_size
    if pf > 1:  # stages do the split's share of the work; each patch's activations cross each stage boundary
        from .parallel.pipefusion import partition

        costs, sizes = facts.stage_costs, facts.stage_blocks
        starts = partition(costs, pf, sizes, cap=sum(sizes) / pf + max(sizes)) + [len(costs)]
        worst = max(sum(costs[starts[i]:starts[i + 1]]) for i in range(pf)) / sum(costs)
        compute *= worst * pf
        layers = starts[1] - starts[0]
        hand = work * pf * (lat + tokens / sp * hidden * e / pf / bw)
        parts["pipefusion p2p"] = hand
    if config.ulysses > 1:
        u = config.ulysses
        sent = 4 * (tokens / sp) * hidden * e * (u - 1) / u  # q, k, v out and the output back, per layer
        parts["ulysses all-to-all"] = work * layers * 2 * lat + work * layers * local_batch * sent / bw
    if config.ring > 1:
        r = config.ring
        sent = (r - 1) * 2 * (tokens / sp) * (hidden / config.ulysses) * e
        transfer = work * layers * local_batch * sent / bw
        # per ring step and layer: a launch/latency and the log-sum-exp merge of the partial outputs (fp32 read
        # twice and written once), neither hidden behind the attention
        merge = work * layers * (r - 1) * (lat + 3 * 4 * local_batch * tokens / sp * hidden / k.hbm_bytes_s)
        parts["ring p2p"] = merge + max(0.0, transfer - attn_time)  # the transfer overlaps the attention it feeds
    if config.cfg > 1 or config.dp > 1:
        out = local_batch * image * a.latent_channels * 4
        parts["cfg/dp gather"] = lat + out / bw
    if config.shard > 1:
        s = config.shard
        gathered = facts.weights[storage] / facts.experts * (s - 1) / s
        gather = forwards * (layers * lat + gathered / bw)
        if config.work_size == 1:  # shard alone: every rank computes the whole step
            compute = work * (mm / _rate(k.matmul_flops, local_batch * tokens, k.half_rows) +
                              attn / _rate(_rate(k.attention_flops, tokens, k.half_rows), tokens, k.half_rows))
        first = forwards * facts.block_max[storage] * (s - 1) / s / bw  # the first block's gather is not hidden
        parts["fsdp gather"] = first + max(0.0, gather - first - compute)  # prefetched: overlaps the block before
    if storage == "fp8":
        parts["fp8 upcast"] = forwards * 3 * facts.weights["fp8"] / facts.experts / k.hbm_bytes_s
    warm = 0.0
    if pf > 1 and job.steps > 0:  # synchronous full-image warm-up steps, amortised over the job
        full = work * (mm / sp / _rate(k.matmul_flops, local_batch * tokens / sp, k.half_rows) + attn / sp /
                       _rate(_rate(k.attention_flops, keys, k.half_rows), keys, k.half_rows))
        warm = config.warmup_steps * max(0.0, full - compute) / job.steps
        parts["pipefusion warm-up"] = warm
    if k.name == "CPU" and 0 < gpus.cores < gpus.count:  # more CPU ranks than cores: they take turns
        compute *= gpus.count / gpus.cores
    total = compute + sum(parts.values())
    return total, (("compute", compute), *parts.items())


@dataclass
class Plan:
    gpus: GPUs
    job: Job
    facts: ModelFacts
    options: list[Option]      # every valid layout, fitting first, ranked
    refused: list[tuple[ParallelConfig, str]]
    warnings: list[str]

    approximate: bool = False

    @property
    def choice(self) -> Option | None:
        return next((o for o in self.options if o.fits and (o.exact or self.approximate)), None)

    def reason(self) -> str:
        """One line: the choice and why, or the refusal and what would fit."""
        c = self.choice
        if c is None:
            return self.refusal()
        gib = c.memory / 2**30
        fitting = [o for o in self.options if o.fits]
        why = []
        if c.storage == "fp8":
            why.append("no bf16 layout fits")
        if c.config.shard > 1:
            why.append(f"weights {self.facts.weights['bf16'] / 1e9:.0f} GB do not fit {self.gpus.memory_gib:g} GB whole"
                       if self.weights_gib("bf16") + OVERHEAD_GIB > self.gpus.memory_gib else "sharded weights")
        runner_up = next((o for o in fitting if o is not c and o.exact), None)
        if runner_up is not None:
            why.append(f"next: {runner_up.layout()} {runner_up.seconds:.3g} s")
        approx = next((o for o in fitting if not o.exact), None)
        if approx is not None and approx.seconds < c.seconds and not self.approximate:
            why.append(f"{approx.layout()} {approx.seconds:.3g} s is approximate, not picked")
        main = max(c.parts, key=lambda p: p[1])[0] if c.parts else "compute"
        return (f"auto: {c.layout()} on {self.gpus.describe()}: {c.seconds:.3g} s/step predicted, "
                f"{gib:.1f} GiB per rank ({main}-bound" + ("; " + "; ".join(why) if why else "") + ")")

    @property
    def model(self) -> str:
        return self.facts.name

    def weights_gib(self, storage: str) -> float:
        return self.facts.weights[storage] / 2**30

    def refusal(self) -> str:
        f = self.facts
        need = f.weights["bf16"] / 1e9
        n, mem = self.gpus.count, self.gpus.memory_gib
        what = _what_would_fit(f, self.job, self.gpus)
        if not self.options:
            why = self.refused[0][1] if self.refused else "no layout"
            return f"auto: no valid layout of {n} ranks for {self.model} at this job ({why})"
        approx = next((o for o in self.options if o.fits and not o.exact), None)
        if approx is not None:
            return (f"auto: only {approx.layout()} (approximate: stale K/V) fits {self.model} on {n} x {mem:g} GB; "
                    f"set the degrees by hand to use it; {what}")
        return (f"auto: {self.model} needs {need:.0f} GB of weights; nothing fits {n} x {mem:g} GB "
                f"(smallest: {min(o.memory for o in self.options) / 2**30:.0f} GiB per rank); {what}")


def _what_would_fit(f: ModelFacts, job: Job, gpus: GPUs) -> str:
    """The smallest card each GPU count would need, and whether fp8 would do it."""
    out = []
    for count in sorted({gpus.count, 2, 4, 8}):
        best = None
        for storage in ("bf16", "fp8"):
            for c in candidates(count, f.heads):
                if valid(f, c, job) is not None:
                    continue
                w, act = memory(f, c, job, storage)
                gib = (w + act) / 2**30 + OVERHEAD_GIB
                if best is None or gib < best[0]:
                    best = (gib, c, storage)
            if best is not None and best[0] <= gpus.memory_gib:
                break
        if best is not None and best[0] <= gpus.memory_gib:
            out.append(f"{count} x {gpus.memory_gib:g} GB fit with {describe_config(best[1], best[2])}")
        elif best is not None and count == gpus.count:
            out.append(f"{count} GPU{'s' if count > 1 else ''} would need {math.ceil(best[0])} GB each "
                       f"({describe_config(best[1], best[2])})")
    return "; ".join(out) if out else "no card holds it"


def _rank_key(o: Option) -> float:
    """Predicted time, with 1% per method used and 2% for sharding: near-ties go to the simpler layout (fewer
    collectives to go wrong; the model is not that exact)."""
    c = o.config
    methods = sum(getattr(c, n) > 1 for n in ("ulysses", "ring", "cfg", "dp", "pipefusion"))
    return o.seconds * (1 + 0.01 * methods + 0.02 * (c.shard > 1))


def plan(model: str | ModelFacts, gpus: GPUs | str, job: Job, cores: int | None = None,
         approximate: bool = False) -> Plan:
    """Every valid layout for `gpus`, ranked: fitting first, then fastest; bf16 unless no bf16 layout fits;
    exact methods only unless `approximate` (PipeFusion's stale K/V changes the result), and then PipeFusion only
    where it beats every exact layout by 20% or is the only one that fits."""
    facts = model if isinstance(model, ModelFacts) else model_facts(model)
    g = parse_gpus(gpus) if isinstance(gpus, str) else gpus
    warnings = []
    if g.kind.name == "CPU":
        have = cores if cores is not None else len(os.sched_getaffinity(0))
        if g.count > have:
            warnings.append(f"{g.count} CPU ranks on {have} cores: ranks share cores, the predicted times assume one "
                            "core each")
    flops = step_flops(facts, job.height, job.width, job.frames, _text(facts.adapter, job))
    options, refused = [], []
    for config in candidates(g.count, facts.heads):
        why = valid(facts, config, job)
        if why is not None:
            refused.append((config, why))
            continue
        for storage in ("bf16", "fp8"):
            w, act = memory(facts, config, job, storage)
            fits = (w + act) / 2**30 + OVERHEAD_GIB <= g.memory_gib
            seconds, parts = step_seconds(facts, config, job, g, storage, flops)
            options.append(Option(config, storage, seconds, w, act, parts, fits))
    bf16_fits = any(o.fits and o.storage == "bf16" for o in options)
    if bf16_fits:  # fp8 storage only when nothing else fits
        options = [o for o in options if o.storage == "bf16"]
    fitting = sorted((o for o in options if o.fits), key=_rank_key)
    exact = [o for o in fitting if o.exact]
    if not approximate:
        fitting = exact + [o for o in fitting if not o.exact]
    elif exact and fitting[0] is not exact[0] and fitting[0].seconds > PIPEFUSION_MARGIN * exact[0].seconds:
        fitting.remove(exact[0])
        fitting.insert(0, exact[0])
    rest = sorted((o for o in options if not o.fits), key=lambda o: o.memory)
    return Plan(g, job, facts, fitting + rest, refused, warnings, approximate)


def check_ranks(world: int, device: str, gpus_seen: int | None = None, cores: int | None = None) -> str | None:
    """One line refusing more ranks than GPUs (None when fine); a warning line for more CPU ranks than cores is
    returned prefixed 'warning:'."""
    if device == "cuda":
        seen = gpus_seen if gpus_seen is not None else torch.cuda.device_count()
        if world > seen:
            return f"{world} ranks but {seen} GPUs: one rank per GPU (lower the degrees or add GPUs)"
        return None
    have = cores if cores is not None else len(os.sched_getaffinity(0))
    if world > have:
        return f"warning: {world} CPU ranks on {have} cores: they share cores and run slower than fewer ranks"
    return None


def format_plan(p: Plan, top: int = 12) -> str:
    """The ranked options as a table, then the one-line choice."""
    lines = [f"{p.model}: {p.job.width}x{p.job.height}" + (f", {p.job.frames} frames" if p.job.frames > 1 else "")
             + f", batch {p.job.batch}, cfg {p.job.cfg:g} on {p.gpus.describe()} ({p.gpus.kind.name} constants)",
             f"{'#':>3}  {'layout':<38}{'s/step':>9}{'GiB/rank':>9}  {'fits':<5} main cost"]
    for i, o in enumerate(p.options[:top], 1):
        main = max(o.parts, key=lambda x: x[1])[0] if o.parts else ""
        flag = "" if o.exact else " (approx.)"
        lines.append(f"{i:>3}  {o.layout() + flag:<38}{o.seconds:>9.3g}{o.memory / 2**30:>9.1f}  "
                     f"{'yes' if o.fits else 'no':<5} {main}")
    if len(p.options) > top:
        lines.append(f"     ... {len(p.options) - top} more")
    lines += [f"warning: {w}" for w in p.warnings]
    lines.append(p.reason())
    return "\n".join(lines)


def add_plan_args(p) -> None:
    p.add_argument("--model", required=True, help="a family or variant (flux-dev, qwen-image, flux2-dev, "
                   "z-image-turbo, wan2.2-t2v-a14b, ...), a diffusers folder or a single-file checkpoint (its header "
                   "only is read)")
    p.add_argument("--gpus", required=True, help="COUNTxMEMORY[,pcie|nvlink] (4x24GB,pcie), COUNTxKIND "
                   f"({', '.join(KINDS)}; e.g. 8xH100) or COUNTxcpu")
    p.add_argument("--size", required=True, help="WIDTHxHEIGHT in pixels, or one side (1024)")
    p.add_argument("--frames", type=int, default=1, help="pixel frames of a video model (4k+1 for Wan)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cfg", type=float, default=1.0, help="true CFG scale (1 = off: no cfg parallel)")
    p.add_argument("--steps", type=int, default=28, help="sampling steps (PipeFusion's warm-up is amortised)")
    p.add_argument("--approximate", action="store_true", help="let auto pick PipeFusion (stale K/V: results differ "
                   "from the exact methods')")
    p.add_argument("--top", type=int, default=12, help="options listed")


def cmd_plan(args) -> int:
    from .memory_estimate import parse_size

    height, width = parse_size(args.size)
    job = Job(height, width, args.frames, args.batch, args.cfg, args.steps)
    gpus = parse_gpus(args.gpus)
    facts = model_facts(args.model)
    p = plan(facts, gpus, job, approximate=args.approximate)
    print(format_plan(p, args.top))
    return 0 if p.choice is not None else 1
