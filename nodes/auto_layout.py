"""layout = auto on Configure Hybrid Parallel: the planner (comfyui_xdit/planner.py) picks the degrees when the
prompt is queued.

Run by the queue-time check's on-prompt handler (nodes/queue_check.py) before its checks, which then see the
chosen degrees: for each Configure node set to auto whose config feeds a Load Parallel DiT, it reads the checkpoint
(built on the meta device from its header), the sampler's steps and cfg and the empty latent's size, batch and
frames, and the GPUs the pool will use (the `gpus` list or every visible GPU: count, memory, and P2P between the
first two as the link, with the constants the last pool measured on them at its start when there is one; on CPU,
one rank per core up to 4), writes the chosen degrees into the node's inputs (and fp8
storage into the loader's weight_dtype when only fp8 fits), and keeps the one-line reason, which the node logs and
shows when it runs. What cannot fit anywhere is refused on the Configure node in one line naming what would fit.
What is only known when the graph runs (linked widgets, a latent from a VAE), or a pool at an address, leaves the
degrees as set, and the node says so.
"""
from __future__ import annotations

import contextvars
import logging
import os
from typing import Any

from .schemas import CONFIGURE, LOAD

log = logging.getLogger("comfyui_xdit.nodes")

DEGREES = {"ulysses": "ulysses_degree", "ring": "ring_degree", "pipefusion": "pipefusion_degree",
           "cfg": "cfg_degree", "dp": "dp_degree", "shard": "shard_degree"}
CPU_RANKS = 4  # auto on CPU: one rank per core, at most this many
_REASONS: dict[str, str] = {}  # node id -> the last reason (read when the node runs)
_FOUND: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("xdit_auto_problems", default=None)


def reason_for(node_id: Any) -> str | None:
    return _REASONS.get(str(node_id))


def problem_for(node_id: Any) -> str | bool:
    return (_FOUND.get() or {}).get(str(node_id), True)


def on_prompt(json_data: dict) -> dict:
    """Resolves every auto Configure node of json_data["prompt"] in place (queue_check.on_prompt calls it first);
    never blocks a prompt."""
    problems: dict[str, str] = {}
    try:
        prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
        if isinstance(prompt, dict):
            problems = resolve(prompt)
    except Exception as e:  # noqa: BLE001 - a bug here must not stop a prompt; the degrees stay as set
        log.warning("xDiT: auto layout failed: %s", e)
    _FOUND.set(problems)
    return json_data


def resolve(prompt: dict) -> dict[str, str]:
    """Writes the planner's degrees into each auto Configure node; {node id: refusal} for those nothing fits."""
    problems = {}
    for nid, node in prompt.items():
        if not (isinstance(node, dict) and node.get("class_type") == CONFIGURE):
            continue
        inputs = node.setdefault("inputs", {})
        if inputs.get("layout") != "auto":
            continue
        nid = str(nid)
        try:
            line, refused = _resolve_one(prompt, nid, inputs)
        except Exception as e:  # noqa: BLE001 - one line, degrees as set
            line, refused = f"auto: kept the degrees as set ({type(e).__name__}: {e})", False
        _REASONS[nid] = line
        log.info("xDiT Configure Hybrid Parallel (node %s): %s", nid, line)
        if refused:
            problems[nid] = line
    return problems


def _resolve_one(prompt: dict, nid: str, inputs: dict) -> tuple[str, bool]:
    from comfyui_xdit import planner

    if inputs.get("pool_address"):
        return "auto: a pool at an address: its GPUs are not known here; kept the degrees as set", False
    load_id, load = _user(prompt, nid, LOAD, "parallel_config")
    if load is None:
        return "auto: no Load Parallel DiT takes this config; kept the degrees as set", False
    job = _job(prompt, load_id)
    if job is None:
        return "auto: the sampler's steps/cfg or the empty latent's size are not constants; kept the degrees as set", \
            False
    from . import checkpoints

    name = (load.get("inputs") or {}).get("checkpoint")
    if not isinstance(name, str):
        return "auto: the checkpoint is not a constant; kept the degrees as set", False
    path = checkpoints.resolve(name)
    gpus = _gpus(inputs)
    p = planner.plan(_facts(path), gpus, job)
    c = p.choice
    if c is None:
        return p.reason(), True
    for key, widget in DEGREES.items():
        inputs[widget] = getattr(c.config, key)
    inputs["num_patches"] = 0
    load_inputs = load.setdefault("inputs", {})
    if c.storage == "fp8" and not str(load_inputs.get("weight_dtype", "")).startswith("fp8"):
        load_inputs["weight_dtype"] = "fp8_e4m3fn"
    return p.reason(), False


def _facts(path: str):
    from comfyui_xdit import planner

    key = path
    if os.path.exists(path):
        st = os.stat(path)
        key = f"{path}@{st.st_mtime_ns}:{st.st_size}"
    if key not in _FACTS:
        _FACTS[key] = planner.facts_of(planner.build_meta(path), os.path.basename(path))
    return _FACTS[key]


_FACTS: dict[str, Any] = {}


def _user(prompt: dict, source: str, kind: str, name: str) -> tuple[str | None, dict | None]:
    """The first node of class `kind` whose input `name` links to node `source`."""
    for oid in sorted(prompt, key=lambda k: (len(str(k)), str(k))):
        other = prompt[oid]
        link = (other.get("inputs") or {}).get(name) if isinstance(other, dict) else None
        if other.get("class_type") == kind and isinstance(link, list) and str(link[0]) == source:
            return str(oid), other
    return None, None


def _job(prompt: dict, load_id: str):
    """The Job of the first Parallel Sampler fed (through Parallel LoRA nodes) by the loader, from constants."""
    from comfyui_xdit.planner import Job

    from .prompt_graph import EMPTY_LATENTS, VIDEO_LATENTS, latent_size, model_source, source
    from .schemas import SAMPLERS

    for oid in sorted(prompt, key=lambda k: (len(str(k)), str(k))):
        node = prompt[oid]
        if not (isinstance(node, dict) and node.get("class_type") in SAMPLERS):
            continue
        src = model_source(prompt, node)
        if src is None or src[0] != load_id:
            continue
        values = node.get("inputs") or {}
        steps, cfg = values.get("steps"), values.get("cfg")
        latent = source(prompt, node, "latent_image", EMPTY_LATENTS)
        size = latent_size(latent[1]) if latent else None
        if not isinstance(steps, int) or not isinstance(cfg, (int, float)) or size is None:
            return None
        height, width, batch, latent_frames = size
        k = VIDEO_LATENTS.get(latent[1].get("class_type"), 1)
        frames = (latent_frames - 1) * k + 1
        return Job(height, width, frames, batch, float(cfg), steps)
    return None


def _probed(device: str):
    """The DeviceKind the last pool started here measured at its start (nodes/pool.py), or None."""
    from comfyui_xdit import planner

    from .pool import MANAGER

    fields = MANAGER.probed(device)
    if not fields:
        return None
    try:
        return planner.DeviceKind(**fields)
    except TypeError:  # a pool of another version
        return None


def _gpus(inputs: dict):
    """The GPUs the pool will use: the `gpus` list or every visible one; CPU ranks when there is none."""
    from comfyui_xdit import planner

    device = inputs.get("device", "auto")
    import torch

    count = torch.cuda.device_count() if device != "cpu" else 0
    if count == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return planner.parse_gpus(f"{max(1, min(cores, CPU_RANKS))}xcpu")
    ids = [int(v) for v in str(inputs.get("gpus") or "").split(",") if v.strip()] or list(range(count))
    props = torch.cuda.get_device_properties(ids[0])
    gib = props.total_memory / 2**30
    name = props.name.upper()
    kind = next((k for n, k in planner.KINDS.items() if n != "CPU" and n in name), planner.kind_for_memory(gib))
    measured = _probed("cuda")
    if measured is not None:  # what the last pool measured on these GPUs at its start replaces the table's figures
        kind = measured
    p2p = len(ids) > 1 and torch.cuda.can_device_access_peer(ids[0], ids[1])
    link = "nvlink" if p2p and kind.fast_link else "pcie"
    return planner.GPUs(len(ids), kind, gib, link)
