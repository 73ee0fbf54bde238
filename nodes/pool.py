"""Parallel settings (the XDIT_PARALLEL_CONFIG value), the model handle (XDIT_MODEL) and the one worker pool the
ComfyUI process keeps: started for a configuration on first use, reused while the configuration is unchanged,
restarted when it changes, stopped when ComfyUI exits."""
from __future__ import annotations

import atexit
import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

log = logging.getLogger("comfyui_xdit.nodes")

DEVICES = ("auto", "cuda", "cpu")
ATTENTION = ("auto", "cudnn", "flash", "efficient", "math")
DEGREES = ("ulysses", "ring", "pipefusion", "cfg", "dp")
SECRET_ENV = "XDIT_POOL_SECRET"


@dataclass(frozen=True)
class ParallelSettings:
    device: str = "auto"
    gpus: str = ""          # CUDA device ids, comma separated; "" = the first world_size visible ones
    ulysses: int = 1
    ring: int = 1
    pipefusion: int = 1
    cfg: int = 1
    dp: int = 1
    num_patches: int = 0    # 0: as many as pipefusion stages
    warmup_steps: int = 1
    shard: int = 1          # FSDP2 weight sharding over the innermost ranks (adds no ranks unless alone)
    shard_keep: bool = False
    attention: str = "auto"
    address: str = ""       # an already running pool (python -m comfyui_xdit serve); "" = start one here

    @property
    def world_size(self) -> int:
        work = self.ulysses * self.ring * self.pipefusion * self.cfg * self.dp
        return work if work > 1 else self.shard  # shard alone: that many ranks computing the same step

    def degrees(self) -> dict[str, int]:
        """The `parallel` object of a pool sample request."""
        return {"dp": self.dp, "cfg": self.cfg, "pipefusion": self.pipefusion, "ring": self.ring,
                "ulysses": self.ulysses, "num_patches": self.num_patches or self.pipefusion,
                "warmup_steps": self.warmup_steps,
                # only when used: a pool of an earlier version refuses fields it does not know
                **({"shard": self.shard, "shard_keep": int(self.shard_keep)} if self.shard > 1 else {})}

    def load_degrees(self) -> dict[str, int] | None:
        """The `parallel` object of a pool load: the degrees when each rank keeps only part of the weights (a
        PipeFusion stage, FSDP2 shards) and so reads only that part; None (a whole model) otherwise."""
        return self.degrees() if self.pipefusion > 1 or self.shard > 1 else None

    def gpu_ids(self) -> list[int]:
        text = self.gpus.replace(" ", "")
        if not text:
            return []
        try:
            ids = [int(p) for p in text.split(",") if p != ""]
        except ValueError:
            raise ValueError(f"gpus must be a comma-separated list of GPU numbers such as 0,1,2,3, got {self.gpus!r}"
                             ) from None
        if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"gpus must list distinct non-negative GPU numbers, got {self.gpus!r}")
        return ids

    def resolved_device(self, cuda_count: Callable[[], int] | None = None) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if _cuda_count(cuda_count) > 0 else "cpu"

    def pool_key(self) -> tuple:
        """What a pool is started with: a change here means another pool."""
        if self.address:
            return ("attach", self.address)
        return ("local", self.resolved_device(), self.gpus.replace(" ", ""), self.world_size, self.attention)


def _lower_advice(s: ParallelSettings, available: int) -> str:
    """Which degrees to lower so the product fits `available` GPUs (the largest first), or layout auto."""
    degrees = sorted(((getattr(s, n), n) for n in ("ulysses", "ring", "pipefusion", "cfg", "dp")
                      if getattr(s, n) > 1), reverse=True)
    if not degrees:  # shard alone: that many ranks
        return f"lower shard_degree to {available} (or set layout auto)"
    product, changes = s.world_size, []
    for value, name in degrees:
        if product <= available:
            break
        rest = product // value
        new = next((d for d in range(value - 1, 0, -1) if rest * d <= available and (name != "cfg" or d == 1)), 1)
        changes.append(f"{name}_degree to {new}")
        product = rest * new
    return f"lower {' and '.join(changes)} (or set layout auto)"


def _cuda_count(cuda_count: Callable[[], int] | None) -> int:
    if cuda_count is not None:
        return cuda_count()
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def validation_error(s: ParallelSettings, cuda_count: Callable[[], int] | None = None) -> str | None:
    """Why these settings cannot run, or None. Checked when the prompt is queued."""
    from comfyui_xdit.errors import XDiTError
    from comfyui_xdit.parallel.config import ParallelConfig

    if s.device not in DEVICES:
        return f"device must be one of {', '.join(DEVICES)}, got {s.device!r}"
    if s.attention not in ATTENTION:
        return f"attention must be one of {', '.join(ATTENTION)}, got {s.attention!r}"
    try:
        ParallelConfig.from_dict(s.degrees()).validate()
    except XDiTError as e:
        return str(e)
    if s.pipefusion > 1 and (s.num_patches or s.pipefusion) < s.pipefusion:
        return f"num_patches ({s.num_patches}) must be at least the pipefusion degree ({s.pipefusion})"
    if s.pipefusion > 1 and s.warmup_steps < 1:
        return "pipefusion needs warmup_steps >= 1 to fill its K/V buffers"
    if s.pipefusion == 1 and s.num_patches > 1:
        return "num_patches applies to PipeFusion only: set pipefusion >= 2 or num_patches to 0"
    if s.address:
        if not s.address.startswith(("tcp://", "ipc://")):
            return f"pool address must look like tcp://HOST:PORT, got {s.address!r}"
        return None
    try:
        ids = s.gpu_ids()
    except ValueError as e:
        return str(e)
    device = s.resolved_device(cuda_count)
    if device == "cuda":
        count = _cuda_count(cuda_count)
        if count == 0:
            return "device is cuda but torch sees no CUDA GPU (choose cpu or auto)"
        if any(i >= count for i in ids):
            return f"gpus {s.gpus!r} names a GPU that does not exist (this machine has {count})"
        available = len(ids) if ids else count
        if s.world_size > available:
            return (f"the degrees need {s.world_size} GPUs (ulysses {s.ulysses} x ring {s.ring} x pipefusion "
                    f"{s.pipefusion} x cfg {s.cfg} x dp {s.dp}) but only {available} are available: "
                    f"{_lower_advice(s, available)}")
    elif ids:
        return "gpus applies to device cuda only; leave it empty for cpu"
    return None


@dataclass
class ModelHandle:
    """The XDIT_MODEL value: what was loaded, on which pool settings."""

    settings: ParallelSettings
    source: str
    dtype: str
    family: str
    variant: str
    key: str
    info: dict = field(default_factory=dict)
    loras: tuple[tuple[str, float], ...] = ()  # (file, strength) in order, from Parallel LoRA nodes
    load_family: str | None = None  # the family the pool load was asked for (None: detected), to load it again

    def lora_fields(self) -> list[dict]:
        """The `loras` of a pool sample request."""
        return [{"path": p, "strength": s} for p, s in self.loras]

    def __repr__(self) -> str:
        loras = f", loras={[(os.path.basename(p), s) for p, s in self.loras]}" if self.loras else ""
        return f"ModelHandle({self.source!r}, {self.variant}, {self.dtype}, ranks={self.settings.world_size}{loras})"


class PoolManager:
    """Holds at most one pool (and its client) for the ComfyUI process."""

    def __init__(self, pool_factory: Callable[..., Any] | None = None, attach_factory: Callable[..., Any] | None = None):
        self._pool_factory = pool_factory
        self._attach_factory = attach_factory
        self._lock = threading.RLock()
        self._key: tuple | None = None
        self._pool: Any = None
        self._client: Any = None
        self._probes: dict[str, dict] = {}  # device -> the planner constants the last pool on it measured

    def _factories(self):
        if self._pool_factory is None or self._attach_factory is None:
            from ..runtime.launcher import Pool

            return self._pool_factory or Pool, self._attach_factory or Pool.attach
        return self._pool_factory, self._attach_factory

    def client_for(self, s: ParallelSettings) -> Any:
        """A client of the pool for these settings, starting (or restarting) the pool when needed."""
        key = s.pool_key()
        with self._lock:
            if self._key == key and self._pool is not None and (self._key[0] == "attach" or self._pool.is_alive()):
                return self._client
            self.stop()
            pool_factory, attach_factory = self._factories()
            secret = os.environ.get(SECRET_ENV) or None
            if s.address:
                pool = attach_factory(s.address, secret)
            else:
                env = {"XDIT_ATTENTION": s.attention}
                device = s.resolved_device()
                if device == "cuda" and s.gpus.strip():
                    env["CUDA_VISIBLE_DEVICES"] = s.gpus.replace(" ", "")
                pool = pool_factory(s.world_size, device=device, env=env, die_with_parent=True)
            log.info("xDiT: starting worker pool %s%s", key, "" if s.address else _log_note(pool))
            pool.start()
            self._pool, self._key, self._client = pool, key, pool.client()
            if not s.address:
                self._keep_probe(s.resolved_device())
            return self._client

    def _keep_probe(self, device: str) -> None:
        try:
            measured = self._client.status().get("probe")
        except Exception as e:  # noqa: BLE001 - the table's constants stay in use
            log.warning("xDiT: no probe from the pool: %s", e)
            return
        if isinstance(measured, dict):
            self._probes[device] = measured

    def probed(self, device: str) -> dict | None:
        """The planner constants (comfyui_xdit.planner.DeviceKind fields) measured by the last pool started here on
        `device` ("cuda" or "cpu"), or None."""
        return self._probes.get(device)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the pool started here (`timeout`: the pool's shutdown wait, default its own)."""
        with self._lock:
            pool, client, key = self._pool, self._client, self._key
            self._pool = self._client = self._key = None
            if client is not None:
                try:
                    client.close()
                except Exception:  # noqa: BLE001
                    pass
            if pool is not None and key is not None and key[0] == "local":  # never stop a pool we did not start
                try:
                    pool.stop(**({} if timeout is None else {"timeout": timeout}))
                except Exception as e:  # noqa: BLE001
                    log.warning("xDiT: stopping the pool failed: %s", e)

    @property
    def key(self) -> tuple | None:
        return self._key


def _log_note(pool: Any) -> str:
    """Where a pool started here writes its ranks' output (the first place to look when it fails)."""
    path = getattr(pool, "log_path", None)
    return f"; its log: {path}" if path else ""


MANAGER = PoolManager()
EXIT_JOB_WAIT = 4.0  # seconds an interrupted job gets to end on the pool when ComfyUI exits
EXIT_STOP_TIMEOUT = 0.2  # the pool's shutdown wait, then SIGTERM (a graceful exit takes seconds; the job ended already)
EXIT_STOP_JOIN = 1.0  # how long the exit waits for the stop: past the SIGTERM, not for torchrun's own exit (~2 s)


def _at_exit() -> None:
    """ComfyUI is exiting (Ctrl-C ends its server loop; Python then runs this while its worker thread, a daemon, still
    runs): a job still sampling is interrupted as ComfyUI's Cancel does (the node cancels it on the pool and ends
    "interrupted", no traceback), then the pool is stopped. A further Ctrl-C is ignored meanwhile (bounded: seconds)
    instead of breaking the stop halfway. SIGTERM's default action ends ComfyUI without this; the pool then goes by
    its parent-death signal (die_with_parent), as it does here if ComfyUI's process ends before the stop did."""
    if MANAGER.key is None:
        return
    restore = _ignore_sigint()
    try:
        from . import progress

        if progress.running_jobs():
            log.info("xDiT: ComfyUI is exiting: cancelling the running job and stopping the worker pool")
            _interrupt_comfy()
            if not progress.wait_idle(EXIT_JOB_WAIT):
                log.warning("xDiT: the job did not end within %.0f s; stopping the pool", EXIT_JOB_WAIT)
        # the stop on a thread of its own, waited for only until it has signalled the pool: the pool's processes then
        # exit while Python finalizes ComfyUI (seconds); should Python end first, the parent-death signal ends them
        stopper = threading.Thread(target=MANAGER.stop, kwargs={"timeout": EXIT_STOP_TIMEOUT}, name="xdit-exit",
                                   daemon=True)
        stopper.start()
        stopper.join(EXIT_STOP_JOIN)
    finally:
        restore()


def _interrupt_comfy() -> None:
    try:
        import comfy.model_management as mm

        mm.interrupt_current_processing(True)
    except Exception:  # noqa: BLE001 - no ComfyUI (stand-ins, the CLI): the pool stop ends the job
        pass


def _ignore_sigint() -> Callable[[], None]:
    import signal

    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        return lambda: None
    return lambda: signal.signal(signal.SIGINT, previous)


atexit.register(_at_exit)


def settings_from_inputs(**kw: Any) -> ParallelSettings:
    names = set(ParallelSettings.__dataclass_fields__)
    values = {k: v for k, v in kw.items() if k in names}
    for k in ("gpus", "address"):
        if k in values:
            values[k] = str(values[k] or "").strip()
    return ParallelSettings(**values)


def settings_dict(s: ParallelSettings) -> dict:
    return asdict(s)


def settings_from_widgets(device, ulysses_degree, ring_degree, pipefusion_degree, cfg_degree, dp_degree, num_patches,
                          warmup_steps, attention, gpus="", pool_address="", shard_degree=1, shard_keep=False,
                          layout="manual") -> ParallelSettings:
    """The XDIT_PARALLEL_CONFIG value for Configure Hybrid Parallel's widget values (not yet validated; `layout`
    auto has written its degrees into them when the prompt was queued)."""
    return settings_from_inputs(device=device, ulysses=int(ulysses_degree), ring=int(ring_degree),
                                pipefusion=int(pipefusion_degree), cfg=int(cfg_degree), dp=int(dp_degree),
                                num_patches=int(num_patches), warmup_steps=int(warmup_steps), attention=attention,
                                gpus=gpus or "", address=pool_address or "", shard=int(shard_degree),
                                shard_keep=bool(shard_keep))
