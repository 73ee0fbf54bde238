"""Tiny LoRA files in the formats users have, and the reference they are checked against: the pairs are drawn on
a checkpoint's own layout (the original one for kohya/ComfyUI files, diffusers' for diffusers/PEFT files), and the
reference patches that layout's weights directly, ``w + strength * alpha / rank * up @ down``, as ComfyUI does,
before the same checkpoint converter the engine's loader uses brings them to diffusers' layout."""
from __future__ import annotations

import torch

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]  # module -> (up, down, alpha)


def draw_pairs(sd: dict[str, torch.Tensor], modules: list[str], rank: int, seed: int,
               alpha: float | None = None) -> Pairs:
    """Random pairs for `modules` (each `<module>.weight` a matrix of `sd`), large enough to move the output."""
    g = torch.Generator().manual_seed(seed)
    out: Pairs = {}
    for m in modules:
        w = sd[m + ".weight"]
        rows, cols = w.shape[0], w.flatten(1).shape[1]
        up = torch.randn(rows, rank, generator=g) * 0.3 / rank ** 0.5
        down = torch.randn(rank, cols, generator=g) / cols ** 0.5
        out[m] = (up, down, alpha)
    return out


def patched(sd: dict[str, torch.Tensor], loras: list[tuple[Pairs, float]]) -> dict[str, torch.Tensor]:
    """`sd` with every (pairs, strength) added in order (float32)."""
    out = dict(sd)
    for pairs, strength in loras:
        for m, (up, down, alpha) in pairs.items():
            k = m + ".weight"
            scale = 1.0 if alpha is None else alpha / down.shape[0]
            out[k] = out[k] + ((up @ down) * (scale * strength)).reshape(out[k].shape)
    return out


def kohya(pairs: Pairs) -> dict[str, torch.Tensor]:
    """sd-scripts / musubi-tuner names: lora_unet_<module with underscores>.lora_up/lora_down + alpha."""
    out = {}
    for m, (up, down, alpha) in pairs.items():
        name = "lora_unet_" + m.replace(".", "_")
        out[f"{name}.lora_up.weight"], out[f"{name}.lora_down.weight"] = up.contiguous(), down.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0] if alpha is None else alpha))
    return out


def comfy(pairs: Pairs, peft_names: bool = False) -> dict[str, torch.Tensor]:
    """ComfyUI / LightX2V / BFL-layout trainers: diffusion_model.<module>.lora_up/lora_down (or lora_B/lora_A)
    + alpha."""
    up_name, down_name = ("lora_B", "lora_A") if peft_names else ("lora_up", "lora_down")
    out = {}
    for m, (up, down, alpha) in pairs.items():
        out[f"diffusion_model.{m}.{up_name}.weight"] = up.contiguous()
        out[f"diffusion_model.{m}.{down_name}.weight"] = down.contiguous()
        if alpha is not None:
            out[f"diffusion_model.{m}.alpha"] = torch.tensor(float(alpha))
    return out


def diffusers(pairs: Pairs) -> dict[str, torch.Tensor]:
    """diffusers / PEFT names: transformer.<diffusers module>.lora_A/lora_B (+ alpha when given)."""
    out = {}
    for m, (up, down, alpha) in pairs.items():
        out[f"transformer.{m}.lora_B.weight"], out[f"transformer.{m}.lora_A.weight"] = up.contiguous(), \
            down.contiguous()
        if alpha is not None:
            out[f"transformer.{m}.alpha"] = torch.tensor(float(alpha))
    return out


def matrices(sd: dict[str, torch.Tensor], include: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[str]:
    """Modules of `sd` whose weight is a matrix and whose name contains one of `include` (none of `exclude`)."""
    return sorted(k[: -len(".weight")] for k, v in sd.items()
                  if k.endswith(".weight") and v.ndim == 2 and any(s in k for s in include)
                  and not any(s in k for s in exclude))
