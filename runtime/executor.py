"""What every rank does with one operation: load/unload models, sample, heartbeat. Ranks share the same model
cache, kept identical because every rank sees every operation in the same order."""
from __future__ import annotations

import collections
import gc
import os
import time
import traceback
from typing import Callable

import msgspec
import torch
import torch.distributed as dist

from comfyui_xdit.cache import CacheSettings
from comfyui_xdit.engine import run_job
from comfyui_xdit.errors import Cancelled, XDiTError
from comfyui_xdit.frugal import peak_rss_bytes, reset_peak_rss, rss_bytes
from comfyui_xdit.lora import LoraSpec, apply_loras
from comfyui_xdit.models import LoadedModel, load_model
from comfyui_xdit.parallel import ParallelConfig
from comfyui_xdit.parallel.config import MESH_DIMS
from comfyui_xdit.sampling import SampleRequest, StepInfo

from .cond_cache import CondCache, CondMissing
from .fanout import Fanout
from .messages import (ForwardOp, LoadOp, Op, Outcome, ParallelFields, PingOp, SampleFields, SampleOp,
                       ShutdownOp, UnloadOp)

# progress(step, total, step_seconds, preview or None); runs on rank 0 only
ProgressHook = Callable[[int, int, float, "torch.Tensor | None"], None]

PREVIEW_SIDE = 32  # longest side of a preview latent
MAX_RUNS = 2  # sampling runs whose caches (context entries, residuals per call slot) a rank keeps
# A forward (one call of a stock sampler's step) measures memory only when the last measurement is older than this:
# reading /proc costs a few tenths of a millisecond per call after a forward, a tenth of a tiny model's step overhead.
FORWARD_STATS_S = 1.0


class UnknownModel(XDiTError):
    """The key names no loaded model (never loaded, unloaded, or the pool restarted)."""


class PeerFailed(Exception):
    """Another rank failed at this step; raised on the ranks that did not."""


def model_key(source: str, family: str | None, dtype: str, parallel: ParallelFields | None = None) -> str:
    """The cache key of a load; one loaded for a PipeFusion layout (each rank holding its stage) or a shard degree
    (each rank holding its FSDP2 shards) has its own."""
    key = f"{source}|{family or 'auto'}|{dtype}"
    layout = staged_layout(parallel)
    if layout is None:
        return key
    key = f"{key}|stages {'x'.join(map(str, layout.mesh_shape))}"
    return key if layout.shard <= 1 else f"{key}|shard {layout.shard}"


def staged_layout(parallel: ParallelFields | None) -> ParallelConfig | None:
    """The config a load is made for: only PipeFusion or shard degrees > 1 change what a rank reads."""
    if parallel is None or (parallel.pipefusion <= 1 and parallel.shard <= 1):
        return None
    return ParallelConfig(**msgspec.structs.asdict(parallel))


def build_request(fields: SampleFields, inputs: dict[str, torch.Tensor]) -> SampleRequest:
    """The engine's SampleRequest from a checked sample message (types and ranges are the schema's)."""
    cache = None
    if fields.cache is not None:
        cache = CacheSettings(**msgspec.structs.asdict(fields.cache))
    kwargs = msgspec.structs.asdict(fields)
    kwargs["cache"] = cache
    return SampleRequest(**kwargs, inputs=inputs)


def memory_stats(device: torch.device) -> dict[str, int]:
    """This rank's memory now, and its high-water marks since reset_memory_peaks() (or the process start)."""
    stats = {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        stats["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
        stats["cuda_reserved_bytes"] = torch.cuda.memory_reserved(device)
        stats["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return stats


def reset_memory_peaks(device: torch.device) -> None:
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class Executor:
    """One per rank. `run` is called collectively with the same operation on every rank."""

    def __init__(self, fanout: Fanout, device: torch.device, test_hooks: bool = False):
        self.fanout = fanout
        self.device = device
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.models: dict[str, LoadedModel] = {}
        self.model_info: dict[str, dict] = {}
        self.test_hooks = test_hooks
        self.conds = CondCache()  # Parallel DiT Model's conditioning, by content hash
        # Parallel DiT Model's step cache, one per sampling run (the newest few): (owner, run id, key) -> RunCache
        self.runs: collections.OrderedDict[tuple, object] = collections.OrderedDict()
        self._stats: dict[str, int] = {}  # the last memory figures, and when they were read (monotonic)
        self._stats_at = float("-inf")

    def run(self, op: Op, tensors: dict[str, torch.Tensor], progress: ProgressHook | None = None,
            should_cancel: Callable[[], bool] | None = None) -> tuple[list[Outcome], torch.Tensor | None, dict]:
        """Execute, then exchange outcomes. Returns (outcome per rank, result on rank 0, reply fields)."""
        result, extra, failure = None, {}, None
        # forwards in a row share one measurement a second: their peaks then span the calls since it
        measure = not isinstance(op, ForwardOp) or time.monotonic() - self._stats_at >= FORWARD_STATS_S
        if measure:
            reset_memory_peaks(self.device)
        try:
            if isinstance(op, LoadOp):
                extra = self._load(op)
            elif isinstance(op, UnloadOp):
                extra = {"unloaded": self._unload(op.key)}
            elif isinstance(op, SampleOp):
                result, extra = self._sample(op, tensors, progress, should_cancel)
            elif isinstance(op, ForwardOp):
                result, extra = self._forward(op, tensors)
            elif not isinstance(op, (PingOp, ShutdownOp)):
                raise XDiTError(f"unknown operation {type(op).__name__}")
        except Cancelled as e:
            failure = ("cancelled", str(e) or "cancelled")
        except PeerFailed as e:
            failure = ("peer", str(e))
        except UnknownModel as e:
            failure = ("unknown_model", str(e))
        except CondMissing as e:
            failure = ("cond_missing", str(e))
        except XDiTError as e:
            failure = ("invalid", str(e))
        except Exception as e:  # noqa: BLE001 - reported to the client with the rank's own text
            traceback.print_exc()
            failure = ("internal", f"{type(e).__name__}: {e}")
        kind, message = failure or ("", "")
        report = extra.pop("load_report", None) if isinstance(op, LoadOp) else None
        if measure:
            self._stats, self._stats_at = memory_stats(self.device), time.monotonic()
        outcomes = self.fanout.gather(Outcome(ok=failure is None, kind=kind, message=message, rank=self.rank,
                                              pid=os.getpid(), load=report, **self._stats))
        if isinstance(op, LoadOp) and not all(o.ok for o in outcomes):
            self._unload(op.key)  # loaded on some ranks only: forget it everywhere
        return outcomes, result, extra

    def _load(self, op: LoadOp) -> dict:
        if op.key in self.models:
            return {"key": op.key, "cached": True, "seconds": 0.0, "family": self.models[op.key].family}
        t0 = time.perf_counter()
        layout = staged_layout(op.parallel)
        if layout is not None:
            layout.validate(self.world)
        loaded = load_model(op.source, op.family, op.dtype, str(self.device), layout=layout, rank=self.rank)
        self.models[op.key] = loaded
        self.model_info[op.key] = {"key": op.key, "source": op.source, "family": loaded.family, "dtype": op.dtype}
        if layout is not None:
            self.model_info[op.key]["parallel"] = layout.to_dict()
        return {"key": op.key, "cached": False, "seconds": round(time.perf_counter() - t0, 3),
                "family": loaded.family, "load_report": loaded.report.to_dict() if loaded.report else None}

    def _unload(self, key: str) -> bool:
        found = self.models.pop(key, None) is not None
        self.model_info.pop(key, None)
        for run in [r for r in self.runs if r[2] == key]:
            del self.runs[run]
        if found:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return found

    def _loaded(self, key: str) -> LoadedModel:
        loaded = self.models.get(key)
        if loaded is None:
            shown = key if len(key) <= 200 else key[:200] + "..."
            raise UnknownModel(f"model {shown!r} is not loaded on the pool")
        return loaded

    def _fit_layout(self, key: str, loaded: LoadedModel, pipefusion: ParallelConfig | None,
                    forward: bool = False) -> LoadedModel:
        """The model as this job needs it. A PipeFusion job drops every block but its stage's from the cached
        model; a later job with another layout (no PipeFusion, another stage) would run a model without those
        blocks, so the model is loaded again from its file first (every rank sees the same op: all reload). A model
        an earlier job sharded (FSDP2) is loaded again whole for PipeFusion and for a forward, whose ranks do not
        all call the model together as the shard gathers need."""
        from comfyui_xdit.parallel.shard import sharded_layout

        if loaded.layout is not None:  # loaded for its degrees (checked by the caller)
            return loaded
        staged = getattr(loaded.adapter.model, "_xdit_stage", None)
        if staged is not None:
            if pipefusion is not None and staged[0] == (pipefusion_stage(pipefusion, self.rank),
                                                        pipefusion.pipefusion):
                return loaded
        elif sharded_layout(loaded.adapter.model) is None or not (forward or pipefusion is not None):
            return loaded
        info = self.model_info[key]
        self.models.pop(key)
        del loaded
        gc.collect()
        loaded = load_model(info["source"], info["family"], info["dtype"], str(self.device))
        self.models[key] = loaded
        return loaded

    def _forward(self, op: ForwardOp, tensors: dict) -> tuple[torch.Tensor, dict]:
        """One transformer forward of a stock ComfyUI sampler's step (comfyui_xdit.parallel.forward)."""
        from comfyui_xdit.adapters import Conditioning
        from comfyui_xdit.parallel.forward import forward_call

        start = time.perf_counter()
        rest = self.conds.take_uploads(tensors)  # uploads are kept even when the call fails below
        config = ParallelConfig(**msgspec.structs.asdict(op.parallel))
        # the whole model, or the model sharded as this forward's shard degree says
        loaded = self._fit_layout(op.key, self._loaded(op.key), None, forward=config.shard == 1)
        lay = loaded.layout
        if lay is not None and (lay.pipefusion > 1 or (lay.mesh_shape, lay.shard) != (config.mesh_shape,
                                                                                       config.shard)):
            raise XDiTError(f"this model was loaded for {_degrees(lay)} (each rank holds part of its weights): "
                            f"a forward with degrees {_degrees(config)} needs it loaded for those degrees")
        self._apply_loras(op, loaded)  # the base weights: a forward carries no LoRA set
        extras = tuple(loaded.adapter.spec.cond.extra_inputs)  # e.g. Qwen-Image-Edit's reference latents
        unknown = set(op.conds) - {"cond", "pooled", "cond_mask", *extras}
        if unknown or "cond" not in op.conds:
            raise XDiTError(f"forward conditioning must name cond (and optionally pooled, cond_mask"
                            f"{''.join(', ' + e for e in extras)}), got {sorted(op.conds)}")
        if set(rest) != {"x", "timestep"}:
            raise XDiTError(f"forward takes the tensors x and timestep, got {sorted(rest)}")
        got = self.conds.on_device(op.conds, self.device)
        cond = Conditioning(got["cond"], got.get("pooled"), got.get("cond_mask"), op.guidance,
                            {k: got[k] for k in extras if k in got})
        if config.world_size not in (1, self.world):
            raise XDiTError(f"the parallel degrees multiply to {config.world_size} but the pool has "
                            f"{self.world} ranks")
        if self.test_hooks and op.debug is not None and op.debug.raise_on_rank == self.rank:
            raise RuntimeError("injected failure in a forward")
        sent: dict[str, int] = {}
        run, run_key = self._run_cache(op, loaded, config)
        try:
            out = forward_call(loaded.adapter, rest["x"].to(self.device), rest["timestep"], cond, config, sent,
                               op.skip_blocks, run)
        except BaseException:
            self.runs.pop(run_key, None)  # a failed call may have left the ranks' caches apart: the run starts over
            raise
        extra = {"seconds": round(time.perf_counter() - start, 6)}
        if run is not None and run[1] is not None:
            extra["reused"] = run[1].step in run[0].reused  # this call's step reused the cached residual
        if sent:
            extra["comm"] = sent  # the bytes rank 0 sent to other ranks, per kind
        return (out.cpu() if self.rank == 0 else out), extra

    def _run_cache(self, op: ForwardOp, loaded: LoadedModel, config: ParallelConfig) -> tuple[tuple | None, tuple]:
        """The caches of the forward's sampling run, and with the step cache where the call sits in it."""
        from comfyui_xdit.forward_cache import RunStep
        from comfyui_xdit.parallel.forward import run_cache

        run = op.run
        if op.cache is not None and (run is None or None in (run.step, run.steps, run.measured)):
            raise XDiTError("a forward with the step cache names its run, step, steps and measured rows")
        key = (op.owner, run.id, op.key, config, msgspec.json.encode(op.cache)) if run is not None else ()
        if run is None:
            return None, key
        cache = self.runs.get(key)
        if cache is None:
            settings = None if op.cache is None else CacheSettings(**msgspec.structs.asdict(op.cache))
            cache = run_cache(loaded.adapter, settings, run.steps or 0, config)
            self.runs[key] = cache
            while len(self.runs) > MAX_RUNS:
                self.runs.popitem(last=False)
        self.runs.move_to_end(key)
        at = None if op.cache is None else RunStep(run.step, run.steps, tuple(run.measured))
        return (cache, at), key

    def _sample(self, op: SampleOp, tensors: dict, progress: ProgressHook | None,
                should_cancel: Callable[[], bool] | None) -> tuple[torch.Tensor, dict]:
        config = ParallelConfig(**msgspec.structs.asdict(op.parallel))
        config.validate()
        staged = config.world_size == self.world and config.pipefusion > 1
        loaded = self._fit_layout(op.key, self._loaded(op.key), config if staged else None)
        lora_info = self._apply_loras(op, loaded)
        req = build_request(op.request, {k: v.to(self.device) for k, v in tensors.items()})
        if loaded.layout is not None and (loaded.layout.mesh_shape, loaded.layout.shard) != (config.mesh_shape,
                                                                                           config.shard):
            lay = loaded.layout
            what, held = ((f"pipefusion {lay.pipefusion}", "its stage's blocks") if lay.pipefusion > 1
                          else (f"shard {lay.shard}", "its shards of the weights"))
            raise XDiTError(f"this model was loaded for {what} with degrees {_degrees(lay)} (each rank holds "
                            f"{held}); load it again for degrees {_degrees(config)}")
        timing = {"progress_seconds": 0.0}
        is_rank0 = self.rank == 0
        start = time.perf_counter()

        def report(info: StepInfo) -> None:
            if not is_rank0 or progress is None:
                return
            t = time.perf_counter()
            preview = _preview(loaded, info.latents) if op.preview else None
            progress(info.step, info.total, info.seconds, preview)
            timing["progress_seconds"] += time.perf_counter() - t

        if config.world_size == self.world:
            job = run_job(loaded, req, config, callback=report, should_cancel=should_cancel if is_rank0 else None)
        elif config.world_size == 1:
            # Degrees all 1 on a larger pool: every rank samples serially; cancels and faults agreed per step.
            fault_at = self._injected_fault(op)
            job = run_job(loaded, req, ParallelConfig(),
                          callback=lambda info: self._serial_step(info, report, should_cancel, fault_at))
        else:
            raise XDiTError(f"the parallel degrees multiply to {config.world_size} but the pool has "
                            f"{self.world} ranks")
        timing["seconds"] = time.perf_counter() - start
        extra = {k: round(v, 6) for k, v in timing.items()}
        extra.update(lora_info)
        if req.cache is not None:
            extra["reused_steps"] = job.reused_steps  # 0-based steps the cache reused
        return job.latents.float().cpu() if is_rank0 else job.latents, extra

    def _apply_loras(self, op: SampleOp | ForwardOp, loaded: LoadedModel) -> dict:
        """Patch the job's LoRA set into this rank's weights (the base weights for an empty set, and for a forward,
        which carries none: a LoRA of an earlier sample job must not leak into it). The model entry's weights are
        then its key plus the set: model_info's "loras" and "lora_key", and the result's "lora_key"."""
        specs = [LoraSpec(lo.path, lo.strength) for lo in getattr(op, "loras", ())]
        t0 = time.perf_counter()
        info = apply_loras(loaded.adapter.model, loaded.family, specs)
        self.model_info[op.key].update(loras=[[s.path, s.strength] for s in specs if s.strength != 0.0],
                                       lora_key=info["key"])
        out = {"lora_key": info["key"]} if info["key"] else {}
        if info["changed"]:
            out.update(lora_seconds=round(time.perf_counter() - t0, 6), lora_patched=info["patched"])
        return out

    def _serial_step(self, info: StepInfo, report: Callable, should_cancel, fault_at: int | None) -> None:
        report(info)
        fault = fault_at == info.step
        cancel = self.rank == 0 and should_cancel is not None and should_cancel()
        flags = torch.tensor([float(cancel), float(fault)], device=self.device)
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if fault:
            raise RuntimeError(f"injected failure at step {info.step}")
        if flags[1] > 0:
            raise PeerFailed(f"another rank failed at step {info.step}")
        if flags[0] > 0:
            raise Cancelled(f"cancelled after step {info.step}")

    def _injected_fault(self, op: SampleOp) -> int | None:
        """Test hook (workers started with XDIT_RUNTIME_TEST_HOOKS=1): fail on one rank at one step."""
        hook = op.debug
        if not self.test_hooks or hook is None or hook.raise_on_rank != self.rank:
            return None
        return hook.at_step


def pipefusion_stage(config: ParallelConfig, rank: int) -> int:
    """The PipeFusion stage of `rank` in the mesh of `config` (row-major over MESH_DIMS, as init_device_mesh)."""
    coords = {}
    for dim, size in zip(reversed(MESH_DIMS), reversed(config.mesh_shape)):
        rank, coords[dim] = divmod(rank, size)
    return coords["pipefusion"]


def _degrees(config: ParallelConfig) -> str:
    dims = [f"{d} {getattr(config, d)}" for d in MESH_DIMS if getattr(config, d) > 1]
    return " x ".join(dims + ([f"shard {config.shard}"] if config.shard > 1 else [])) or "all 1"


def _preview(loaded: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """Current latents in ComfyUI's convention, average-pooled to at most PREVIEW_SIDE per side, float16."""
    x = loaded.adapter.from_model_space(latents.detach().float())
    video = x.ndim == 5
    if video:  # a video's first latent frame ([B, C, 1, h, w]: what ComfyUI's previewers show of a video)
        x = x[:, :, 0]
    factor = max(1, -(-max(x.shape[-2:]) // PREVIEW_SIDE))
    if factor > 1:
        x = torch.nn.functional.avg_pool2d(x, factor, ceil_mode=True)
    return (x.unsqueeze(2) if video else x).half().cpu()
