"""FLUX.2 (dev): Flux2Transformer2DModel, 8 double-stream and 48 single-stream blocks, one joint [text; image]
stream through the single blocks, Mistral-3 text embeddings [B, L, 15360], guidance-distilled.

LATENT convention (what ComfyUI's side sees; ComfyUI 0.3.64 has no FLUX.2 model, text encoder or VAE):
[B, 32, H/8, W/8], the FLUX.2 VAE's latents *normalised by the VAE's batch norm* and put back into the VAE's
32-channel layout. Flux2Pipeline works on patchified latents: a 2x2 patch of the VAE's 32-channel latent z becomes
128 channels (channel c*4 + 2*dy + dx), normalised per channel with the VAE's `bn` running statistics
((p - running_mean) / sqrt(running_var + batch_norm_eps)), then packed row-major into 128-wide tokens. Our LATENT is
that normalised 128-channel latent unpatchified to 32 channels, so

    patchify(LATENT) == (patchify(z) - bn_mean) / bn_std          (the pipeline's latents, before packing)
    z == to_vae_space(LATENT, vae)                                  (what AutoencoderKLFlux2.decode takes)

The newer ComfyUI's FLUX.2 LATENT (EmptyFlux2LatentImage, its FLUX.2 VAE) is the patchified form itself:
[B, 128, H/16, W/16] == patchify(LATENT) (its VAE applies and undoes the batch norm inside encode and decode, and
its latent format has no scale or shift), so the nodes convert between the two by patchify / unpatchify, exactly.

The normalisation belongs to the VAE's weights (no published constants), so it stays with the VAE: the transformer
samples LATENT as it is (model space == LATENT: no scale, no shift), and `to_vae_space` / `from_vae_space` convert
with a loaded AutoencoderKLFlux2. Noise is drawn in LATENT's shape [B, 32, H/8, W/8] (ComfyUI's noise for a seed);
its patchified form is i.i.d. Gaussian too, the pipeline's `latents`.

Sampling as Flux2Pipeline: Euler on linear sigmas linspace(1, 1/N, N) shifted exponentially by the empirical mu of
the image token count and step count; guidance embedding (default 4.0, the pipeline's guidance_scale); no negative
prompt and no true CFG (the pipeline has none), so cfg must be 1 and cfg parallel is refused.

FLUX.2 klein (Flux2KleinPipeline) uses the same transformer class but a Qwen3 text encoder of another width, no
guidance embedding and true CFG: not a size variant of this family, and refused by name.
"""
from __future__ import annotations

import numpy as np
import torch

from ..adapters.base import Conditioning, FamilyAdapter
from ..errors import WeightsError
from .checkpoint import count, head_dim, require, run_converter
from .spec import (IMAGE, TEXT, BlockList, ComfySpec, CondSpec, Family, LatentFormat, NativeSpec, TokenPlan, Variant,
                   from_cp_plan)

TEXT_WIDTH = 15360  # Mistral-3 Small: hidden states of layers 10, 20, 30 (3 x 5120) per token
# FlowMatchEulerDiscreteScheduler with dynamic, exponential shifting: Flux2Pipeline passes its own sigmas and mu, so
# only use_dynamic_shifting and time_shift_type are read; the other fields are Flux.1-dev's values (not used here)
FLOW_FLUX2 = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                  base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
# the shared modulation layers only FLUX.2 has (BFL "lin", diffusers "linear"); Flux.1 modulates per block
MARKERS = ("single_stream_modulation.lin.weight", "single_stream_modulation.linear.weight",
           "double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear.weight")


# ------------------------------------------------------------------------------------------------ layouts
def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, 4C, h/2, w/2], channel c*4 + 2*dy + dx (Flux2Pipeline._patchify_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of patchify."""
    b, c4, h2, w2 = x.shape
    return x.view(b, c4 // 4, 2, 2, h2, w2).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h2 * 2, w2 * 2)


def pack(x: torch.Tensor) -> torch.Tensor:
    """LATENT-layout [B, 32, h, w] -> tokens [B, (h/2)(w/2), 128], row-major (patchify, then _pack_latents)."""
    p = patchify(x)
    return p.flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens -> LATENT layout for a latent of height h and width w."""
    b, _, d = tokens.shape
    return unpatchify(tokens.transpose(1, 2).reshape(b, d, h // 2, w // 2))


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """Position ids [1, (h/2)(w/2), 4] (t, row, col, l) = (0, i, j, 0), as Flux2Pipeline._prepare_latent_ids. 3-D:
    the class's _cp_plan splits ids of 3 dimensions."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    zero = torch.zeros_like(rows)
    return torch.stack([zero, rows, cols, zero], dim=-1).reshape(1, -1, 4).to(device)


def text_ids(n: int, device=None) -> torch.Tensor:
    """Position ids [1, n, 4] = (0, 0, 0, l), as Flux2Pipeline._prepare_text_ids."""
    ids = torch.zeros(1, n, 4, dtype=torch.long)
    ids[..., 3] = torch.arange(n)
    return ids.to(device)


def _bn(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def to_vae_space(latent: torch.Tensor, vae) -> torch.Tensor:
    """A FLUX.2 LATENT [B, 32, H/8, W/8] -> the latent an AutoencoderKLFlux2 decodes (its batch norm undone)."""
    p = patchify(latent)
    mean, std = _bn(vae, p)
    return unpatchify(p * std + mean)


def from_vae_space(z: torch.Tensor, vae) -> torch.Tensor:
    """An AutoencoderKLFlux2 latent (e.g. its encoder's mode) -> the FLUX.2 LATENT (its batch norm applied)."""
    p = patchify(z)
    mean, std = _bn(vae, p)
    return unpatchify((p - mean) / std)


# ------------------------------------------------------------------------------------------------ schedule
def empirical_mu(image_tokens: int, steps: int) -> float:
    """Flux2Pipeline's shift (compute_empirical_mu): linear in the image token count, interpolated in the step count
    between fits at 10 and 200 steps; above 4300 tokens the 200-step fit alone."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    m200 = a2 * image_tokens + b2
    if image_tokens > 4300:
        return float(m200)
    m10 = a1 * image_tokens + b1
    a = (m200 - m10) / 190.0
    return float(a * steps + (m200 - 200.0 * a))


def pipeline_timesteps(steps: int, image_tokens: int, cfg: dict) -> dict:
    """Flux2Pipeline's set_timesteps arguments: linear sigmas and the empirical mu."""
    return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": empirical_mu(image_tokens, steps)}


# ------------------------------------------------------------------------------------------------ the adapter
class Flux2Adapter(FamilyAdapter):
    def token_plan(self) -> TokenPlan:
        from diffusers import Flux2Transformer2DModel

        joint = (TEXT, IMAGE)  # both processors put the text tokens first
        return from_cp_plan(
            Flux2Transformer2DModel._cp_plan,
            streams={"hidden_states": IMAGE, "encoder_hidden_states": TEXT, "img_ids": IMAGE, "txt_ids": TEXT},
            attention={"transformer_blocks.*.attn": joint, "single_transformer_blocks.*.attn": joint},
            blocks=(BlockList("transformer_blocks", (("hidden_states", (IMAGE,)), ("encoder_hidden_states", (TEXT,))),
                              outputs=(1, 0)),
                    # the single blocks take and return one joint stream: the model concatenates [text; image]
                    BlockList("single_transformer_blocks", (("hidden_states", joint),))))

    def predict(self, x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
        b, _, h, w = x.shape
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full((b,), FAMILY.cond.guidance if c.guidance is None else c.guidance,
                                  dtype=torch.float32, device=x.device)
        out = self.model(
            hidden_states=pack(x).to(self.dtype),
            encoder_hidden_states=c.cond,
            timestep=t.expand(b).to(device=x.device, dtype=self.dtype) / 1000,
            img_ids=image_ids(h, w, x.device),
            txt_ids=text_ids(c.cond.shape[1], x.device),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack(out, h, w)


# ------------------------------------------------------------------------------------------------ checkpoints
def _detect(keys: set[str]) -> bool:
    return any(m in keys for m in MARKERS)


def _is_original(keys: set[str]) -> bool:
    return "single_stream_modulation.lin.weight" in keys or any(
        k.startswith(("double_blocks.", "single_blocks.", "img_in.", "txt_in.")) for k in keys)


def _convert(sd: dict, name: str) -> tuple[dict, dict]:
    """BFL FLUX.2 layout -> diffusers, with diffusers' converter (a rename: fused projections stay fused)."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers as convert

    return {k: v.contiguous() for k, v in run_converter(convert, sd, name).items()}, {}


def _infer_config(sd: dict, hints: dict) -> dict:
    require(sd, "x_embedder.weight", "context_embedder.weight", "proj_out.weight",
            "time_guidance_embed.timestep_embedder.linear_1.weight")
    inner, in_channels = sd["x_embedder.weight"].shape
    norm = next((k for k in ("transformer_blocks.0.attn.norm_q.weight",
                             "single_transformer_blocks.0.attn.norm_q.weight") if k in sd), "")
    head = head_dim(sd, norm, inner, 128)
    if "transformer_blocks.0.ff.linear_in.weight" in sd:  # SwiGLU: gate and value halves
        mlp = sd["transformer_blocks.0.ff.linear_in.weight"].shape[0] // 2
    elif "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight" in sd:
        mlp = (sd["single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"].shape[0] - 3 * inner) // 2
    else:
        mlp = 3 * inner
    out_channels = sd["proj_out.weight"].shape[0]
    return dict(
        patch_size=1, in_channels=in_channels, out_channels=None if out_channels == in_channels else out_channels,
        num_layers=count(sd, "transformer_blocks."), num_single_layers=count(sd, "single_transformer_blocks."),
        attention_head_dim=head, num_attention_heads=inner // head,
        joint_attention_dim=sd["context_embedder.weight"].shape[1],
        timestep_guidance_channels=sd["time_guidance_embed.timestep_embedder.linear_1.weight"].shape[1],
        mlp_ratio=mlp / inner, guidance_embeds="time_guidance_embed.guidance_embedder.linear_1.weight" in sd,
        axes_dims_rope=_axes(head))


def _axes(head: int) -> list[int]:
    """RoPE axes (no weights encode them): four equal axes, the published [32, 32, 32, 32] for head size 128."""
    if head % 8:
        raise WeightsError(f"cannot split a FLUX.2 head of size {head} into 4 even RoPE axes; pass "
                           "config_overrides={'axes_dims_rope': [...]}")
    return [head // 4] * 4


def _variant_of(cfg: dict, pipeline: str) -> str:
    width = cfg.get("joint_attention_dim", TEXT_WIDTH)
    if "Klein" in pipeline or not cfg.get("guidance_embeds", True) or width != TEXT_WIDTH:
        raise WeightsError(f"this Flux2Transformer2DModel looks like FLUX.2 klein (text width {width}, guidance "
                           f"embedding {'yes' if cfg.get('guidance_embeds', True) else 'no'}), which is not supported: "
                           f"FLUX.2-dev has Mistral-3 text embeddings of width {TEXT_WIDTH} and a guidance embedding")
    return "flux2-dev"


FAMILY = Family(
    name="flux2",
    diffusers_class="Flux2Transformer2DModel",
    # ComfyUI 0.3.64 has no FLUX.2: its Flux sampling (ModelSamplingFlux, the same exponential shift) with the
    # pipeline's shift for the job's size and steps, and the identity latent format (no previews). The newer ComfyUI's
    # own FLUX.2 (supported_models.Flux2: Flux's model type, shift 2.02; latent_formats.Flux2: 128 channels at 1/16,
    # no scale or shift) takes this LATENT 2x2-patchified, which is what its FLUX.2 VAE decodes (see the docstring)
    variants=(Variant("flux2-dev", "flux2-dev.json", FLOW_FLUX2,
                      ComfySpec("Flux", "FLUX", "LatentFormat", shift=empirical_mu,
                                native=NativeSpec("Flux2", "FLUX", "Flux2", patch=2))),),
    latent=LatentFormat(32),
    cond=CondSpec(width=TEXT_WIDTH, guidance=4.0, tokens=512, negative=False),
    flow=True,
    samplers=("euler", "dpmpp_2m"),
    adapter=f"{__name__}:Flux2Adapter",
    tiny={"tiny-flux2": dict(patch_size=1, in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16,
                             num_attention_heads=4, joint_attention_dim=TEXT_WIDTH, timestep_guidance_channels=32,
                             mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=True)},
    detect=_detect,
    is_original=_is_original,
    convert=_convert,
    infer_config=_infer_config,
    variant_of=_variant_of,
    variant_of_keys=lambda keys: "flux2-dev",
    blocks_of=lambda cfg: cfg.get("num_layers", 0) + cfg.get("num_single_layers", 0),
    set_timesteps=pipeline_timesteps,
    order=50,
)
