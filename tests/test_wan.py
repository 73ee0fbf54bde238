"""Wan (video): serial sampling equals diffusers' WanPipeline (Wan 2.1 T2V, the two-expert Wan 2.2 A14B, Wan 2.2
TI2V with per-token timesteps) and WanImageToVideoPipeline; frame counts; the step cache and the analyser's
profile; weights; bench's memory rows; the CLI. Parallel sampling at world 2 and 4 on an odd token count, PipeFusion
over the flattened T x H x W tokens (patches cross frame boundaries) exact when synchronous and equal to a
plain-hook stale reference when stale, the cache on ranks, the analyser under Ulysses and the tiny bench run: the
wan row of the family matrix (tests/test_family_matrix.py).

The tiny models: 4 heads x 16, 3 blocks, 4096-wide text; the matrix's cases are 9 frames (3 latent frames) of
48x80 pixels: 3 x 3 x 5 = 45 video tokens, 15 text tokens, divisible by neither 2 nor 4.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_xdit.errors import ConfigError, WeightsError, XDiTError
from comfyui_xdit.models import load_model
from comfyui_xdit.sampling import SampleRequest, latent_shape, prepare, sample, seed_noise
from tests.cases import build_request, get_model
from tests.conftest import rel_l2
from tests.family_matrix import WAN_ANALYZE, WAN_CACHE, WAN_CACHE_MASK, WAN_I2V as I2V
from tests.family_matrix import WAN_NEG as NEG, WAN_ODD as ODD  # noqa: F401 (tests/test_wan_*.py take them from here)

MODEL, EXPERTS, TI2V = "tiny-wan", "tiny-wan-a14b", "tiny-wan-ti2v"


# flow_shift in scheduler/scheduler_config.json of the published diffusers folders (Wan-AI/*-Diffusers); the
# reference pipelines are built from these numbers, not from the engine's own scheduler
PUBLISHED_SHIFT = {"wan2.1-t2v-1.3b": 3.0, "wan2.1-t2v-14b": 3.0, "wan2.2-t2v-a14b": 3.0, "wan2.2-ti2v-5b": 5.0,
                   "wan2.1-i2v-14b": 5.0, "wan2.2-i2v-a14b": 5.0}


def published_scheduler(variant: str, shift: float | None = None):
    """The scheduler a published Wan folder ships: UniPC over flow sigmas (its other fields diffusers' defaults)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                   flow_shift=PUBLISHED_SHIFT[variant] if shift is None else shift)


def pipeline_latents(adapter, req: SampleRequest, cond, neg, guidance_scale_2: float | None = None,
                     boundary_ratio: float | None = None, shift: float | None = None) -> torch.Tensor:
    """WanPipeline with the same transformer(s), embeddings and the seed noise as latents, the published folder's
    scheduler (or flow_shift `shift`); no VAE (output_type="latent"); ComfyUI-convention latents."""
    import diffusers

    sched = published_scheduler(adapter.variant, shift)
    model = adapter.model
    if adapter.experts:
        kw = dict(transformer=model.transformer, transformer_2=model.transformer_2,
                  boundary_ratio=model.boundary_ratio if boundary_ratio is None else boundary_ratio)
    else:
        kw = dict(transformer=model)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sched,
                                 expand_timesteps=adapter.variant == "wan2.2-ti2v-5b", **kw)
    pipe.set_progress_bar_config(disable=True)
    noise = seed_noise(req.seed, latent_shape(adapter, req))
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=neg, guidance_scale=req.cfg,
               guidance_scale_2=guidance_scale_2, height=req.height, width=req.width, num_frames=req.frames,
               num_inference_steps=req.steps, latents=noise, output_type="latent", return_dict=False)[0]
    return adapter.from_model_space(out.float())


def _embeddings(seed: int, batch: int = 1, pos: int = 12, neg: int = 7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, pos, 4096, generator=gen), torch.randn(batch, neg, 4096, generator=gen)


@pytest.mark.parametrize("model,height,width,frames,batch", [
    (MODEL, 96, 80, 9, 1),      # 3 latent frames of 6 x 5 patches
    (MODEL, 64, 64, 1, 2),      # one frame (an image), batch 2
    (EXPERTS, 96, 80, 9, 1),    # two experts switched at boundary_ratio 0.875
    (TI2V, 96, 160, 5, 1),      # 48 channels, 16x spatial, one timestep per token
])
def test_serial_matches_wan_pipeline(model, height, width, frames, batch):
    ad = get_model({"model": model}).adapter
    cond, neg = _embeddings(0, batch)
    req = SampleRequest(height=height, width=width, frames=frames, steps=5, seed=3, batch_size=batch, cfg=4.0,
                        inputs={"cond": cond, "neg_cond": neg})
    ours = sample(ad, req)
    down = ad.latent.downscale
    assert ours.shape == (batch, ad.latent_channels, (frames - 1) // 4 + 1, height // down, width // down)
    assert torch.isfinite(ours).all() and ours.std() > 0.5
    assert rel_l2(ours, pipeline_latents(ad, req, cond, neg)) <= 1e-4


@pytest.mark.parametrize("model", [MODEL, EXPERTS])
def test_shift_override_matches_the_pipeline_at_that_shift(model):
    """The default is the published folder's shift (3.0 for T2V); `shift` replaces it and equals WanPipeline with
    that flow_shift; the two differ (so the default comparison can fail)."""
    ad = get_model({"model": model}).adapter
    cond, neg = _embeddings(4)
    req = SampleRequest(height=48, width=80, frames=5, steps=4, seed=1, cfg=3.0, shift=5.0,
                        inputs={"cond": cond, "neg_cond": neg})
    ours = sample(ad, req)
    assert rel_l2(ours, pipeline_latents(ad, req, cond, neg, shift=5.0)) <= 1e-4
    default = sample(ad, SampleRequest(**{**req.__dict__, "shift": None}))
    assert rel_l2(default, pipeline_latents(ad, req, cond, neg)) <= 1e-4
    assert rel_l2(default, ours) > 1e-2


def test_experts_switch_at_the_boundary():
    """The high-noise expert runs the steps with t >= 875, the low-noise one the rest; the pipeline with another
    boundary (or the low expert's own guidance scale) gives another result, so the comparison above can fail."""
    ad = get_model({"model": EXPERTS}).adapter
    cond, neg = _embeddings(1)
    req = SampleRequest(height=48, width=48, frames=5, steps=6, seed=2, cfg=3.0, inputs={"cond": cond,
                                                                                          "neg_cond": neg})
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs, i=i: calls.append((i, float(kwargs["timestep"][0]))),
                                         with_kwargs=True)
             for i, m in enumerate((ad.model.transformer, ad.model.transformer_2))]
    try:
        ours = sample(ad, req)
    finally:
        for h in hooks:
            h.remove()
    assert {i for i, _ in calls} == {0, 1}
    assert all((t >= 875) == (i == 0) for i, t in calls)
    assert rel_l2(ours, pipeline_latents(ad, req, cond, neg)) <= 1e-4
    assert rel_l2(ours, pipeline_latents(ad, req, cond, neg, boundary_ratio=0.5)) > 1e-3
    assert rel_l2(ours, pipeline_latents(ad, req, cond, neg, guidance_scale_2=1.0)) > 1e-3


def test_i2v_serial_matches_wan_i2v_pipeline():
    """Wan 2.1 I2V: WanImageToVideoPipeline with the same transformer, embeddings and image_embeds; its VAE step
    (prepare_latents) returns the seed noise and the same image_cond, so the denoising loop and the model calls
    are the pipeline's own."""
    import diffusers

    ad = get_model({"model": MODEL, "overrides": I2V}).adapter
    assert ad.variant == "wan2.1-i2v-14b"
    gen = torch.Generator().manual_seed(5)
    cond, neg = torch.randn(1, 512, 4096, generator=gen), torch.randn(1, 512, 4096, generator=gen)
    image_cond, embeds = torch.randn(1, 20, 3, 6, 10, generator=gen), torch.randn(1, 257, 32, generator=gen)
    req = SampleRequest(height=48, width=80, frames=9, steps=4, seed=3, cfg=5.0,
                        inputs={"cond": cond, "neg_cond": neg, "image_cond": image_cond, "image_embeds": embeds})
    ours = sample(ad, req)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, image_encoder=None,
                                             image_processor=None, transformer=ad.model,
                                             scheduler=published_scheduler(ad.variant))
    pipe.set_progress_bar_config(disable=True)
    noise = seed_noise(3, latent_shape(ad, req))
    pipe.prepare_latents = lambda *args, **kwargs: (noise, image_cond)
    pipe.check_inputs = lambda *args, **kwargs: None  # it refuses an image together with image_embeds
    out = pipe(image=torch.zeros(1, 3, 48, 80), prompt_embeds=cond, negative_prompt_embeds=neg, image_embeds=embeds,
               guidance_scale=5.0, height=48, width=80, num_frames=9, num_inference_steps=4, output_type="latent",
               return_dict=False)[0]
    assert rel_l2(ours, ad.from_model_space(out.float())) <= 1e-4
    no_image = sample(ad, SampleRequest(**{**req.__dict__, "inputs": {**req.inputs, "image_cond": 0 * image_cond}}))
    assert rel_l2(ours, no_image) > 1e-3  # the image conditioning reaches the model


def test_frames_and_shapes_are_checked():
    ad = get_model({"model": MODEL}).adapter
    base = dict(height=48, width=80, steps=2, seed=1)
    for frames in (8, 0, -3):
        with pytest.raises(XDiTError, match=r"frames must be 4k\+1 \(1, 5, 9, \.\.\., 81, \.\.\.\) for wan, got"):
            prepare(ad, SampleRequest(**base, frames=frames), tiny=True)
    assert latent_shape(ad, SampleRequest(**base, frames=81)) == (1, 16, 21, 6, 10)
    assert ad.image_tokens(480, 832, 81) == 21 * 30 * 52
    with pytest.raises(XDiTError, match=r"expected cond of shape \[B, L, 4096\]"):
        prepare(ad, SampleRequest(**base, inputs={"cond": torch.zeros(1, 8, 2560)}), tiny=False)
    with pytest.raises(XDiTError, match=r"noise has shape \[1, 16, 2, 6, 10\], expected \[1, 16, 3, 6, 10\]"):
        prepare(ad, SampleRequest(**base, frames=9, inputs={"noise": torch.zeros(1, 16, 2, 6, 10)}), tiny=True)
    image = load_model("tiny-flux").adapter  # image families: one frame only, nothing else changes
    with pytest.raises(XDiTError, match="flux makes images: frames must be 1, got 5"):
        prepare(image, SampleRequest(height=64, width=64, steps=2, frames=5), tiny=True)
    assert latent_shape(image, SampleRequest(height=64, width=64, steps=2)) == (1, 16, 8, 8)


def test_schedule_latents_and_refusals(tmp_path):
    """The published folders' UniPC (flow sigmas, shift 3.0 for T2V, 5.0 for TI2V 5B); ComfyUI's euler over its levels; explicit sigmas; the Wan
    2.1 / 2.2 latent conventions; I2V (image conditioning) and expert-incompatible settings refused."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    from comfyui_xdit import families
    from comfyui_xdit.adapters import make_adapter
    from comfyui_xdit.cache import CacheSettings
    from comfyui_xdit.parallel import ParallelConfig
    from comfyui_xdit.parallel.runner import check_model_fit
    from comfyui_xdit.schedules import make_schedule

    for variant, shift in PUBLISHED_SHIFT.items():
        sched = make_schedule("wan", variant, "default", 10, 0).scheduler
        assert isinstance(sched, UniPCMultistepScheduler) and sched.config.flow_shift == shift, variant
    sched = make_schedule("wan", "wan2.1-t2v-14b", "default", 10, 0, shift=5.0).scheduler
    assert sched.timesteps[0] == 999 and sched.sigmas[-1] == 0 and round(float(sched.sigmas[5]), 4) == 0.8336
    with pytest.raises(XDiTError, match="shift cannot be set for flux: its pipeline shifts by the image size"):
        make_schedule("flux", "flux-dev", "default", 4, 256, shift=3.0)
    with pytest.raises(XDiTError, match="shift applies to the pipeline's schedule, not to explicit sigmas"):
        make_schedule("wan", "wan2.1-t2v-14b", "euler", 4, 0, sigmas=[1.0, 0.5, 0.0], shift=3.0)
    ad = get_model({"model": MODEL}).adapter
    base = dict(height=48, width=48, frames=5, steps=4, seed=2)
    unipc, euler = (sample(ad, SampleRequest(**base, sampler=x), tiny=True) for x in ("unipc", "euler"))
    assert torch.isfinite(euler).all() and 1e-3 < rel_l2(euler, unipc) < 0.5
    sig = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    assert torch.isfinite(sample(ad, SampleRequest(**base, sampler="euler", inputs={"sigmas": sig}),
                                 tiny=True)).all()
    with pytest.raises(XDiTError, match="sampler 'unipc' cannot run over explicit sigmas: choose euler or dpmpp_2m"):
        prepare(ad, SampleRequest(**base, inputs={"sigmas": sig}), tiny=True)
    latent = torch.randn(1, 16, 2, 3, 3)
    mean, std = (torch.tensor(v).view(1, 16, 1, 1, 1) for v in (ad.latent.mean, ad.latent.std))
    assert torch.allclose(ad.to_model_space(latent), (latent - mean) / std)
    ti2v = get_model({"model": TI2V}).adapter
    assert (ti2v.variant, ti2v.latent.channels, ti2v.latent.downscale) == ("wan2.2-ti2v-5b", 48, 16)
    fam = families.get("wan")
    assert [v.comfy.supported_model for v in fam.variants] == ["WAN21_T2V"] * 3 + ["WAN21_I2V"] * 2 + ["WAN22_T2V"]
    i2v = make_adapter("wan", WanTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=36,
                                                    out_channels=16, num_layers=1, ffn_dim=32, freq_dim=32,
                                                    image_dim=32, added_kv_proj_dim=32).eval(), "wan2.1-i2v-14b")
    with pytest.raises(XDiTError, match=r"wan2.1-i2v-14b needs image_cond \[B, 20, 2, 6, 6\]"):
        prepare(i2v, SampleRequest(**base), tiny=True)
    with pytest.raises(XDiTError, match=r"image_cond has shape \[1, 20, 3, 6, 6\], expected \[B, 20, 2, 6, 6\]"):
        prepare(i2v, SampleRequest(**base, inputs={"image_cond": torch.zeros(1, 20, 3, 6, 6)}), tiny=True)
    with pytest.raises(XDiTError, match=r"needs image_embeds \[B, 257, 32\]"):
        prepare(i2v, SampleRequest(**base, inputs={"image_cond": torch.zeros(1, 20, 2, 6, 6)}), tiny=True)
    with pytest.raises(XDiTError, match="cond has 8 tokens: with image_embeds the text must be 512 tokens"):
        prepare(i2v, SampleRequest(**base, inputs={"image_cond": torch.zeros(1, 20, 2, 6, 6), "cond": torch.zeros(
            1, 8, 4096), "image_embeds": torch.zeros(1, 257, 32)}), tiny=False)
    with pytest.raises(XDiTError, match="wan2.1-t2v-1.3b takes no image_cond"):
        prepare(ad, SampleRequest(**base, inputs={"image_cond": torch.zeros(1, 20, 2, 6, 6)}), tiny=True)
    experts = get_model({"model": EXPERTS}).adapter
    with pytest.raises(ConfigError, match="step cache is not available for wan2.2-t2v-a14b"):
        prepare(experts, SampleRequest(**base, cache=CacheSettings(threshold=0.1)), tiny=True)
    with pytest.raises(ConfigError, match=r"pipefusion is not available for wan2.2-t2v-a14b \(two experts\)"):
        check_model_fit(ParallelConfig(pipefusion=2, num_patches=2), experts, SampleRequest(**base))


# ------------------------------------------------------------------------------------------------ parallel
# Parallel sampling at world 2 and 4 (45 video tokens; the two experts, TI2V and I2V too), PipeFusion over the
# flattened frames, the stale phase, the cache on ranks and the analyser under Ulysses: the wan row of
# tests/family_matrix.py, checked in tests/test_family_matrix.py.
def test_ulysses_degree_not_dividing_40_heads_is_refused_and_81_frames_fit():
    from comfyui_xdit.bench import build_random
    from comfyui_xdit.parallel import ParallelConfig
    from comfyui_xdit.parallel.runner import check_model_fit

    adapter = build_random("wan2.1-t2v-14b", torch.bfloat16, "meta")
    req = SampleRequest(height=480, width=832, frames=81, steps=40)
    with pytest.raises(ConfigError, match=r"40 attention heads, not divisible by the Ulysses degree 3"):
        check_model_fit(ParallelConfig(ulysses=3), adapter, req)
    check_model_fit(ParallelConfig(ulysses=8), adapter, req)
    check_model_fit(ParallelConfig(pipefusion=4, num_patches=4), adapter, req)


# ------------------------------------------------------------------------------------------------ cache, analyser
def _cached(mask: list[bool] | None):
    from comfyui_xdit.cache import CacheSettings
    from comfyui_xdit.engine import run_job

    loaded = get_model({"model": MODEL})
    req = build_request(loaded, WAN_CACHE)
    req.cache = None if mask is None else CacheSettings(mask=mask)
    job = run_job(loaded, req)
    return job.latents, job.reused_steps


def test_cache_reuses_the_masked_steps():
    ref, _ = _cached(None)
    serial, reused = _cached(WAN_CACHE_MASK)
    assert reused == [2, 4] and rel_l2(serial, ref) > 1e-4


def test_analyser_profile_over_the_blocks():
    import numpy as np

    from comfyui_xdit.analysis import analyze
    from tests.attn_cases import analysis_requests

    loaded = get_model({"model": MODEL})
    profile = analyze(loaded, analysis_requests(loaded, WAN_ANALYZE))
    assert profile.labels["residual"] == ["blocks.0", "blocks.1", "blocks.2"]
    assert np.isfinite(profile.rel["residual"][:, :, 1:]).all()


# ------------------------------------------------------------------------------------------------ weights
# diffusers -> the original Wan layout (ComfyUI's files), the inverse of diffusers' converter, for the tests only
_TO_ORIGINAL = [("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
                ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
                ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
                ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
                ("condition_embedder.time_proj.", "time_projection.1."),
                ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
                ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
                ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
                ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
                (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_out.0.", ".o."), (".to_q.", ".q."),
                (".to_k.", ".k."), (".to_v.", ".v."), (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."),
                (".norm_added_k.", ".norm_k_img."), (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
                (".norm2.", ".norm3."), (".scale_shift_table", ".modulation")]


def wan_to_original(model) -> dict:
    out = {}
    for key, value in model.state_dict().items():
        if key == "scale_shift_table":
            key = "head.modulation"
        elif key.startswith("proj_out."):
            key = "head.head." + key[len("proj_out."):]
        for a, b in _TO_ORIGINAL:
            key = key.replace(a, b)
        out[key] = value
    return out


def _randomized(**kw):
    from diffusers import WanTransformer3DModel

    from comfyui_xdit.tiny import fill_deterministic

    model = WanTransformer3DModel(**{**dict(num_attention_heads=4, attention_head_dim=24, in_channels=16,
                                           out_channels=16, num_layers=2, ffn_dim=64, freq_dim=32), **kw})
    fill_deterministic(model, 9)
    return model.eval().requires_grad_(False)


def _same(model, loaded) -> None:
    ref, got = model.state_dict(), loaded.model.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_single_files_original_comfyui_and_diffusers(tmp_path):
    """The original layout (converted with diffusers' converter), ComfyUI's prefixed file, the diffusers layout in
    one file, a diffusers folder; the I2V layout (CLIP-vision embedding, image K/V) too."""
    from comfyui_xdit.weights import detect_family, load_transformer

    model = _randomized()
    original = wan_to_original(model)
    assert {"head.modulation", "blocks.0.self_attn.q.weight", "blocks.1.cross_attn.norm_k.weight",
            "blocks.0.norm3.weight", "head.head.weight", "patch_embedding.weight"} <= set(original)
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "wan.safetensors"))
    loaded = load_transformer(str(tmp_path / "wan.safetensors"))
    assert (loaded.family, loaded.variant) == ("wan", "wan2.1-t2v-1.3b")
    _same(model, loaded)
    assert loaded.model.config.num_attention_heads == 4 and loaded.model.config.ffn_dim == 64  # 96 wide: 4 heads
    comfy = {f"model.diffusion_model.{k}": v.contiguous() for k, v in original.items()}
    save_file(comfy, str(tmp_path / "wan_comfy.safetensors"))
    _same(model, load_transformer(str(tmp_path / "wan_comfy.safetensors")))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "diffusers.safetensors"))
    _same(model, load_transformer(str(tmp_path / "diffusers.safetensors")))
    model.save_pretrained(str(tmp_path / "folder"))
    _same(model, load_transformer(str(tmp_path / "folder"), family="wan"))
    assert detect_family(original) == detect_family(model.state_dict()) == "wan"
    i2v = _randomized(in_channels=36, image_dim=24, added_kv_proj_dim=24)
    save_file({k: v.contiguous() for k, v in wan_to_original(i2v).items()}, str(tmp_path / "i2v.safetensors"))
    loaded = load_transformer(str(tmp_path / "i2v.safetensors"))
    assert loaded.variant == "wan2.1-i2v-14b" and loaded.model.config.image_dim == 24
    _same(i2v, loaded)


def test_detection_is_specific_and_bad_files_are_one_line_errors(tmp_path):
    from comfyui_xdit import families
    from comfyui_xdit.weights import load_transformer
    from tests.test_weights import flux_to_bfl, make_flux, make_pixart, make_sd3, sd3_to_mmdit

    wan = families.get("wan")
    model = _randomized()
    for keys in (set(model.state_dict()), set(wan_to_original(model))):
        assert [f.name for f in families.families().values() if f.detect(keys)] == ["wan"]
    for other in (make_flux().state_dict(), flux_to_bfl(make_flux()), make_sd3().state_dict(),
                  sd3_to_mmdit(make_sd3()), make_pixart().state_dict()):
        assert not wan.detect(set(other))
    broken = {k: v.contiguous() for k, v in wan_to_original(model).items() if not k.startswith("text_embedding.0.")}
    save_file(broken, str(tmp_path / "a.safetensors"))
    with pytest.raises(WeightsError, match="missing keys condition_embedder.text_embedder.linear_1.weight"):
        load_transformer(str(tmp_path / "a.safetensors"))


@pytest.mark.parametrize("variant,billions", [("wan2.1-t2v-1.3b", 1.419), ("wan2.1-t2v-14b", 14.288),
                                              ("wan2.1-i2v-14b", 16.395), ("wan2.2-i2v-a14b", 14.289),
                                              ("wan2.2-ti2v-5b", 5.000)])
def test_published_configs_round_trip(variant, billions):
    """Each shipped config builds the published size; its original layout converts with diffusers' converter and
    the config inferred from the shapes is the published one (meta tensors)."""
    from diffusers import WanTransformer3DModel

    from comfyui_xdit import families, weights

    fam = families.get("wan")
    base = weights._base_config(fam, variant)
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(base)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.001)
    original = wan_to_original(model)
    assert fam.is_original(set(original)) and not fam.is_original(set(model.state_dict()))
    converted, hints = fam.convert(original, "wan.safetensors")
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}
    inferred = fam.infer_config(converted, hints)
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in inferred.items()} == {k: base[k] for k in inferred}
    expected = "wan2.1-t2v-14b" if variant == "wan2.2-t2v-a14b" else variant  # one expert looks like Wan 2.1 14B
    assert fam.variant_of(inferred, "") == expected


# ------------------------------------------------------------------------------------------------ bench (the tiny run: the matrix), CLI
def test_bench_memory_per_degree(capsys):
    from comfyui_xdit.bench import build_random, main, memory_rows

    adapter = build_random("wan-14b", torch.bfloat16, "meta")
    total = sum(p.numel() for p in adapter.model.parameters())
    assert total == pytest.approx(14.288e9, rel=1e-4) and adapter.variant == "wan2.1-t2v-14b"
    rows = {(m, d): (params, tokens, kv) for m, d, params, tokens, kv in memory_rows(adapter, "832x480", 81)}
    assert rows[("ulysses", 8)] == (2 * total, 4095, 0) and rows[("ring", 4)] == (2 * total, 8190, 0)
    params, tokens, kv = rows[("pipefusion", 4)]
    assert 2 * total / 4 < params < 2 * total / 4 * 1.1 and tokens == 32760
    assert kv == 2 * 2 * 32760 * 5120 * 2 * 10  # K and V, 2 branches, bf16, 10 of the 40 blocks
    assert main(["--arch", "wan-14b", "--frames", "81", "--size", "832x480", "--memory"]) == 0
    out = capsys.readouterr().out
    assert "wan-14b 832x480 81 frames bf16: 32760 tokens" in out and "pipefusion        8" in out
    experts = build_random("wan-a14b", torch.bfloat16, "meta")
    assert sum(p.numel() for p in experts.model.parameters()) == 2 * total and experts.experts
    assert {m for m, *_ in memory_rows(experts, "832x480", 81)} == {"ulysses", "ring"}  # pipefusion refused


def test_generate_with_frames(tmp_path, capsys):
    from comfyui_xdit.cli import main

    cond, _ = _embeddings(4)
    save_file({"cond": cond}, str(tmp_path / "in.safetensors"))
    args = ["generate", "--model", MODEL, "--height", "48", "--width", "80", "--steps", "2", "--seed", "2",
            "--inputs", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out.safetensors")]
    assert main([*args, "--frames", "9"]) == 0, capsys.readouterr().err
    out = load_file(tmp_path / "out.safetensors")["latents"]
    ref = sample(get_model({"model": MODEL}).adapter,
                 SampleRequest(height=48, width=80, frames=9, steps=2, seed=2, inputs={"cond": cond}))
    assert out.shape == (1, 16, 3, 6, 10) and torch.equal(out, ref)
    assert main([*args, "--frames", "8"]) == 2
    assert "frames must be 4k+1" in capsys.readouterr().err
    shifted = sample(get_model({"model": MODEL}).adapter,
                     SampleRequest(height=48, width=80, frames=9, steps=2, seed=2, inputs={"cond": cond}, shift=5.0))
    assert main([*args, "--frames", "9", "--shift", "5"]) == 0, capsys.readouterr().err
    assert torch.equal(load_file(tmp_path / "out.safetensors")["latents"], shifted) and not torch.equal(shifted, ref)
    assert main([*args, "--frames", "9", "--shift", "0"]) == 2
    assert "shift must be > 0, got 0.0" in capsys.readouterr().err
