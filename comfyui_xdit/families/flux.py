"""Flux.1 (dev, schnell): FluxTransformer2DModel, latents packed 2x2 into 64-wide tokens."""
from __future__ import annotations

import re

import numpy as np
import torch

from ..adapters.base import Conditioning, FamilyAdapter
from ..errors import WeightsError
from .checkpoint import count, head_dim, require, run_converter
from .spec import IMAGE, TEXT, BlockList, ComfySpec, CondSpec, Family, LatentFormat, Variant, from_cp_plan

FLOW_DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)
FLOW_SCHNELL = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C], the token layout Flux expects."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack for a latent of height h and width w."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, row0: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids [(h/2)(w/2), 3] of packed tokens; row0 offsets the rows (for a patch of the image)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(row0, row0 + h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def resolution_shift(image_tokens: int, cfg: dict) -> float:
    """The pipeline's mu: linear in the image token count, from base_shift at base_image_seq_len to max_shift at
    max_image_seq_len."""
    x0, x1 = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    y0, y1 = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (y1 - y0) / (x1 - x0)
    return image_tokens * m + (y0 - m * x0)


def linear_sigmas_with_shift(steps: int, image_tokens: int, cfg: dict) -> dict:
    """FluxPipeline's noise levels: linear sigmas, shifted by the resolution-dependent mu when the scheduler
    shifts dynamically."""
    kwargs = {"sigmas": np.linspace(1.0, 1 / steps, steps)}
    if cfg.get("use_dynamic_shifting"):
        kwargs["mu"] = resolution_shift(image_tokens, cfg)
    return kwargs


class FluxAdapter(FamilyAdapter):
    @property
    def has_guidance(self) -> bool:
        return bool(self.model.config.guidance_embeds)

    def token_plan(self):
        from diffusers import FluxTransformer2DModel

        joint = (TEXT, IMAGE)  # the processors put the text tokens first
        blocks = (("hidden_states", (IMAGE,)), ("encoder_hidden_states", (TEXT,)))
        return from_cp_plan(
            FluxTransformer2DModel._cp_plan,
            streams={"hidden_states": IMAGE, "encoder_hidden_states": TEXT, "img_ids": IMAGE, "txt_ids": TEXT},
            attention={"transformer_blocks.*.attn": joint, "single_transformer_blocks.*.attn": joint},
            blocks=(BlockList("transformer_blocks", blocks, outputs=(1, 0)),
                    BlockList("single_transformer_blocks", blocks, outputs=(1, 0))))

    def predict(self, x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
        b, _, h, w = x.shape
        dtype = self.dtype
        guidance = None
        if self.has_guidance:
            guidance = torch.full((b,), FAMILY.cond.guidance if c.guidance is None else c.guidance,
                                  dtype=torch.float32, device=x.device)
        timestep = t.expand(b).to(device=x.device, dtype=dtype)
        out = self.model(
            hidden_states=pack(x).to(dtype),
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=c.pooled,
            encoder_hidden_states=c.cond,
            txt_ids=torch.zeros(c.cond.shape[1], 3, device=x.device, dtype=dtype),
            img_ids=image_ids(h, w, device=x.device, dtype=dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)


# ------------------------------------------------------------------------------------------------ checkpoints
# Modulation layers shared by all blocks (FLUX.2, BFL and diffusers names): a model with them is not Flux.1, whose
# blocks carry their own modulation, although both name their blocks alike.
_SHARED_MODULATION = ("double_stream_modulation_img.", "double_stream_modulation_txt.", "single_stream_modulation.")


def _detect(keys: set[str]) -> bool:
    if any(k.startswith(_SHARED_MODULATION) for k in keys):
        return False
    if any(k.startswith(("double_blocks.", "single_blocks.", "single_transformer_blocks.")) for k in keys):
        return True
    return {"x_embedder.weight", "context_embedder.weight", "norm_out.linear.weight"} <= keys  # no single blocks


def _is_original(keys: set[str]) -> bool:
    return any(k.startswith(("double_blocks.", "single_blocks.")) for k in keys)


def _convert(sd: dict, name: str) -> tuple[dict, dict]:
    """BFL layout -> diffusers, with diffusers' converter.

    That converter splits each single block's fused `linear1` (q, k, v, mlp) with sizes fixed for the 3072-wide
    published model. So the fused tensors are split here, at the width read from `img_in`, and the converter gets
    shape-only placeholders on the meta device in their place, whose outputs are then replaced.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert

    if "img_in.weight" not in sd:
        raise WeightsError(f"{name}: incomplete Flux checkpoint, missing key 'img_in.weight'")
    hidden = sd["img_in.weight"].shape[0]
    sd = dict(sd)
    split: dict[str, torch.Tensor] = {}
    for key in [k for k in sd if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", k)]:
        i, kind = key.split(".")[1], key.rsplit(".", 1)[1]
        fused = sd[key]
        if fused.shape[0] <= 3 * hidden:
            raise WeightsError(f"{name}: {key} has {fused.shape[0]} rows, expected more than 3 x {hidden}")
        q, k_, v, mlp = torch.split(fused, [hidden, hidden, hidden, fused.shape[0] - 3 * hidden])
        prefix = f"single_transformer_blocks.{i}."
        split.update({f"{prefix}attn.to_q.{kind}": q, f"{prefix}attn.to_k.{kind}": k_,
                      f"{prefix}attn.to_v.{kind}": v, f"{prefix}proj_mlp.{kind}": mlp})
        sd[key] = torch.empty((4 * 3072 + 3 * 3072, *fused.shape[1:]), device="meta", dtype=fused.dtype)
    converted = run_converter(convert, sd, name)
    converted.update({k: v.contiguous() for k, v in split.items()})
    return {k: v.contiguous() for k, v in converted.items()}, {}


def _axes(head: int) -> list[int]:
    """RoPE axes (no weights encode them): the published [16, 56, 56] for head size 128; in general the first (index)
    axis gets min(16, head / 4) and the two spatial axes split the rest, e.g. 64 -> [16, 24, 24], 16 -> [4, 6, 6]."""
    first = min(16, head // 4)
    rest = (head - first) // 2
    return [first, rest, rest] if first + 2 * rest == head else [head - 2 * rest, rest, rest]


def _infer_config(sd: dict, hints: dict) -> dict:
    require(sd, "x_embedder.weight", "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight",
            "proj_out.weight")
    hidden, in_channels = sd["x_embedder.weight"].shape
    norm_key = next((k for k in ("transformer_blocks.0.attn.norm_q.weight",
                                 "single_transformer_blocks.0.attn.norm_q.weight") if k in sd), "")
    head = head_dim(sd, norm_key, hidden, 128)
    out_channels = sd["proj_out.weight"].shape[0]
    return dict(
        patch_size=1, in_channels=in_channels, out_channels=None if out_channels == in_channels else out_channels,
        num_layers=count(sd, "transformer_blocks."), num_single_layers=count(sd, "single_transformer_blocks."),
        attention_head_dim=head, num_attention_heads=hidden // head,
        joint_attention_dim=sd["context_embedder.weight"].shape[1],
        pooled_projection_dim=sd["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in sd,
        axes_dims_rope=_axes(head))


LATENT = LatentFormat(16, scale=0.3611, shift=0.1159)
# ComfyUI's Flux model (comfy/ldm/flux/model.py) replaces its double_blocks[i] and single_blocks[i] by index
SKIP = (("double_block", "transformer_blocks"), ("single_block", "single_transformer_blocks"))
FAMILY = Family(
    name="flux",
    diffusers_class="FluxTransformer2DModel",
    variants=(Variant("flux-dev", "flux-dev.json", FLOW_DEV, ComfySpec("Flux", "FLUX", "Flux", skip_blocks=SKIP)),
              Variant("flux-schnell", "flux-schnell.json", FLOW_SCHNELL,
                      ComfySpec("FluxSchnell", "FLOW", "Flux", skip_blocks=SKIP))),
    latent=LATENT,
    cond=CondSpec(width=4096, pooled=768, guidance=3.5, tokens=512),
    flow=True,
    samplers=("euler", "dpmpp_2m"),
    adapter=f"{__name__}:FluxAdapter",
    tiny={
        "tiny-flux": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                          num_attention_heads=4, joint_attention_dim=4096, pooled_projection_dim=768,
                          guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        # larger, for CPU benchmarks, where compute must dominate communication
        "bench-flux": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=5, attention_head_dim=64,
                           num_attention_heads=16, joint_attention_dim=4096, pooled_projection_dim=768,
                           guidance_embeds=True, axes_dims_rope=(16, 24, 24)),
    },
    detect=_detect,
    is_original=_is_original,
    convert=_convert,
    infer_config=_infer_config,
    variant_of=lambda cfg, pipeline: "flux-dev" if cfg.get("guidance_embeds") else "flux-schnell",
    variant_of_keys=lambda keys: "flux-dev" if any("guidance_in." in k or "guidance_embedder." in k for k in keys)
    else "flux-schnell",
    blocks_of=lambda cfg: cfg.get("num_layers", 0) + cfg.get("num_single_layers", 0),
    set_timesteps=linear_sigmas_with_shift,
    order=10,
)
