"""Z-Image (Turbo): serial sampling equals ZImagePipeline; the text mask; the step cache and the analyser's profile;
single-file weights (original release layout, ComfyUI-style prefixed fp8) and diffusers folders; the CLI; the nodes
with a Z-Image graph (stand-ins for ComfyUI). Parallel sampling at world 2 and 4, the stale phase and its hybrids,
the cache on ranks, the analyser under Ulysses and bench: the z-image row of the family matrix
(tests/test_family_matrix.py).

The tiny model: 4 heads x 16, 2 + 2 refiner blocks and 3 main layers, 2560-wide text. The transformer pads its
image and text sequences to multiples of 32 itself, so 112x144 (63 image tokens) and 15 text tokens run as 64
and 32 tokens with learned pad tokens; negatives of 40 tokens (64 inside) test branches of different lengths.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_xdit.errors import ConfigError, WeightsError, XDiTError
from comfyui_xdit.models import load_model
from comfyui_xdit.sampling import SampleRequest, latent_shape, prepare, sample, seed_noise
from tests.cases import build_request, get_model
from tests.conftest import rel_l2
from tests.family_matrix import ZI_ANALYZE, ZI_CACHE_MASK as CACHE_MASK

MODEL = "tiny-z-image"
SQUARE = dict(height=128, width=128)


@pytest.fixture(scope="module")
def tiny():
    return get_model({"model": MODEL})


# ------------------------------------------------------------------------------------------------ the pipeline
def pipeline_latents(adapter, noise, pos: list, neg: list, guidance_scale: float, steps: int, height: int,
                     width: int) -> torch.Tensor:
    """ZImagePipeline with prompt embeddings (a list of [L_i, 2560], real tokens only) and the seed noise as
    latents; ComfyUI-convention latents."""
    import diffusers

    from comfyui_xdit.schedules import make_schedule

    sched = make_schedule("z-image", adapter.variant, "default", steps, adapter.image_tokens(height, width)).scheduler
    pipe = diffusers.ZImagePipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                                    transformer=adapter.model)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, guidance_scale=guidance_scale, latents=noise,
               height=height, width=width, num_inference_steps=steps, output_type="latent", return_dict=False)[0]
    return adapter.from_model_space(out.float())


def _padded(n: int, length: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """A [1, length, 2560] embedding of which the first n tokens are real, and its mask."""
    cond = torch.randn(1, length, 2560, generator=gen)
    return cond, (torch.arange(length) < n).long()[None]


@pytest.mark.parametrize("cfg,batch,height,width,pos_len,neg_len", [
    (1.0, 1, 256, 256, 16, None),    # Turbo's default: no guidance
    (4.0, 2, 112, 144, 45, 7),       # guidance 3 in the pipeline's terms; prompts of 45 and 7 real tokens
])
def test_serial_matches_zimage_pipeline(tiny, cfg, batch, height, width, pos_len, neg_len):
    """Same noise and embeddings: the pipeline runs both branches in one batch (different lengths: the model
    masks the padding), we run them one by one with the padded tokens dropped by the mask."""
    gen = torch.Generator().manual_seed(0)
    cond, mask = _padded(pos_len, 50, gen)
    inputs = {"cond": cond, "cond_mask": mask}
    neg = []
    if neg_len is not None:
        neg_cond, neg_mask = _padded(neg_len, 12, gen)
        inputs.update(neg_cond=neg_cond, neg_cond_mask=neg_mask)
        neg = [neg_cond[0, :neg_len]] * batch
    req = SampleRequest(height=height, width=width, steps=4, seed=3, batch_size=batch, cfg=cfg, inputs=inputs)
    ours = sample(tiny.adapter, req)
    ref = pipeline_latents(tiny.adapter, seed_noise(3, latent_shape(tiny.adapter, req)), [cond[0, :pos_len]] * batch,
                           neg, cfg - 1.0, 4, height, width)
    assert ours.shape == (batch, 16, height // 8, width // 8)
    assert torch.isfinite(ours).all() and ours.std() > 0.5
    assert rel_l2(ours, ref) <= 1e-4


def test_schedule_and_conventions(tiny):
    """ZImagePipeline's timesteps (linear sigmas shifted by 3.0, no resolution shift); the Flux VAE's latent
    convention; dpmpp_2m runs over the same noise levels."""
    from comfyui_xdit.schedules import make_schedule

    sched = make_schedule("z-image", "z-image-turbo", "default", 4, 4096).scheduler
    s = torch.linspace(1.0, 0.25, 4)
    assert torch.allclose(sched.sigmas[:-1], 3 * s / (1 + 2 * s)) and sched.sigmas[-1] == 0
    assert torch.equal(make_schedule("z-image", "z-image-turbo", "default", 4, 256).scheduler.sigmas, sched.sigmas)
    latent = torch.randn(1, 16, 4, 4)
    assert torch.allclose(tiny.adapter.to_model_space(latent), (latent - 0.1159) * 0.3611)
    base = dict(height=128, width=128, steps=4, seed=1)
    euler, dpm = (sample(tiny.adapter, SampleRequest(**base, sampler=s), tiny=True) for s in ("euler", "dpmpp_2m"))
    assert torch.isfinite(dpm).all() and 1e-3 < rel_l2(dpm, euler) < 0.5


def test_text_mask_and_padding(tiny):
    """A mask drops the padded tokens exactly like cutting them off; rows with different real token counts in
    one batch are refused (the model's unified sequence cannot be sharded then); no mask reaches a block."""
    gen = torch.Generator().manual_seed(2)
    cond, mask = _padded(9, 20, gen)
    base = dict(height=64, width=64, steps=2, seed=4)
    masked = sample(tiny.adapter, SampleRequest(**base, inputs={"cond": cond, "cond_mask": mask}))
    cut = sample(tiny.adapter, SampleRequest(**base, inputs={"cond": cond[:, :9]}))
    assert torch.equal(masked, cut)
    assert rel_l2(sample(tiny.adapter, SampleRequest(**base, inputs={"cond": cond})), cut) > 1e-3
    job = prepare(tiny.adapter, SampleRequest(**base, inputs={"cond": cond, "cond_mask": mask}), tiny=False)
    assert job.positive.mask is None and job.positive.cond.shape == (1, 9, 2560)
    masks = []
    hook = tiny.adapter.model.layers[0].register_forward_pre_hook(lambda m, args: masks.append(args[1]))
    try:
        sample(tiny.adapter, SampleRequest(**base, cfg=2.0, inputs={"cond": cond, "neg_cond": cond[:, :3]}))
    finally:
        hook.remove()
    assert masks == [None] * 4
    two = torch.cat([mask, (torch.arange(20) < 5).long()[None]])
    with pytest.raises(XDiTError, match="must have as many real tokens \\(their masks keep 5, 9\\)"):
        prepare(tiny.adapter, SampleRequest(**base, batch_size=2, inputs={"cond": cond.expand(2, -1, -1),
                                                                          "cond_mask": two}), tiny=False)
    with pytest.raises(XDiTError, match=r"expected cond of shape \[B, L, 2560\]"):
        prepare(tiny.adapter, SampleRequest(**base, inputs={"cond": torch.zeros(1, 8, 4096)}), tiny=False)


# ------------------------------------------------------------------------------------------------ parallel
# Parallel sampling at world 2 and 4 (63 image and 15 text tokens padded to 64 and 32, negatives of 40), the stale
# phase and its hybrids, the cache on ranks, the analyser under Ulysses: the z-image row of tests/family_matrix.py,
# checked in tests/test_family_matrix.py.
def test_ulysses_degree_not_dividing_30_heads_is_refused():
    from comfyui_xdit.bench import build_random
    from comfyui_xdit.parallel import ParallelConfig
    from comfyui_xdit.parallel.runner import check_model_fit

    adapter = build_random("z-image", torch.bfloat16, "meta")
    req = SampleRequest(height=1024, width=1024, steps=8)
    with pytest.raises(ConfigError, match=r"30 attention heads, not divisible by the Ulysses degree 4 \(Ulysses "
                                          r"degrees that work: 1, 2, 3, 5, 6, 10 or 15;"):
        check_model_fit(ParallelConfig(ulysses=4), adapter, req)
    check_model_fit(ParallelConfig(ulysses=5, ring=2), adapter, req)


# ------------------------------------------------------------------------------------------------ cache, analyser
def _cached(cache: dict | None, **kw):
    from comfyui_xdit.cache import CacheSettings
    from comfyui_xdit.engine import run_job

    loaded = get_model({"model": MODEL})
    case = {"model": MODEL, "seed": 5, "steps": 6, "cfg": 3.0, **SQUARE, **kw}
    req = build_request(loaded, case)
    req.cache = None if cache is None else CacheSettings.from_dict(cache)
    job = run_job(loaded, req)
    return job.latents, job.reused_steps


def test_cache_threshold_zero_is_uncached_and_reuse_follows_the_rule():
    from tests.test_cache import BASE, _hook_reference

    ref, _ = _cached(None)
    out, reused = _cached({"threshold": 0.0})
    assert reused == [] and torch.equal(out, ref)
    masked, reused = _cached({"mask": CACHE_MASK})
    assert reused == [2, 4] and rel_l2(masked, ref) > 1e-4
    # the rule written with plain hooks on the first and last main layers (tests/test_cache.py), at its BASE
    mask = [True, True, False, False, True, False, True, False]
    out, reused = _cached({"mask": mask}, **{k: BASE[k] for k in ("seed", "steps", "cfg")})
    assert reused == [2, 3, 5, 7] and rel_l2(out, _hook_reference(MODEL, mask)) < 1e-6
    _, reused = _cached({"threshold": 100.0, "warmup": 2})
    assert reused == [2, 3, 4, 5]


def test_analyser_profile_over_refiners_and_main_layers():
    import numpy as np

    from comfyui_xdit.analysis import analyze
    from tests.attn_cases import analysis_requests

    loaded = get_model({"model": MODEL})
    profile = analyze(loaded, analysis_requests(loaded, ZI_ANALYZE))
    assert profile.kinds == ["k", "v", "out", "text_k", "text_v", "text_out", "residual"]
    assert profile.labels["residual"] == ["noise_refiner.0", "noise_refiner.1", "context_refiner.0",
                                          "context_refiner.1", "layers.0", "layers.1", "layers.2"]
    assert len(profile.labels["k"]) == 7 and len(profile.labels["text_k"]) == 3  # joint: the main layers
    rel = profile.rel["residual"]
    assert np.isnan(rel[:, :, 0]).all() and np.isfinite(rel[:, :, 1:]).all()
    # the text refiner has no time modulation and sees the same text every step: no change at all
    assert (rel[:, 2:4, 1:] == 0).all() and (rel[:, [0, 1, 4, 5, 6], 1:] > 0).all()
    ctx = [i for i, label in enumerate(profile.labels["k"]) if label.startswith("context_refiner")]
    assert len(ctx) == 2 and (profile.abs["k"][:, ctx, 1:] == 0).all()


# ------------------------------------------------------------------------------------------------ weights
_TO_ORIGINAL = [("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1.", "x_embedder."),
                (".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
                (".attention.norm_k.", ".attention.k_norm.")]


def z_image_to_original(model) -> dict:
    """diffusers -> the original release layout (inverse of diffusers' converter): fused qkv, original names."""
    sd = dict(model.state_dict())
    out = {}
    for key in [k for k in sd if k.endswith(".attention.to_q.weight")]:
        stem = key[: -len("to_q.weight")]
        out[stem + "qkv.weight"] = torch.cat([sd.pop(f"{stem}to_{x}.weight") for x in "qkv"])
    for key, value in sd.items():
        for a, b in _TO_ORIGINAL:
            key = key.replace(a, b)
        out[key] = value
    return out


def _randomized():
    from diffusers import ZImageTransformer2DModel

    from comfyui_xdit.tiny import fill_deterministic

    model = ZImageTransformer2DModel(in_channels=16, dim=96, n_layers=2, n_refiner_layers=1, n_heads=6,
                                     n_kv_heads=6, cap_feat_dim=2560, axes_dims=[4, 6, 6])
    fill_deterministic(model, 9)
    return model.eval().requires_grad_(False)


def _same(model, loaded) -> None:
    ref = model.state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_single_files_original_and_comfyui_fp8(tmp_path):
    from comfyui_xdit.weights import detect_family, load_transformer

    model = _randomized()
    original = z_image_to_original(model)
    assert "layers.0.attention.qkv.weight" in original and "final_layer.linear.weight" in original
    path = tmp_path / "z_image.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    loaded = load_transformer(str(path))
    assert (loaded.family, loaded.variant) == ("z-image", "z-image-turbo")
    _same(model, loaded)
    assert loaded.model.config.axes_dims == [4, 6, 6] and loaded.model.config.n_heads == 6
    # ComfyUI's diffusion_models file: the original layout behind model.diffusion_model., scaled fp8 weights
    fp8, scales = {}, {}
    for k, v in original.items():
        if v.ndim == 2 and k.endswith(".weight"):
            scale = v.abs().max() / 448
            fp8[k] = (v / scale).to(torch.float8_e4m3fn)
            scales[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            fp8[k] = v
    comfy = {f"model.diffusion_model.{k}": v.contiguous() for k, v in {**fp8, **scales}.items()}
    comfy["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    comfy["vae.decoder.conv_in.weight"] = torch.zeros(1)  # an all-in-one file's other parts are ignored
    save_file(comfy, str(tmp_path / "z_image_fp8_scaled.safetensors"))
    loaded = load_transformer(str(tmp_path / "z_image_fp8_scaled.safetensors"), dtype=torch.bfloat16)
    w = loaded.model.layers[0].attention.to_k.weight
    assert w.dtype == torch.bfloat16 and rel_l2(w.float(), model.layers[0].attention.to_k.weight) < 0.05
    # the diffusers layout in a single file, and a diffusers folder
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "diffusers.safetensors"))
    _same(model, load_transformer(str(tmp_path / "diffusers.safetensors")))
    model.save_pretrained(str(tmp_path / "folder"))
    _same(model, load_transformer(str(tmp_path / "folder"), family="z-image-turbo"))
    assert detect_family(original) == detect_family(model.state_dict()) == "z-image"


def test_detection_is_specific(tmp_path):
    """Z-Image keys match no other family and theirs not Z-Image's; Lumina 2's NextDiT (the same pad tokens and
    refiners, adaLN with a leading SiLU) is not taken for Z-Image."""
    from comfyui_xdit import families
    from tests.test_weights import flux_to_bfl, make_flux, make_pixart, make_sd3, pixart_to_original, sd3_to_mmdit

    zi = families.get("z-image")
    model = _randomized()
    for keys in (set(model.state_dict()), set(z_image_to_original(model))):
        assert [f.name for f in families.families().values() if f.detect(keys)] == ["z-image"]
    for other in (make_flux().state_dict(), flux_to_bfl(make_flux()), make_sd3().state_dict(),
                  sd3_to_mmdit(make_sd3()), make_pixart().state_dict(), pixart_to_original(make_pixart())):
        assert not zi.detect(set(other))
    lumina = {k.replace("adaLN_modulation.0.", "adaLN_modulation.1.") for k in z_image_to_original(model)}
    assert not zi.detect(lumina)


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    from comfyui_xdit.weights import load_transformer

    original = z_image_to_original(_randomized())
    broken = {k: v.contiguous() for k, v in original.items() if k != "cap_embedder.1.weight"}
    save_file(broken, str(tmp_path / "a.safetensors"))
    with pytest.raises(WeightsError, match="missing keys cap_embedder.1.weight"):
        load_transformer(str(tmp_path / "a.safetensors"))
    omni = {**{k: v.contiguous() for k, v in original.items()}, "siglip_embedder.1.weight": torch.zeros(96, 8)}
    save_file(omni, str(tmp_path / "b.safetensors"))
    with pytest.raises(WeightsError, match="SigLIP image conditioning \\(Omni\\) is not supported"):
        load_transformer(str(tmp_path / "b.safetensors"))


def test_published_config_round_trip():
    """configs/z-image-turbo.json builds the published 6.15B transformer; its original layout converts with
    diffusers' converter and the config inferred from the shapes is the published one (meta tensors)."""
    from diffusers import ZImageTransformer2DModel

    from comfyui_xdit import families, weights

    fam = families.get("z-image")
    base = weights._base_config(fam, "z-image-turbo")
    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(base)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(6.15, abs=0.01)
    original = z_image_to_original(model)
    assert fam.is_original(set(original)) and not fam.is_original(set(model.state_dict()))
    converted, hints = fam.convert(original, "z_image_turbo_bf16.safetensors")
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}
    inferred = fam.infer_config(converted, hints)
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in inferred.items()} == {k: base[k] for k in inferred}
    assert fam.variant_of(inferred, "") == "z-image-turbo"


# ------------------------------------------------------------------------------------------------ CLI (bench: the matrix)
def test_generate_from_a_diffusers_folder(tmp_path, capsys, tiny):
    """`generate --model DIR` on a saved ZImageTransformer2DModel, with the pipeline's text embedding shape
    [1, L, 2560] as --inputs: ComfyUI-convention latents, equal to the built-in model's."""
    from comfyui_xdit.cli import main

    tiny.adapter.model.save_pretrained(str(tmp_path / "zimage"))
    gen = torch.Generator().manual_seed(6)
    cond, mask = _padded(20, 24, gen)
    save_file({"cond": cond, "cond_mask": mask}, str(tmp_path / "in.safetensors"))
    code = main(["generate", "--model", str(tmp_path / "zimage"), "--height", "128", "--width", "160", "--steps",
                 "3", "--seed", "2", "--inputs", str(tmp_path / "in.safetensors"), "--out",
                 str(tmp_path / "out.safetensors")])
    assert code == 0, capsys.readouterr().err
    out = load_file(tmp_path / "out.safetensors")["latents"]
    ref = sample(tiny.adapter, SampleRequest(height=128, width=160, steps=3, seed=2,
                                             inputs={"cond": cond, "cond_mask": mask}))
    assert out.shape == (1, 16, 16, 20) and torch.equal(out, ref)
    assert main(["generate", "--model", str(tmp_path / "zimage"), "--height", "128", "--width", "128", "--steps",
                 "2", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "positive conditioning (cond) is required" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ nodes
def _queue(ext, prompt):
    from .test_nodes import _queue as queue

    return queue(ext, ext.rec, prompt)


def _zimage_graph(checkpoint: str, **config) -> dict:
    from .test_nodes import _graph

    g = _graph(config, checkpoint=checkpoint, width=1024, height=1024)
    g["8"]["inputs"].update(steps=8, cfg=1.0)
    return g


def test_nodes_take_a_z_image_checkpoint_and_refuse_ulysses_4_at_queue_time(ext, tmp_path):
    """A 30-head Z-Image file (original layout, ComfyUI prefix) in diffusion_models: listed, its variant read from
    its keys, its heads from its header; Ulysses 4 refused on POST /prompt with the degrees that work."""
    from diffusers import ZImageTransformer2DModel

    path = tmp_path / "diffusion_models" / "z_image_turbo_mini.safetensors"
    path.parent.mkdir()
    model = ZImageTransformer2DModel(in_channels=16, dim=240, n_layers=2, n_refiner_layers=1, n_heads=30,
                                     n_kv_heads=30, cap_feat_dim=2560, axes_dims=[4, 2, 2])
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in z_image_to_original(model).items()},
              str(path))
    ext.rec.folders = {"diffusion_models": [str(path)]}
    ck = ext.nodes.checkpoints
    assert "z_image_turbo_mini.safetensors" in ck.list_checkpoints() and "tiny-z-image" in ck.list_checkpoints()
    assert ck.detect_variant(str(path)) == ck.detect_variant("tiny-z-image") == "z-image-turbo"
    errors = _queue(ext, _zimage_graph("z_image_turbo_mini.safetensors", ulysses_degree=4))
    assert errors == {"5": ["ulysses_degree - ulysses_degree 4 does not divide the 30 attention heads of "
                            "z_image_turbo_mini.safetensors (Ulysses degrees that work: 1, 2, 3, 5, 6, 10 or 15; "
                            "the ring degree takes any other split) (Load Parallel DiT node 6)"]}
    assert _queue(ext, _zimage_graph("z_image_turbo_mini.safetensors", ulysses_degree=5)) == {}
    errors = _queue(ext, _zimage_graph("z_image_turbo_mini.safetensors", pipefusion_degree=3))
    assert "pipefusion_degree 3 is larger than the 2 transformer blocks" in errors["5"][0]


def test_parallel_sampler_takes_pipeline_conditioning_and_a_16_channel_latent(ext, monkeypatch):
    """CONDITIONING [1, L, 2560] (with an attention mask, as a text encoder may attach) and EmptySD3LatentImage's
    16-channel latent, ComfyUI's scheduler on SD3's flow settings (shift 3) with the Flux latent format: the job
    the pool gets samples like the engine does with the same tensors."""
    from comfyui_xdit.engine import run_job

    from . import comfy_standins as cs
    from .test_nodes import CONFIG_DEFAULTS

    xn = ext.nodes.xdit_nodes
    sent = {}

    def fake_run(model, fields, tensors, unique_id, total, latent_format, use_native=False):
        sent.update(fields=fields, tensors=tensors, latent_format=latent_format)
        loaded = load_model(model.source)
        req = SampleRequest(**{k: v for k, v in fields.items() if k != "cache"}, inputs=tensors)
        return run_job(loaded, req).latents

    class Client:
        def load(self, path, family, dtype, parallel=None):
            return {"key": "k", "family": "z-image"}

    monkeypatch.setattr(xn, "_run", fake_run)
    monkeypatch.setattr(xn.MANAGER, "client_for", lambda settings: Client())
    m = ext.nodes.NODE_CLASS_MAPPINGS
    (config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2))
    (model,) = m["XDiTLoadParallelDiT"].execute(config, "tiny-z-image", "fp32", "auto")
    assert (model.family, model.variant) == ("z-image", "z-image-turbo")
    gen = torch.Generator().manual_seed(8)
    pos = [[torch.randn(1, 30, 2560, generator=gen), {"attention_mask": (torch.arange(30) < 21).long()[None]}]]
    neg = [[torch.randn(1, 6, 2560, generator=gen), {}]]
    latent = {"samples": torch.zeros(1, 16, 16, 16)}
    (out,) = cs.with_id(m["XDiTParallelSampler"], "8").execute(model, pos, neg, latent, 7, 4, 2.0, "euler",
                                                                 "simple", 1.0)
    assert out["samples"].shape == (1, 16, 16, 16) and torch.isfinite(out["samples"]).all()
    t = sent["tensors"]
    assert set(t) == {"cond", "cond_mask", "neg_cond", "latent", "noise", "sigmas"}
    assert t["cond"].shape == (1, 30, 2560) and t["cond_mask"].sum() == 21
    ms, scheduler, steps = ext.rec.sigma_calls[-1]
    assert (ms.model_type.name, ms.settings, scheduler, steps) == ("FLOW", {"shift": 3.0}, "simple", 4)
    fmt = sent["latent_format"]
    assert (fmt.scale_factor, fmt.shift_factor, fmt.latent_channels) == (0.3611, 0.1159, 16)
    # what the engine does with the real tokens only, given directly
    inputs = {**t, "cond": t["cond"][:, :21]}
    del inputs["cond_mask"]
    ref = sample(load_model("tiny-z-image").adapter, SampleRequest(height=128, width=128, steps=4, seed=7, cfg=2.0,
                                                                   inputs=inputs))
    assert rel_l2(out["samples"], ref) <= 1e-6
    # 4-channel EmptyLatentImage is widened as ComfyUI does
    assert ext.nodes.convert.latent_input({"samples": torch.zeros(1, 4, 8, 8)}, "z-image-turbo")["samples"].shape == \
        (1, 16, 8, 8)


def test_cond_spec_and_comfy_objects(ext):
    fam = ext.nodes.families
    s = fam.spec("z-image-turbo")
    assert (s.family, s.supported_model, s.model_type, s.latent_format, s.channels) == \
        ("z-image", "SD3", "FLOW", "Flux", 16)
    cs_ = fam.cond_spec("z-image")
    assert (cs_.width, cs_.pooled, cs_.mask) == (2560, None, True)
    tensors, guidance = ext.nodes.convert.conditioning_tensors([[torch.zeros(1, 5, 2560), {}]], None, "z-image",
                                                               use_cfg=False)
    assert set(tensors) == {"cond"} and guidance is None


def test_workflow_note_names_the_conditioning_the_sampler_expects():
    root = Path(__file__).resolve().parents[1] / "workflows"
    ui = json.loads((root / "z-image-turbo.json").read_text())
    notes = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and "[batch, tokens, 2560]" in notes[0] and "Qwen3-4B" in notes[0]
    api = json.loads((root / "api" / "z-image-turbo.json").read_text())
    sampler = next(n["inputs"] for n in api.values() if n["class_type"] == "XDiTParallelSampler")
    assert sampler["cfg"] == 1.0 and sampler["sampler_name"] == "euler"
