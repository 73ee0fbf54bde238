"""What every rank does with one operation: load/unload models, sample, heartbeat. Ranks share the same model
cache, kept identical because every rank sees every operation in the same order."""
from __future__ import annotations

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
from comfyui_xdit.lora import LoraSpec, apply_loras
from comfyui_xdit.models import LoadedModel, load_model
from comfyui_xdit.parallel import ParallelConfig
from comfyui_xdit.sampling import SampleRequest, StepInfo

from .fanout import Fanout
from .messages import LoadOp, Op, Outcome, PingOp, SampleFields, SampleOp, ShutdownOp, UnloadOp

# progress(step, total, step_seconds, preview or None); runs on rank 0 only
ProgressHook = Callable[[int, int, float, "torch.Tensor | None"], None]

PREVIEW_SIDE = 32  # longest side of a preview latent


class UnknownModel(XDiTError):
    """The key names no loaded model (never loaded, unloaded, or the pool restarted)."""


class PeerFailed(Exception):
    """Another rank failed at this step; raised on the ranks that did not."""


def model_key(source: str, family: str | None, dtype: str) -> str:
    return f"{source}|{family or 'auto'}|{dtype}"


def build_request(fields: SampleFields, inputs: dict[str, torch.Tensor]) -> SampleRequest:
    """The engine's SampleRequest from a checked sample message (types and ranges are the schema's)."""
    cache = None
    if fields.cache is not None:
        cache = CacheSettings(**msgspec.structs.asdict(fields.cache))
    kwargs = msgspec.structs.asdict(fields)
    kwargs["cache"] = cache
    return SampleRequest(**kwargs, inputs=inputs)


def memory_stats(device: torch.device) -> dict[str, int]:
    rss = 0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    stats = {"rss_bytes": rss}
    if device.type == "cuda":
        stats["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
        stats["cuda_reserved_bytes"] = torch.cuda.memory_reserved(device)
    return stats


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

    def run(self, op: Op, tensors: dict[str, torch.Tensor], progress: ProgressHook | None = None,
            should_cancel: Callable[[], bool] | None = None) -> tuple[list[Outcome], torch.Tensor | None, dict]:
        """Execute, then exchange outcomes. Returns (outcome per rank, result on rank 0, reply fields)."""
        result, extra, failure = None, {}, None
        try:
            if isinstance(op, LoadOp):
                extra = self._load(op)
            elif isinstance(op, UnloadOp):
                extra = {"unloaded": self._unload(op.key)}
            elif isinstance(op, SampleOp):
                result, extra = self._sample(op, tensors, progress, should_cancel)
            elif not isinstance(op, (PingOp, ShutdownOp)):
                raise XDiTError(f"unknown operation {type(op).__name__}")
        except Cancelled as e:
            failure = ("cancelled", str(e) or "cancelled")
        except PeerFailed as e:
            failure = ("peer", str(e))
        except UnknownModel as e:
            failure = ("unknown_model", str(e))
        except XDiTError as e:
            failure = ("invalid", str(e))
        except Exception as e:  # noqa: BLE001 - reported to the client with the rank's own text
            traceback.print_exc()
            failure = ("internal", f"{type(e).__name__}: {e}")
        kind, message = failure or ("", "")
        outcomes = self.fanout.gather(Outcome(ok=failure is None, kind=kind, message=message, rank=self.rank,
                                              pid=os.getpid(), **memory_stats(self.device)))
        if isinstance(op, LoadOp) and not all(o.ok for o in outcomes):
            self._unload(op.key)  # loaded on some ranks only: forget it everywhere
        return outcomes, result, extra

    def _load(self, op: LoadOp) -> dict:
        if op.key in self.models:
            return {"key": op.key, "cached": True, "seconds": 0.0, "family": self.models[op.key].family}
        t0 = time.perf_counter()
        loaded = load_model(op.source, op.family, op.dtype, str(self.device))
        self.models[op.key] = loaded
        self.model_info[op.key] = {"key": op.key, "source": op.source, "family": loaded.family, "dtype": op.dtype}
        return {"key": op.key, "cached": False, "seconds": round(time.perf_counter() - t0, 3),
                "family": loaded.family}

    def _unload(self, key: str) -> bool:
        found = self.models.pop(key, None) is not None
        self.model_info.pop(key, None)
        if found:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return found

    def _sample(self, op: SampleOp, tensors: dict, progress: ProgressHook | None,
                should_cancel: Callable[[], bool] | None) -> tuple[torch.Tensor, dict]:
        loaded = self.models.get(op.key)
        if loaded is None:
            shown = op.key if len(op.key) <= 200 else op.key[:200] + "..."
            raise UnknownModel(f"model {shown!r} is not loaded on the pool")
        lora_info = self._apply_loras(op, loaded)
        req = build_request(op.request, {k: v.to(self.device) for k, v in tensors.items()})
        config = ParallelConfig(**msgspec.structs.asdict(op.parallel))
        config.validate()
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

    def _apply_loras(self, op: SampleOp, loaded: LoadedModel) -> dict:
        """Patch the job's LoRA set into this rank's weights (the base weights for an empty set). The model entry's
        weights are then its key plus the set: model_info's "loras" and "lora_key", and the result's "lora_key"."""
        specs = [LoraSpec(lo.path, lo.strength) for lo in op.loras]
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
