"""SD3 / SD3.5: SD3Transformer2DModel."""
from __future__ import annotations

import torch

from .base import Conditioning, FamilyAdapter, SequencePlan


class SD3Adapter(FamilyAdapter):
    family = "sd3"
    latent_channels = 16
    vae_scale = 1.5305
    vae_shift = 0.0609
    pooled_width = 2048

    def check_size(self, height: int, width: int) -> None:
        super().check_size(height, width)
        limit = self.model.config.pos_embed_max_size * self.patch * 8
        if max(height, width) > limit:
            from ..errors import XDiTError

            raise XDiTError(f"{height}x{width} is larger than this SD3 model's position table allows ({limit} px)")

    def sp_plan(self) -> SequencePlan:
        m = self.model
        attention = []
        for b in m.transformer_blocks:
            attention.append((b.attn, True))
            if getattr(b, "attn2", None) is not None:  # SD3.5 dual attention: image tokens only
                attention.append((b.attn2, False))
        return SequencePlan(image=m.pos_embed, text=m.context_embedder, gather=m.proj_out, attention=attention,
                            text_first=False)

    def predict(self, x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
        return self.model(
            hidden_states=x.to(self.dtype),
            timestep=t.expand(x.shape[0]).to(x.device),
            encoder_hidden_states=c.cond,
            pooled_projections=c.pooled,
            return_dict=False,
        )[0]
