"""Flux.1 (dev, schnell): FluxTransformer2DModel with 2x2 latent packing."""
from __future__ import annotations

import torch

from .base import Conditioning, FamilyAdapter, SequencePlan


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


class FluxAdapter(FamilyAdapter):
    family = "flux"
    latent_channels = 16
    vae_scale = 0.3611
    vae_shift = 0.1159
    pooled_width = 768

    @property
    def has_guidance(self) -> bool:
        return bool(self.model.config.guidance_embeds)

    def sp_plan(self) -> SequencePlan:
        m = self.model
        blocks = list(m.transformer_blocks) + list(m.single_transformer_blocks)
        return SequencePlan(image=m.x_embedder, text=m.context_embedder, rope=m.pos_embed, gather=m.proj_out,
                            attention=[(b.attn, True) for b in blocks],
                            blocks=("transformer_blocks", "single_transformer_blocks"))

    def predict(self, x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
        b, _, h, w = x.shape
        dtype = self.dtype
        guidance = None
        if self.has_guidance:
            guidance = torch.full((b,), 3.5 if c.guidance is None else c.guidance, dtype=torch.float32,
                                  device=x.device)
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
