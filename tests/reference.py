"""Reference results from the diffusers pipelines themselves, converted to ComfyUI's latent convention."""
from __future__ import annotations

import torch

from comfyui_xdit.adapters import FamilyAdapter
from comfyui_xdit.families.flux import pack, unpack
from comfyui_xdit.schedules import make_schedule


def pipeline_latents(adapter: FamilyAdapter, noise: torch.Tensor, pos, neg, cfg: float, steps: int,
                     height: int, width: int, sampler: str = "default", guidance: float = 3.5) -> torch.Tensor:
    """Run the family's diffusers pipeline with prompt embeddings and latents; return ComfyUI-convention latents."""
    import diffusers

    sched = make_schedule(adapter.family, adapter.variant, sampler, steps,
                          adapter.image_tokens(height, width)).scheduler
    fam = adapter.family
    x = noise  # the pipelines take the seed noise as `latents` (PixArt's scales it by init_noise_sigma itself)
    common = dict(height=height, width=width, num_inference_steps=steps, output_type="latent", return_dict=False)
    if fam == "flux":
        pipe = diffusers.FluxPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                                      text_encoder_2=None, tokenizer_2=None, transformer=adapter.model)
        kw = dict(prompt_embeds=pos.cond, pooled_prompt_embeds=pos.pooled, latents=pack(x), guidance_scale=guidance)
        if neg is not None:
            kw.update(negative_prompt_embeds=neg.cond, negative_pooled_prompt_embeds=neg.pooled, true_cfg_scale=cfg)
        out = pipe(**kw, **common)[0]
        out = unpack(out, height // 8, width // 8)
    elif fam == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                                                  text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                                  tokenizer_3=None, transformer=adapter.model)
        kw = dict(prompt_embeds=pos.cond, pooled_prompt_embeds=pos.pooled, latents=x, guidance_scale=cfg)
        if neg is not None:
            kw.update(negative_prompt_embeds=neg.cond, negative_pooled_prompt_embeds=neg.pooled)
        out = pipe(**kw, **common)[0]
    else:
        pipe = diffusers.PixArtSigmaPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                                             transformer=adapter.model)
        kw = dict(prompt_embeds=pos.cond, prompt_attention_mask=pos.mask, latents=x, guidance_scale=cfg,
                  use_resolution_binning=False)
        if neg is not None:
            kw.update(negative_prompt=None, negative_prompt_embeds=neg.cond, negative_prompt_attention_mask=neg.mask)
        out = pipe(**kw, **common)[0]
    return adapter.from_model_space(out.float())
