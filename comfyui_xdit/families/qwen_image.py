"""Qwen-Image (and its 2512 update): QwenImageTransformer2DModel, 60 dual-stream blocks of joint text + image
attention. Text: Qwen2.5-VL 7B hidden states (3584 wide) with a padding mask; latents: the Wan 2.1 VAE's 16
channels (per-channel mean/std), one frame, packed 2x2 into 64-wide tokens as Flux packs them.

Qwen-Image-Edit (2509, QwenImageEditPlusPipeline; 2511, whose config sets zero_cond_t) runs the same model with
reference images: `reference_latent` (and `reference_latent_2`, `reference_latent_3`; ComfyUI-convention latents
[B, 16, h, w] or [B, 16, 1, h, w], each of its own size, the same for both CFG branches) are packed and appended to
the image tokens, one img_shapes entry each, and the prediction is the target's tokens only. The scheduler's
resolution shift counts the target's tokens (as the pipeline).

Single files (the release's transformer, ComfyUI's diffusion_models files, with or without the
`model.diffusion_model.` prefix) already use diffusers' key names: diffusers' own single-file mapping for this
class is the identity, so there is no converter. ComfyUI's files of Edit-2511 carry one extra, empty tensor,
`__index_timestep_zero__`: the marker of its default reference method (the references at timestep 0, diffusers'
zero_cond_t); it is dropped and the file loads as qwen-image-edit-2511.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from ..adapters.base import Conditioning, FamilyAdapter
from ..errors import WeightsError
from .checkpoint import count, head_dim, require
from .flux import pack, unpack
from .spec import IMAGE, TEXT, BlockList, ComfySpec, CondSpec, Family, LatentFormat, TokenPlan, Variant, from_cp_plan

# scheduler/scheduler_config.json of the release (Qwen-Image and Qwen-Image-2512 ship the same)
QWEN_FLOW = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                 base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
                 invert_sigmas=False, stochastic_sampling=False, use_karras_sigmas=False, use_exponential_sigmas=False,
                 use_beta_sigmas=False)

# The Wan 2.1 VAE's latent statistics (diffusers' AutoencoderKLQwenImage config, ComfyUI's Wan21 latent format)
WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


def pipeline_timesteps(steps: int, image_tokens: int, cfg: dict) -> dict:
    """QwenImagePipeline's noise levels: linspace(1, 1/steps) shifted by mu, linear in the image token count from
    base_shift at base_image_seq_len to max_shift at max_image_seq_len (the scheduler then applies its exponential
    time shift and stretches the end to shift_terminal)."""
    x0, x1 = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    y0, y1 = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (y1 - y0) / (x1 - x0)
    return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": image_tokens * m + (y0 - m * x0)}


def _token_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of every packed token (its C channels x 2x2 latent pixels) of [B, C, h, w], shaped to broadcast
    against x viewed as [B, C, h/2, 2, w/2, 2]."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).square().sum(dim=(1, 3, 5), keepdim=True).sqrt()


def norm_preserving_cfg(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """QwenImagePipeline's true CFG: neg + scale (pos - neg), rescaled per token to the norm of the positive
    prediction (norms over each packed token's 64 values)."""
    comb = neg + scale * (pos - neg)
    b, c, h, w = comb.shape
    ratio = _token_norm(pos) / _token_norm(comb)
    return (comb.reshape(b, c, h // 2, 2, w // 2, 2) * ratio).reshape(b, c, h, w)


REFERENCES = ("reference_latent", "reference_latent_2", "reference_latent_3")  # Edit: reference images, in order


class QwenImageAdapter(FamilyAdapter):
    def token_plan(self) -> TokenPlan:
        from diffusers import QwenImageTransformer2DModel

        return from_cp_plan(
            QwenImageTransformer2DModel._cp_plan,
            # the blocks' inputs, the text mask at every block, Edit-2511's per-token modulation index (image
            # tokens), and the rotary tables pos_embed returns: (image, text)
            streams={"hidden_states": IMAGE, "encoder_hidden_states": TEXT, "encoder_hidden_states_mask": TEXT,
                     "modulate_index": IMAGE, "pos_embed:0": IMAGE, "pos_embed:1": TEXT},
            attention={"transformer_blocks.*.attn": (TEXT, IMAGE)},  # the processor puts the text tokens first
            blocks=(BlockList("transformer_blocks", (("hidden_states", (IMAGE,)), ("encoder_hidden_states", (TEXT,))),
                              outputs=(1, 0)),))

    def expand(self, c: Conditioning, batch: int) -> Conditioning:
        """As QwenImagePipeline: a mask that hides nothing is no mask."""
        out = super().expand(c, batch)
        if out.mask is not None and bool((out.mask != 0).all()):
            out.mask = None
        return out

    def check_request(self, req, config=None) -> None:
        from ..errors import ConfigError, XDiTError

        refs = [k for k in REFERENCES if k in req.inputs]
        if refs != list(REFERENCES[:len(refs)]):
            raise XDiTError(f"reference latents must be given in order ({', '.join(REFERENCES)}), got "
                            f"{', '.join(refs)}")
        for name in refs:
            r = req.inputs[name]
            if r.ndim == 5 and r.shape[2] == 1:
                r = r[:, :, 0]
            if (r.ndim != 4 or r.shape[1] != self.latent_channels or r.shape[2] % 2 or r.shape[3] % 2
                    or r.shape[0] not in (1, req.batch_size)):
                raise XDiTError(f"{name} has shape {list(req.inputs[name].shape)}, expected [B, "
                                f"{self.latent_channels}, h, w] (or [B, {self.latent_channels}, 1, h, w]) with even "
                                "h and w")
        if refs and config is not None and config.pipefusion > 1:
            raise ConfigError("pipefusion is not available with reference latents (Qwen-Image-Edit): use ulysses, "
                              "ring, cfg or dp")
        if refs and req.cache is not None:
            raise ConfigError("the step cache is not available with reference latents (Qwen-Image-Edit)")

    def predict(self, x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
        b, _, h, w = x.shape
        timestep = t.expand(b).to(device=x.device, dtype=self.dtype)
        tokens, shapes = [pack(x).to(self.dtype)], [(1, h // 2, w // 2)]
        for name in REFERENCES:  # Edit: the reference images' tokens after the target's
            r = c.extra.get(name)
            if r is None:
                break
            r = r[:, :, 0] if r.ndim == 5 else r
            r = self.to_model_space(r.float()).expand(b, -1, -1, -1).to(x.device)
            tokens.append(pack(r).to(self.dtype))
            shapes.append((1, r.shape[2] // 2, r.shape[3] // 2))
        out = self.model(
            hidden_states=torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0],
            timestep=timestep / 1000,
            encoder_hidden_states=c.cond,
            encoder_hidden_states_mask=c.mask,
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0]
        return unpack(out[:, :tokens[0].shape[1]], h, w)


# ------------------------------------------------------------------------------------------------ checkpoints
_BLOCK_KEY = re.compile(r"transformer_blocks\.\d+\.(img_mod\.1|txt_mlp\.net\.2)\.weight")


def _detect(keys: set[str]) -> bool:
    """The text-stream RMSNorm and both input projections at the top level (txt_norm is ComfyUI's own detection
    key), and dual-stream blocks with per-block image modulation and a text MLP; Qwen-Image 2.1's txt_in is a
    module, not a projection, and Flux's blocks have no txt_norm."""
    return {"txt_norm.weight", "txt_in.weight", "img_in.weight"} <= keys and any(_BLOCK_KEY.fullmatch(k)
                                                                                 for k in keys)


def _axes(head: int) -> list[int]:
    """RoPE axes (no weights encode them): the published [16, 56, 56] for head size 128; otherwise the frame axis
    gets about a quarter and the two spatial axes the rest, every axis even (their sum is the head size)."""
    if head % 2:
        raise WeightsError(f"cannot infer Qwen-Image's rotary axes for an odd head size {head}")
    rest = (head - min(16, head // 4)) // 4 * 2
    return [head - 2 * rest, rest, rest]


def _infer_config(sd: dict, hints: dict) -> dict:
    require(sd, "img_in.weight", "txt_in.weight", "proj_out.weight")
    hidden, in_channels = sd["img_in.weight"].shape
    head = head_dim(sd, "transformer_blocks.0.attn.norm_q.weight", hidden, 128)
    patch = 2  # the packing is fixed by the pipeline (and ComfyUI)
    return dict(patch_size=patch, in_channels=int(in_channels), out_channels=int(sd["proj_out.weight"].shape[0])
                // patch ** 2, num_layers=count(sd, "transformer_blocks."), attention_head_dim=head,
                num_attention_heads=int(hidden) // head, joint_attention_dim=int(sd["txt_in.weight"].shape[1]),
                axes_dims_rope=_axes(head),
                use_additional_t_cond="time_text_embed.addition_t_embedding.weight" in sd,
                **({"zero_cond_t": True} if hints.get("zero_cond_t") else {}))


# ComfyUI's Edit-2511 files: an empty tensor naming the model's default reference method (index_timestep_zero)
EDIT_2511_MARKER = "__index_timestep_zero__"


def _drop_marker(sd: dict, name: str) -> tuple[dict, dict]:
    return {k: v for k, v in sd.items() if k != EDIT_2511_MARKER}, {"zero_cond_t": True}


LATENT = LatentFormat(16, mean=WAN21_MEAN, std=WAN21_STD, frame_axis=True)
# ComfyUI's QwenImage model (comfy/ldm/qwen_image/model.py) replaces transformer_blocks[i] as ("double_block", i)
COMFY = ComfySpec("QwenImage", "FLUX", "Wan21", text_mask=False, skip_blocks=(("double_block", "transformer_blocks"),))
FAMILY = Family(
    name="qwen-image",
    diffusers_class="QwenImageTransformer2DModel",
    # ComfyUI 0.3.64: supported_models.QwenImage (ModelType FLUX, shift 1.15, Wan21 latents); its model ignores
    # the text encoder's attention_mask (model_base.QwenImage passes none on: text_mask=False); the newer ComfyUI's
    # passes it to the model, which applies it (the nodes ask the running ComfyUI: nodes.families.applies_text_mask)
    # Qwen-Image-Edit 2509 is the same model (ComfyUI runs it as QwenImage with reference_latents); 2511 sets
    # zero_cond_t (the references' tokens at timestep 0): the newer ComfyUI runs it as QwenImage too, with the
    # reference method index_timestep_zero (FluxKontextMultiReferenceLatentMethod, or the file's marker); ComfyUI
    # 0.3.64's QwenImage samples it with the same settings (the pool runs the forward). The Edit releases'
    # scheduler config is taken to be Qwen-Image's.
    variants=(Variant("qwen-image-t2i", "qwen-image.json", QWEN_FLOW, COMFY),
              Variant("qwen-image-edit-2509", "qwen-image.json", QWEN_FLOW, COMFY),
              Variant("qwen-image-edit-2511", "qwen-image-edit-2511.json", QWEN_FLOW, COMFY)),
    latent=LATENT,
    cond=CondSpec(width=3584, mask=True, negative_length_may_differ=True, tokens=128, extra_inputs=REFERENCES),
    flow=True,
    samplers=("euler", "dpmpp_2m"),
    adapter=f"{__name__}:QwenImageAdapter",
    tiny={"tiny-qwen-image": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                                  num_attention_heads=4, joint_attention_dim=3584, axes_dims_rope=(4, 6, 6))},
    detect=_detect,
    infer_config=_infer_config,
    variant_of=lambda cfg, pipeline: ("qwen-image-edit-2511" if cfg.get("zero_cond_t") else
                                      "qwen-image-edit-2509" if "Edit" in pipeline else "qwen-image-t2i"),
    variant_of_keys=lambda keys: ("qwen-image-edit-2511" if any(k.endswith(EDIT_2511_MARKER) for k in keys)
                                  else "qwen-image-t2i"),
    convert=_drop_marker,
    is_original=lambda keys: EDIT_2511_MARKER in keys,
    set_timesteps=pipeline_timesteps,
    cfg_combine=norm_preserving_cfg,
    order=40,
)
