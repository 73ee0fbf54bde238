"""PixArt-Sigma / PixArt-alpha: PixArtTransformer2DModel (epsilon prediction, optional learned sigma)."""
from __future__ import annotations

import math
import re

import torch

from ..adapters.base import Conditioning, FamilyAdapter
from ..errors import WeightsError
from .checkpoint import count, few, head_dim, require
from .spec import IMAGE, BlockList, ComfySpec, CondSpec, Family, Gather, LatentFormat, Split, TokenPlan, Variant

PIXART_DPM = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                  lower_order_final=True, timestep_spacing="linspace", steps_offset=0)


class PixArtAdapter(FamilyAdapter):
    def token_plan(self) -> TokenPlan:
        # cross-attention (attn2) needs no change: local image queries attend to the full text on every rank
        return TokenPlan(inputs={}, outputs={"pos_embed": {None: Split(IMAGE)}}, gathers={"proj_out": Gather((IMAGE,))},
                         attention={"transformer_blocks.*.attn1": (IMAGE,)},
                         blocks=(BlockList("transformer_blocks"),))

    def predict(self, x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
        t = t[None] if t.ndim == 0 else t
        out = self.model(
            x.to(self.dtype),
            encoder_hidden_states=c.cond,
            encoder_attention_mask=c.mask,
            timestep=t.expand(x.shape[0]).to(x.device),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        if self.model.config.out_channels // 2 == self.latent_channels:  # learned sigma: keep the epsilon half
            out = out.chunk(2, dim=1)[0]
        return out


def _detect(keys: set[str]) -> bool:
    if any(re.match(r"blocks\.\d+\.cross_attn\.", k) for k in keys):
        return not any(re.match(r"blocks\.\d+\.self_attn\.", k) for k in keys)  # Wan's blocks have both
    return any(k.startswith("adaln_single.") for k in keys) and any(k.startswith("caption_projection.") for k in keys)


# PixArt original -> diffusers names (key facts of both layouts; diffusers ships no single-file converter for it).
_PIXART_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
}
_PIXART_BLOCK = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}


def _convert(sd: dict, name: str) -> tuple[dict, dict]:
    """PixArt-alpha/sigma original layout -> diffusers. Returns (state dict, hints for the config)."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    hints: dict = {}
    pos = sd.pop("pos_embed", None)  # a fixed sin-cos table; diffusers recomputes it from the config
    if pos is not None:
        hints["pos_embed"] = pos
    y_embedding = sd.pop("y_embedder.y_embedding", None)  # learned null caption, unused by diffusers
    if y_embedding is not None:  # its length is the caption token count: 120 for alpha, 300 for sigma
        hints["pipeline"] = {120: "PixArtAlpha", 300: "PixArtSigma"}.get(y_embedding.shape[0], "")
    if "final_layer.scale_shift_table" in sd:
        out["scale_shift_table"] = sd.pop("final_layer.scale_shift_table")
    for key in list(sd):
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if m:
            i, name, kind = m.groups()
            dst = f"transformer_blocks.{i}."
            if name == "attn.qkv":
                for part, t in zip(("to_q", "to_k", "to_v"), sd.pop(key).chunk(3)):
                    out[f"{dst}attn1.{part}.{kind}"] = t
            elif name == "cross_attn.kv_linear":
                for part, t in zip(("to_k", "to_v"), sd.pop(key).chunk(2)):
                    out[f"{dst}attn2.{part}.{kind}"] = t
            elif name in _PIXART_BLOCK:
                out[f"{dst}{_PIXART_BLOCK[name]}.{kind}"] = sd.pop(key)
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.scale_shift_table", key)
        if m:
            out[f"transformer_blocks.{m.group(1)}.scale_shift_table"] = sd.pop(key)
            continue
        stem, _, kind = key.rpartition(".")
        if stem in _PIXART_TOP:
            out[f"{_PIXART_TOP[stem]}.{kind}"] = sd.pop(key)
    if sd:
        raise WeightsError(f"{name}: unexpected keys {few(sd)}")
    return {k: v.contiguous() for k, v in out.items()}, hints


def _infer_config(sd: dict, hints: dict) -> dict:
    require(sd, "pos_embed.proj.weight", "caption_projection.linear_1.weight", "proj_out.weight",
             "transformer_blocks.0.attn2.to_k.weight")
    hidden, in_channels, patch, _ = sd["pos_embed.proj.weight"].shape
    head = head_dim(sd, "transformer_blocks.0.attn1.norm_q.weight", hidden, 72)
    cfg = dict(
        patch_size=patch, in_channels=in_channels, out_channels=sd["proj_out.weight"].shape[0] // patch ** 2,
        num_layers=count(sd, "transformer_blocks."), attention_head_dim=head,
        num_attention_heads=hidden // head,
        cross_attention_dim=sd["transformer_blocks.0.attn2.to_k.weight"].shape[1],
        caption_channels=sd["caption_projection.linear_1.weight"].shape[1],
        use_additional_conditions="adaln_single.emb.resolution_embedder.linear_1.weight" in sd,
        norm_elementwise_affine="transformer_blocks.0.norm1.weight" in sd)
    pos = hints.get("pos_embed")
    if pos is not None:  # the original's fixed table gives the training resolution and its interpolation scale
        grid = math.isqrt(pos.shape[-2])
        cfg["sample_size"] = grid * patch
        cfg["interpolation_scale"] = _interpolation(pos, grid)
    return cfg


def _interpolation(pos: torch.Tensor, grid: int) -> float:
    """Find which interpolation scale produced the checkpoint's sin-cos table (PixArt used 0.5, 1, 2 or 4)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    if pos.device.type == "meta":  # shapes only (the queue-time checks): the scale does not matter there
        return max(grid * 2 // 64, 1)
    table = pos.reshape(-1, pos.shape[-1]).double()
    for scale in (1, 2, 0.5, 4, max(grid * 2 // 64, 1)):
        ref = get_2d_sincos_pos_embed(table.shape[-1], grid, base_size=grid, interpolation_scale=scale,
                                      output_type="pt")
        if ref.shape == table.shape and torch.allclose(ref.double(), table, atol=1e-2):
            return scale
    return max(grid * 2 // 64, 1)  # diffusers' default for a sample size of grid * 2



def _variant_of(cfg: dict, pipeline: str) -> str:
    if "Alpha" in pipeline:
        return "pixart-alpha"
    if "Sigma" in pipeline:
        return "pixart-sigma"
    extra = cfg.get("use_additional_conditions")
    if extra is None:
        extra = cfg.get("sample_size") == 128
    return "pixart-alpha" if extra else "pixart-sigma"


FAMILY = Family(
    name="pixart",
    diffusers_class="PixArtTransformer2DModel",
    other_classes=("Transformer2DModel",),  # PixArt folders saved before diffusers had a dedicated class
    accepts=lambda cfg: cfg.get("_class_name") != "Transformer2DModel" or cfg.get("norm_type") == "ada_norm_single",
    variants=(Variant("pixart-sigma", "pixart-sigma.json", PIXART_DPM, ComfySpec("PixArtSigma", "EPS", "SDXL")),
              Variant("pixart-alpha", "pixart-alpha.json", PIXART_DPM, ComfySpec("PixArtAlpha", "EPS", "SD15"),
                      latent=LatentFormat(4, scale=0.18215))),  # the SD1 VAE
    latent=LatentFormat(4, scale=0.13025),  # the SDXL VAE
    cond=CondSpec(width=4096, mask=True, negative_length_may_differ=True, tokens=300),
    flow=False,
    samplers=("dpmpp_2m", "euler"),
    adapter=f"{__name__}:PixArtAdapter",
    tiny={"tiny-pixart": dict(sample_size=32, num_layers=2, attention_head_dim=16, num_attention_heads=4,
                              in_channels=4, out_channels=8, caption_channels=4096, cross_attention_dim=64,
                              use_additional_conditions=False, norm_type="ada_norm_single",
                              norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1)},
    detect=_detect,
    is_original=lambda keys: any(k.startswith("blocks.") for k in keys),
    convert=_convert,
    infer_config=_infer_config,
    variant_of=_variant_of,
    variant_of_keys=lambda keys: "pixart-alpha" if any(
        k.startswith(("csize_embedder.", "ar_embedder.")) or "resolution_embedder." in k for k in keys)
    else "pixart-sigma",
    context_modules=("caption_projection", "transformer_blocks.*.attn2.to_k", "transformer_blocks.*.attn2.to_v"),
    order=30,
)
