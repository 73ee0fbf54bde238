"""SD3 / SD3.5 (medium, large): SD3Transformer2DModel (MMDiT)."""
from __future__ import annotations

import math
import re

import torch

from ..adapters.base import Conditioning, FamilyAdapter
from .checkpoint import count, head_dim, require, run_converter
from .spec import (IMAGE, TEXT, BlockList, ComfySpec, CondSpec, Family, LatentFormat, Split, TokenPlan, Gather,
                   Variant)

FLOW_SD3 = dict(num_train_timesteps=1000, shift=3.0)
# ComfyUI's MMDiT (comfy/ldm/modules/diffusionmodules/mmdit.py) replaces its joint_blocks[i] by index
SD3 = ComfySpec("SD3", "FLOW", "SD3", skip_blocks=(("double_block", "transformer_blocks"),))


class SD3Adapter(FamilyAdapter):
    def token_plan(self) -> TokenPlan:
        # The latent is patch-embedded by a convolution, so tokens are split after pos_embed, not at the input.
        return TokenPlan(
            inputs={},
            outputs={"pos_embed": {None: Split(IMAGE)}, "context_embedder": {None: Split(TEXT)}},
            gathers={"proj_out": Gather((IMAGE,))},
            attention={"transformer_blocks.*.attn": (IMAGE, TEXT),   # the processor appends the text tokens
                       "transformer_blocks.*.attn2": (IMAGE,)},      # SD3.5 dual attention: image tokens only
            blocks=(BlockList("transformer_blocks",
                              (("hidden_states", (IMAGE,)), ("encoder_hidden_states", (TEXT,))), outputs=(1, 0)),))

    def predict(self, x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
        return self.model(
            hidden_states=x.to(self.dtype),
            timestep=t.expand(x.shape[0]).to(x.device),
            encoder_hidden_states=c.cond,
            pooled_projections=c.pooled,
            return_dict=False,
        )[0]


def _detect(keys: set[str]) -> bool:
    if any(k.startswith("joint_blocks.") for k in keys):
        return True
    return "pos_embed.proj.weight" in keys and any(re.match(r"transformer_blocks\.\d+\.attn\.add_q_proj\.", k)
                                                   for k in keys)


def _convert(sd: dict, name: str) -> tuple[dict, dict]:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers as convert

    return {k: v.contiguous() for k, v in run_converter(convert, sd, name).items()}, {}


def _lora_layout(shapes: dict) -> tuple:
    """diffusers' MMDiT converter and the original keys it sizes the model by: the blocks (joint_blocks.<i>), the
    dual-attention blocks (attn2), q/k norms (ln_q) and the caption width (context_embedder.weight rows)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers as convert

    layers = count(shapes, "transformer_blocks.")
    sizing = {f"joint_blocks.{i}.x_block.attn.qkv.weight": 0 for i in range(layers)}
    sizing.update({f"joint_blocks.{i}.x_block.attn2.qkv.weight": 0 for i in range(layers)
                   if f"transformer_blocks.{i}.attn2.to_q.weight" in shapes})
    if "transformer_blocks.0.attn.norm_q.weight" in shapes:
        sizing["joint_blocks.0.x_block.attn.ln_q.weight"] = 0
    sizing["context_embedder.weight"] = shapes["context_embedder.weight"][0]
    return convert, sizing


def _infer_config(sd: dict, hints: dict) -> dict:
    require(sd, "pos_embed.proj.weight", "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight",
            "proj_out.weight")
    hidden, in_channels, patch, _ = sd["pos_embed.proj.weight"].shape
    # MMDiT always has 64-wide heads, one per block of depth
    head = head_dim(sd, "transformer_blocks.0.attn.norm_q.weight", hidden, 64, min_heads=1)
    layers = count(sd, "transformer_blocks.")
    cfg = dict(
        patch_size=patch, in_channels=in_channels, out_channels=sd["proj_out.weight"].shape[0] // patch ** 2,
        num_layers=layers, attention_head_dim=head, num_attention_heads=hidden // head,
        joint_attention_dim=sd["context_embedder.weight"].shape[1],
        caption_projection_dim=sd["context_embedder.weight"].shape[0],
        pooled_projection_dim=sd["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        dual_attention_layers=[i for i in range(layers) if f"transformer_blocks.{i}.attn2.to_q.weight" in sd],
        qk_norm=None)
    if "transformer_blocks.0.attn.norm_q.weight" in sd:
        cfg["qk_norm"] = "layer_norm" if "transformer_blocks.0.attn.norm_q.bias" in sd else "rms_norm"
    if "pos_embed.pos_embed" in sd:
        cfg["pos_embed_max_size"] = math.isqrt(sd["pos_embed.pos_embed"].shape[1])
    return cfg


def _variant_of(cfg: dict, pipeline: str) -> str:
    if cfg.get("dual_attention_layers"):
        return "sd3.5-medium"
    return "sd3.5-large" if cfg.get("qk_norm") else "sd3-medium"


FAMILY = Family(
    name="sd3",
    diffusers_class="SD3Transformer2DModel",
    variants=(Variant("sd3-medium", "sd3-medium.json", FLOW_SD3, SD3),
              Variant("sd3.5-medium", "sd3.5-medium.json", FLOW_SD3, SD3),
              Variant("sd3.5-large", "sd3.5-large.json", FLOW_SD3, SD3)),
    latent=LatentFormat(16, scale=1.5305, shift=0.0609),
    # a negative of another token count (a prompt past 77 CLIP/T5 tokens): ComfyUI's SD3 takes the text as a
    # CONDRegular, so such a pair runs as two forwards, never batched or padded; each branch runs alone here too
    cond=CondSpec(width=4096, pooled=2048, tokens=154, negative_length_may_differ=True),
    flow=True,
    samplers=("euler", "dpmpp_2m"),
    adapter=f"{__name__}:SD3Adapter",
    tiny={"tiny-sd3": dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                           num_attention_heads=4, joint_attention_dim=4096, caption_projection_dim=64,
                           pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=96, qk_norm="rms_norm",
                           dual_attention_layers=(0,))},
    detect=_detect,
    is_original=lambda keys: any(k.startswith("joint_blocks.") for k in keys),
    convert=_convert,
    lora_layout=_lora_layout,
    infer_config=_infer_config,
    variant_of=_variant_of,
    max_side_of=lambda cfg: cfg["pos_embed_max_size"] * cfg.get("patch_size", 2) * 8,
    order=20,
)
