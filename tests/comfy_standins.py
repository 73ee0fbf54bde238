"""Stand-ins for the parts of ComfyUI the nodes use (comfy.*, folder_paths, latent_preview), for tests without
ComfyUI, and a loader that imports this repository as a ComfyUI extension package the way ComfyUI does."""
from __future__ import annotations

import enum
import importlib.util
import inspect
import math
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from . import comfy_io_standin, recorded_sigmas

ROOT = Path(__file__).resolve().parents[1]
EXTENSION_NAME = "xdit_extension_under_test"


class InterruptProcessingException(Exception):  # ComfyUI 0.3.64's
    pass


class Recorder:
    def __init__(self):
        self.sigma_calls: list[tuple] = []
        self.progress: list[tuple] = []
        self.interrupt_after: int | None = None  # raise on the poll after this many progress updates
        self.interrupted_at: float | None = None  # time.monotonic() of the first raise
        self.unloaded = 0
        self.folders: dict[str, list[str]] = {}
        self.server = None  # the stand-in PromptServer.instance
        self.fixed_empty: list[tuple] = []  # newer ComfyUI stand-in: (latent format, shape) per fix_empty_latent
        self.interrupt_class: type = InterruptProcessingException  # what a cancel raises


# comfy.samplers.SCHEDULER_NAMES of ComfyUI 0.3.64, in its order (a fact checked by test_comfyui_e2e.py)
SCHEDULER_NAMES = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                   "linear_quadratic", "kl_optimal"]


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def install(rec: Recorder, newer: bool = False) -> dict[str, types.ModuleType]:
    """Stand-in modules, to put into sys.modules (monkeypatch.setitem): ComfyUI 0.3.64's API, or with `newer` the
    newer ComfyUI's where it differs (tests/comfy_newer_standins.py)."""

    class ModelType(enum.Enum):
        EPS = 1
        FLOW = 6
        FLUX = 8

    class FakeModelSampling:
        """ComfyUI's model_sampling object as far as the nodes read it: its sigma range and, through
        calculate_sigmas, its schedules, all from the tables recorded in the real ComfyUI (tests/data)."""

        def __init__(self, settings, model_type):
            self.settings, self.model_type = settings, model_type
            self.sigma_min, self.sigma_max = recorded_sigmas.sigma_range(model_type.name, settings)

    def model_sampling(model_config, model_type):
        return FakeModelSampling(dict(model_config.sampling_settings), model_type)

    class Flux:  # sampling settings as published by ComfyUI's supported_models (facts, not code)
        sampling_settings = {}

    class FluxSchnell:
        sampling_settings = {"multiplier": 1.0, "shift": 1.0}

    class SD3:
        sampling_settings = {"shift": 3.0}

    class PixArtAlpha:
        sampling_settings = {"beta_schedule": "sqrt_linear", "linear_start": 0.0001, "linear_end": 0.02,
                             "timesteps": 1000}

    class PixArtSigma(PixArtAlpha):
        pass

    class QwenImage:  # ModelType.FLUX in ComfyUI 0.3.64's supported_models.QwenImage
        sampling_settings = {"multiplier": 1.0, "shift": 1.15}

    class WAN21_T2V:  # ModelType.FLOW (comfy.model_base.WAN21); WAN22_T2V and WAN21_I2V inherit the settings
        sampling_settings = {"shift": 8.0}

    class WAN22_T2V(WAN21_T2V):
        pass

    class WAN21_I2V(WAN21_T2V):
        pass

    class _Format:  # comfy.latent_formats.LatentFormat of 0.3.64, as far as the nodes read it
        scale_factor, shift_factor, latent_channels, latent_dimensions = 1.0, 0.0, 4, 2

        def process_in(self, x):
            return (x - self.shift_factor) * self.scale_factor

    formats = {name: type(name, (_Format,), {"scale_factor": sc, "shift_factor": sh, "latent_channels": ch})
               for name, sc, sh, ch in [("Flux", 0.3611, 0.1159, 16), ("SD3", 1.5305, 0.0609, 16),
                                        ("SDXL", 0.13025, 0.0, 4), ("SD15", 0.18215, 0.0, 4),
                                        ("LatentFormat", 1.0, 0.0, 4)]}  # ComfyUI's base class: the identity

    class Wan21(_Format):  # latent_dimensions 3: its per-channel statistics are shaped [1, 16, 1, 1, 1]
        latent_channels, latent_dimensions = 16, 3

        def process_in(self, x):
            if x.ndim != 5:
                raise ValueError(f"Wan21 latents are [B, C, T, H, W], got {list(x.shape)}")
            return x

    formats["Wan21"] = Wan21
    formats["Wan22"] = type("Wan22", (Wan21,), {"latent_channels": 48})

    class BaseModel:  # comfy.model_base.BaseModel.extra_conds as far as the nodes ask it (0.3.64 and newer alike)
        def extra_conds(self, **kwargs):
            out = {}
            for key, value in (("c_concat", self.concat_cond(**kwargs)), ("y", self.encode_adm(**kwargs))):
                if value is not None:
                    out[key] = value
            if kwargs.get("cross_attn") is not None:
                out["c_crossattn"] = kwargs["cross_attn"]
            return out

        def concat_cond(self, **kwargs):  # reads what __init__ sets, as ComfyUI's does
            return None if not self.concat_keys else kwargs.get("concat_latent_image")

        def encode_adm(self, **kwargs):
            return kwargs.get("pooled_output") if self.adm_channels else None

    class QwenImageModel(BaseModel):  # model_base.QwenImage of 0.3.64: the text and reference latents, no mask
        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            if kwargs.get("cross_attn") is not None:
                out["c_crossattn"] = kwargs["cross_attn"]
            if kwargs.get("reference_latents") is not None:
                out["ref_latents"] = list(kwargs["reference_latents"])
            return out

    def calculate_sigmas(ms, scheduler, steps):
        rec.sigma_calls.append((ms, scheduler, steps))
        if scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"error invalid scheduler {scheduler}")
        return recorded_sigmas.sigmas(ms.model_type.name, ms.settings, scheduler, steps)

    def prepare_noise(latent, seed, noise_inds=None):
        g = torch.manual_seed(seed)
        return torch.randn(latent.size(), dtype=latent.dtype, generator=g, device="cpu")

    def fix_empty_latent_channels(model, latent):
        fmt = model.get_model_object("latent_format")
        if fmt.latent_channels != latent.shape[1] and torch.count_nonzero(latent) == 0:
            reps = math.ceil(fmt.latent_channels / latent.shape[1])
            latent = latent.repeat(1, reps, *[1] * (latent.ndim - 2))[:, :fmt.latent_channels]
        if getattr(fmt, "latent_dimensions", 2) == 3 and latent.ndim == 4:
            latent = latent.unsqueeze(2)
        return latent

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.node_id = total, node_id

        def update_absolute(self, value, total=None, preview=None):
            rec.progress.append((value, total if total is not None else self.total, self.node_id, preview))

    def throw_exception_if_processing_interrupted():
        if rec.interrupt_after is not None and len(rec.progress) >= rec.interrupt_after:
            if rec.interrupted_at is None:
                rec.interrupted_at = time.monotonic()
            raise rec.interrupt_class()

    def unload_all_models():
        rec.unloaded += 1

    def get_filename_list(folder):
        return sorted(Path(p).name for p in rec.folders.get(_legacy(folder), []) if Path(p).is_file())

    def get_full_path(folder, name):
        for p in rec.folders.get(_legacy(folder), []):
            if Path(p).name == name:
                return p
        return None

    def get_folder_paths(folder):
        return sorted({str(Path(p).parent) for p in rec.folders.get(_legacy(folder), [])})

    def _legacy(folder):
        return "diffusion_models" if folder == "unet" else folder

    class Previewer:
        def decode_latent_to_preview_image(self, fmt, x0):
            return (fmt, tuple(x0.shape), 512)

    class PromptServer:  # server.PromptServer: the on-prompt handlers, called with POST /prompt's body
        instance = None

        def __init__(self):
            self.on_prompt_handlers = []

        def add_on_prompt_handler(self, handler):
            self.on_prompt_handlers.append(handler)

        def trigger_on_prompt(self, json_data):
            for handler in self.on_prompt_handlers:
                json_data = handler(json_data)
            return json_data

    PromptServer.instance = PromptServer()
    rec.server = PromptServer.instance

    comfy = _module("comfy")
    mods = {
        "comfy": comfy,
        "comfy.model_base": _module("comfy.model_base", ModelType=ModelType, model_sampling=model_sampling,
                                    BaseModel=BaseModel, QwenImage=QwenImageModel),
        "comfy.supported_models": _module("comfy.supported_models", Flux=Flux, FluxSchnell=FluxSchnell, SD3=SD3,
                                          PixArtAlpha=PixArtAlpha, PixArtSigma=PixArtSigma, QwenImage=QwenImage,
                                          WAN21_T2V=WAN21_T2V, WAN22_T2V=WAN22_T2V, WAN21_I2V=WAN21_I2V),
        "comfy.latent_formats": _module("comfy.latent_formats", **formats),
        "comfy.samplers": _module("comfy.samplers", calculate_sigmas=calculate_sigmas,
                                  SCHEDULER_NAMES=list(SCHEDULER_NAMES),
                                  KSampler=type("KSampler", (), {"SCHEDULERS": list(SCHEDULER_NAMES)})),
        "comfy.sample": _module("comfy.sample", prepare_noise=prepare_noise,
                                fix_empty_latent_channels=fix_empty_latent_channels),
        "comfy.utils": _module("comfy.utils", ProgressBar=ProgressBar),
        "comfy.model_management": _module(
            "comfy.model_management", InterruptProcessingException=InterruptProcessingException,
            throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted,
            unload_all_models=unload_all_models, soft_empty_cache=lambda force=False: None),
        "folder_paths": _module("folder_paths", get_filename_list=get_filename_list, get_full_path=get_full_path,
                                get_folder_paths=get_folder_paths,
                                folder_names_and_paths={"diffusion_models": None, "checkpoints": None}),
        "latent_preview": _module("latent_preview", get_previewer=lambda device, fmt: Previewer()),
        "server": _module("server", PromptServer=PromptServer),
        "nodes": _module("nodes", COMFY_OWN_NODES_MODULE=True),  # ComfyUI's own top-level `nodes`
        "comfy_api": _module("comfy_api"),
        "comfy_api.latest": _module("comfy_api.latest", io=comfy_io_standin,
                                    ComfyExtension=comfy_io_standin.ComfyExtension),
    }
    for name, m in mods.items():
        if name.startswith("comfy."):
            setattr(comfy, name.split(".", 1)[1], m)
    mods["comfy_api"].latest = mods["comfy_api.latest"]
    if newer:
        from . import comfy_newer_standins

        comfy_newer_standins.overlay(mods, rec)
    return mods


def load_extension(name: str = EXTENSION_NAME) -> types.ModuleType:
    """Import the repository root as a package, as ComfyUI's custom-node loader does."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def extension(newer: bool = False) -> Iterator[types.ModuleType]:
    """The extension loaded over the stand-ins (its `rec` attribute: their Recorder; `newer`: the newer ComfyUI's
    API); sys.modules restored and the nodes' pools stopped afterwards."""
    rec = Recorder()
    modules = install(rec, newer)
    saved = {k: sys.modules.get(k) for k in modules}
    sys.modules.update(modules)
    ext = None
    try:
        ext = load_extension()
        ext.rec = rec
        yield ext
    finally:
        if ext is not None:
            ext.nodes.xdit_nodes.MANAGER.stop()
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def validation_messages(cls, inputs: dict, unique_id: str) -> list[str]:
    """The details ComfyUI's prompt validation reports for a node's own check (facts of ComfyUI 0.3.64's
    execution.validate_inputs): a V3 node's validate_inputs (a V1 node's VALIDATE_INPUTS) gets each argument it
    declares that the node has in the prompt (linked inputs as None; every input when it takes **kwargs; a V1 node's
    hidden UNIQUE_ID inputs as the node id, a V3 node's hidden values on the copy of the class it calls), and for a
    result other than True one error is reported per argument passed, "<argument> - <result>"."""
    # by name, not issubclass: a test module imported as `tests.x` beside pytest's own copy sees two stand-ins
    base = next((b for b in cls.__mro__ if b.__name__ == "ComfyNode"), None)
    v3 = base is not None
    if v3 and cls.validate_inputs.__func__ is base.validate_inputs.__func__:
        return []  # not overridden: ComfyUI calls none
    fn = cls.validate_inputs if v3 else getattr(cls, "VALIDATE_INPUTS", None)
    if fn is None:
        return []
    spec = inspect.getfullargspec(fn)
    declared = {**cls.INPUT_TYPES().get("required", {}), **cls.INPUT_TYPES().get("optional", {})}
    available = {k: None if isinstance(v, list) else v for k, v in inputs.items() if k in declared}
    if not v3:
        available.update({k: unique_id for k, v in cls.INPUT_TYPES().get("hidden", {}).items() if v == "UNIQUE_ID"})
    args = available if spec.varkw else {k: available[k] for k in spec.args if k in available}
    target = with_id(cls, unique_id) if v3 else cls
    result = (target.validate_inputs if v3 else target.VALIDATE_INPUTS)(**args)
    if result is True:
        return []
    return [f"{k} - {result}" if result is not False else k for k in args]


def with_id(node, node_id: str) -> type:
    """The copy of a V3 node class (or of an instance's class) that ComfyUI calls for node `node_id`: its hidden
    UNIQUE_ID set, as ComfyUI's executor sets it before execute and validate_inputs."""
    cls = node if isinstance(node, type) else type(node)
    return cls.PREPARE_CLASS_CLONE({comfy_io_standin.Hidden.unique_id: node_id})
