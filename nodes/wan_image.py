"""Wan image-to-video CONDITIONING -> the pool's image inputs (`image_cond`, `image_embeds`).

ComfyUI's WanImageToVideo (and WanFirstLastFrameToVideo, WanFunInpaintToVideo, which set the same keys) puts on both
CONDITIONINGs `concat_latent_image` (the VAE latent of the given frames and grey padding, raw VAE space) and
`concat_mask` ([1, 1, T, h, w], 0 on the given latent frames); CLIP Vision Encode adds `clip_vision_output`.
ComfyUI's WAN21 model (comfy.model_base.WAN21.concat_cond) makes of them the channels it reads after the noisy
latent: 4 mask channels (1 - the mask's channel mean, padded with 0 to the latent's frames), then the latent format's
process_in of the image latent; zeros without an image latent. The CLIP output goes in as its penultimate hidden
states, read only by a model with an image embedding (Wan 2.1 I2V; Wan 2.2 I2V A14B has none and ComfyUI ignores
it there). The engine takes one set for both CFG branches, so sides that differ are refused.
Spatial resizing (ComfyUI's bilinear upscale of an image latent of another size) is not done: refused.
"""
from __future__ import annotations

from typing import Any

import torch

from .convert import ConversionError, entry_extras

MASK_CHANNELS = 4  # Wan I2V reads the mask as 4 channels


def image_inputs(positive: Any, negative: Any, use_cfg: bool, samples: torch.Tensor, in_channels: int,
                 image_dim: int | None, latent_format: Any) -> dict[str, torch.Tensor]:
    """`image_cond` [B, in_channels - C, T, h, w] (and `image_embeds` [B, N, image_dim] for a model with a CLIP
    embedding) from the conditioning, as ComfyUI's WAN21 model builds them for latents `samples` [B, C, T, h, w]."""
    sides = [("positive", positive)] + ([("negative", negative)] if use_cfg else [])
    built = [(which, _side(entry_extras(cond, which), samples, in_channels, image_dim, latent_format, which))
             for which, cond in sides]
    out = built[0][1]
    for which, other in built[1:]:
        for key, value in out.items():
            if value.shape != other[key].shape or not torch.equal(value, other[key]):
                raise ConversionError(f"positive and negative carry different image conditioning ({key}); "
                                      "Parallel Sampler takes one for both: feed both through the same "
                                      "WanImageToVideo")
    return out


def _side(extras: dict, samples: torch.Tensor, in_channels: int, image_dim: int | None, latent_format: Any,
          which: str) -> dict[str, torch.Tensor]:
    out = {}
    extra = in_channels - samples.shape[1]
    if extra > 0:
        out["image_cond"] = concat_channels(extras.get("concat_latent_image"), extras.get("concat_mask"), samples,
                                            extra, latent_format, which)
    if image_dim:
        clip = extras.get("clip_vision_output")
        if clip is None:
            raise ConversionError(f"{which} conditioning has no clip_vision_output; this Wan 2.1 image-to-video "
                                  "model needs the image's CLIP vision embedding (CLIP Vision Encode into "
                                  "WanImageToVideo's clip_vision_output)")
        states = getattr(clip, "penultimate_hidden_states", None)
        if not isinstance(states, torch.Tensor) or states.ndim != 3 or states.shape[-1] != image_dim:
            got = list(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise ConversionError(f"{which} clip_vision_output's penultimate hidden states are {got}, expected "
                                  f"[batch, tokens, {image_dim}] (CLIP ViT-H)")
        states = _to_batch(states.detach().to("cpu", torch.float32), samples.shape[0], "clip_vision_output", which)
        out["image_embeds"] = states.contiguous()
    return out


def concat_channels(image: torch.Tensor | None, mask: torch.Tensor | None, samples: torch.Tensor, extra: int,
                    latent_format: Any, which: str = "positive") -> torch.Tensor:
    """The `extra` channels ComfyUI's WAN21.concat_cond puts after the noisy latent `samples` [B, C, T, h, w]:
    [mask (4), process_in(image)] for an image latent, zeros without one."""
    b, c, t, h, w = samples.shape
    if image is None:  # ComfyUI: zeros (the mask is not read then)
        return samples.new_zeros((b, extra, t, h, w))
    if not isinstance(image, torch.Tensor) or image.ndim != 5:
        raise ConversionError(f"{which} concat_latent_image is not a video latent [batch, channels, frames, h, w]")
    if image.shape[1] + MASK_CHANNELS != extra:
        raise ConversionError(f"{which} concat_latent_image has {image.shape[1]} channels; this model reads "
                              f"{extra} channels after the latent ({MASK_CHANNELS} mask + {extra - MASK_CHANNELS})")
    if tuple(image.shape[2:]) != (t, h, w):
        raise ConversionError(f"{which} concat_latent_image is {list(image.shape[2:])} (frames, h, w) but the "
                              f"latent is {[t, h, w]}: take the latent from the same WanImageToVideo")
    image = _to_batch(image.detach().to("cpu", torch.float32), b, "concat_latent_image", which).clone()
    step = int(getattr(latent_format, "latent_channels", c) or c)
    for i in range(0, image.shape[1], step):
        image[:, i:i + step] = latent_format.process_in(image[:, i:i + step])
    if mask is None:
        mask = samples.new_zeros((b, MASK_CHANNELS, t, h, w))
    else:
        mask = mask.detach().to("cpu", torch.float32)
        if mask.ndim != 5 or tuple(mask.shape[-2:]) != (h, w) or mask.shape[2] > t:
            raise ConversionError(f"{which} concat_mask has shape {list(mask.shape)}, expected [batch, 1 or "
                                  f"{MASK_CHANNELS}, <= {t}, {h}, {w}]")
        if mask.shape[1] != MASK_CHANNELS:
            mask = mask.mean(dim=1, keepdim=True)
        mask = 1.0 - mask
        if mask.shape[2] < t:
            mask = torch.nn.functional.pad(mask, (0, 0, 0, 0, 0, t - mask.shape[2]), value=0.0)
        if mask.shape[1] == 1:
            mask = mask.repeat(1, MASK_CHANNELS, 1, 1, 1)
        mask = _to_batch(mask, b, "concat_mask", which)
    return torch.cat([mask, image], dim=1).contiguous()


def _to_batch(t: torch.Tensor, batch: int, name: str, which: str) -> torch.Tensor:
    """ComfyUI's resize_to_batch_size for the cases it is exact in: the batch, or one repeated."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ConversionError(f"{which} {name} has batch {t.shape[0]}, the latent {batch}")
