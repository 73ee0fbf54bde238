"""Built-in tiny models: real diffusers classes at small sizes with deterministic random weights.

They exist for tests, the demo and CI: a 256x256, 8-step run takes seconds on one CPU core.
"""
from __future__ import annotations

import math

import torch

from .errors import XDiTError

# family, diffusers class name, constructor kwargs
TINY_MODELS: dict[str, tuple[str, str, dict]] = {
    "tiny-flux": ("flux", "FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))),
    "tiny-sd3": ("sd3", "SD3Transformer2DModel", dict(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=4096, caption_projection_dim=64, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=96, qk_norm="rms_norm", dual_attention_layers=(0,))),
    "tiny-pixart": ("pixart", "PixArtTransformer2DModel", dict(
        sample_size=32, num_layers=2, attention_head_dim=16, num_attention_heads=4, in_channels=4, out_channels=8,
        caption_channels=4096, cross_attention_dim=64, use_additional_conditions=False, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1)),
    # Larger built-in models for CPU benchmarks, where compute must dominate communication.
    "bench-flux": ("flux", "FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=5, attention_head_dim=64,
        num_attention_heads=16, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 24, 24))),
}
TINY_TEXT_TOKENS = 16
_WEIGHT_SEED = 20241122


def is_tiny(name: str) -> bool:
    return name in TINY_MODELS


def build_tiny(name: str, dtype: torch.dtype = torch.float32, **overrides) -> tuple[str, torch.nn.Module]:
    """Return (family, model) for a built-in tiny model; `overrides` change constructor kwargs (e.g. depth)."""
    if name not in TINY_MODELS:
        raise XDiTError(f"unknown model {name!r}: expected one of {', '.join(TINY_MODELS)} or a path")
    family, cls_name, kwargs = TINY_MODELS[name]
    import diffusers

    model = getattr(diffusers, cls_name)(**{**kwargs, **overrides})
    fill_deterministic(model, _WEIGHT_SEED)
    if dtype != torch.float32:
        model = model.to(dtype)
    return family, model.eval().requires_grad_(False)


@torch.no_grad()
def fill_deterministic(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with values from a seeded generator (independent of torch's init code).

    Matrices get N(0, 1/fan_in), vectors (biases, norms) small values around their init, so activations stay O(1).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        values = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            p.copy_(values / math.sqrt(fan_in))
        elif name.endswith("weight"):  # norm scales
            p.copy_(1.0 + 0.1 * values)
        else:
            p.copy_(0.02 * values)
