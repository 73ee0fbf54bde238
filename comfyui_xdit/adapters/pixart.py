"""PixArt-Sigma / PixArt-alpha: PixArtTransformer2DModel (epsilon prediction, optional learned sigma)."""
from __future__ import annotations

import torch

from .base import Conditioning, FamilyAdapter, SequencePlan


class PixArtAdapter(FamilyAdapter):
    family = "pixart"
    latent_channels = 4
    vae_scale = 0.13025  # SDXL VAE (Sigma); alpha uses the SD1 VAE
    vae_shift = 0.0
    uses_mask = True

    def __init__(self, model: torch.nn.Module, variant: str = ""):
        super().__init__(model, variant)
        if variant == "pixart-alpha":
            self.vae_scale = 0.18215

    def sp_plan(self) -> SequencePlan:
        # cross-attention (attn2) needs no change: local image queries attend to the full text on every rank
        m = self.model
        return SequencePlan(image=m.pos_embed, gather=m.proj_out,
                            attention=[(b.attn1, False) for b in m.transformer_blocks])

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
