"""Conversions between ComfyUI's types and the pool's request: CONDITIONING -> text tensors, LATENT -> latent and
noise, ComfyUI scheduler -> explicit sigmas, pool result -> LATENT. ComfyUI modules are imported inside the
functions that use ComfyUI's own code, so the pure parts import and test without ComfyUI."""
from __future__ import annotations

import math
from typing import Any

import torch

from .families import (applies_text_mask, comfy_latent_format, cond_spec, native, native_conds, reference_method_error,
                       spec)

SUPPORTED_EXTRAS = ("pooled_output", "guidance", "attention_mask")
# What TextEncodeQwenImageEdit(Plus) attach (Qwen-Image-Edit's reference images' latents); taken by qwen-image
REFERENCE_EXTRAS = ("reference_latents", "reference_latents_method")
REFERENCE_NAMES = ("reference_latent", "reference_latent_2", "reference_latent_3")  # the engine's inputs
# What WanImageToVideo / WanFirstLastFrameToVideo / CLIPVisionEncode attach for Wan's image-to-video models
IMAGE_EXTRAS = ("concat_latent_image", "concat_mask", "clip_vision_output")
# What the newer ComfyUI's empty latent nodes put in a LATENT beside "samples" (the pixel/latent ratios its
# fix_empty_latent_channels reads); KSampler drops them from the latent it returns.
EMPTY_LATENT_KEYS = ("downscale_ratio_spacial", "downscale_ratio_temporal")
# Extras ComfyUI attaches with a value that changes nothing; any other value is rejected.
NEUTRAL_EXTRAS = {"start_percent": 0.0, "end_percent": 1.0, "strength": 1.0}


class ConversionError(ValueError):
    """An input the parallel sampler cannot take; the message says which and why."""


def _one_entry(conditioning: Any, which: str, image_input: bool = False, references: bool = False
               ) -> tuple[torch.Tensor, dict]:
    """The one [cond, extras] entry of a CONDITIONING, its extras checked; image-to-video extras are taken only by
    a model with image input channels (nodes/wan_image.py reads them)."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ConversionError(f"{which} conditioning is empty or not a CONDITIONING list")
    if len(conditioning) > 1:
        raise ConversionError(f"{which} conditioning has {len(conditioning)} entries (combined or concatenated "
                              "conditionings); Parallel Sampler takes one text conditioning per side")
    entry = conditioning[0]
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], torch.Tensor):
        raise ConversionError(f"{which} conditioning entry is not [tensor, dict]")
    cond, extras = entry
    extras = dict(extras or {})
    image = sorted(k for k in IMAGE_EXTRAS if extras.get(k) is not None)
    if image and not image_input:
        raise ConversionError(f"{which} conditioning carries image conditioning ({', '.join(image)}, from "
                              "WanImageToVideo or CLIP Vision Encode), but this is a text-to-video model (no image "
                              "input channels): load a Wan image-to-video checkpoint, or leave the image out")
    bad = []
    for key, value in extras.items():
        if key in SUPPORTED_EXTRAS or value is None or (image_input and key in IMAGE_EXTRAS):
            continue
        if key in REFERENCE_EXTRAS and references:
            continue
        if key in NEUTRAL_EXTRAS and _is_number(value) and float(value) == NEUTRAL_EXTRAS[key]:
            continue
        bad.append(key)
    if bad:
        raise ConversionError(f"{which} conditioning uses {', '.join(sorted(bad))}, which Parallel Sampler does not "
                              "support (area, mask, ControlNet, hooks and timestep ranges are not implemented); "
                              "use plain text conditioning or the native KSampler")
    if cond.ndim != 3:
        raise ConversionError(f"{which} conditioning has shape {list(cond.shape)}, expected [batch, tokens, dim]")
    return cond, extras


def entry_extras(conditioning: Any, which: str) -> dict:
    """The extras dict of a CONDITIONING's one entry (checked by conditioning_tensors)."""
    return _one_entry(conditioning, which, image_input=True)[1]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def conditioning_tensors(positive: Any, negative: Any, family: str, use_cfg: bool, variant: str | None = None,
                         image_input: bool = False, use_native: bool = False
                         ) -> tuple[dict[str, torch.Tensor], float | None]:
    """Pool input tensors (cond, pooled, cond_mask and their neg_ twins) and distilled guidance, as the family's
    conditioning declares them (comfyui_xdit.families: CondSpec).

    The negative is read only when classifier-free guidance is on (cfg != 1), as ComfyUI does. An attention_mask
    is dropped where the running ComfyUI's model of the variant ignores it (so the pool samples what KSampler
    samples: nodes.families.applies_text_mask).
    image_input: the model reads image conditioning (Wan I2V), whose extras nodes/wan_image.py turns into tensors;
    refused otherwise.
    use_native: the job samples the running ComfyUI's own model of the variant (a native LATENT): the text and the
    distilled guidance become what that ComfyUI's model class makes of them (nodes.families.native_conds: FLUX.2's
    context padded to its 512 tokens, Flux's default guidance), so the pool samples what its KSampler samples."""
    want = cond_spec(family)
    keep_mask = want.mask and (variant is None or applies_text_mask(variant))
    tensors: dict[str, torch.Tensor] = {}
    guidance = None
    sides = [("", positive, "positive")] + ([("neg_", negative, "negative")] if use_cfg else [])
    references = family == "qwen-image"
    refs: dict[str, list[torch.Tensor]] = {}
    for prefix, conditioning, which in sides:
        cond, extras = _one_entry(conditioning, which, image_input, references)
        if references:
            refs[which] = reference_latents(extras, which, variant)
        g = extras.get("guidance")
        made = native_conds(variant, cond, extras) if use_native and variant is not None else None
        if made is not None:
            cond, g = made.get("c_crossattn", cond), made.get("guidance", g)
        tensors[prefix + "cond"] = cond.detach().to("cpu", torch.float32).contiguous()
        pooled = extras.get("pooled_output")
        if want.pooled is not None:
            if pooled is None:
                raise ConversionError(f"{which} conditioning has no pooled_output; {family} needs the CLIP pooled "
                                      "vector (encode with CLIPTextEncode from DualCLIPLoader/TripleCLIPLoader)")
            tensors[prefix + "pooled"] = pooled.detach().to("cpu", torch.float32).reshape(pooled.shape[0], -1)
        mask = extras.get("attention_mask")
        if keep_mask and mask is not None:
            tensors[prefix + "cond_mask"] = mask.detach().to("cpu").reshape(mask.shape[0], -1).to(torch.int64)
        if prefix == "" and want.guidance is not None:
            guidance = want.guidance if g is None else float(torch.as_tensor(g).reshape(-1)[0])
    if references and refs.get("positive"):
        pos, neg = refs["positive"], refs.get("negative")
        if neg is not None and (len(neg) != len(pos) or any(a.shape != b.shape or not torch.equal(a, b)
                                                            for a, b in zip(pos, neg))):
            raise ConversionError("the negative conditioning's reference_latents differ from the positive's: "
                                  "Parallel Sampler takes the same reference images for both (encode the negative "
                                  "with TextEncodeQwenImageEdit(Plus) and the same images)")
        for name, lat in zip(REFERENCE_NAMES, pos):
            tensors[name] = lat
    elif references and refs.get("negative"):
        raise ConversionError("the negative conditioning has reference_latents and the positive none")
    return tensors, guidance


def reference_latents(extras: dict, which: str, variant: str | None = None) -> list[torch.Tensor]:
    """A conditioning's reference_latents (TextEncodeQwenImageEdit(Plus): [1, 16, 1, h, w] each), each padded to
    even h and w as ComfyUI's Qwen-Image model pads them (circular), checked; its reference_latents_method must be
    the one the loaded variant runs (nodes.families.reference_method_error)."""
    why = reference_method_error(extras.get("reference_latents_method"), variant or "qwen-image-edit-2509")
    if why:
        raise ConversionError(f"{which} conditioning: {why}")
    refs = list(extras.get("reference_latents") or [])
    if len(refs) > len(REFERENCE_NAMES):
        raise ConversionError(f"{which} conditioning has {len(refs)} reference_latents: at most "
                              f"{len(REFERENCE_NAMES)} are taken")
    out = []
    for r in refs:
        if (not isinstance(r, torch.Tensor) or r.ndim not in (4, 5) or r.shape[1] != 16
                or (r.ndim == 5 and r.shape[2] != 1)):
            raise ConversionError(f"{which} conditioning has a reference latent of shape "
                                  f"{list(getattr(r, 'shape', []))}, expected [1, 16, 1, h, w]")
        r = r.detach().to("cpu", torch.float32)
        r = r[:, :, 0] if r.ndim == 5 else r
        pad = (0, r.shape[-1] % 2, 0, r.shape[-2] % 2)
        if any(pad):
            r = torch.nn.functional.pad(r, pad, mode="circular")
        out.append(r.contiguous())
    return out


def latent_input(latent: Any, variant: str) -> dict:
    """Checks a LATENT for this model; returns {"samples", "batch_index"} with an all-zero latent of the wrong
    channel count (EmptyLatentImage's 4 channels) widened to the model's, as ComfyUI does."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise ConversionError("latent_image is not a LATENT (a dict with 'samples')")
    mask = latent.get("noise_mask")
    if mask is not None and variant not in GIVEN_FRAMES:
        raise ConversionError("latent_image has a noise_mask (inpainting), which Parallel Sampler does not support")
    samples = latent["samples"]
    s = spec(variant)
    n = native_input(samples, variant)
    if samples.ndim in (4, 5):  # an empty latent made the model's as KSampler makes it, before any shape check
        samples = fix_empty_latent(samples, variant, latent)
    if n is not None:  # the running ComfyUI's own layout of the variant: checked there, sampled in the engine's
        want = s.channels * n.patch ** 2
        if samples.ndim != 4 or samples.shape[1] != want:
            raise ConversionError(f"latent_image has shape {list(samples.shape)}, expected ComfyUI's {variant} "
                                  f"latent [batch, {want}, h, w] (its empty latent node or its VAE's encode)")
        samples = samples.detach().to("cpu", torch.float32).contiguous()
        return {"samples": native_to_engine(samples, variant), "batch_index": latent.get("batch_index"),
                "given_frames": 0, "native": True, "comfy_samples": samples}
    if s.dims == 3:  # video: [B, C, T, h, w]; an image latent is one frame, as ComfyUI takes it
        if samples.ndim == 4:
            samples = samples.unsqueeze(2)
        if samples.ndim != 5:
            raise ConversionError(f"latent_image has shape {list(samples.shape)}, expected a video latent "
                                  "[batch, channels, frames, h, w] (EmptyHunyuanLatentVideo, Wan22ImageToVideoLatent)")
    elif s.frame_axis and samples.ndim == 5 and samples.shape[2] == 1:  # one frame of a video VAE's latent
        samples = samples[:, :, 0]
    if samples.ndim != (5 if s.dims == 3 else 4):
        expected = "[batch, channels, 1, h, w] or [batch, channels, h, w]" if s.frame_axis else \
            "[batch, channels, h, w]"
        raise ConversionError(f"latent_image has shape {list(samples.shape)}, expected {expected}")
    if samples.shape[1] != s.channels:
        raise ConversionError(f"latent_image has {samples.shape[1]} channels but {variant} uses {s.channels}; "
                              "encode the image with this model's VAE")
    return {"samples": samples.detach().to("cpu", torch.float32).contiguous(),
            "batch_index": latent.get("batch_index"),
            "given_frames": 0 if mask is None else given_frames(mask, samples.shape), "native": False}


def native_input(samples: Any, variant: str):
    """The variant's native model on the running ComfyUI (nodes.families.native) when this LATENT's samples are in
    its layout: an empty latent (what KSampler makes of it for that model: its own channels and size) or one with
    that model's channels; None otherwise (ComfyUI 0.3.64, or the pack's own layout, e.g. FLUX.2's 32 channels at
    1/8, sampled as before)."""
    n = native(variant)
    if n is None or not isinstance(samples, torch.Tensor) or samples.ndim not in (4, 5):
        return None
    if samples.shape[1] == spec(variant).channels * n.patch ** 2 or torch.count_nonzero(samples) == 0:
        return n
    return None


def unfold(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C p^2, h, w] -> [B, C, h p, w p]: channel c p^2 + p dy + dx goes to pixel (p i + dy, p j + dx) of channel
    c (the FLUX.2 VAE's 2x2 packing; ComfyUI's Flux2 preview reshape reads its 128 channels the same way)."""
    if p == 1:
        return x
    b, cp, h, w = x.shape
    return x.reshape(b, cp // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, cp // (p * p), h * p, w * p)


def fold(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of unfold: [B, C, h p, w p] -> [B, C p^2, h, w]."""
    if p == 1:
        return x
    b, c, hp, wp = x.shape
    return x.reshape(b, c, hp // p, p, wp // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, hp // p, wp // p)


def native_to_engine(samples: torch.Tensor, variant: str) -> torch.Tensor:
    """A LATENT in the running ComfyUI's own layout of the variant -> the engine's latent: ComfyUI's latent format
    applied as its model applies it (process_in: FLUX.2's has no scale or shift), then unfolded. Exact."""
    n = native(variant)
    return unfold(comfy_latent_format(variant, use_native=True).process_in(samples), n.patch).contiguous()


def engine_to_native(samples: torch.Tensor, variant: str) -> torch.Tensor:
    """The inverse of native_to_engine: what that ComfyUI's VAE decodes (its latent format's process_out)."""
    n = native(variant)
    return comfy_latent_format(variant, use_native=True).process_out(fold(samples, n.patch)).contiguous()


def engine_noise_for(lat: dict, seed: int, variant: str) -> torch.Tensor:
    """The initial noise ComfyUI's KSampler draws for this LATENT and seed, in the engine's layout: for a native
    LATENT drawn in ComfyUI's layout (its model's shape) and unfolded (noise is model-space: no latent format)."""
    if lat.get("native"):
        return unfold(noise_for(lat["comfy_samples"], seed, lat["batch_index"]), native(variant).patch).contiguous()
    return noise_for(lat["samples"], seed, lat["batch_index"])


GIVEN_FRAMES = ("wan2.2-ti2v-5b",)  # variants that take given first frames (Wan22ImageToVideoLatent's start image)


def given_frames(mask: torch.Tensor, shape: torch.Size) -> int:
    """The number n of leading latent frames a noise_mask keeps (0 on them, 1 on every later one), as
    Wan22ImageToVideoLatent makes it for a start image; any other mask is refused in one line."""
    m = mask.detach().to("cpu", torch.float32)
    if m.ndim == 4:
        m = m.unsqueeze(1)
    frames = shape[2]
    if m.ndim != 5 or m.shape[2] != frames:
        raise ConversionError(f"latent_image's noise_mask has shape {list(mask.shape)}: expected one value per "
                              f"latent frame ({frames}), as Wan22ImageToVideoLatent makes it")
    per = m.transpose(0, 2).reshape(frames, -1)
    n = int((per == 0).all(dim=1).long().cumprod(0).sum())
    if n == 0 or not bool((per[n:] == 1).all()):
        raise ConversionError("latent_image's noise_mask is not a start image's (0 on the first latent frames, 1 on "
                              "the rest): Parallel Sampler takes only Wan22ImageToVideoLatent's start_image")
    return n


def fix_empty_latent(samples: torch.Tensor, variant: str, latent: dict | None = None) -> torch.Tensor:
    """What KSampler makes of a LATENT's samples for a model of this variant (ComfyUI's
    comfy.sample.fix_empty_latent_channels): an all-zero latent (an empty latent node's) gets the model's channels,
    and whatever else the running ComfyUI does to one; a video format's frame axis is added to a 4-D latent. It is
    run with ComfyUI's own latent format object of the variant (nodes.families.comfy_latent_format), and given the
    LATENT's pixel/latent ratios where that ComfyUI's function takes them (the newer one's downscale_ratio_spacial /
    _temporal, from its empty latent nodes: an empty latent of another VAE's size is resized to the model's).
    Without ComfyUI: the channels and the frame axis, by the same rule."""
    try:
        import comfy.sample
    except ImportError:
        s = spec(variant)
        if samples.shape[1] != s.channels and torch.count_nonzero(samples) == 0:
            samples = samples.new_zeros((samples.shape[0], s.channels, *samples.shape[2:]))
        return samples.unsqueeze(2) if (s.dims == 3 or s.frame_axis) and samples.ndim == 4 else samples
    # the running ComfyUI's own model of the variant where this LATENT is in its layout (an empty latent always is)
    fmt = comfy_latent_format(variant, use_native=native_input(samples, variant) is not None)

    class _Model:  # the one method fix_empty_latent_channels asks of a model
        @staticmethod
        def get_model_object(name):
            if name != "latent_format":
                raise AttributeError(f"the latent stand-in model has no {name!r}")
            return fmt

    fix = comfy.sample.fix_empty_latent_channels
    ratios = [(latent or {}).get(k) for k in EMPTY_LATENT_KEYS[:_ratio_parameters(fix)]]
    while ratios and ratios[-1] is None:
        ratios.pop()
    return fix(_Model(), samples, *ratios)


def _ratio_parameters(fn) -> int:
    """How many of the LATENT's ratios (EMPTY_LATENT_KEYS, in order) the running ComfyUI's
    fix_empty_latent_channels takes after (model, latent_image): 0 on ComfyUI 0.3.64."""
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())[2:]
    except (TypeError, ValueError):
        return 0
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return len(EMPTY_LATENT_KEYS)
    n = 0
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or n == len(EMPTY_LATENT_KEYS):
            break
        n += 1
    return n


def noise_for(samples: torch.Tensor, seed: int, batch_index: Any = None) -> torch.Tensor:
    """The initial noise ComfyUI's KSampler would draw for this latent and seed."""
    import comfy.sample

    return comfy.sample.prepare_noise(samples, seed, batch_index).to(torch.float32)


def engine_noise(noise: torch.Tensor, sigmas: torch.Tensor, variant: str, model_sampling: Any) -> torch.Tensor:
    """Noise to send so the pool starts where ComfyUI's KSampler starts. The pool noises the given latent as
    latent + sigma * noise (epsilon models); ComfyUI uses sqrt(1 + sigma^2) instead of sigma when sampling starts at
    the model's largest sigma. Flow models (x = (1 - sigma) latent + sigma noise) need nothing."""
    if spec(variant).model_type != "EPS" or len(sigmas) == 0:
        return noise
    s0, smax = float(sigmas[0]), float(model_sampling.sigma_max)
    if s0 > 0 and (math.isclose(smax, s0, rel_tol=1e-5) or s0 > smax):
        return noise * (math.sqrt(1.0 + s0 * s0) / s0)
    return noise


DISCARD_PENULTIMATE = ("dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2")


def sigmas_for(variant: str, sampler: str, scheduler: str, steps: int, denoise: float,
               model_sampling: Any = None) -> torch.Tensor:
    """Noise levels as ComfyUI's KSampler computes them for a model of this variant (including denoise < 1)."""
    import comfy.samplers

    if model_sampling is None:
        from .families import comfy_objects

        model_sampling = comfy_objects(variant)[0]

    def calc(n: int) -> torch.Tensor:
        discard = sampler in DISCARD_PENULTIMATE
        s = comfy.samplers.calculate_sigmas(model_sampling, scheduler, n + 1 if discard else n)
        return torch.cat([s[:-2], s[-1:]]) if discard else s

    if denoise > 0.9999:
        sigmas = calc(steps)
    else:
        sigmas = calc(int(steps / denoise))[-(steps + 1):]
    return sigmas.detach().to("cpu", torch.float32)


def step_range(sigmas: torch.Tensor, start_step: int | None, last_step: int | None,
               force_full_denoise: bool) -> torch.Tensor:
    """KSamplerAdvanced's cut of a schedule (comfy.samplers.KSampler.sample): the levels up to last_step, the last
    set to 0 when force_full_denoise and the cut ends early, then from start_step on. The caller has checked that
    start_step leaves a step to run (ComfyUI returns the latent unchanged otherwise)."""
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            raise ValueError(f"start step {start_step} leaves no step of {len(sigmas) - 1} to run")
        sigmas = sigmas[start_step:]
    return sigmas


def unchanged_latent(latent: Any, variant: str) -> Any:
    """What KSamplerAdvanced returns when it has no step to run: the input LATENT as ComfyUI's
    fix_empty_latent_channels leaves it (ComfyUI fixes the latent before it looks at the steps: an empty latent
    widened, a video format's frame axis added), without the empty latent's ratio entries."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        return latent
    samples = latent["samples"]
    out = {k: v for k, v in latent.items() if k not in EMPTY_LATENT_KEYS}
    if samples.ndim in (4, 5):
        out["samples"] = fix_empty_latent(samples, variant, latent)
    return out


def request_fields(samples: torch.Tensor, steps: int, seed: int, cfg: float, guidance: float | None,
                   sampler: str, variant: str | None = None) -> dict[str, Any]:
    """The JSON part of a pool sample request for a latent of this shape ([B, C, h, w], or a video model's
    [B, C, T, h, w]: its pixel frames k (T - 1) + 1 go as `frames`)."""
    s = spec(variant) if variant is not None else None
    down = s.downscale if s is not None else 8
    fields: dict[str, Any] = {"height": int(samples.shape[-2]) * down, "width": int(samples.shape[-1]) * down,
                              "steps": int(steps), "seed": int(seed) % (1 << 63), "batch_size": int(samples.shape[0]),
                              "cfg": float(cfg), "sampler": sampler, "denoise": 1.0}
    if samples.ndim == 5 and s is not None and s.time_downscale:
        fields["frames"] = s.time_downscale * (int(samples.shape[2]) - 1) + 1
    if guidance is not None:
        fields["guidance"] = float(guidance)
    return fields


def comfy_layout(samples: torch.Tensor, variant: str) -> torch.Tensor:
    """[B, C, H, W] latents (the pool's) in ComfyUI's layout for the variant: with its frame axis where ComfyUI's
    latent format has one ([B, C, 1, H, W], as KSampler returns them)."""
    return samples.unsqueeze(2) if spec(variant).frame_axis and samples.ndim == 4 else samples


def output_latent(latent: dict, samples: torch.Tensor, variant: str | None = None, use_native: bool = False) -> dict:
    """The LATENT to return: the input's entries (batch_index...) with the sampled latents (in the variant's
    layout when given; use_native: in the running ComfyUI's own layout of it, as the input was)."""
    out = {k: v for k, v in latent.items() if k != "noise_mask" and k not in EMPTY_LATENT_KEYS}
    if use_native:
        out["samples"] = engine_to_native(samples.to(torch.float32), variant)
        return out
    out["samples"] = (samples if variant is None else comfy_layout(samples, variant)).to(torch.float32)
    return out
