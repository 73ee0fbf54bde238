"""What the nodes need to know about each model variant on ComfyUI's side: which of ComfyUI's sampling
configurations and latent formats it corresponds to. Only names here; ComfyUI's objects are built lazily by
`comfy_objects`, so this module imports without ComfyUI."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VariantSpec:
    family: str          # engine family: flux | sd3 | pixart
    supported_model: str  # class name in comfy.supported_models whose sampling_settings apply
    model_type: str      # member of comfy.model_base.ModelType
    latent_format: str   # class name in comfy.latent_formats
    channels: int


VARIANTS: dict[str, VariantSpec] = {
    "flux-dev": VariantSpec("flux", "Flux", "FLUX", "Flux", 16),
    "flux-schnell": VariantSpec("flux", "FluxSchnell", "FLOW", "Flux", 16),
    "sd3-medium": VariantSpec("sd3", "SD3", "FLOW", "SD3", 16),
    "sd3.5-medium": VariantSpec("sd3", "SD3", "FLOW", "SD3", 16),
    "sd3.5-large": VariantSpec("sd3", "SD3", "FLOW", "SD3", 16),
    "pixart-sigma": VariantSpec("pixart", "PixArtSigma", "EPS", "SDXL", 4),
    "pixart-alpha": VariantSpec("pixart", "PixArtAlpha", "EPS", "SD15", 4),
}
DEFAULT_VARIANT = {"flux": "flux-dev", "sd3": "sd3-medium", "pixart": "pixart-sigma"}
TINY_VARIANT = {"tiny-flux": "flux-dev", "tiny-sd3": "sd3-medium", "tiny-pixart": "pixart-sigma"}

# Samplers the pool runs. Schedulers: ComfyUI's own (their sigmas are computed by ComfyUI's calculate_sigmas and
# sent); this is ComfyUI 0.3.64's list, for use without ComfyUI.
SAMPLERS = ("euler", "dpmpp_2m")
SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
              "kl_optimal")


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


def comfy_objects(variant: str):
    """(model_sampling, latent_format) as ComfyUI would build them for a model of this variant."""
    from types import SimpleNamespace

    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models

    s = spec(variant)
    settings = dict(getattr(comfy.supported_models, s.supported_model).sampling_settings)
    model_type = getattr(comfy.model_base.ModelType, s.model_type)
    model_sampling = comfy.model_base.model_sampling(SimpleNamespace(sampling_settings=settings), model_type)
    return model_sampling, getattr(comfy.latent_formats, s.latent_format)()
