"""FLUX.2 (Flux2Transformer2DModel): serial sampling equals Flux2Pipeline, the LATENT convention against the pipeline's
VAE code, the schedule; PipeFusion's stage boundaries inside the double blocks, at the double/single switch and
inside the single blocks, cfg parallel refused; the step cache and the analyser over the joint single-block stream;
weights (BFL layout, ComfyUI prefixed and fp8 files, folders), the CLI. Parallel sampling at world 2 and 4, the
stale phase, the cache on ranks and bench: the flux2 row of the family matrix (tests/test_family_matrix.py)."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_xdit.errors import ConfigError, WeightsError, XDiTError
from comfyui_xdit.families import flux2
from comfyui_xdit.parallel import ParallelConfig
from comfyui_xdit.sampling import SampleRequest, latent_shape, prepare, sample, seed_noise
from tests.cases import build_request, get_model
from tests.conftest import rel_l2

MODEL = "tiny-flux2"
SQUARE = dict(height=128, width=128)              # 8 token rows
# the parallel runs (exact methods, PipeFusion stale and hybrids, the step cache on ranks, the analyser under
# Ulysses) are the flux2 row of tests/family_matrix.py, checked in tests/test_family_matrix.py; here what is
# specific to FLUX.2


@pytest.fixture(scope="module")
def tiny():
    return get_model({"model": MODEL})


# ------------------------------------------------------------------------------------------------ layouts, schedule
def test_layouts_and_shift_are_the_pipelines():
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    x = torch.randn(2, 32, 6, 10)
    p = Flux2Pipeline._patchify_latents(x)
    assert torch.equal(flux2.patchify(x), p) and torch.equal(flux2.unpatchify(p), x)
    assert torch.equal(flux2.pack(x), Flux2Pipeline._pack_latents(p))
    assert torch.equal(flux2.unpack(flux2.pack(x), 6, 10), x)
    assert torch.equal(flux2.image_ids(6, 10), Flux2Pipeline._prepare_latent_ids(p)[:1])
    assert torch.equal(flux2.text_ids(7), Flux2Pipeline._prepare_text_ids(torch.zeros(1, 7, 3)))
    for tokens in (64, 1024, 4096, 4300, 4301, 16384):
        for steps in (1, 4, 28, 50):
            assert flux2.empirical_mu(tokens, steps) == compute_empirical_mu(tokens, steps)


@pytest.mark.parametrize("size,steps", [(1024, 50), (512, 28), (2048, 20)])
def test_schedule_is_the_pipelines(size, steps):
    """Our scheduler's sigmas are what Flux2Pipeline sets (its linspace sigmas and empirical mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

    from comfyui_xdit.schedules import make_schedule

    tokens = (size // 16) ** 2
    ours = make_schedule("flux2", "flux2-dev", "default", steps, tokens).scheduler
    ref = FlowMatchEulerDiscreteScheduler.from_config(flux2.FLOW_FLUX2)
    retrieve_timesteps(ref, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps),
                       mu=compute_empirical_mu(tokens, steps))
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas[1] > 0.9  # the shift keeps the first steps at high noise (mu about 1.7 to 2.8 here)


def _pipeline(adapter, noise, cond, steps, height, width, guidance):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(flux2.FLOW_FLUX2), vae=None,
                         text_encoder=None, tokenizer=None, transformer=adapter.model)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=cond, latents=flux2.patchify(noise), height=height, width=width,
               num_inference_steps=steps, guidance_scale=guidance, output_type="latent", return_dict=False)[0]
    return flux2.unpack(out, height // 8, width // 8)


@pytest.mark.parametrize("batch,height,width,steps,guidance", [(1, 256, 256, 4, None), (2, 192, 256, 3, 2.5)])
def test_serial_matches_flux2_pipeline(tiny, batch, height, width, steps, guidance):
    req = SampleRequest(height=height, width=width, steps=steps, seed=7, batch_size=batch, guidance=guidance)
    ours = sample(tiny.adapter, req, tiny=True)
    job = prepare(tiny.adapter, req, tiny=True)
    noise = seed_noise(7, latent_shape(tiny.adapter, req))
    g = 4.0 if guidance is None else guidance  # the pipeline's default guidance_scale is the family's default
    ref = _pipeline(tiny.adapter, noise, job.positive.cond, steps, height, width, g)
    assert ours.shape == (batch, 32, height // 8, width // 8) and ours.std() > 0.1
    assert rel_l2(ours, ref) <= 1e-4
    other = _pipeline(tiny.adapter, noise, job.positive.cond, steps, height, width, g + 2.0)
    assert rel_l2(ours, other) > 1e-3  # the guidance embedding matters: the comparison can fail


def test_dpmpp_2m_runs_comfyuis_sampler_on_the_default_levels(tiny):
    base = dict(height=128, width=128, steps=6, seed=3)
    euler = sample(tiny.adapter, SampleRequest(**base), tiny=True)
    dpm = sample(tiny.adapter, SampleRequest(**base, sampler="dpmpp_2m"), tiny=True)
    job = prepare(tiny.adapter, SampleRequest(**base), tiny=True)
    inputs = {"sigmas": job.schedule.scheduler.sigmas, "cond": job.positive.cond,
              "noise": seed_noise(3, (1, 32, 16, 16))}
    explicit = sample(tiny.adapter, SampleRequest(**base, sampler="dpmpp_2m", inputs=inputs), tiny=True)
    assert torch.isfinite(dpm).all() and 1e-3 < rel_l2(dpm, euler) < 0.5
    assert rel_l2(explicit, dpm) <= 1e-5


def test_latent_convention_is_the_pipelines_vae_path(tiny):
    """LATENT -> to_vae_space -> AutoencoderKLFlux2.decode gives the image Flux2Pipeline decodes from the same
    sampled latents, and from_vae_space of the VAE's encoding is the pipeline's normalised image latent."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    from comfyui_xdit.tiny import fill_deterministic

    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                             latent_channels=32).eval().requires_grad_(False)
    fill_deterministic(vae, 5)
    g = torch.Generator().manual_seed(0)
    vae.bn.running_mean.copy_(torch.randn(128, generator=g))
    vae.bn.running_var.copy_(torch.rand(128, generator=g) + 0.5)
    req = SampleRequest(height=128, width=128, steps=2, seed=1)
    job = prepare(tiny.adapter, req, tiny=True)
    ours = sample(tiny.adapter, req, tiny=True)
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(flux2.FLOW_FLUX2), vae=vae,
                         text_encoder=None, tokenizer=None, transformer=tiny.adapter.model)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt_embeds=job.positive.cond, latents=flux2.patchify(seed_noise(1, (1, 32, 16, 16))),
                 height=128, width=128, num_inference_steps=2, output_type="pt", return_dict=False)[0]
    with torch.no_grad():
        decoded = pipe.image_processor.postprocess(vae.decode(flux2.to_vae_space(ours, vae)).sample, output_type="pt")
    assert image.shape == (1, 3, 128, 128) and rel_l2(decoded, image) <= 1e-4
    with torch.no_grad():
        wrong = pipe.image_processor.postprocess(vae.decode(ours).sample, output_type="pt")
    assert rel_l2(wrong, image) > 1e-2  # without the batch norm undone the image differs
    pixels = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.mode()
        ref = pipe._encode_vae_image(pixels, generator=None)
    assert rel_l2(flux2.from_vae_space(z, vae), flux2.unpatchify(ref)) <= 1e-6
    assert rel_l2(flux2.to_vae_space(flux2.from_vae_space(z, vae), vae), z) <= 1e-6


def test_no_true_cfg_and_clear_errors(tiny):
    with pytest.raises(XDiTError, match="flux2 takes no negative prompt .* cfg must be 1, got 3.0"):
        sample(tiny.adapter, SampleRequest(height=128, width=128, steps=2, cfg=3.0), tiny=True)
    from comfyui_xdit.parallel.runner import check_model_fit

    with pytest.raises(ConfigError, match="cfg parallel is not available for flux2"):
        check_model_fit(ParallelConfig(cfg=2), tiny.adapter, SampleRequest(height=128, width=128, steps=2, cfg=3.0))
    with pytest.raises(ConfigError, match="not divisible by the Ulysses degree 3"):
        check_model_fit(ParallelConfig(ulysses=3), tiny.adapter, SampleRequest(height=128, width=128, steps=2))
    with pytest.raises(XDiTError, match=r"expected cond of shape \[B, L, 15360\]"):
        sample(tiny.adapter, SampleRequest(height=128, width=128, steps=2, inputs={"cond": torch.zeros(1, 8, 4096)}),
               tiny=True)
    with pytest.raises(XDiTError, match=r"noise has shape \[1, 16, 16, 16\], expected \[1, 32, 16, 16\]"):
        sample(tiny.adapter, SampleRequest(height=128, width=128, steps=2, inputs={"noise": torch.zeros(1, 16, 16, 16)}),
               tiny=True)


# ------------------------------------------------------------------------------------------------ step cache
BASE = {"model": MODEL, "seed": 5, "steps": 8, **SQUARE}


def _run(cache=None, overrides=None, **kw):
    from comfyui_xdit.engine import run_job

    case = {**BASE, **kw, **({"cache": cache} if cache else {}), **({"overrides": overrides} if overrides else {})}
    loaded = get_model(case)
    result = run_job(loaded, build_request(loaded, case))
    return result.latents, result.reused_steps


def _reference(mask, first_blocks, overrides=None):
    """The reuse rule with plain hooks (every block still runs): on a reused step the last single block's joint
    output is replaced by the first blocks' output joined as [text; image] plus the span residual of the last
    computed step."""
    from comfyui_xdit.cache import model_blocks
    from comfyui_xdit.engine import run_job

    case = {**BASE, **({"overrides": overrides} if overrides else {})}
    loaded = get_model(case)
    blocks = model_blocks(loaded.adapter)
    state = {"step": 0, "res": None, "first": None}

    def first_hook(module, args, kwargs, out):
        state["first"] = torch.cat([out[0], out[1]], dim=1) if isinstance(out, tuple) else out  # (text, image)

    def last_hook(module, args, out):
        if mask[state["step"]]:
            state["res"] = out - state["first"]
            return None
        return state["first"] + state["res"]

    handles = [blocks[first_blocks - 1].register_forward_hook(first_hook, with_kwargs=True),
               blocks[-1].register_forward_hook(last_hook)]
    try:
        return run_job(loaded, build_request(loaded, case),
                       step_end=lambda i: state.__setitem__("step", i + 1)).latents
    finally:
        for h in handles:
            h.remove()


def test_cache_threshold_zero_is_exactly_uncached():
    plain, _ = _run()
    out, reused = _run({"threshold": 0.0})
    assert reused == [] and torch.equal(out, plain)


@pytest.mark.parametrize("first_blocks", [1, 3])  # the span from a double block, or from inside the single blocks
def test_cache_reuse_matches_plain_hook_reference(first_blocks):
    mask = [True, True, False, False, True, False, True, False]
    out, reused = _run({"mask": mask, "first_blocks": first_blocks})
    assert reused == [2, 3, 5, 7]
    plain, _ = _run()
    assert rel_l2(out, plain) > 1e-3
    assert rel_l2(out, _reference(mask, first_blocks)) < 1e-6


def test_cache_threshold_reuses_and_skips_the_blocks():
    loaded = get_model(BASE)
    calls = []
    later = [*loaded.adapter.model.transformer_blocks[1:], *loaded.adapter.model.single_transformer_blocks]
    handles = [b.attn.register_forward_pre_hook(lambda m, a: calls.append(1)) for b in later]
    try:
        out, reused = _run({"threshold": 0.8})
    finally:
        for h in handles:
            h.remove()
    assert 0 < len(reused) < 7 and 0 not in reused
    assert len(calls) == (8 - len(reused)) * len(later)
    plain, _ = _run()
    assert rel_l2(out, plain) > 1e-4
    # the steps the threshold reused, reused exactly as the plain-hook rule says
    assert rel_l2(out, _reference([i not in reused for i in range(8)], 1)) < 1e-6


# ------------------------------------------------------------------------------------------------ analyser
def test_analyser_joint_streams_match_direct_capture(tiny):
    """A single block's image-token residual and its attention's image and text outputs, captured with plain hooks
    (the joint stream holds the 16 text tokens first)."""
    from comfyui_xdit.analysis import analyze

    req = build_request(tiny, {"model": MODEL, "seed": 2, "steps": 3, **SQUARE})
    profile = analyze(tiny, [req])
    assert profile.kinds == ["k", "v", "out", "text_k", "text_v", "text_out", "residual"]
    assert profile.labels["residual"] == ["transformer_blocks.0", "transformer_blocks.1",
                                          "single_transformer_blocks.0", "single_transformer_blocks.1"]
    single = tiny.adapter.model.single_transformer_blocks[0]
    seen = {"residual": [], "out": [], "text_out": []}

    def block_hook(module, args, kwargs, out):
        seen["residual"].append((out - kwargs["hidden_states"])[:, 16:].clone())

    handles = [single.register_forward_hook(block_hook, with_kwargs=True)]
    # the SDPA output before to_out: the processor's attention part of the input of to_out (attn then mlp)
    inner = tiny.adapter.model.config.num_attention_heads * tiny.adapter.model.config.attention_head_dim

    def to_out_hook(module, args, out):
        seen["out"].append(args[0][:, 16:, :inner].clone())
        seen["text_out"].append(args[0][:, :16, :inner].clone())

    handles.append(single.attn.to_out.register_forward_hook(to_out_hook))
    try:
        sample(tiny.adapter, req, tiny=True)
    finally:
        for h in handles:
            h.remove()
    for kind, row in (("residual", 2), ("out", profile.labels["out"].index("single_transformer_blocks.0.attn (joint)")),
                      ("text_out", profile.labels["text_out"].index("single_transformer_blocks.0.attn (joint)"))):
        xs = seen[kind]
        for t in (1, 2):
            diff, prev = (xs[t] - xs[t - 1]).abs().mean().item(), xs[t - 1].abs().mean().item()
            assert math.isclose(profile.abs[kind][0, row, t], diff, rel_tol=1e-5), kind
            assert math.isclose(profile.rel[kind][0, row, t], diff / prev, rel_tol=1e-5), kind


# ------------------------------------------------------------------------------------------------ parallel
@pytest.mark.families("flux2")
def test_pipefusion_stage_boundaries_where_declared(matrix):
    """Which blocks each stage held (parameter bytes): the three boundary positions of the matrix's PipeFusion runs
    (FLUX2_BOUNDARY in tests/family_matrix.py) are really exercised."""
    double, single = (sum(p.numel() * 4 for p in b.parameters()) for b in (
        get_model({"model": MODEL}).adapter.model.transformer_blocks[0],
        get_model({"model": MODEL}).adapter.model.single_transformer_blocks[0]))
    expect = {"double": [3 * double, double + 2 * single], "switch": [2 * double, 2 * single],
              "single": [double + single, 2 * single]}
    for where, blocks in expect.items():
        assert [r["blocks"] for r in matrix.result(f"flux2.pf2_{where}_m1")["params"]] == blocks
    assert [r["blocks"] for r in matrix.result("flux2.pf4_m1")["params"]] == [double, double, single, single]


@pytest.mark.families("flux2")
def test_cfg_parallel_refused(matrix):
    info = matrix.world(2)["flux2.cfg2"]
    assert not info["ok"] and "cfg parallel is not available for flux2" in info["error"]


# ------------------------------------------------------------------------------------------------ weights
def flux2_to_bfl(model) -> dict:
    """diffusers -> BFL FLUX.2 keys (the inverse of diffusers' converter)."""
    sd = dict(model.state_dict())
    out = {}
    top = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
           "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
           "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
           "single_stream_modulation.linear": "single_stream_modulation.lin"}
    for src, dst in top.items():
        if f"{src}.weight" in sd:
            out[f"{dst}.weight"] = sd.pop(f"{src}.weight")
    scale, shift = sd.pop("norm_out.linear.weight").chunk(2)
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
    for i in range(model.config.num_layers):
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out[f"{d}img_attn.qkv.weight"] = torch.cat([sd.pop(f"{s}attn.to_{x}.weight") for x in "qkv"])
        out[f"{d}txt_attn.qkv.weight"] = torch.cat([sd.pop(f"{s}attn.add_{x}_proj.weight") for x in "qkv"])
        for a, b in [("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
                     ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
                     ("img_attn.proj.weight", "attn.to_out.0.weight"), ("img_mlp.0.weight", "ff.linear_in.weight"),
                     ("img_mlp.2.weight", "ff.linear_out.weight"),
                     ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
                     ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
                     ("txt_attn.proj.weight", "attn.to_add_out.weight"),
                     ("txt_mlp.0.weight", "ff_context.linear_in.weight"),
                     ("txt_mlp.2.weight", "ff_context.linear_out.weight")]:
            out[d + a] = sd.pop(s + b)
    for i in range(model.config.num_single_layers):
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for a, b in [("linear1.weight", "attn.to_qkv_mlp_proj.weight"), ("linear2.weight", "attn.to_out.weight"),
                     ("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")]:
            out[d + a] = sd.pop(s + b)
    assert not sd, sorted(sd)
    return {k: v.contiguous() for k, v in out.items()}


def _weights_model(guidance=True, heads=4, head_dim=16, joint=flux2.TEXT_WIDTH):
    from diffusers import Flux2Transformer2DModel

    from comfyui_xdit.tiny import fill_deterministic

    model = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=2,
                                    attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint,
                                    timestep_guidance_channels=32, axes_dims_rope=(head_dim // 4,) * 4,
                                    guidance_embeds=guidance)
    fill_deterministic(model, 9)
    return model.eval().requires_grad_(False)


def _same(loaded, model, expected=None):
    assert loaded.family == "flux2" and loaded.variant == "flux2-dev"
    got, want = loaded.model.state_dict(), expected or model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for key in ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "mlp_ratio",
                "timestep_guidance_channels", "joint_attention_dim", "guidance_embeds"):
        assert loaded.model.config[key] == model.config[key], key
    assert list(loaded.model.config.axes_dims_rope) == list(model.config.axes_dims_rope)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_single_file(tmp_path, prefix):
    from comfyui_xdit.weights import load_transformer

    model = _weights_model(heads=3)
    path = tmp_path / "flux2.safetensors"
    save_file({prefix + k: v for k, v in flux2_to_bfl(model).items()}, str(path))
    _same(load_transformer(str(path)), model)


def test_comfyui_fp8_files(tmp_path):
    """ComfyUI's FLUX.2 fp8 files: prefixed BFL keys, float8 matrices with a per-tensor scale (old `scale_weight`,
    or the mixed-precision `weight_scale` with `input_scale` and `comfy_quant` entries), the rest unquantized."""
    from comfyui_xdit.weights import load_transformer

    model = _weights_model()
    bfl = flux2_to_bfl(model)
    for style in ("scale_weight", "weight_scale"):
        sd, expected_bfl = {}, {}
        for k, v in bfl.items():
            if v.ndim == 2 and "img_in" not in k:
                scale = v.abs().max() / 448
                q = (v / scale).to(torch.float8_e4m3fn)
                sd[k] = q
                expected_bfl[k] = q.float() * scale
                if style == "scale_weight":
                    sd[k[:-6] + "scale_weight"] = scale.reshape(1)
                else:
                    sd[k + "_scale"], sd[k[:-6] + "input_scale"] = scale, torch.tensor(1.0)
                    sd[k[:-6] + "comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
            else:
                sd[k] = expected_bfl[k] = v
        path = tmp_path / f"flux2_dev_fp8_{style}.safetensors"
        save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(path))
        ref = tmp_path / "ref.safetensors"
        save_file(expected_bfl, str(ref))
        expected = load_transformer(str(ref)).model.state_dict()
        assert not torch.equal(expected["transformer_blocks.0.attn.to_q.weight"],
                               model.state_dict()["transformer_blocks.0.attn.to_q.weight"])  # fp8 did round
        _same(load_transformer(str(path)), model, expected)
        from safetensors import safe_open

        from comfyui_xdit.weights import describe

        with safe_open(str(path), "pt") as f:  # the queue-time reading: shapes only
            d = describe({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        assert (d.family.name, d.config["num_attention_heads"]) == ("flux2", 4)
    bad = tmp_path / "nvfp4.safetensors"
    save_file({**bfl, "img_in.weight_scale_2": torch.tensor(1.0)}, str(bad))
    with pytest.raises(WeightsError, match="weight_scale_2 .* not supported"):
        load_transformer(str(bad))


def test_diffusers_layout_file_folder_and_detection(tmp_path):
    from comfyui_xdit.weights import detect_family, load_transformer
    from tests.test_weights import flux_to_bfl, make_flux

    model = _weights_model()
    path = tmp_path / "flux2-diffusers.safetensors"
    save_file(model.state_dict(), str(path))
    _same(load_transformer(str(path)), model)
    model.save_pretrained(str(tmp_path / "folder"))
    _same(load_transformer(str(tmp_path / "folder")), model)
    assert detect_family(flux2_to_bfl(model)) == "flux2"
    assert detect_family(model.state_dict()) == "flux2"
    assert detect_family(flux_to_bfl(make_flux())) == "flux"           # Flux.1 in BFL layout stays Flux.1
    assert detect_family(make_flux().state_dict()) == "flux"
    with pytest.raises(WeightsError, match="family mismatch: .* looks like flux2, not flux"):
        load_transformer(str(path), family="flux")


@pytest.mark.parametrize("guidance,joint", [(False, 7680), (True, 4096)])
def test_klein_like_checkpoints_refused(tmp_path, guidance, joint):
    from comfyui_xdit.weights import load_transformer

    model = _weights_model(guidance=guidance, joint=joint)
    path = tmp_path / "klein.safetensors"
    save_file(flux2_to_bfl(model), str(path))
    with pytest.raises(WeightsError, match=f"looks like FLUX.2 klein \\(text width {joint}"):
        load_transformer(str(path))
    model.save_pretrained(str(tmp_path / "klein"))
    with pytest.raises(WeightsError, match="FLUX.2 klein"):
        load_transformer(str(tmp_path / "klein"))


def test_published_config_and_inference_from_shapes():
    """The shipped flux2-dev config builds the published 32.2B model (meta device); config inference recovers it
    from the BFL layout's shapes alone."""
    from diffusers import Flux2Transformer2DModel

    from comfyui_xdit import families, weights

    fam = families.get("flux2")
    base = weights._base_config(fam, "flux2-dev")
    with torch.device("meta"):
        model = Flux2Transformer2DModel.from_config(base)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(32.22, abs=0.01)
    original = flux2_to_bfl(model)
    assert fam.detect(set(original)) and fam.is_original(set(original))
    converted, hints = fam.convert(original, "flux2-dev.safetensors")
    assert converted.keys() == model.state_dict().keys()
    inferred = fam.infer_config(converted, hints)
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    assert {k: norm(v) for k, v in inferred.items()} == {k: norm(base[k]) for k in inferred}
    assert fam.variant_of(inferred, "") == "flux2-dev"
    d = weights.describe({k: tuple(v.shape) for k, v in original.items()})
    assert (d.family.name, d.variant, fam.heads_of(d.config), fam.blocks_of(d.config)) == ("flux2", "flux2-dev", 48, 56)


# ------------------------------------------------------------------------------------------------ CLI (bench: the matrix)
def test_generate_from_a_diffusers_folder(tmp_path, tiny):
    """`generate --model DIR` on a saved Flux2Transformer2DModel folder, with noise/cond/sigmas inputs: the
    LATENT convention out, equal to the engine's serial run of the built-in model on the same inputs."""
    tiny.adapter.model.save_pretrained(str(tmp_path / "flux2"))
    g = torch.Generator().manual_seed(4)
    inputs = {"noise": torch.randn(1, 32, 16, 16, generator=g), "cond": torch.randn(1, 9, flux2.TEXT_WIDTH, generator=g),
              "sigmas": torch.tensor([1.0, 0.9, 0.6, 0.3, 0.0])}
    save_file(inputs, str(tmp_path / "in.safetensors"))
    out = tmp_path / "out.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "comfyui_xdit", "generate", "--model", str(tmp_path / "flux2"),
                           "--height", "128", "--width", "128", "--steps", "4", "--guidance", "3.0", "--inputs",
                           str(tmp_path / "in.safetensors"), "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(flux2, fp32, cpu)" in proc.stdout
    latents = load_file(out)["latents"]
    ref = sample(tiny.adapter, SampleRequest(height=128, width=128, steps=4, guidance=3.0, inputs=inputs), tiny=True)
    assert latents.shape == (1, 32, 16, 16) and rel_l2(latents, ref) <= 1e-5
    bad = subprocess.run([sys.executable, "-m", "comfyui_xdit", "generate", "--model", str(tmp_path / "flux2"),
                          "--height", "128", "--width", "128", "--steps", "2", "--cfg", "2.0", "--inputs",
                          str(tmp_path / "in.safetensors"), "--out", str(out)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "flux2 takes no negative prompt" in bad.stderr and bad.stderr.count("\n") == 1
