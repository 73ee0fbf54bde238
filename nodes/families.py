"""What the nodes need to know about each model variant on ComfyUI's side, read from the engine's family registry
(comfyui_xdit/families): which of ComfyUI's sampling configurations and latent formats it corresponds to. ComfyUI's
objects are built lazily by `comfy_objects`, so this module imports without ComfyUI (and without diffusers)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from comfyui_xdit import families as registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariantSpec:
    family: str           # engine family name
    supported_model: str  # class name in comfy.supported_models whose sampling_settings apply
    model_type: str       # member of comfy.model_base.ModelType
    latent_format: str    # class name in comfy.latent_formats
    channels: int
    dims: int             # latent spatial dimensions (2: image, 3: video)
    frame_axis: bool = False  # ComfyUI's LATENT is [B, C, 1, H, W] for this image model (a video VAE's format)
    text_mask: bool = True    # ComfyUI's model applies the CONDITIONING's attention_mask
    shift: Callable[[int, int], float] | None = None  # (image tokens, steps) -> the job's sampling shift
    patch: int = 2        # latent pixels per token side
    downscale: int = 8    # image pixels per latent pixel (Wan 2.2's VAE: 16)
    time_downscale: int = 0  # video: pixel frames per latent frame (F = k (T - 1) + 1); 0: an image model
    native: object = None    # the newer ComfyUI's own model of it (families.spec.NativeSpec), where that one has it


def _specs() -> dict[str, VariantSpec]:
    out = {}
    for name, (fam, v) in registry.variants().items():
        if v.comfy is None:
            continue  # not a model the supported ComfyUI has
        latent = fam.latent_of(name)
        out[name] = VariantSpec(fam.name, v.comfy.supported_model, v.comfy.model_type, v.comfy.latent_format,
                                latent.channels, latent.dims, latent.frame_axis, v.comfy.text_mask,
                                v.comfy.shift, fam.patch, latent.downscale, latent.time_downscale, v.comfy.native)
    return out


VARIANTS: dict[str, VariantSpec] = _specs()
DEFAULT_VARIANT = {f.name: f.default_variant.name for f in registry.families().values()
                   if f.default_variant.name in VARIANTS}


def _tiny_variant(fam, kwargs: dict) -> str:
    """A tiny model's variant: its family's default, or the one its config says where variants differ in their
    latents (tiny-wan-ti2v is Wan 2.2 TI2V 5B's 48-channel architecture)."""
    if any(v.latent is not None for v in fam.variants):
        try:
            return fam.variant_of(kwargs, "")
        except (KeyError, TypeError):
            pass
    return fam.default_variant.name


TINY_VARIANT = {name: v for name, (fam, kw) in registry.tiny_models().items()
                if name.startswith("tiny-") and (v := _tiny_variant(fam, kw)) in VARIANTS}

# Samplers the pool runs. Schedulers: ComfyUI's own (their sigmas are computed by ComfyUI's calculate_sigmas and
# sent); this is ComfyUI 0.3.64's list, for use without ComfyUI.
SAMPLERS = ("euler", "dpmpp_2m")
SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
              "kl_optimal")


def sampler_names() -> list[str]:
    """Every sampler the running ComfyUI offers its KSampler (SAMPLERS without ComfyUI): SAMPLERS run in the pool's
    own loop, the others as ComfyUI's sampler over the pool's forwards."""
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS)
    except (ImportError, AttributeError):
        return list(SAMPLERS)


def scheduler_names() -> list[str]:
    """Every scheduler the running ComfyUI offers its KSampler (SCHEDULERS without ComfyUI)."""
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SCHEDULERS)
    except (ImportError, AttributeError):
        return list(SCHEDULERS)


def spec(variant: str) -> VariantSpec:
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown model variant {variant!r}: expected one of {', '.join(VARIANTS)}") from None


def cond_spec(family: str):
    """The family's text conditioning (comfyui_xdit.families.spec.CondSpec)."""
    return registry.get(family).cond


def native(variant: str):
    """The variant's own model on the running ComfyUI (its ComfySpec.native: families.spec.NativeSpec), or None:
    without ComfyUI, on ComfyUI 0.3.64 (which has no such classes), or where the running ComfyUI's latent format of
    that name is not the engine latent folded by its patch (channels x patch^2, downscale ratio x patch). Detected
    from the running ComfyUI's classes, never from its version."""
    n = spec(variant).native
    if n is None:
        return None
    try:
        import comfy.latent_formats
        import comfy.supported_models
    except ImportError:
        return None
    fmt_class = getattr(comfy.latent_formats, n.latent_format, None)
    if fmt_class is None or getattr(comfy.supported_models, n.supported_model, None) is None:
        return None
    try:
        fmt = fmt_class()
    except Exception as e:  # noqa: BLE001 - a format we cannot build is not one we can convert to
        log.debug("xDiT: cannot build ComfyUI's latent format %s (%s)", n.latent_format, e)
        return None
    s = spec(variant)
    if (getattr(fmt, "latent_channels", None) != s.channels * n.patch ** 2
            or getattr(fmt, "spacial_downscale_ratio", 8) != s.downscale * n.patch):
        return None
    return n


def comfy_objects(variant: str, latent_hw: tuple[int, int] | None = None, steps: int | None = None,
                  shift: float | None = None, use_native: bool = False):
    """(model_sampling, latent_format) as ComfyUI would build them for a model of this variant; for a variant with
    a per-job shift, the shift of a latent of `latent_hw` (LATENT height, width) sampled in `steps` steps; `shift`
    replaces it for a flow model as ModelSamplingSD3 does (the same ModelSamplingDiscreteFlow, another shift).
    use_native: the running ComfyUI's own model of the variant (`native`; the caller checked it has one): its
    supported model's sampling settings, model type and latent format, as KSampler uses them for that model."""
    from types import SimpleNamespace

    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models

    s = spec(variant)
    n = native(variant) if use_native else None
    if use_native and n is None:
        raise ValueError(f"the running ComfyUI has no model of its own for {variant}")
    if n is not None:
        s = VariantSpec(s.family, n.supported_model, n.model_type, n.latent_format, s.channels * n.patch ** 2, s.dims,
                        patch=1, downscale=s.downscale * n.patch)
    settings = dict(getattr(comfy.supported_models, s.supported_model).sampling_settings)
    if s.shift is not None and latent_hw is not None and steps:
        settings["shift"] = float(s.shift((latent_hw[0] // s.patch) * (latent_hw[1] // s.patch), int(steps)))
    if shift:
        if s.model_type != "FLOW" or float(settings.get("multiplier", 1000.0)) != 1000.0:  # ModelSamplingSD3's
            raise ValueError(f"shift applies to flow models (Wan, SD3; ComfyUI's ModelSamplingSD3), not {variant}")
        settings["shift"] = float(shift)
    model_type = getattr(comfy.model_base.ModelType, s.model_type)
    model_sampling = comfy.model_base.model_sampling(SimpleNamespace(sampling_settings=settings), model_type)
    return model_sampling, getattr(comfy.latent_formats, s.latent_format)()


def comfy_latent_format(variant: str, use_native: bool = False):
    """ComfyUI's own latent format object for the variant (comfy.latent_formats.<ComfySpec.latent_format>), as the
    running ComfyUI defines it: whatever it asks of a format (fix_empty_latent, the downscale ratios of the newer
    ComfyUI, latent_dimensions) is its own. One attribute may be ours: where the pack's LATENT has other channels
    than that class (FLUX.2's own 32-channel latent at 1/8, on ComfyUI's base LatentFormat of 4), the instance's
    latent_channels is the pack's, so ComfyUI widens an empty latent to what the pool samples."""
    import comfy.latent_formats

    s = spec(variant)
    if use_native:  # the running ComfyUI's own format of the variant, as it is (`native` checked its channels)
        return getattr(comfy.latent_formats, s.native.latent_format)()
    fmt = getattr(comfy.latent_formats, s.latent_format)()
    if getattr(fmt, "latent_channels", None) != s.channels:
        fmt.latent_channels = s.channels  # on the instance: ComfyUI's class stays as it is
    return fmt


def applies_text_mask(variant: str) -> bool:
    """Whether the running ComfyUI's model of the variant applies a CONDITIONING's attention_mask (so the pool must
    too, to sample what KSampler samples). A variant whose ComfySpec says so always does; for the others (Qwen-Image:
    ComfyUI 0.3.64's QwenImage drops the mask, the newer one passes it to its model) it is read from the running
    ComfyUI itself: its model_base class of the supported model's name is asked to turn an attention_mask into a
    model input (extra_conds on a bare instance). Without ComfyUI, or when that cannot be asked, the ComfySpec's."""
    s = spec(variant)
    if s.text_mask:
        return True
    try:
        import comfy.model_base
    except ImportError:
        return False
    cls = getattr(comfy.model_base, s.supported_model, None)
    return cls is not None and bool(_passes_attention_mask(cls))


def _passes_attention_mask(cls) -> bool | None:
    """Whether ComfyUI's model_base class `cls` turns a padded prompt's attention_mask into a model input; None when
    it cannot be asked (its extra_conds needs more of an instance than the bare one)."""
    import torch

    probe = cls.__new__(cls)  # no __init__: no weights, no config; only the methods extra_conds calls of itself
    object.__setattr__(probe, "concat_cond", lambda **kwargs: None)
    object.__setattr__(probe, "encode_adm", lambda **kwargs: None)
    try:
        out = cls.extra_conds(probe, attention_mask=torch.tensor([[1.0, 0.0]]))  # one token and one pad
    except Exception as e:  # noqa: BLE001 - a ComfyUI whose extra_conds needs more: keep the ComfySpec's answer
        log.debug("xDiT: cannot ask %s.extra_conds about attention_mask (%s); assuming it is dropped",
                  cls.__name__, e)
        return None
    return isinstance(out, dict) and out.get("attention_mask") is not None


# ComfyUI's reference_latents_method (FluxKontextMultiReferenceLatentMethod) per Qwen-Image-Edit variant: "index"
# (each reference at its own frame index) is 2509's; the newer ComfyUI's "index_timestep_zero" (the references'
# tokens at timestep 0) is 2511's zero_cond_t, and its 2511 files default to it. None: the loaded variant's own.
def reference_method_error(method: object, variant: str) -> str | None:
    """Why a conditioning's reference_latents_method cannot run on a model loaded as `variant`, or None."""
    own = "index_timestep_zero" if variant == "qwen-image-edit-2511" else "index"
    if method in (None, own):
        return None
    if method == "index_timestep_zero":
        return ("reference_latents_method 'index_timestep_zero' (the references at timestep 0) is Qwen-Image-Edit "
                "2511's: load the checkpoint with family qwen-image-edit-2511")
    if method == "index":
        return ("reference_latents_method 'index' on a model loaded as qwen-image-edit-2511 (references at timestep "
                "0): drop the method node, or load the checkpoint as qwen-image-edit-2509")
    return (f"reference_latents_method {method!r} is not supported: 'index' (Edit 2509) or 'index_timestep_zero' "
            "(Edit 2511)")


def native_conds(variant: str, cond, extras: dict) -> dict | None:
    """What the running ComfyUI's own model of the variant (its model_base class named by ComfySpec.native's
    supported model, e.g. FLUX.2's Flux2) makes of one CONDITIONING entry, asked of its extra_conds on a bare
    instance: {"c_crossattn": the text as its diffusion model gets it (FLUX.2: padded to 512 tokens),
    "guidance": the distilled guidance (Flux's default when the entry has none)}, the entries it makes of these
    only. None when the running ComfyUI has no such model or it cannot be asked (the pack's conventions then)."""
    import torch

    n = native(variant)
    if n is None:
        return None
    try:
        import comfy.model_base
    except ImportError:
        return None
    cls = getattr(comfy.model_base, n.supported_model, None)
    if cls is None:
        return None
    probe = cls.__new__(cls)
    object.__setattr__(probe, "concat_cond", lambda **kwargs: None)
    object.__setattr__(probe, "encode_adm", lambda **kwargs: None)
    # the text and the guidance only: an attention_mask would make Flux's extra_conds read the instance's model
    kwargs = {"guidance": extras["guidance"]} if extras.get("guidance") is not None else {}
    try:
        out = cls.extra_conds(probe, cross_attn=cond, device=cond.device, **kwargs)
    except Exception as e:  # noqa: BLE001 - a ComfyUI whose extra_conds needs more: the pack's conventions
        log.debug("xDiT: cannot ask %s.extra_conds about a conditioning (%s)", cls.__name__, e)
        return None
    made = {}
    for key in ("c_crossattn", "guidance"):
        value = getattr(out.get(key), "cond", out.get(key)) if isinstance(out, dict) else None
        if isinstance(value, torch.Tensor):
            made[key] = value if key == "c_crossattn" else float(value.reshape(-1)[0])
    return made
