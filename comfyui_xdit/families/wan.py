"""Wan 2.1 / 2.2 (video): WanTransformer3DModel, one stream of video tokens (self-attention, then cross-attention to
umT5 text [B, L, 4096], no pooled embedding), true CFG with a negative prompt.

Latents are 5-D [B, C, T, H/8, W/8] as ComfyUI holds them: T = (F - 1) / 4 + 1 latent frames for F pixel frames.
Patches (1, 2, 2) make T x (H/16) x (W/16) tokens, flattened frame by frame, row by row, with a 3-D rotary table
(the model's `rope` module returns it for exactly these tokens, so it is split like them). Wan 2.1 and the
Wan 2.2 A14B experts take the Wan 2.1 VAE's 16 channels; Wan 2.2 TI2V 5B the Wan 2.2 VAE's 48 channels at 16x
spatial compression, with one timestep per token (WanPipeline's expand_timesteps).

Wan 2.2 A14B runs two transformers of one architecture: `transformer` (high noise) for scheduler timesteps
t >= boundary_ratio x 1000 and `transformer_2` (low noise) below; the engine holds them in one `WanExperts` module
(the token plan covers both). One cfg scale serves both experts (WanPipeline's guidance_scale_2 = guidance_scale).

Wan 2.2 TI2V 5B image-to-video (WanImageToVideoPipeline with expand_timesteps; ComfyUI's Wan22ImageToVideoLatent
with a start image): `image_latent` [B, 48, n, h, w], the given first n latent frames in ComfyUI's convention. Every
model call reads them in place of those frames of the noisy latent, at timestep 0 on their tokens (t elsewhere),
and the result ends with them (the pipeline's first_frame_mask; ComfyUI's noise_mask with WAN22's per-frame
timesteps, which sample the same).

I2V variants (in_channels 36) take two more inputs, the same for both CFG branches: `image_cond` [B, 20, T, h, w],
the channels the model reads after the noisy latent (4 mask channels, then the 16-channel image latent, in
WanImageToVideoPipeline's convention: the mask is 1 on the given frames), and for Wan 2.1 I2V `image_embeds`
[B, 257, 1280] (CLIP vision, the pipeline's image encoder output); the model then splits its context at 512 text
tokens, so the text must be exactly 512 tokens (the pipeline's padded length).

Single files in the original layout (ComfyUI's diffusion_models files: `blocks.0.self_attn.q.weight`,
`head.head.weight`, optionally behind `model.diffusion_model.`) are converted with diffusers' converter.
"""
from __future__ import annotations

import torch

from ..adapters.base import Conditioning, FamilyAdapter
from ..errors import ConfigError, XDiTError
from .checkpoint import count, head_dim, require, run_converter
from .qwen_image import WAN21_MEAN, WAN21_STD
from .spec import IMAGE, BlockList, ComfySpec, CondSpec, Family, LatentFormat, TokenPlan, Variant, from_cp_plan

# The Wan 2.2 VAE's latent statistics (48 channels; ComfyUI's Wan22 latent format, diffusers' AutoencoderKLWan)
WAN22_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
              -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
              -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
              -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
              -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
              0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
             0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
             0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
             0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
             0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)
WAN21_LATENT = LatentFormat(16, mean=WAN21_MEAN, std=WAN21_STD, dims=3, time_downscale=4)
WAN22_LATENT = LatentFormat(48, mean=WAN22_MEAN, std=WAN22_STD, dims=3, downscale=16, time_downscale=4)


def unipc_flow(flow_shift: float) -> dict:
    """The Wan releases' scheduler config: UniPC (bh2, order 2) over flow sigmas shifted by `flow_shift`."""
    return dict(_class_name="UniPCMultistepScheduler", num_train_timesteps=1000, prediction_type="flow_prediction",
                use_flow_sigmas=True, flow_shift=flow_shift, solver_order=2, solver_type="bh2", predict_x0=True,
                lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace", steps_offset=0,
                beta_start=0.0001, beta_end=0.02, beta_schedule="linear", thresholding=False, disable_corrector=[],
                use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)


# What each published diffusers folder ships in scheduler/scheduler_config.json (UniPC, flow sigmas):
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan2.1-T2V-14B-Diffusers and Wan2.2-T2V-A14B-Diffusers flow_shift 3.0 (diffusers'
# Wan docs: "the default value is 3.0"; 5.0 is their 720p recommendation, a user's choice: --shift 5);
# Wan2.2-TI2V-5B-Diffusers 5.0. The I2V releases keep 5.0 (the Wan 2.2 release's wan_i2v_A14B config:
# sample_shift 5.0). `--shift` (SampleRequest.shift) replaces any of them.
UNIPC_T2V, UNIPC_5B, UNIPC_I2V = unipc_flow(3.0), unipc_flow(5.0), unipc_flow(5.0)
BOUNDARY = {"wan2.2-t2v-a14b": 0.875, "wan2.2-i2v-a14b": 0.9}   # boundary_ratio of the two-expert releases
EXPAND_TIMESTEPS = {"wan2.2-ti2v-5b"}                             # one timestep per token (WanPipeline's flag)
IMAGE_TO_VIDEO = {"wan2.1-i2v-14b", "wan2.2-i2v-a14b"}            # in_channels 36: latent + mask + image latent
TEXT_TOKENS = 512  # the text length the model assumes when it also takes image embeddings
# ComfyUI's Wan models (comfy/ldm/wan/model.py) replace blocks[i] as ("double_block", i)
SKIP = (("double_block", "blocks"),)
T2V = ComfySpec("WAN21_T2V", "FLOW", "Wan21", skip_blocks=SKIP)
I2V = ComfySpec("WAN21_I2V", "FLOW", "Wan21", skip_blocks=SKIP)


class WanExperts(torch.nn.Module):
    """Wan 2.2 A14B's two experts of one architecture: `transformer` for scheduler timesteps t >= boundary_ratio x
    num_train_timesteps (high noise), `transformer_2` below (low noise)."""

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module, boundary_ratio: float,
                 num_train_timesteps: int = 1000):
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary_ratio, self.num_train_timesteps = boundary_ratio, num_train_timesteps
        self.config = transformer.config

    @property
    def blocks(self) -> torch.nn.ModuleList:
        """Both experts' blocks (a view; each expert runs its own)."""
        return torch.nn.ModuleList([*self.transformer.blocks, *self.transformer_2.blocks])

    def expert(self, t: torch.Tensor) -> int:
        return 0 if float(t) >= self.boundary_ratio * self.num_train_timesteps else 1

    def forward(self, *args, expert: int = 0, **kwargs):
        return (self.transformer, self.transformer_2)[expert](*args, **kwargs)


def build(kwargs: dict, variant: str = "") -> torch.nn.Module:
    """A WanTransformer3DModel, or two of them in WanExperts for a two-expert variant or kwargs naming a
    `boundary_ratio` (tiny models; a pipeline folder's or a pair of files': None there is the variant's)."""
    from diffusers import WanTransformer3DModel

    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    pair = "boundary_ratio" in kwargs
    boundary = kwargs.pop("boundary_ratio", None)
    if boundary is None:
        boundary = BOUNDARY.get(variant, BOUNDARY["wan2.2-t2v-a14b"] if pair else None)
    if boundary is None:
        return WanTransformer3DModel(**kwargs)
    return WanExperts(WanTransformer3DModel(**kwargs), WanTransformer3DModel(**kwargs), boundary)


class WanAdapter(FamilyAdapter):
    def __init__(self, spec: Family, model: torch.nn.Module, variant: str = ""):
        # a built-in tiny model comes with the family's default variant (make_adapter's for none): take the one
        # its shape says; another named variant the model cannot be is refused (the loaders refuse it first, with
        # the file's name)
        experts = isinstance(model, WanExperts)
        image = model.config.in_channels != model.config.out_channels
        if ((variant in BOUNDARY) != experts or spec.latent_of(variant).channels != model.config.out_channels
                or (variant in IMAGE_TO_VIDEO) != image):
            detected = _variant_of(dict(model.config), "", experts)
            if variant != spec.default_variant.name and not (variant == detected == "wan2.2-i2v-a14b"):
                raise XDiTError(f"the model is {'two experts of ' if experts else ''}{detected}, not {variant}")
            variant = detected
        super().__init__(spec, model, variant)

    @property
    def experts(self) -> bool:
        return isinstance(self.model, WanExperts)

    def token_plan(self) -> TokenPlan:
        from diffusers import WanTransformer3DModel

        cp_plan = WanTransformer3DModel._cp_plan
        prefix = "" if not self.experts else "*"  # WanExperts: the same points in each expert ("*" = either)
        plan = {(f"{prefix}.{path}" if path and prefix else path or prefix): entry for path, entry in cp_plan.items()}
        # the rotary tables (cos, sin) and the blocks' input are the video tokens; so is the per-token timestep of
        # Wan 2.2 TI2V ([B, tokens]; a [B] timestep passes)
        return from_cp_plan(plan, streams={"0": IMAGE, "1": IMAGE, "hidden_states": IMAGE, "timestep": IMAGE},
                            attention={f"{prefix}.blocks.*.attn1" if prefix else "blocks.*.attn1": (IMAGE,)},
                            blocks=(BlockList("blocks"),))

    def check_request(self, req, config=None) -> None:
        from ..sampling import latent_shape

        cfg = self.model.config
        extra = cfg.in_channels - self.latent_channels
        given, embeds = req.inputs.get("image_cond"), req.inputs.get("image_embeds")
        shape = latent_shape(self, req)
        if extra:
            want = [extra, *shape[2:]]
            if given is None:
                raise XDiTError(f"{self.variant} needs image_cond [B, {', '.join(map(str, want))}] (the mask and the "
                                "image latent the model reads after the noisy latent)")
            if given.ndim != 5 or list(given.shape[1:]) != want or given.shape[0] not in (1, req.batch_size):
                raise XDiTError(f"image_cond has shape {list(given.shape)}, expected [B, {', '.join(map(str, want))}]")
        elif given is not None:
            raise XDiTError(f"{self.variant} takes no image_cond (a text-to-video model)")
        first = req.inputs.get("image_latent")
        if first is not None:
            if self.variant not in EXPAND_TIMESTEPS:
                raise XDiTError(f"{self.variant} takes no image_latent (given first frames: Wan 2.2 TI2V 5B's "
                                "image-to-video)")
            want = [self.latent_channels, *shape[3:]]
            if (first.ndim != 5 or [first.shape[1], *first.shape[3:]] != want or not 1 <= first.shape[2] <= shape[2]
                    or first.shape[0] not in (1, req.batch_size)):
                raise XDiTError(f"image_latent has shape {list(first.shape)}, expected [B, {want[0]}, n, "
                                f"{want[1]}, {want[2]}] with 1 <= n <= {shape[2]} latent frames")
        if cfg.image_dim and embeds is None:
            raise XDiTError(f"{self.variant} needs image_embeds [B, 257, {cfg.image_dim}] (CLIP vision)")
        if embeds is not None:
            if not cfg.image_dim:
                raise XDiTError(f"{self.variant} takes no image_embeds")
            if embeds.ndim != 3 or embeds.shape[-1] != cfg.image_dim or embeds.shape[0] not in (1, req.batch_size):
                raise XDiTError(f"image_embeds has shape {list(embeds.shape)}, expected [B, N, {cfg.image_dim}]")
            for name in ("cond", "neg_cond"):
                t = req.inputs.get(name)
                if t is not None and t.ndim == 3 and t.shape[1] != TEXT_TOKENS:
                    raise XDiTError(f"{name} has {t.shape[1]} tokens: with image_embeds the text must be "
                                    f"{TEXT_TOKENS} tokens (the model splits its context there)")
        if self.experts and req.cache is not None:
            raise ConfigError(f"the step cache is not available for {self.variant}: its two experts do not share "
                              "the residual it reuses")
        if self.experts and config is not None and config.pipefusion > 1:
            raise ConfigError(f"pipefusion is not available for {self.variant} (two experts): use ulysses, ring, "
                              "cfg or dp")

    def _given_frames(self, x: torch.Tensor, c: Conditioning) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the given frames in model space at their place in x, the mask: 0 on them, 1 elsewhere [1, 1, T, 1, 1])
        for TI2V's image-to-video, else None."""
        first = c.extra.get("image_latent")
        if first is None:
            return None
        n = first.shape[2]
        given = torch.zeros_like(x)
        given[:, :, :n] = self.to_model_space(first.float()).to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1, -1)
        mask = torch.ones(1, 1, x.shape[2], 1, 1, device=x.device, dtype=x.dtype)
        mask[:, :, :n] = 0.0
        return given, mask

    def finish_latents(self, x: torch.Tensor, c: Conditioning) -> torch.Tensor:
        """TI2V image-to-video ends with the given frames (the pipeline's last step)."""
        g = self._given_frames(x, c)
        return x if g is None else (1 - g[1]) * g[0] + g[1] * x

    def predict(self, x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
        if x.ndim != 5:
            raise XDiTError(f"{self.family} samples video latents [B, C, T, h, w], got {list(x.shape)}")
        b, _, frames, h, w = x.shape
        timestep = t.expand(b).to(x.device)
        if self.variant in EXPAND_TIMESTEPS:  # every token at t, the given frames' at 0
            per_frame = torch.ones(frames, device=x.device)
            g = self._given_frames(x, c)
            if g is not None:
                x = (1 - g[1]) * g[0] + g[1] * x
                per_frame = g[1].flatten().float()
            per_token = per_frame[:, None].expand(frames, (h // self.patch) * (w // self.patch)).flatten()
            timestep = (per_token[None, :] * timestep.float()[:, None])
        kwargs = {"expert": self.model.expert(t)} if self.experts else {}
        if "image_cond" in c.extra:  # I2V: mask and image latent after the noisy latent
            x = torch.cat([x, c.extra["image_cond"].to(x.dtype)], dim=1)
        if "image_embeds" in c.extra:
            kwargs["encoder_hidden_states_image"] = c.extra["image_embeds"]
        out = self.model(hidden_states=x.to(self.dtype), timestep=timestep, encoder_hidden_states=c.cond,
                         return_dict=False, **kwargs)[0]
        return out


# ------------------------------------------------------------------------------------------------ checkpoints
def _detect(keys: set[str]) -> bool:
    """The output head's modulation (original layout: diffusers' own detection key) or, in diffusers' layout, the
    3-D patch embedding with blocks of self- and cross-attention and a per-block scale_shift_table."""
    original = {"head.modulation", "patch_embedding.weight", "blocks.0.self_attn.q.weight"} <= keys
    return original or {"patch_embedding.weight", "condition_embedder.time_proj.weight", "blocks.0.attn1.to_q.weight",
                        "blocks.0.attn2.to_k.weight", "blocks.0.scale_shift_table"} <= keys


def _is_original(keys: set[str]) -> bool:
    return "head.modulation" in keys or any(".self_attn." in k for k in keys)


def _convert(sd: dict, name: str) -> tuple[dict, dict]:
    """The original layout -> diffusers, with diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers as convert

    return {k: v.contiguous() for k, v in run_converter(convert, sd, name).items()}, {}


def _infer_config(sd: dict, hints: dict) -> dict:
    require(sd, "patch_embedding.weight", "proj_out.weight", "blocks.0.ffn.net.0.proj.weight",
            "condition_embedder.text_embedder.linear_1.weight", "condition_embedder.time_embedder.linear_1.weight")
    inner, in_channels, *patch = sd["patch_embedding.weight"].shape
    head = head_dim(sd, "", int(inner), 128)
    cfg = dict(patch_size=[int(p) for p in patch], in_channels=int(in_channels),
               out_channels=int(sd["proj_out.weight"].shape[0]) // (int(patch[0]) * int(patch[1]) * int(patch[2])),
               num_attention_heads=int(inner) // head, attention_head_dim=head,
               ffn_dim=int(sd["blocks.0.ffn.net.0.proj.weight"].shape[0]),
               text_dim=int(sd["condition_embedder.text_embedder.linear_1.weight"].shape[1]),
               freq_dim=int(sd["condition_embedder.time_embedder.linear_1.weight"].shape[1]),
               num_layers=count(sd, "blocks."), cross_attn_norm="blocks.0.norm2.weight" in sd,
               qk_norm="rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in sd else None,
               image_dim=None, added_kv_proj_dim=None, pos_embed_seq_len=None)
    if "condition_embedder.image_embedder.norm1.weight" in sd:  # Wan 2.1 I2V's CLIP-vision embedding
        cfg["image_dim"] = int(sd["condition_embedder.image_embedder.norm1.weight"].shape[0])
    if "blocks.0.attn2.add_k_proj.weight" in sd:
        cfg["added_kv_proj_dim"] = int(sd["blocks.0.attn2.add_k_proj.weight"].shape[1])
    if "condition_embedder.image_embedder.pos_embed" in sd:
        cfg["pos_embed_seq_len"] = int(sd["condition_embedder.image_embedder.pos_embed"].shape[1])
    return cfg


def _variant_of(cfg: dict, pipeline: str, experts: bool = False) -> str:
    """The variant a config (and the pipeline's class name, or two experts: `experts` or a `boundary_ratio` key)
    says. One expert alone is the Wan 2.1 model of its architecture (14B T2V or, with no CLIP image input, a
    one-expert I2V, which only Wan 2.2 A14B has)."""
    experts = experts or "boundary_ratio" in cfg
    if cfg.get("in_channels") == 48 or cfg.get("out_channels") == 48:
        return "wan2.2-ti2v-5b"
    if cfg.get("in_channels") == 36 or "ImageToVideo" in pipeline:
        return "wan2.1-i2v-14b" if cfg.get("image_dim") else "wan2.2-i2v-a14b"
    if experts:
        return "wan2.2-t2v-a14b"
    return "wan2.1-t2v-1.3b" if cfg.get("num_attention_heads", 40) * cfg.get("attention_head_dim", 128) <= 1536 \
        else "wan2.1-t2v-14b"


def _refuse_variant(cfg: dict, detected: str, requested: str) -> str | None:
    """Why weights of config `cfg` (variant `detected`) cannot be loaded as `requested` (None: they are it). Every
    Wan variant is told apart by its weights (sizes, channels, CLIP input, one or two experts), so any other one is
    refused; one expert alone (Wan 2.2 I2V's is `detected` as wan2.2-i2v-a14b: ComfyUI runs each expert as its own
    model) is never the two-expert variant."""
    experts = "boundary_ratio" in cfg
    if requested in BOUNDARY and not experts:
        return (f"one transformer ({'one expert of ' if detected == requested else ''}{detected}), not {requested}, "
                "which is two experts: load a pipeline folder with transformer/ and transformer_2/, or the high- "
                "and low-noise files together (--model HIGH --model-2 LOW, or Load Parallel DiT's second "
                "checkpoint)")
    if experts and requested not in BOUNDARY:
        return f"two experts ({detected}), not {requested}"
    if requested != detected:
        return f"these weights are {detected}, not {requested}"
    return None


_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
             text_dim=4096, freq_dim=32, ffn_dim=96, num_layers=3, rope_max_seq_len=64)
FAMILY = Family(
    name="wan",
    diffusers_class="WanTransformer3DModel",
    # ComfyUI 0.3.64: WAN21_T2V (also the A14B experts, the same architecture), WAN22_T2V (TI2V 5B, Wan22 latents),
    # WAN21_I2V; flow, shift 8.0
    variants=(Variant("wan2.1-t2v-1.3b", "wan2.1-t2v-1.3b.json", UNIPC_T2V, T2V),
              Variant("wan2.1-t2v-14b", "wan2.1-t2v-14b.json", UNIPC_T2V, T2V),
              Variant("wan2.2-t2v-a14b", "wan2.2-t2v-a14b.json", UNIPC_T2V, T2V),
              Variant("wan2.1-i2v-14b", "wan2.1-i2v-14b.json", UNIPC_I2V, I2V),
              Variant("wan2.2-i2v-a14b", "wan2.2-i2v-a14b.json", UNIPC_I2V, I2V),
              Variant("wan2.2-ti2v-5b", "wan2.2-ti2v-5b.json", UNIPC_5B, ComfySpec("WAN22_T2V", "FLOW", "Wan22", skip_blocks=SKIP),
                      latent=WAN22_LATENT)),
    latent=WAN21_LATENT,
    cond=CondSpec(width=4096, negative_length_may_differ=True, tokens=512,
                  extra_inputs=("image_cond", "image_embeds", "image_latent")),
    flow=True,
    samplers=("unipc", "euler", "dpmpp_2m"),
    adapter=f"{__name__}:WanAdapter",
    tiny={"tiny-wan": _TINY,
          "tiny-wan-a14b": {**_TINY, "boundary_ratio": BOUNDARY["wan2.2-t2v-a14b"]},
          "tiny-wan-ti2v": {**_TINY, "in_channels": 48, "out_channels": 48},
          # compute-bound on video tokens for the CPU scaling benchmark: 8 heads x 128, 4 blocks
          "bench-wan": {**_TINY, "num_attention_heads": 8, "attention_head_dim": 128, "ffn_dim": 4096, "num_layers": 4,
                        "freq_dim": 256, "rope_max_seq_len": 1024}},
    detect=_detect,
    is_original=_is_original,
    convert=_convert,
    infer_config=_infer_config,
    variant_of=_variant_of,
    build=build,
    experts=True,
    refuse_variant=_refuse_variant,
    # the text (and CLIP-image) embedding and cross-attention's K/V (each expert's own; I2V's context is a new
    # concatenation every call, so there only the embedders are reused)
    context_modules=("*condition_embedder.text_embedder", "*condition_embedder.image_embedder",
                     *(f"*blocks.*.attn2.{m}" for m in ("to_k", "to_v", "norm_k", "add_k_proj", "add_v_proj",
                                                         "norm_added_k"))),
    aliases={"wan-1.3b": "wan2.1-t2v-1.3b", "wan-14b": "wan2.1-t2v-14b", "wan-a14b": "wan2.2-t2v-a14b",
             "wan-i2v": "wan2.1-i2v-14b", "wan-5b": "wan2.2-ti2v-5b"},
    order=60,
)
