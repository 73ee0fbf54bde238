"""What every rank does with one operation: load/unload models, sample, heartbeat. Ranks share the same model
cache, kept identical because every rank sees every operation in the same order."""
from __future__ import annotations

import gc
import os
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from comfyui_xdit.cache import CacheSettings
from comfyui_xdit.engine import Cancelled, run_job
from comfyui_xdit.errors import XDiTError
from comfyui_xdit.models import LoadedModel, load_model
from comfyui_xdit.parallel import ParallelConfig
from comfyui_xdit.sampling import SampleRequest, StepInfo

from .fanout import Fanout

# progress(step, total, step_seconds, preview or None); runs on rank 0 only
ProgressHook = Callable[[int, int, float, "torch.Tensor | None"], None]

REQUEST_FIELDS: dict[str, type] = {"height": int, "width": int, "steps": int, "seed": int, "batch_size": int,
                                   "cfg": float, "guidance": float, "sampler": str, "denoise": float, "cache": dict}
PREVIEW_SIDE = 32  # longest side of a preview latent


class UnknownModel(XDiTError):
    """The key names no loaded model (never loaded, unloaded, or the pool restarted)."""


class PeerFailed(Exception):
    """Another rank failed at this step; raised on the ranks that did not."""


def model_key(source: str, family: str | None, dtype: str) -> str:
    return f"{source}|{family or 'auto'}|{dtype}"


def build_request(fields: Any, inputs: dict[str, torch.Tensor]) -> SampleRequest:
    """SampleRequest from the JSON fields; same checks, same errors on every rank."""
    if not isinstance(fields, dict):
        raise XDiTError("'request' must be an object")
    unknown = set(fields) - set(REQUEST_FIELDS)
    if unknown:
        raise XDiTError(f"unknown request fields {sorted(unknown)}")
    missing = {"height", "width", "steps"} - set(fields)
    if missing:
        raise XDiTError(f"request is missing {sorted(missing)}")
    kwargs = {}
    for name, value in fields.items():
        kind = REQUEST_FIELDS[name]
        if value is None and name in ("guidance", "cache"):
            kwargs[name] = None
            continue
        if kind is dict:  # the step cache's settings
            kwargs[name] = CacheSettings.from_dict(value)
            continue
        ok = isinstance(value, str) if kind is str else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or value == int(value)))
        if not ok:
            raise XDiTError(f"request field {name} must be {kind.__name__}, got {value!r}")
        kwargs[name] = kind(value)
    if not (1 <= kwargs["steps"] <= 10000 and 0 < kwargs["height"] <= 16384 and 0 < kwargs["width"] <= 16384
            and 1 <= kwargs.get("batch_size", 1) <= 4096):
        raise XDiTError("steps, size or batch size out of range")
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

    def run(self, op: dict[str, Any], tensors: dict[str, torch.Tensor], progress: ProgressHook | None = None,
            should_cancel: Callable[[], bool] | None = None) -> tuple[list[dict], torch.Tensor | None, dict]:
        """Execute, then exchange outcomes. Returns (outcome per rank, result on rank 0, reply fields)."""
        result, extra, outcome = None, {}, {"ok": True}
        try:
            kind = op["op"]
            if kind == "load":
                extra = self._load(op)
            elif kind == "unload":
                extra = {"unloaded": self._unload(op["key"])}
            elif kind == "sample":
                result, extra = self._sample(op, tensors, progress, should_cancel)
            elif kind not in ("ping", "shutdown"):
                raise XDiTError(f"unknown operation {kind!r}")
        except Cancelled as e:
            outcome = {"ok": False, "kind": "cancelled", "message": str(e) or "cancelled"}
        except PeerFailed as e:
            outcome = {"ok": False, "kind": "peer", "message": str(e)}
        except UnknownModel as e:
            outcome = {"ok": False, "kind": "unknown_model", "message": str(e)}
        except XDiTError as e:
            outcome = {"ok": False, "kind": "invalid", "message": str(e)}
        except Exception as e:  # noqa: BLE001 - reported to the client with the rank's own text
            traceback.print_exc()
            outcome = {"ok": False, "kind": "internal", "message": f"{type(e).__name__}: {e}"}
        outcome.update(rank=self.rank, pid=os.getpid(), **memory_stats(self.device))
        outcomes = self.fanout.gather(outcome)
        if op.get("op") == "load" and not all(o["ok"] for o in outcomes):
            self._unload(op["key"])  # loaded on some ranks only: forget it everywhere
        return outcomes, result, extra

    def _load(self, op: dict) -> dict:
        key = op["key"]
        if key in self.models:
            return {"key": key, "cached": True, "seconds": 0.0}
        t0 = time.perf_counter()
        loaded = load_model(op["source"], op.get("family"), op.get("dtype", "fp32"), str(self.device))
        self.models[key] = loaded
        self.model_info[key] = {"key": key, "source": op["source"], "family": loaded.family,
                                "dtype": op.get("dtype", "fp32")}
        return {"key": key, "cached": False, "seconds": round(time.perf_counter() - t0, 3),
                "family": loaded.family}

    def _unload(self, key: str) -> bool:
        found = self.models.pop(key, None) is not None
        self.model_info.pop(key, None)
        if found:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return found

    def _sample(self, op: dict, tensors: dict, progress: ProgressHook | None,
                should_cancel: Callable[[], bool] | None) -> tuple[torch.Tensor, dict]:
        loaded = self.models.get(op.get("key"))
        if loaded is None:
            raise UnknownModel(f"model {op.get('key')!r} is not loaded on the pool")
        req = build_request(op.get("request"), {k: v.to(self.device) for k, v in tensors.items()})
        parallel = op.get("parallel") or {}
        if not isinstance(parallel, dict):
            raise XDiTError("'parallel' must be an object")
        try:
            config = ParallelConfig.from_dict(parallel)
        except (TypeError, ValueError) as e:
            raise XDiTError(f"bad parallel settings: {e}") from None
        config.validate()
        want_preview = bool(op.get("preview"))
        timing = {"progress_seconds": 0.0}
        is_rank0 = self.rank == 0
        start = time.perf_counter()

        reused: list[int] = []

        def report(info: StepInfo) -> None:
            if info.reused:
                reused.append(info.step - 1)
            if not is_rank0 or progress is None:
                return
            t = time.perf_counter()
            preview = _preview(loaded, info.latents) if want_preview else None
            progress(info.step, info.total, info.seconds, preview)
            timing["progress_seconds"] += time.perf_counter() - t

        if config.world_size == self.world:
            out = run_job(loaded, req, config, callback=report if is_rank0 else None,
                          should_cancel=should_cancel if is_rank0 else None)
        elif config.world_size == 1:
            # Degrees all 1 on a larger pool: every rank samples serially; cancels and faults agreed per step.
            fault_at = self._injected_fault(op)
            out = run_job(loaded, req, ParallelConfig(),
                          callback=lambda info: self._serial_step(info, report, should_cancel, fault_at))
        else:
            raise XDiTError(f"the parallel degrees multiply to {config.world_size} but the pool has "
                            f"{self.world} ranks")
        timing["seconds"] = time.perf_counter() - start
        extra = {k: round(v, 6) for k, v in timing.items()}
        if req.cache is not None:
            extra["reused_steps"] = reused  # 0-based steps the cache reused
        return out.float().cpu() if is_rank0 else out, extra

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

    def _injected_fault(self, op: dict) -> int | None:
        """Test hook (workers started with XDIT_RUNTIME_TEST_HOOKS=1): fail on one rank at one step."""
        hook = op.get("debug")
        if not self.test_hooks or not isinstance(hook, dict) or hook.get("raise_on_rank") != self.rank:
            return None
        return int(hook.get("at_step", 1))


def _preview(loaded: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """Current latents in ComfyUI's convention, average-pooled to at most PREVIEW_SIDE per side, float16."""
    x = loaded.adapter.from_model_space(latents.detach().float())
    factor = max(1, -(-max(x.shape[-2:]) // PREVIEW_SIDE))
    if factor > 1:
        x = torch.nn.functional.avg_pool2d(x, factor, ceil_mode=True)
    return x.half().cpu()
