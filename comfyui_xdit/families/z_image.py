"""Z-Image (Turbo): ZImageTransformer2DModel, a single-stream DiT with 16-channel Flux-VAE latents and Qwen3-4B
text embeddings (2560 wide).

The transformer takes lists of per-sample tensors: latents [C, 1, H, W] and caption embeddings [L_i, 2560] (the
pipeline passes each prompt's real tokens only). It pads the image and text sequences to multiples of 32 with
learned pad tokens (attended like any token), runs two `noise_refiner` blocks on the image tokens and two
`context_refiner` blocks on the text tokens, then its main `layers` on one unified [image; text] sequence. It masks
only the batch padding between samples whose captions differ in length; it slices each sample's unified sequence
at its full lengths, which a shard of the stream is not, so the prompts of one job's batch must have as many real
tokens (each branch may have its own length): no mask ever reaches a block.

ZImagePipeline's conventions: model time (1000 - t) / 1000, prediction = -model output (x0 - noise), and guidance
pos + g (pos - neg): the engine's (and ComfyUI's) cfg scale is 1 + the pipeline's guidance_scale.
"""
from __future__ import annotations

import re

import torch

from ..adapters.base import Conditioning, FamilyAdapter
from ..errors import WeightsError, XDiTError
from .checkpoint import count, head_dim, require, run_converter
from .flux import resolution_shift
from .spec import (IMAGE, TEXT, BlockList, ComfySpec, CondSpec, Family, Gather, LatentFormat, Split, TokenPlan,
                   Variant)

FLOW_TURBO = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)  # the Turbo release's scheduler
UNIFIED = (IMAGE, TEXT)  # the main layers' sequence (the model's basic mode puts the image first)


def pipeline_sigmas(steps: int, image_tokens: int, cfg: dict) -> dict:
    """ZImagePipeline's noise levels: linspace(1, 1/steps) in float32 (then shifted by the scheduler), with the
    resolution-dependent mu when the scheduler shifts dynamically."""
    kwargs: dict = {"sigmas": torch.linspace(1.0, 1 / steps, steps).tolist()}
    if cfg.get("use_dynamic_shifting"):
        kwargs["mu"] = resolution_shift(image_tokens, cfg)
    return kwargs


def padded(n: int) -> int:
    """A sequence's length inside the transformer: padded to its fixed multiple (diffusers' SEQ_MULTI_OF)."""
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    return n + (-n) % SEQ_MULTI_OF


class ZImageAdapter(FamilyAdapter):
    @property
    def hidden_size(self) -> int:
        return int(self.model.config.dim)

    def token_plan(self) -> TokenPlan:
        # Each refiner list takes its stream as the first block's input (later blocks get the local output); the rope
        # frequencies come from the forward's scope for every block. The main layers' input is the unified
        # sequence the model concatenates from the refiners' (local) outputs; their frequencies are the joint
        # [image; text] table, split stream by stream.
        return TokenPlan(
            inputs={"noise_refiner.[0]": {"x": Split(IMAGE)},
                    "noise_refiner.*": {"freqs_cis": Split(IMAGE, ndim=3)},
                    "context_refiner.[0]": {"x": Split(TEXT)},
                    "context_refiner.*": {"freqs_cis": Split(TEXT, ndim=3)},
                    "layers.*": {"freqs_cis": Split(UNIFIED, ndim=3)}},
            outputs={},
            gathers={"all_final_layer.*": Gather(UNIFIED)},
            attention={"noise_refiner.*.attention": (IMAGE,), "context_refiner.*.attention": (TEXT,),
                       "layers.*.attention": UNIFIED},
            blocks=(BlockList("noise_refiner", (("x", (IMAGE,)),), pipelined=False, cached=False),
                    BlockList("context_refiner", (("x", (TEXT,)),), pipelined=False, cached=False),
                    BlockList("layers", (("x", UNIFIED),))))

    def stream_lengths(self, image_tokens: int, text_tokens: int) -> dict[str, int]:
        return {IMAGE: padded(image_tokens), TEXT: padded(text_tokens)}

    def check_conditioning(self, c: Conditioning, batch: int, what: str = "positive") -> None:
        super().check_conditioning(c, batch, what)
        if c.mask is not None:
            counts = sorted(set((c.mask != 0).sum(dim=1).tolist()))
            if len(counts) > 1:
                raise XDiTError(f"{what} conditioning for {self.family}: the prompts of a batch must have as many "
                                f"real tokens (their masks keep {', '.join(map(str, counts))}); sample them as "
                                "separate jobs")

    def expand(self, c: Conditioning, batch: int) -> Conditioning:
        """As the pipeline, keep each prompt's real tokens only (check_conditioning made sure every row keeps as
        many): the text length is then the real one everywhere."""
        if c.mask is not None:
            keep = c.mask != 0
            n = int(keep[0].sum())
            c = Conditioning(c.cond[keep].view(c.cond.shape[0], n, c.cond.shape[2]), c.pooled, None, c.guidance)
        return super().expand(c, batch)

    def predict(self, x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
        b = x.shape[0]
        timestep = (1000 - t.expand(b).to(device=x.device, dtype=torch.float32)) / 1000
        latents = x.to(self.dtype).unsqueeze(2)  # [B, C, 1, h, w]: one frame
        out = self.model(list(latents.unbind(0)), timestep, list(c.cond.unbind(0)), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


# ------------------------------------------------------------------------------------------------ checkpoints
def _detect(keys: set[str]) -> bool:
    """Z-Image's learned pad tokens, text refiner and its adaLN without a leading SiLU (Lumina 2's NextDiT, with
    the same pad tokens, has adaLN_modulation.1); the same names in the original and the diffusers layout."""
    return ({"x_pad_token", "cap_pad_token", "layers.0.adaLN_modulation.0.weight"} <= keys
            and any(k.startswith("context_refiner.") for k in keys))


def _is_original(keys: set[str]) -> bool:
    return "x_embedder.weight" in keys or any(k.endswith(".attention.qkv.weight") or k.startswith("final_layer.")
                                              for k in keys)


def _convert(sd: dict, name: str) -> tuple[dict, dict]:
    """The original release layout (also ComfyUI's files) -> diffusers, with diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers as convert

    return {k: v.contiguous() for k, v in run_converter(convert, sd, name).items()}, {}


def _axes(head: int) -> list[int]:
    """RoPE axes (frame, height, width; no weights encode them): the published [32, 48, 48] for head size 128, in
    general 3/8 of the head to each spatial axis (even sizes), the rest to the first."""
    rest = (3 * head // 8) // 2 * 2
    return [head - 2 * rest, rest, rest]


def _infer_config(sd: dict, hints: dict) -> dict:
    if any(k.startswith(("siglip_embedder.", "siglip_refiner.")) for k in sd):
        raise WeightsError("a Z-Image checkpoint with SigLIP image conditioning (Omni) is not supported")
    embedders = sorted(m.group(1) for k in sd if (m := re.fullmatch(r"all_x_embedder\.(\d+-\d+)\.weight", k)))
    if embedders and embedders != ["2-1"]:
        raise WeightsError(f"Z-Image checkpoint with patch sizes {', '.join(embedders)}: only 2x2 patches (2-1) "
                           "are supported")
    require(sd, "all_x_embedder.2-1.weight", "cap_embedder.1.weight", "layers.0.attention.to_q.weight")
    dim, patch_in = sd["all_x_embedder.2-1.weight"].shape
    head = head_dim(sd, "layers.0.attention.norm_q.weight", dim, 128)
    return dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=patch_in // 4, dim=dim,
                n_layers=count(sd, "layers."), n_refiner_layers=count(sd, "noise_refiner."), n_heads=dim // head,
                n_kv_heads=dim // head, qk_norm="layers.0.attention.norm_q.weight" in sd,
                cap_feat_dim=sd["cap_embedder.1.weight"].shape[1], axes_dims=_axes(head))


FAMILY = Family(
    name="z-image",
    diffusers_class="ZImageTransformer2DModel",
    # ComfyUI 0.3.64 has no Z-Image model: SD3's sampling settings (flow, shift 3.0) and the Flux latent format
    # (0.3611, 0.1159) are Z-Image Turbo's
    variants=(Variant("z-image-turbo", "z-image-turbo.json", FLOW_TURBO, ComfySpec("SD3", "FLOW", "Flux")),),
    latent=LatentFormat(16, scale=0.3611, shift=0.1159),
    cond=CondSpec(width=2560, mask=True, negative_length_may_differ=True, tokens=128),
    flow=True,
    samplers=("euler", "dpmpp_2m"),
    adapter=f"{__name__}:ZImageAdapter",
    tiny={"tiny-z-image": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=3,
                               n_refiner_layers=2, n_heads=4, n_kv_heads=4, cap_feat_dim=2560, axes_dims=(4, 6, 6),
                               axes_lens=(1536, 512, 512))},
    detect=_detect,
    is_original=_is_original,
    convert=_convert,
    infer_config=_infer_config,
    variant_of=lambda cfg, pipeline: "z-image-turbo",
    blocks_of=lambda cfg: cfg["n_layers"],
    heads_of=lambda cfg: cfg["n_heads"],
    max_side_of=lambda cfg: min(cfg.get("axes_lens", (1536, 512, 512))[1:]) * 16,  # rope positions per side
    set_timesteps=pipeline_sigmas,
    order=40,
)
