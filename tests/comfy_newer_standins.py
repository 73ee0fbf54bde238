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
- comfy/model_management.py: `InterruptProcessingException` derives from BaseException (0.3.64: Exception).
- Native FLUX.2: comfy/latent_formats.py `Flux2` (128 channels, spacial_downscale_ratio 16, process_in / process_out
  the identity; its preview reshape reads channel c*4 + 2*dy + dx as pixel (dy, dx) of channel c),
  comfy/supported_models.py `Flux2` (Flux's model type, sampling_settings {"shift": 2.02}), comfy/model_base.py
  `Flux.extra_conds` (the text as c_crossattn; guidance, 3.5 when the CONDITIONING has none) and `Flux2.extra_conds`
  (the text padded with zero tokens at its front to 512 tokens), comfy/sd.py (a VAE with `bn.running_mean` folds
  2x2 pixels into 4x the channels and applies the batch norm inside encode and decode: the LATENT is the
  patchified, normalised latent), comfy_extras/nodes_flux.py `EmptyFlux2LatentImage` (zeros [B, 128, H/16, W/16],
  downscale_ratio_spacial 16).
- Native Z-Image: comfy/model_base.py `Lumina2.extra_conds` (attention_mask only when it masks a token;
  `num_tokens` the mask's count of real tokens, at least 1, else the context's length) and
  comfy/ldm/lumina/model.py `NextDiT.forward(x, timesteps, context, num_tokens, attention_mask=None, ...)` (model
  time 1 - timesteps, output negated).
- The native forwards (flux2_native_forward, lumina2_native_forward) run the engine's diffusers model as those
  ComfyUI models are called: ComfyUI's latent layout, timestep = sigma, ComfyUI's context. comfy/ldm/flux/model.py
  is not in the search index: FLUX.2's image tokens are taken as the 128-channel latent's pixels row-major and its
  position ids as the published model's (Flux2Pipeline's), which ComfyUI's loader of the same weights must use."""
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

        def process_out(self, x):
            return x / self.scale_factor + self.shift_factor

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

    class Flux2(LatentFormat):
        latent_channels, spacial_downscale_ratio = 128, 16

        def process_in(self, x):
            return x

        def process_out(self, x):
            return x

    return {"LatentFormat": LatentFormat, "Flux2": Flux2, "Flux": image("Flux", 0.3611, 0.1159, 16),
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

    class Flux(base_model):
        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            guidance = kwargs.get("guidance", 3.5)
            if guidance is not None:
                out["guidance"] = torch.tensor([float(guidance)])
            return out

    class Flux2(Flux):
        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            ctx = kwargs.get("cross_attn")
            if ctx is not None and ctx.shape[1] < 512:
                ctx = torch.cat([ctx.new_zeros(ctx.shape[0], 512 - ctx.shape[1], ctx.shape[2]), ctx], dim=1)
                out["c_crossattn"] = ctx
            return out

    class Lumina2(base_model):
        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            mask = kwargs.get("attention_mask")
            if mask is not None:
                if mask.numel() != mask.sum():
                    out["attention_mask"] = mask
                out["num_tokens"] = max(1, int(mask.sum()))
            if kwargs.get("cross_attn") is not None and "num_tokens" not in out:
                out["num_tokens"] = kwargs["cross_attn"].shape[1]
            return out

    return {"QwenImage": QwenImage, "Flux": Flux, "Flux2": Flux2, "Lumina2": Lumina2}


def flux2_native_forward(model, x, timestep, context, guidance):
    """ComfyUI's native FLUX.2 diffusion model call (model_base.Flux2 with its diffusion model), run by the engine's
    diffusers Flux2Transformer2DModel: x [B, 128, h, w] (model space: the LATENT, its format being the identity),
    timestep = sigma [B], context as Flux2.extra_conds made it, guidance [B]; the velocity in x's layout."""
    b, c, h, w = x.shape
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols, torch.zeros_like(rows)], -1).reshape(1, -1, 4)
    txt_ids = torch.zeros(1, context.shape[1], 4, dtype=torch.long)
    txt_ids[..., 3] = torch.arange(context.shape[1])
    out = model(hidden_states=x.flatten(2).transpose(1, 2), encoder_hidden_states=context, timestep=timestep,
                img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
    return out.transpose(1, 2).reshape(b, c, h, w)


def lumina2_native_forward(model, x, timesteps, context, num_tokens):
    """ComfyUI's native Z-Image diffusion model call (model_base.Lumina2, NextDiT) run by the engine's diffusers
    ZImageTransformer2DModel: x [B, 16, h, w], timesteps = sigma [B], the context's first num_tokens tokens (the
    prompt's real ones, as Lumina2.extra_conds counts them); NextDiT's output (the negated model output)."""
    out = model(list(x.unsqueeze(2).unbind(0)), 1.0 - timesteps, list(context[:, :num_tokens].unbind(0)),
                return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def overlay(mods: dict[str, types.ModuleType], rec) -> None:
    """Replace, in comfy_standins' 0.3.64 modules, what the newer ComfyUI changed (the module docstring)."""
    formats = latent_formats(rec)
    for name in list(vars(mods["comfy.latent_formats"])):
        if isinstance(getattr(mods["comfy.latent_formats"], name), type):
            delattr(mods["comfy.latent_formats"], name)
    vars(mods["comfy.latent_formats"]).update(formats)
    mods["comfy.sample"].fix_empty_latent_channels = fix_empty_latent_channels
    mods["comfy.supported_models"].Flux2 = type("Flux2", (), {"sampling_settings": {"shift": 2.02}})
    base = mods["comfy.model_base"]
    vars(base).update(model_base_classes(base.BaseModel))
    mm = mods["comfy.model_management"]
    mm.InterruptProcessingException = InterruptProcessingException
    rec.interrupt_class = InterruptProcessingException
