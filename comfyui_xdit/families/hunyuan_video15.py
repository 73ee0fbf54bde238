"""HunyuanVideo 1.5 (video, text-to-video): HunyuanVideo15Transformer3DModel, 54 dual-stream blocks of joint
attention over [video tokens; text tokens], rotary positions on the video tokens only.

Latents: the HunyuanVideo 1.5 VAE's 32 channels, 16x spatial and 4x temporal compression, 5-D [B, 32, T, H/16, W/16]
(T = (F - 1) / 4 + 1 latent frames for F pixel frames), patch 1: T x (H/16) x (W/16) video tokens. Model space is
the VAE latent times its scaling factor 1.03682 (HunyuanVideo15Pipeline divides by it before decoding). The model
reads 65 channels: the noisy latent, then 32 condition-latent channels and one mask channel, which the
text-to-video pipeline fills with zeros.

Text: Qwen2.5-VL 7B hidden states [B, L, 3584] (`cond`) with a padding mask (`cond_mask`); the model refines them
(two refiner blocks that see the timestep), then appends them to two more token groups it always attends with: the
ByT5 glyph text (quoted text in the prompt) and the SigLIP image slots (image-to-video). It moves each row's real
tokens first and zeroes the padding, and the blocks' attention masks every padded token as key and as query. In
text-to-video without glyph text (what the engine runs) both groups are wholly masked: HunyuanVideo15Pipeline
passes 729 zero image slots and 256 zero ByT5 tokens, the engine one masked token of each, which reach no real
token either way (tests/test_hunyuan_video15.py compares with the pipeline). The text stream inside the blocks is
therefore L + 2 tokens; it is split across ranks with its mask, which travels with its keys.

Schedule: HunyuanVideo15Pipeline's sigmas linspace(1, 0, N + 1)[:-1] through flow-matching Euler with the
release's static shift (480p 5.0, 720p 9.0; image-to-video 480p 5.0, 720p 7.0); true CFG neg + cfg (pos - neg)
(the release's guider: 6.0).

Image-to-video (the i2v variants, HunyuanVideo15ImageToVideoPipeline) takes two more inputs, the same for both
CFG branches: `image_latent` [B, 32, 1, h, w], the first frame's VAE latent in ComfyUI's convention (the engine puts
it in model space into the condition channels' first frame and sets the mask channel there, as the pipeline's
prepare_cond_latents_and_mask), and `image_embeds` [B, N, 1152], the SigLIP vision states (N = 729 for the
release's encoder), which the model then attends with: the text stream is L + 1 + N tokens. PipeFusion sizes its
transfers by the family's stream lengths, which cannot know N, so it is refused with image inputs.

Not here: glyph text (ByT5 embeddings), the step-distilled (meanflow) and super-resolution models, and single
files in the release's original layout (no diffusers converter for them: a diffusers folder or a file in
diffusers' names loads).
"""
from __future__ import annotations

import numpy as np
import torch

from ..adapters.base import Conditioning, FamilyAdapter
from ..errors import WeightsError, XDiTError
from .checkpoint import count, head_dim, require
from .spec import IMAGE, TEXT, BlockList, CondSpec, Family, Gather, LatentFormat, Split, TokenPlan, Variant


def flow_euler(shift: float) -> dict:
    """scheduler/scheduler_config.json of the diffusers releases: flow-matching Euler, static shift."""
    return dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=shift,
                use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False,
                use_exponential_sigmas=False, use_beta_sigmas=False, time_shift_type="exponential",
                stochastic_sampling=False)


def pipeline_sigmas(steps: int, image_tokens: int, cfg: dict) -> dict:
    """HunyuanVideo15Pipeline's noise levels before the scheduler's shift: linspace(1, 0, steps + 1) without the
    final 0."""
    return {"sigmas": np.linspace(1.0, 0.0, steps + 1)[:-1]}


SCALING_FACTOR = 1.03682  # AutoencoderKLHunyuanVideo15's scaling_factor
LATENT = LatentFormat(32, scale=SCALING_FACTOR, dims=3, downscale=16, time_downscale=4)
# the masked slots the engine passes for the groups text-to-video leaves empty (ByT5 glyph text, SigLIP image)
EMPTY_SLOTS = 1
IMAGE_INPUTS = ("image_latent", "image_embeds")  # image-to-video


class HunyuanVideo15Adapter(FamilyAdapter):
    def __init__(self, spec: Family, model: torch.nn.Module, variant: str = ""):
        # a built-in tiny model comes with the family's default variant (text-to-video): its config's task_type
        # says whether it is the image-to-video one
        if variant in ("", spec.default_variant.name) and model.config.task_type == "i2v":
            variant = spec.default_variant.name.replace("-t2v", "-i2v")
        super().__init__(spec, model, variant)

    @property
    def image_to_video(self) -> bool:
        return self.variant.endswith("-i2v")

    def token_plan(self) -> TokenPlan:
        # No _cp_plan in diffusers 0.42 for this class; its points, in diffusers' vocabulary: the rotary tables
        # (cos, sin) [S, D] the `rope` module returns are video tokens, the first block takes the video and the
        # joint text stream, every block takes the text mask [B, L] (split as text, so each rank's processor builds
        # the mask of its own tokens), and `proj_out` is gathered. The processor puts the video tokens first.
        blocks = "transformer_blocks"
        return TokenPlan(
            inputs={f"{blocks}.[0]": {"hidden_states": Split(IMAGE, 1, 3), "encoder_hidden_states": Split(TEXT, 1, 3)},
                    f"{blocks}.*": {"attention_mask": Split(TEXT, 1, 2)}},
            outputs={"rope": {0: Split(IMAGE, 0, 2), 1: Split(IMAGE, 0, 2)}},
            gathers={"proj_out": Gather((IMAGE,), 1, 3)},
            attention={f"{blocks}.*.attn": (IMAGE, TEXT)},
            blocks=(BlockList(blocks, (("hidden_states", (IMAGE,)), ("encoder_hidden_states", (TEXT,))),
                              outputs=(0, 1)),))

    def stream_lengths(self, image_tokens: int, text_tokens: int) -> dict[str, int]:
        return {IMAGE: image_tokens, TEXT: text_tokens + 2 * EMPTY_SLOTS}

    def check_request(self, req, config=None) -> None:
        from ..errors import ConfigError
        from ..sampling import latent_shape

        cfg = self.model.config
        if cfg.use_meanflow:
            raise XDiTError("the step-distilled (meanflow) HunyuanVideo 1.5 models are not supported")
        given = [k for k in IMAGE_INPUTS if k in req.inputs]
        if not self.image_to_video:
            if given:
                raise XDiTError(f"{self.variant} takes no {given[0]} (a text-to-video model; image-to-video: an i2v "
                                "variant)")
            return
        if len(given) != 2:
            raise XDiTError(f"{self.variant} needs image_latent [B, {self.latent_channels}, 1, h, w] (the first "
                            f"frame's VAE latent) and image_embeds [B, N, {cfg.image_embed_dim}] (SigLIP)")
        shape = latent_shape(self, req)
        first, embeds = req.inputs["image_latent"], req.inputs["image_embeds"]
        want = [self.latent_channels, 1, *shape[3:]]
        if first.ndim != 5 or list(first.shape[1:]) != want or first.shape[0] not in (1, req.batch_size):
            raise XDiTError(f"image_latent has shape {list(first.shape)}, expected [B, {', '.join(map(str, want))}]")
        if embeds.ndim != 3 or embeds.shape[-1] != cfg.image_embed_dim or embeds.shape[0] not in (1, req.batch_size):
            raise XDiTError(f"image_embeds has shape {list(embeds.shape)}, expected [B, N, {cfg.image_embed_dim}]")
        if config is not None and config.pipefusion > 1:
            raise ConfigError(f"pipefusion is not available for {self.variant}: its text stream's length depends "
                              "on the image embeddings; use ulysses, ring, cfg or dp")

    def predict(self, x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
        if x.ndim != 5:
            raise XDiTError(f"{self.family} samples video latents [B, C, T, h, w], got {list(x.shape)}")
        cfg = self.model.config
        b, ch, frames, h, w = x.shape
        # text-to-video: the condition latent and its mask channel are zeros (the pipeline's
        # prepare_cond_latents_and_mask), the image slots zeros (the model masks them), no glyph text;
        # image-to-video: the first frame's latent (model space) and mask 1 on the first frame, the SigLIP states
        cond = x.new_zeros(b, cfg.in_channels - ch, frames, h, w)
        embeds = c.extra.get("image_embeds")
        if "image_latent" in c.extra:
            first = self.to_model_space(c.extra["image_latent"].float()).to(x.device, x.dtype)
            cond[:, :ch, :1] = first.expand(b, -1, -1, -1, -1)
            cond[:, ch:, :1] = 1.0
        if embeds is None:
            embeds = torch.zeros(b, EMPTY_SLOTS, cfg.image_embed_dim, dtype=self.dtype, device=x.device)
        hidden = torch.cat([x, cond], dim=1).to(self.dtype)
        mask = c.mask if c.mask is not None else torch.ones(c.cond.shape[:2], dtype=torch.long, device=x.device)
        empty = torch.zeros(b, EMPTY_SLOTS, dtype=mask.dtype, device=x.device)
        return self.model(
            hidden_states=hidden,
            timestep=t.expand(b).to(device=x.device, dtype=self.dtype),
            encoder_hidden_states=c.cond,
            encoder_attention_mask=mask,
            encoder_hidden_states_2=torch.zeros(b, EMPTY_SLOTS, cfg.text_embed_2_dim, dtype=self.dtype,
                                                device=x.device),
            encoder_attention_mask_2=empty,
            image_embeds=embeds.to(self.dtype).expand(b, -1, -1),
            return_dict=False,
        )[0]


# ------------------------------------------------------------------------------------------------ checkpoints
def _detect(keys: set[str]) -> bool:
    """diffusers' names: the 3-D patch embedding, the ByT5 projection, the condition-type embedding and joint
    blocks with text projections."""
    return {"x_embedder.proj.weight", "context_embedder_2.linear_3.weight", "cond_type_embed.weight",
            "transformer_blocks.0.attn.add_q_proj.weight"} <= keys


def _axes(head: int) -> list[int]:
    """Rotary axes (no weights encode them): the release's [16, 56, 56] for head size 128; otherwise the frame
    axis a quarter (at most 16) and the two spatial axes the rest, every axis even."""
    if head % 4:
        raise WeightsError(f"cannot infer HunyuanVideo 1.5's rotary axes for head size {head}")
    rest = (head - min(16, head // 4)) // 4 * 2
    return [head - 2 * rest, rest, rest]


def _infer_config(sd: dict, hints: dict) -> dict:
    require(sd, "x_embedder.proj.weight", "proj_out.weight", "context_embedder.proj_in.weight",
            "context_embedder_2.norm.weight", "image_embedder.norm_in.weight",
            "transformer_blocks.0.ff.net.0.proj.weight")
    inner, in_channels, pt, p, _ = sd["x_embedder.proj.weight"].shape
    head = head_dim(sd, "transformer_blocks.0.attn.norm_q.weight", int(inner), 128)
    return dict(in_channels=int(in_channels), out_channels=int(sd["proj_out.weight"].shape[0]) // int(pt * p * p),
                num_attention_heads=int(inner) // head, attention_head_dim=head,
                num_layers=count(sd, "transformer_blocks."),
                num_refiner_layers=count(sd, "context_embedder.token_refiner.refiner_blocks."),
                mlp_ratio=int(sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0]) / int(inner),
                patch_size=int(p), patch_size_t=int(pt),
                text_embed_dim=int(sd["context_embedder.proj_in.weight"].shape[1]),
                text_embed_2_dim=int(sd["context_embedder_2.norm.weight"].shape[0]),
                image_embed_dim=int(sd["image_embedder.norm_in.weight"].shape[0]), rope_axes_dim=_axes(head),
                use_meanflow="time_embed.timestep_embedder_r.linear_1.weight" in sd)


def _variant_of(cfg: dict, pipeline: str) -> str:
    """480p or 720p by the config's target_size, text- or image-to-video by its task_type or the pipeline's class
    (the weights say neither: 480p text-to-video without them)."""
    task = "i2v" if cfg.get("task_type") == "i2v" or "ImageToVideo" in pipeline else "t2v"
    return f"hunyuanvideo-1.5-{'720p' if cfg.get('target_size') == 960 else '480p'}-{task}"


_TINY = dict(in_channels=65, out_channels=32, num_attention_heads=4, attention_head_dim=16, num_layers=2,
             num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=3584,
             text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(4, 6, 6), target_size=640, task_type="t2v")
FAMILY = Family(
    name="hunyuanvideo-1.5",
    diffusers_class="HunyuanVideo15Transformer3DModel",
    # ComfyUI 0.3.64 has no HunyuanVideo 1.5 model (a later ComfyUI's HunyuanVideo15 is not targeted here)
    variants=(Variant("hunyuanvideo-1.5-720p-t2v", "hunyuanvideo-1.5-720p-t2v.json", flow_euler(9.0)),
              Variant("hunyuanvideo-1.5-480p-t2v", "hunyuanvideo-1.5-480p-t2v.json", flow_euler(5.0)),
              Variant("hunyuanvideo-1.5-720p-i2v", "hunyuanvideo-1.5-720p-i2v.json", flow_euler(7.0)),
              Variant("hunyuanvideo-1.5-480p-i2v", "hunyuanvideo-1.5-480p-i2v.json", flow_euler(5.0))),
    latent=LATENT,
    cond=CondSpec(width=3584, mask=True, negative_length_may_differ=True, tokens=256, extra_inputs=IMAGE_INPUTS),
    flow=True,
    samplers=("euler", "dpmpp_2m"),
    adapter=f"{__name__}:HunyuanVideo15Adapter",
    tiny={"tiny-hunyuanvideo15": _TINY},
    detect=_detect,
    infer_config=_infer_config,
    variant_of=_variant_of,
    set_timesteps=pipeline_sigmas,
    patch=1,
    aliases={"hunyuanvideo-720p": "hunyuanvideo-1.5-720p-t2v", "hunyuanvideo-480p": "hunyuanvideo-1.5-480p-t2v",
             "hunyuanvideo-720p-i2v": "hunyuanvideo-1.5-720p-i2v",
             "hunyuanvideo-480p-i2v": "hunyuanvideo-1.5-480p-i2v"},
    order=70,
)
