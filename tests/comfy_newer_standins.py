"""Stand-ins for the newer ComfyUI's API where it differs from 0.3.64's in what the nodes touch, laid over
comfy_standins' 0.3.64 modules (comfy_standins.install(rec, newer=True)). Nothing newer than 0.3.64 runs here, so
these are modelled on the files themselves: Comfy-Org/ComfyUI as the search index holds it in late 2026 (the
ComfyUI users run today, see ../shared/comfyui-2026.md), read file by file:

- comfy/sample.py `fix_empty_latent_channels(model, latent_image, downscale_ratio_spacial=None,
  downscale_ratio_temporal=None)`: a nested latent is left alone; on an all-zero latent the channels become the
  latent format's, a spatial ratio other than the format's `spacial_downscale_ratio` resizes it, a video format's
  frame axis is added, a temporal ratio other than `temporal_downscale_ratio` changes its frame count, and then the
  format's own `fix_empty_latent()` runs. (0.3.64's takes (model, latent_image) and reads only latent_channels and
  latent_dimensions.)
- nodes.py: the empty latent nodes put `downscale_ratio_spacial` (and the video ones `downscale_ratio_temporal`)
  into the LATENT beside "samples"; common_ksampler passes them to fix_empty_latent_channels and drops them from
  the latent it returns.
- comfy/latent_formats.py: `LatentFormat` has `spacial_downscale_ratio` 8, `temporal_downscale_ratio` 1 and an
  identity `fix_empty_latent`; Flux, SD3 (16 channels), SDXL and SD15 (4), Wan21 (16, 3-D, temporal 4) and Wan22
  (48, spatial 16) inherit them. The stand-in's fix_empty_latent records which format ran it (rec.fixed_empty), so
  a test sees that ComfyUI's format object of the variant was the one used.
- comfy/model_base.py `QwenImage.extra_conds`: passes the CONDITIONING's `attention_mask` to the model
  (0.3.64's drops it), after BaseModel.extra_conds (which asks the model for concat_cond and encode_adm).
- comfy/model_management.py: `InterruptProcessingException` derives from BaseException (0.3.64: Exception)."""
from __future__ import annotations

import math
import types

import torch


class InterruptProcessingException(BaseException):
    pass


def latent_formats(rec) -> dict[str, type]:
    class LatentFormat:
        scale_factor, shift_factor = 1.0, 0.0
        latent_channels, latent_dimensions = 4, 2
        spacial_downscale_ratio, temporal_downscale_ratio = 8, 1

        def process_in(self, x):
            return (x - self.shift_factor) * self.scale_factor

        def fix_empty_latent(self, latent):
            rec.fixed_empty.append((type(self).__name__, tuple(latent.shape)))
            return latent

    def image(name, scale, shift, channels):
        return type(name, (LatentFormat,), {"scale_factor": scale, "shift_factor": shift,
                                            "latent_channels": channels})

    class Wan21(LatentFormat):
        latent_channels, latent_dimensions, temporal_downscale_ratio = 16, 3, 4

        def process_in(self, x):
            if x.ndim != 5:
                raise ValueError(f"Wan21 latents are [B, C, T, H, W], got {list(x.shape)}")
            return x

    class Wan22(Wan21):
        latent_channels, spacial_downscale_ratio = 48, 16

    return {"LatentFormat": LatentFormat, "Flux": image("Flux", 0.3611, 0.1159, 16),
            "SD3": image("SD3", 1.5305, 0.0609, 16), "SDXL": image("SDXL", 0.13025, 0.0, 4),
            "SD15": image("SD15", 0.18215, 0.0, 4), "Wan21": Wan21, "Wan22": Wan22}


def _to_size(latent: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """comfy.utils.repeat_to_batch_size along `dim`: repeated up to `size`, or cut to it."""
    if latent.shape[dim] < size:
        reps = [1] * latent.ndim
        reps[dim] = math.ceil(size / latent.shape[dim])
        latent = latent.repeat(*reps)
    return latent.narrow(dim, 0, size)


def fix_empty_latent_channels(model, latent_image, downscale_ratio_spacial=None, downscale_ratio_temporal=None):
    if latent_image.is_nested:
        return latent_image
    fmt = model.get_model_object("latent_format")
    empty = torch.count_nonzero(latent_image) == 0
    if empty:
        if fmt.latent_channels != latent_image.shape[1]:
            latent_image = _to_size(latent_image, 1, fmt.latent_channels)
        if downscale_ratio_spacial is not None and downscale_ratio_spacial != fmt.spacial_downscale_ratio:
            ratio = downscale_ratio_spacial / fmt.spacial_downscale_ratio  # a nearest resize of zeros: zeros
            h, w = round(latent_image.shape[-2] * ratio), round(latent_image.shape[-1] * ratio)
            latent_image = latent_image.new_zeros((*latent_image.shape[:-2], h, w))
    if fmt.latent_dimensions == 3 and latent_image.ndim == 4:
        latent_image = latent_image.unsqueeze(2)
    if empty and downscale_ratio_temporal is not None and downscale_ratio_temporal != fmt.temporal_downscale_ratio:
        frames = max(1, round(latent_image.shape[2] * downscale_ratio_temporal / fmt.temporal_downscale_ratio))
        latent_image = _to_size(latent_image, 2, frames)
    if empty:
        latent_image = fmt.fix_empty_latent(latent_image)
    return latent_image


def model_base_classes(base_model: type) -> dict[str, type]:
    class QwenImage(base_model):
        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            if kwargs.get("attention_mask") is not None:
                out["attention_mask"] = kwargs["attention_mask"]
            if kwargs.get("cross_attn") is not None:
                out["c_crossattn"] = kwargs["cross_attn"]
            if kwargs.get("reference_latents") is not None:
                out["ref_latents"] = list(kwargs["reference_latents"])
            return out

    return {"QwenImage": QwenImage}


def overlay(mods: dict[str, types.ModuleType], rec) -> None:
    """Replace, in comfy_standins' 0.3.64 modules, what the newer ComfyUI changed (the module docstring)."""
    formats = latent_formats(rec)
    for name in list(vars(mods["comfy.latent_formats"])):
        if isinstance(getattr(mods["comfy.latent_formats"], name), type):
            delattr(mods["comfy.latent_formats"], name)
    vars(mods["comfy.latent_formats"]).update(formats)
    mods["comfy.sample"].fix_empty_latent_channels = fix_empty_latent_channels
    base = mods["comfy.model_base"]
    vars(base).update(model_base_classes(base.BaseModel))
    mm = mods["comfy.model_management"]
    mm.InterruptProcessingException = InterruptProcessingException
    rec.interrupt_class = InterruptProcessingException
