"""Refusing at queue time what the pool would refuse at sampling.

ComfyUI's validate_inputs sees one node's widget constants, not the graph; but a Ulysses degree that does not divide
the model's heads, cfg parallel with cfg 1 or a dp degree larger than the batch are properties of several nodes
together. So an on-prompt handler (PromptServer.add_on_prompt_handler, called on POST /prompt just before ComfyUI
validates the graph, in the same request task) reads the whole graph: the checkpoint's geometry (nodes/geometry.py,
no weights loaded), the constants of Configure Hybrid Parallel, the Parallel Samplers and an empty-latent node; it keeps
one line per offending node in a context variable of that task. Each node's validate_inputs takes a single input
(schemas.VALIDATED) and reads its node id from the hidden UNIQUE_ID, so ComfyUI reports that line once for the node
(it repeats a message once per argument). Input names, limits and choices come from the nodes' schemas
(schemas.py), which import no node module. What depends on values only known when the graph runs (linked widgets, a
latent from a VAE) is checked at sampling.
"""
from __future__ import annotations

import contextvars
import logging
import os
import sys
from typing import Any

from . import schemas
from .families import SAMPLERS as ENGINE_SAMPLERS
from .geometry import CheckpointError, Geometry
from .prompt_graph import EMPTY_LATENTS, latent_size as _latent_size
from .prompt_graph import model_source as _model_source
from .prompt_graph import source as _source
from .schemas import CONFIGURE, LOAD, LORA, SAMPLERS, STOCK_MODEL

log = logging.getLogger("comfyui_xdit.nodes")

WEIGHT_PATCHERS = ("LoraLoader", "LoraLoaderModelOnly")  # ComfyUI's; so are its ModelMerge* nodes
# ComfyUI's weight hooks (comfy_extras/nodes_hooks.py): LoRAs a conditioning carries into sampling, whose patches
# could not reach the pool's weights either; SetClipHooks passes its hooks on to the conditioning only with
# apply_to_conds
HOOK_MAKERS = ("CreateHookLora", "CreateHookLoraModelOnly", "CreateHookModelAsLora", "CreateHookModelAsLoraModelOnly")
# ComfyUI's nodes whose CONDITIONING carries Wan image-to-video inputs (concat_latent_image, clip_vision_output);
# the camera node adds camera_conditions, which the pool does not take
IMAGE_CONDITIONING = ("WanImageToVideo", "WanFirstLastFrameToVideo", "WanFunInpaintToVideo", "WanCameraImageToVideo")
UNSUPPORTED_IMAGE_CONDITIONING = ("WanCameraImageToVideo",)
CLIP_VISION_INPUTS = ("clip_vision_output", "clip_vision_start_image", "clip_vision_end_image")
_FOUND: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("xdit_queue_problems", default=None)


def problem_for(node_id: Any) -> str | bool:
    """VALIDATE_INPUTS' answer for a node: True, or the line the on-prompt handler found for it."""
    found = _FOUND.get()
    return (found or {}).get(str(node_id), True)


def on_prompt(json_data: dict) -> dict:
    """The on-prompt handler: records the problems of json_data["prompt"]; never changes or blocks the prompt."""
    from . import auto_layout

    json_data = auto_layout.on_prompt(json_data)  # layout = auto: the degrees first, then their checks
    try:
        prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
        _FOUND.set(graph_problems(prompt) if isinstance(prompt, dict) else {})
    except Exception as e:  # noqa: BLE001 - a bug here must not stop a prompt; sampling checks again
        _FOUND.set({})
        log.warning("xDiT: queue-time check failed: %s", e)
    return json_data


on_prompt.xdit_queue_check = True  # marks the handler so a reloaded extension does not add a second one


def register() -> bool:
    """Adds the handler to ComfyUI's server (once); False without one. ComfyUI imports its `server` module before
    loading extensions: looked up, never imported (elsewhere a module of that name is someone else's)."""
    module = sys.modules.get("server")
    server = getattr(getattr(module, "PromptServer", None), "instance", None)
    if server is None or not hasattr(server, "add_on_prompt_handler"):
        return False
    if not any(getattr(h, "xdit_queue_check", False) for h in getattr(server, "on_prompt_handlers", [])):
        server.add_on_prompt_handler(on_prompt)
    return True


# ------------------------------------------------------------------------------------------------ the graph
def graph_problems(prompt: dict) -> dict[str, str]:
    """{node id: one line} for every node of ours whose combination with the rest of the graph cannot run."""
    found: dict[str, list[str]] = {}
    for nid, node in prompt.items():
        if not isinstance(node, dict):
            continue
        kind = node.get("class_type")
        lines = _choice_problems(node, kind) if kind in schemas.SCHEMAS else []
        lines += (_configure_problems(node) if kind == CONFIGURE else
                 _load_problems(prompt, node) + _stock_model_problems(prompt, str(nid), node) if kind == LOAD else
                 _sampler_problems(prompt, node) if kind in SAMPLERS else
                 _lora_problems(prompt, node) if kind == LORA else [])
        if kind == LOAD:  # a degree the model cannot take: shown on the Configure node, where it is changed
            config = _source(prompt, node, "parallel_config", CONFIGURE)
            degrees = [line for line in lines if line.startswith(DEGREE_NAMES)]
            if config is not None and degrees:
                found.setdefault(config[0], []).extend(f"{line} (Load Parallel DiT node {nid})" for line in degrees)
                lines = [line for line in lines if line not in degrees]
        if lines:
            found.setdefault(str(nid), []).extend(lines)
    return {nid: "; ".join(dict.fromkeys(lines)) for nid, lines in found.items()}


def _constants(node: dict, kind: str) -> dict | None:
    """The node's widget values when all are constants within their schema's ranges and choices; None otherwise
    (a linked widget is known only when the graph runs; ComfyUI itself reports a value out of range, and
    _choice_problems one not among the choices)."""
    inputs = node.get("inputs") or {}
    out = {}
    for widget in schemas.widgets(kind):
        if widget.id not in inputs:
            if not widget.optional:
                return None
            continue
        value = inputs[widget.id]
        if isinstance(value, list) or not _in_range(value, widget):
            return None
        out[widget.id] = value
    return out


def _in_range(value: Any, widget) -> bool:
    options = getattr(widget, "options", None)
    if options is not None:
        return value in options
    if isinstance(widget, (schemas.io.Int.Input, schemas.io.Float.Input)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        low, high = getattr(widget, "min", None), getattr(widget, "max", None)
        return (low is None or low <= value) and (high is None or value <= high)
    return True


def _choice_problems(node: dict, kind: str) -> list[str]:
    """What ComfyUI's own prompt validation leaves out for our V3 nodes, as it would say it: a constant not among a
    choice widget's options (ComfyUI 0.3.64 checks the choices of V1 nodes only: a V3 combo's list sits in its
    options), and for the one input validate_inputs takes (schemas.VALIDATED), whose limits ComfyUI does not check
    once that method takes it, a number outside them."""
    inputs = node.get("inputs") or {}
    out = []
    for widget in schemas.widgets(kind):
        value = inputs.get(widget.id)
        if widget.id not in inputs or isinstance(value, list):
            continue
        options = getattr(widget, "options", None)
        if options is not None and value not in options:
            shown = ", ".join(map(str, options)) if len(options) <= 20 else f"a list of {len(options)}"
            out.append(f"{value!r} is not among {widget.id}'s choices ({shown or 'none'})")
        elif widget.id == schemas.VALIDATED.get(kind) and options is None and not _in_range(value, widget):
            out.append(f"{widget.id} {value!r} is outside its range {widget.min}..{widget.max}")
    return out


def _settings(values: dict):
    from .pool import settings_from_widgets

    return settings_from_widgets(**values)


# ------------------------------------------------------------------------------------------------ per node
def _configure_problems(node: dict) -> list[str]:
    from .pool import validation_error

    values = _constants(node, CONFIGURE)
    if values is None:
        return []
    try:
        err = validation_error(_settings(values))
    except (TypeError, ValueError) as e:
        err = f"invalid parallel settings: {e}"
    return [err] if err else []


def _valid_settings(prompt: dict, node: dict):
    """The settings of the Configure node feeding `node`, when they are known and valid (else that node says why)."""
    from .pool import validation_error

    src = _source(prompt, node, "parallel_config", CONFIGURE)
    values = _constants(src[1], CONFIGURE) if src else None
    if values is None:
        return None
    try:
        s = _settings(values)
    except (TypeError, ValueError):
        return None
    return None if validation_error(s) else s


def _geometry(node: dict) -> Geometry | None:
    """Raises CheckpointError for a damaged file; None when the checkpoint is not (yet) known."""
    from . import checkpoints
    from .geometry import geometry

    values = _constants(node, LOAD)
    if values is None:
        return None
    try:
        path = checkpoints.resolve(values["checkpoint"])
    except FileNotFoundError:
        return None  # ComfyUI reports a name not in the list
    try:
        return geometry(path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - not one of our families: loading says so in detail
        log.debug("xDiT: no geometry for %s: %s", path, e)
        return None


def _load_problems(prompt: dict, node: dict) -> list[str]:
    try:
        g = _geometry(node)
    except CheckpointError as e:
        return [str(e)]
    s = _valid_settings(prompt, node)
    if g is None or s is None:
        return []
    name = (node.get("inputs") or {}).get("checkpoint")
    return model_fit_problems(s, g, name)


def _stock_model_problems(prompt: dict, nid: str, node: dict) -> list[str]:
    """A loader whose model reaches a Parallel DiT Model (directly or through Parallel LoRA nodes) that cannot run
    it: degrees it does not take, or ComfyUI's weight patchers (LoRA loaders, merges) after it or LoRA hooks on the
    conditioning it samples with, whose patches could not reach the pool's weights. Refused before the loader puts
    the model on the pool."""
    users = _downstream(prompt, nid, lambda kind: kind == STOCK_MODEL,
                        lambda kind, name: kind == LORA and name == "model")
    if not users:
        return []
    out = []
    s = _valid_settings(prompt, node)
    if s is not None and s.pipefusion > 1:
        out.append(f"this model feeds Parallel DiT Model (node {users[0][0]}), which runs Ulysses, Ring, CFG, DP and "
                   f"shard per forward: pipefusion_degree {s.pipefusion} runs in Parallel Sampler only")
    for user, _ in users:
        patchers = _downstream(prompt, user, lambda kind: kind in WEIGHT_PATCHERS or kind.startswith("ModelMerge"),
                               lambda kind, name: name == "model")
        if patchers:
            oid, kind = patchers[0]
            out.append(f"{kind} (node {oid}) patches the weights of Parallel DiT Model (node {user}), which live on "
                       "the worker pool: add LoRAs with Parallel LoRA before Parallel DiT Model")
            break
        hooked = _hooked_consumer(prompt, user)
        if hooked:
            (hid, hkind), (cid, ckind) = hooked
            out.append(f"the LoRA hook of {hkind} (node {hid}) reaches the conditioning of {ckind} (node {cid}), which "
                       f"samples Parallel DiT Model (node {user}): hooks cannot patch the weights on the worker pool; "
                       "add LoRAs with Parallel LoRA before Parallel DiT Model")
            break
    return out


def _links(node: dict) -> list[tuple[str, str]]:
    """(input name, source node id) of a node's linked inputs."""
    return [(name, str(v[0])) for name, v in (node.get("inputs") or {}).items() if isinstance(v, list) and len(v) == 2]


def _hooked_consumer(prompt: dict, start: str) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """((id, class) of a weight-hook node, (id, class) of the node it reaches) where a node that takes node
    `start`'s model (through any nodes' model inputs) has conditioning upstream of which a weight hook of non-zero
    model strength is set on it. The walk upstream stops at nodes that take a model (another branch's sampler)."""
    consumers, frontier = [], [start]
    while frontier:
        current = frontier.pop()
        for oid, other in prompt.items():
            if isinstance(other, dict) and str(oid) not in consumers and any(
                    name.startswith("model") and src == current for name, src in _links(other)):
                consumers.append(str(oid))
                frontier.append(str(oid))
    for cid in sorted(consumers, key=lambda c: (len(c), c)):
        node = prompt[cid]
        seen, frontier = set(), [src for name, src in _links(node) if not name.startswith("model")]
        while frontier:
            current = frontier.pop()
            other = prompt.get(current)
            if current in seen or not isinstance(other, dict):
                continue
            seen.add(current)
            kind = str(other.get("class_type"))
            inputs = other.get("inputs") or {}
            if any(name.startswith("model") for name, _ in _links(other)):
                continue  # a sampler or guider of its own (a latent or image from another branch)
            if kind in HOOK_MAKERS and inputs.get("strength_model") != 0:
                return (current, kind), (cid, str(node.get("class_type")))
            frontier += [src for name, src in _links(other)
                         if not (kind == "SetClipHooks" and name == "hooks" and inputs.get("apply_to_conds") is False)]
    return None


def _downstream(prompt: dict, start: str, is_target, follow,
                inputs: tuple[str, ...] = ("model", "model1", "model2")) -> list[tuple[str, str]]:
    """(id, class) of the nodes of an is_target(class) whose model inputs take node `start`'s output, passing
    through the other nodes for which follow(class, input name) holds."""
    found, frontier, seen = [], [start], set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        for oid, other in prompt.items():
            if not isinstance(other, dict):
                continue
            kind = str(other.get("class_type"))
            for name in inputs:
                link = (other.get("inputs") or {}).get(name)
                if not (isinstance(link, list) and len(link) == 2 and str(link[0]) == current):
                    continue
                if is_target(kind):
                    found.append((str(oid), kind))
                elif follow(kind, name):
                    frontier.append(str(oid))
    return sorted(set(found), key=lambda f: (len(f[0]), f[0]))


DEGREE_NAMES = ("ulysses_degree ", "pipefusion_degree ")  # model_fit_problems' lines, each about one degree


def model_fit_problems(s, g: Geometry, name: str) -> list[str]:
    """What the settings cannot do with this model, whatever the image (the engine's check_model_fit)."""
    out = []
    if g.heads and g.heads % s.ulysses:
        from comfyui_xdit.parallel.config import heads_advice

        out.append(f"ulysses_degree {s.ulysses} does not divide the {g.heads} attention heads of {name} "
                   f"({heads_advice(g.heads)})")
    if g.blocks and s.pipefusion > g.blocks:
        out.append(f"pipefusion_degree {s.pipefusion} is larger than the {g.blocks} transformer blocks of {name}")
    return out


def _lora_problems(prompt: dict, node: dict) -> list[str]:
    """A constant lora_name whose file is not a LoRA the pool applies (unreadable, LoKr/LoHa/DoRA, no pairs), or
    one that does not fit the model its Load Parallel DiT loads (another family or size)."""
    from comfyui_xdit.lora import refusal

    from .geometry import tensor_shapes
    from .checkpoints import LoraNodeError
    from .checkpoints import resolve_lora as resolve

    name = (node.get("inputs") or {}).get("lora_name")
    if not isinstance(name, str):
        return []
    try:
        path = resolve(name)
        keys = tensor_shapes(path)
    except LoraNodeError as e:
        return [str(e).removeprefix("Parallel LoRA: ")]
    except (CheckpointError, OSError) as e:
        return [f"LoRA {name}: {e}"]
    why = refusal(keys)
    if why is None and not any(k.endswith(_PAIR_SUFFIXES) for k in keys):
        why = f"no LoRA pairs in the file (first key: {next(iter(sorted(keys)), 'none')})"
    if why:
        return [f"LoRA {name}: {why}"]
    misfit = _lora_fit(prompt, node, path)
    return [misfit] if misfit else []


def _lora_fit(prompt: dict, node: dict, path: str) -> str | None:
    """The pool's refusal of this LoRA file for the checkpoint its model input loads (diffusers' conversion and
    the shape check, on the meta device), or None (fits, or the checkpoint is not known yet)."""
    from . import checkpoints
    from .geometry import parameter_shapes

    load = _model_source(prompt, node)
    values = _constants(load[1], LOAD) if load else None
    if values is None:
        return None
    try:
        model = parameter_shapes(checkpoints.resolve(values["checkpoint"]))
    except Exception as e:  # noqa: BLE001 - an unknown or damaged checkpoint: the loader's own line says so
        log.debug("xDiT: no parameter shapes for %s: %s", values.get("checkpoint"), e)
        return None
    if model is None:
        return None
    st = os.stat(path)
    return _fit_verdict(path, st.st_mtime_ns, st.st_size, *model)


def _fit_verdict(path: str, mtime_ns: int, size: int, family: str, shapes: dict) -> str | None:
    """fit_problem, remembered for the file's version and the model (a graph is queued again and again)."""
    from comfyui_xdit.lora import fit_problem

    key = (path, mtime_ns, size, family, id(shapes))  # geometry keeps each shapes dict: its id names the model
    if key not in _FITS:
        while len(_FITS) >= 64:
            _FITS.pop(next(iter(_FITS)))
        _FITS[key] = fit_problem(path, family, shapes)
    return _FITS[key]


_FITS: dict[tuple, str | None] = {}


_PAIR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_up.weight", ".lora_down.weight", ".diff_b",
                  ".lora_B.bias")


def _sampler_problems(prompt: dict, node: dict) -> list[str]:
    load = _model_source(prompt, node)
    s = _valid_settings(prompt, load[1]) if load else None
    if s is None:
        return []
    values = {k: v for k, v in (node.get("inputs") or {}).items() if not isinstance(v, list)}
    out = []
    try:
        g = _geometry(load[1])
    except CheckpointError:
        g = None  # the Load node reports it
    cfg = values.get("cfg")
    if g is not None and not _takes_negative(g.family):
        if s.cfg == 2:
            out.append(f"cfg_degree 2 runs a negative branch, but {g.family} takes no negative prompt (no true "
                       "classifier-free guidance): set cfg_degree 1")
        elif isinstance(cfg, (int, float)) and float(cfg) != 1.0:
            out.append(f"{g.family} takes no negative prompt (no true classifier-free guidance): set cfg 1")
    elif s.cfg == 2 and isinstance(cfg, (int, float)) and float(cfg) == 1.0:
        out.append("cfg_degree 2 runs the negative branch on half the ranks, but cfg is 1 (no negative branch): "
                   "set cfg != 1 or cfg_degree 1")
    sampler = values.get("sampler_name")
    if isinstance(sampler, str) and sampler not in ENGINE_SAMPLERS:  # ComfyUI's sampler over the pool's forwards
        what = "PipeFusion" if s.pipefusion > 1 else "the step cache" if values.get("cache") == "fbcache" else None
        if what:
            out.append(f"{sampler} runs as ComfyUI's own sampler over the pool's forwards, without {what}: use "
                       f"{' or '.join(ENGINE_SAMPLERS)} for {what}")
    shift = values.get("shift")
    if g is not None and isinstance(shift, (int, float)) and shift and not _flow_family(g.family):
        out.append(f"shift applies to flow models (Wan, SD3; ComfyUI's ModelSamplingSD3), not {g.family}: set 0")
    for side in ("positive", "negative"):
        src = _source(prompt, node, side, IMAGE_CONDITIONING)
        if src is not None:
            out += _image_conditioning_problems(side, src[1], g)
    latent = _source(prompt, node, "latent_image", EMPTY_LATENTS)
    if (latent and isinstance((latent[1].get("inputs") or {}).get("start_image"), list)
            and not (g is not None and g.family == "wan" and g.in_channels == 48)):  # TI2V 5B takes it
        out.append(f"latent_image comes from {latent[1]['class_type']} with a start_image (an inpainting "
                   "noise_mask), which only Wan 2.2 TI2V 5B takes: leave start_image unconnected")
    size = _latent_size(latent[1]) if latent else None
    if size is not None:
        out += image_problems(s, g, *size)
    return out


def _image_conditioning_problems(side: str, src: dict, g: Geometry | None) -> list[str]:
    """A side from one of ComfyUI's Wan image-to-video nodes: refused for a text-to-video checkpoint, for camera
    conditioning, and without CLIP vision for a model with a CLIP embedding (Wan 2.1 I2V)."""
    kind = src["class_type"]
    if kind in UNSUPPORTED_IMAGE_CONDITIONING:
        return [f"{side} comes from {kind} (camera conditioning), which Parallel Sampler does not take: use the "
                "native KSampler"]
    if g is None:
        return []
    if not g.image_input:
        return [f"{side} comes from {kind}, image-to-video conditioning, but the checkpoint is a text-to-video "
                "model (no image input channels): load a Wan image-to-video checkpoint"]
    inputs = src.get("inputs") or {}
    if g.image_dim and not any(isinstance(inputs.get(k), list) for k in CLIP_VISION_INPUTS):
        return [f"{side} comes from {kind} without a CLIP vision output, which this Wan 2.1 image-to-video "
                "checkpoint needs: connect CLIP Vision Encode to its clip_vision_output"]
    return []


def _flow_family(family: str) -> bool:
    from .families import VARIANTS

    kinds = {v.model_type for v in VARIANTS.values() if v.family == family}
    return kinds == {"FLOW"}  # (flux-schnell is a flow model of another timestep scale: sampling says so)


def _takes_negative(family: str) -> bool:
    from .families import cond_spec

    try:
        return cond_spec(family).negative
    except KeyError:
        return True


def image_problems(s, g: Geometry | None, height: int, width: int, batch: int, latent_frames: int = 1
                   ) -> list[str]:
    """What the settings cannot do with an image (or a video of `latent_frames` latent frames) of this size and
    batch (the engine's checks at sampling)."""
    out = []
    if s.dp > batch:
        out.append(f"dp_degree {s.dp} is larger than the batch size {batch}")
    patch = g.patch if g else 2
    multiple = 8 * patch
    if height % multiple or width % multiple:
        out.append(f"{width}x{height} is not a multiple of {multiple} px, as this model needs")
        return out
    if g and g.max_side and max(height, width) > g.max_side:
        out.append(f"{width}x{height} is larger than this model allows ({g.max_side} px a side)")
    rows, cols = height // multiple, width // multiple
    sp = s.ring * s.ulysses
    tokens = latent_frames * rows * cols
    if sp > tokens:
        what = f"{width}x{height}" + (f" x {latent_frames} latent frames" if latent_frames > 1 else "")
        out.append(f"{what} has {tokens} {'video' if latent_frames > 1 else 'image'} tokens, fewer than ring x "
                   f"ulysses ({sp})")
    if s.pipefusion > 1 and latent_frames > 1:
        patches = s.num_patches or s.pipefusion
        if patches > tokens:
            out.append(f"num_patches {patches} is larger than the {tokens} video tokens")
    elif s.pipefusion > 1:
        patches = s.num_patches or s.pipefusion
        if patches > rows:
            out.append(f"num_patches {patches} is larger than the latent height in tokens ({rows})")
        elif (rows // patches) * cols < sp:
            out.append(f"a PipeFusion patch of {rows // patches}x{cols} tokens has fewer tokens than ring x "
                       f"ulysses ({sp})")
    return out
