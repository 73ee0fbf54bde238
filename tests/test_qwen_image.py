"""Qwen-Image: serial sampling equals QwenImagePipeline; masked keys stay masked (the padding of the parallel cases'
prompts matters); the step cache and the analyser (through the CLI, serial and Ulysses 2); the schedule, the latent
layout, weights, the CLI, the edit model's reference tokens under the token plan. Parallel sampling at world 2 and
4 (an image token count no degree divides, text padding on different ranks, a negative of another length), the
stale phase and its hybrids, the cache on ranks and bench: the qwen-image row of the family matrix
(tests/test_family_matrix.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from comfyui_xdit import families
from comfyui_xdit.engine import run_job
from comfyui_xdit.errors import XDiTError
from comfyui_xdit.families.flux import pack, unpack
from comfyui_xdit.sampling import SampleRequest, latent_shape, prepare, sample, seed_noise
from comfyui_xdit.schedules import make_schedule
from tests.cases import build_request, get_model
from tests.conftest import rel_l2
from tests.family_matrix import CASES, QWEN_CACHE, QWEN_NEG, QWEN_POS
from tests.test_cache import _hook_reference

MODEL = "tiny-qwen-image"
# the padded prompts of the parallel cases (15 tokens, masks on different ranks) and 9-token negatives: the
# qwen-image row of tests/family_matrix.py, whose runs tests/test_family_matrix.py checks
POS, NEG = QWEN_POS, QWEN_NEG


def serial(c: dict) -> torch.Tensor:
    loaded = get_model(c)
    return sample(loaded.adapter, build_request(loaded, c), tiny=True)


# ------------------------------------------------------------------------------------------------ the pipeline
def pipeline_latents(adapter, req: SampleRequest) -> torch.Tensor:
    """QwenImagePipeline with the request's embeddings, masks and seed noise, in ComfyUI's convention."""
    import diffusers

    job = prepare(adapter, req, tiny=True)
    sched = make_schedule(adapter.family, adapter.variant, "default", req.steps,
                          adapter.image_tokens(req.height, req.width)).scheduler
    pipe = diffusers.QwenImagePipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                                       transformer=adapter.model)
    kw = dict(prompt_embeds=job.positive.cond, prompt_embeds_mask=job.positive.mask, height=req.height,
              width=req.width, num_inference_steps=req.steps, output_type="latent", return_dict=False,
              latents=pack(seed_noise(req.seed, latent_shape(adapter, req))), true_cfg_scale=req.cfg)
    if job.negative is not None:
        kw.update(negative_prompt_embeds=job.negative.cond, negative_prompt_embeds_mask=job.negative.mask)
    out = pipe(**kw)[0]
    return adapter.from_model_space(unpack(out.float(), req.height // 8, req.width // 8))


def _inputs(batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(cond=torch.randn(batch, 15, 3584, generator=g), cond_mask=torch.tensor(POS[:batch]),
                neg_cond=torch.randn(batch, 9, 3584, generator=g), neg_cond_mask=torch.tensor(NEG[:batch]))


@pytest.mark.parametrize("cfg,batch,height,width", [(1.0, 1, 256, 256), (4.0, 2, 192, 256)])
def test_matches_qwen_image_pipeline(cfg, batch, height, width):
    ad = get_model({"model": MODEL}).adapter
    req = SampleRequest(height=height, width=width, steps=6, seed=7, batch_size=batch, cfg=cfg, inputs=_inputs(batch))
    ours = sample(ad, req, tiny=True)
    ref = pipeline_latents(ad, req)
    assert ours.shape == (batch, 16, height // 8, width // 8)
    assert torch.isfinite(ours).all() and ours.std() > 0.1
    assert rel_l2(ours, ref) <= 1e-4
    if cfg != 1.0:  # the pipeline's norm-preserving CFG is what makes this equal: plain CFG does not
        sig = prepare(ad, req, tiny=True).schedule.scheduler.sigmas
        plain = sample(ad, SampleRequest(height=height, width=width, steps=6, seed=7, batch_size=batch, cfg=cfg,
                                         inputs={**_inputs(batch), "sigmas": sig}), tiny=True)
        assert rel_l2(plain, ref) > 1e-3  # 10x the tolerance above


def test_padded_mask_equals_the_unpadded_prompt():
    """Masked keys are invisible: a prompt padded with masked garbage tokens at its end samples what the prompt
    alone samples (the rotary positions of its tokens are the same), and without its mask it does not."""
    ad = get_model({"model": MODEL}).adapter
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(1, 15, 3584, generator=g)
    base = dict(height=128, width=128, steps=4, seed=2)
    mask = torch.tensor([[1] * 10 + [0] * 5])
    padded = sample(ad, SampleRequest(**base, inputs={"cond": cond, "cond_mask": mask}))
    alone = sample(ad, SampleRequest(**base, inputs={"cond": cond[:, :10]}))
    unmasked = sample(ad, SampleRequest(**base, inputs={"cond": cond}))
    assert rel_l2(padded, alone) <= 1e-5
    assert rel_l2(unmasked, alone) > 1e-3  # 100x the tolerance above


def test_schedule_is_the_pipelines_at_the_published_size():
    """1328x1328 (83x83 = 6889 tokens): linspace sigmas, mu from the token count, exponential shift, terminal
    stretch to 0.02, as QwenImagePipeline computes them with the released scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

    from comfyui_xdit.families.qwen_image import QWEN_FLOW

    for steps, tokens in ((50, 83 * 83), (20, 64 * 64), (4, 8 * 8)):
        ours = make_schedule("qwen-image", "qwen-image-t2i", "euler", steps, tokens).scheduler
        ref = FlowMatchEulerDiscreteScheduler.from_config(QWEN_FLOW)
        mu = calculate_shift(tokens, 256, 8192, 0.5, 0.9)
        retrieve_timesteps(ref, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)
        assert ours.sigmas[-2].item() == pytest.approx(0.02, abs=1e-6) and ours.sigmas[-1] == 0


def test_dpmpp_2m_and_explicit_sigmas():
    ad = get_model({"model": MODEL}).adapter
    base = dict(height=128, width=128, steps=6, seed=4, cfg=2.0, inputs=_inputs(1, 1))
    euler = sample(ad, SampleRequest(**base))
    dpm = sample(ad, SampleRequest(**base, sampler="dpmpp_2m"))
    assert torch.isfinite(dpm).all() and 1e-3 < rel_l2(dpm, euler) < 0.5
    job = prepare(ad, SampleRequest(**base), tiny=True)
    assert job.combine is not None and job.combine.__name__ == "norm_preserving_cfg"
    explicit = prepare(ad, SampleRequest(**{**base, "inputs": {**base["inputs"], "sigmas": torch.tensor(
        [1.0, 0.5, 0.0])}}), tiny=True)
    assert explicit.combine.__name__ == "plain_cfg"  # ComfyUI's sigmas: ComfyUI's CFG


def test_latent_layout_and_conditioning_checks():
    """ComfyUI's LATENT for Qwen-Image is [B, 16, 1, H/8, W/8] in the Wan 2.1 VAE's space: given noise and
    latents may carry the frame axis, and the model space is (latent - mean) / std per channel."""
    ad = get_model({"model": MODEL}).adapter
    from comfyui_xdit.families.qwen_image import WAN21_MEAN, WAN21_STD

    lat = torch.randn(1, 16, 8, 8)
    mean, std = torch.tensor(WAN21_MEAN).view(1, 16, 1, 1), torch.tensor(WAN21_STD).view(1, 16, 1, 1)
    assert torch.allclose(ad.to_model_space(lat), (lat - mean) / std)
    assert torch.allclose(ad.from_model_space(ad.to_model_space(lat)), lat, atol=1e-6)
    noise = torch.randn(1, 16, 16, 16)
    base = dict(height=128, width=128, steps=2, seed=0)
    flat = sample(ad, SampleRequest(**base, inputs={"noise": noise}), tiny=True)
    framed = sample(ad, SampleRequest(**base, inputs={"noise": noise[:, :, None]}), tiny=True)
    assert torch.equal(flat, framed)
    with pytest.raises(XDiTError, match="noise has shape"):
        sample(ad, SampleRequest(**base, inputs={"noise": torch.randn(1, 16, 2, 16, 16)}), tiny=True)
    with pytest.raises(XDiTError, match=r"expected cond of shape \[B, L, 3584\]"):
        sample(ad, SampleRequest(**base, inputs={"cond": torch.zeros(1, 8, 4096)}), tiny=True)
    with pytest.raises(XDiTError, match="hides every token"):
        sample(ad, SampleRequest(**base, inputs={"cond": torch.zeros(1, 4, 3584),
                                                 "cond_mask": torch.zeros(1, 4)}), tiny=True)


# ------------------------------------------------------------------------------------------------ parallel
CACHED = CASES["qwen-image.cache_ulysses2"]  # the step cache's case (8 steps, 128x128), also run under Ulysses 2


def test_masks_change_the_result():
    """The padding of the cases' prompts matters: without the masks the result is another one (so the equalities
    below hold only if masked keys stay masked on every rank and ring step)."""
    c = CASES["qwen-image.ulysses2"]
    loaded = get_model(c)
    req = build_request(loaded, c)
    unmasked = SampleRequest(**{**req.__dict__, "inputs": {k: v for k, v in req.inputs.items()
                                                           if not k.endswith("mask")}})
    assert rel_l2(sample(loaded.adapter, unmasked, tiny=True), serial(c)) > 1e-2  # 100x the tolerance below
    assert req.inputs["cond"].shape[1] == 15 and req.inputs["neg_cond"].shape[1] == 9


# ------------------------------------------------------------------------------------------------ cache, analyser
def _cached(cache: dict | None, c: dict = CACHED):
    loaded = get_model(c)
    case_ = {**c, "cache": cache} if cache is not None else {k: v for k, v in c.items() if k != "cache"}
    result = run_job(loaded, build_request(loaded, case_))
    return result.latents, result.reused_steps


def test_cache_threshold_zero_is_exactly_uncached_and_reuse_works():
    ref, _ = _cached(None)
    exact, reused = _cached({"threshold": 0.0})
    assert reused == [] and torch.equal(exact, ref)
    out, reused = _cached(QWEN_CACHE)
    assert reused == [1, 2, 3]
    assert rel_l2(out, ref) > 1e-3
    # reused exactly as the plain-hook rule says (tests/test_cache.py, on this case)
    assert rel_l2(out, _hook_reference(MODEL, [i not in reused for i in range(8)], CACHED)) < 1e-6
    masked, reused = _cached({"mask": [True, True, False, True, False, False, True, True]})
    assert reused == [2, 4, 5] and rel_l2(masked, ref) > 1e-4


ANALYZE = ["--model", MODEL, "--prompts", "2", "--steps", "3", "--height", "64", "--width", "96"]


def test_analyser_serial_and_ulysses2(tmp_path):
    from comfyui_xdit.cli import main

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "comfyui_xdit", "analyze", *ANALYZE, "--ulysses-degree", "2",
                           "--out", str(tmp_path / "usp")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(["analyze", *ANALYZE, "--out", str(tmp_path / "serial")]) == 0
    usp, ser = np.load(tmp_path / "usp" / "profile.npz"), np.load(tmp_path / "serial" / "profile.npz")
    doc = json.loads((tmp_path / "serial" / "profile.json").read_text())
    assert doc["kinds"] == ["k", "v", "out", "text_k", "text_v", "text_out", "residual"]
    assert len(ser["layer_labels"]) == 2 and len(ser["block_labels"]) == 2
    keys = [k for k in ser.files if k.endswith(("_abs", "_rel"))]
    assert len(keys) == 14
    for k in keys:
        assert ser[k].shape == (2, 2, 3) and np.isfinite(ser[k][:, :, 1:]).all() and (ser[k][:, :, 1:] > 0).all()
        np.testing.assert_allclose(usp[k], ser[k], rtol=1e-4, atol=1e-7, equal_nan=True, err_msg=k)


# ------------------------------------------------------------------------------------------------ bench, CLI
def test_generate_from_a_diffusers_folder(tmp_path, capsys):
    """`generate --model DIR` for a saved QwenImageTransformer2DModel: family from the config's class, inputs by
    the usual names, the output in ComfyUI's LATENT layout for Qwen-Image ([B, 16, 1, H/8, W/8])."""
    from safetensors.torch import load_file, save_file

    from comfyui_xdit.cli import main

    loaded = get_model({"model": MODEL})
    loaded.adapter.model.save_pretrained(str(tmp_path / "qwen"))
    inputs = _inputs(1, 5)
    noise = seed_noise(9, (1, 16, 1, 12, 16))
    save_file({**inputs, "noise": noise}, str(tmp_path / "in.safetensors"))
    out = tmp_path / "out.safetensors"
    assert main(["generate", "--model", str(tmp_path / "qwen"), "--height", "96", "--width", "128", "--steps", "3",
                 "--cfg", "2.5", "--inputs", str(tmp_path / "in.safetensors"), "--out", str(out)]) == 0
    assert "qwen-image" in capsys.readouterr().out
    latents = load_file(str(out))["latents"]
    assert latents.shape == (1, 16, 1, 12, 16)
    ref = sample(loaded.adapter, SampleRequest(height=96, width=128, steps=3, cfg=2.5,
                                               inputs={**inputs, "noise": noise[:, :, 0]}), tiny=True)
    assert rel_l2(latents[:, :, 0], ref) <= 1e-5
    assert main(["generate", "--model", MODEL, "--height", "96", "--width", "128", "--steps", "2",
                 "--family", "flux", "--out", str(out)]) == 2
    assert "family mismatch" in capsys.readouterr().err


def test_registry_declarations():
    fam = families.get("qwen-image")
    assert families.by_class("QwenImageTransformer2DModel") is fam
    assert fam.variant("qwen-image-t2i").comfy.model_type == "FLUX"  # ComfyUI: ModelSamplingFlux, shift 1.15
    assert families.parse("qwen-image-t2i")[0] is fam and "tiny-qwen-image" in families.tiny_models()
    assert fam.cond.width == 3584 and fam.cond.mask and fam.latent.frame_axis
    plan = get_model({"model": MODEL}).adapter.plan
    assert plan.attention == {"transformer_blocks.*.attn": ("text", "image")}
    assert {k: v.stream for k, v in plan.outputs["pos_embed"].items()} == {0: "image", 1: "text"}
    assert plan.inputs["transformer_blocks.*"]["encoder_hidden_states_mask"].stream == "text"
    assert set(plan.gathers) == {"proj_out"}


# ------------------------------------------------------------------------------------------------ weights
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def qwen_sd():
    return {k: v.clone() for k, v in get_model({"model": MODEL}).adapter.model.state_dict().items()}


def _load_equal(path, sd, **kw):
    from comfyui_xdit.weights import load_transformer

    loaded = load_transformer(str(path), **kw)
    assert (loaded.family, loaded.variant) == ("qwen-image", "qwen-image-t2i")
    got = loaded.model.state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    cfg = loaded.model.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, list(cfg.axes_dims_rope)) == \
        (2, 4, 16, [4, 6, 6])
    return loaded


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_files_release_and_comfyui_layout(tmp_path, qwen_sd, prefix):
    """The release's and ComfyUI's diffusion_models files use diffusers' names; all-in-one files also hold the text
    encoder and VAE under other prefixes, which are ignored."""
    from safetensors.torch import save_file

    sd = {prefix + k: v for k, v in qwen_sd.items()}
    if prefix:
        sd["text_encoders.qwen25_7b.transformer.model.norm.weight"] = torch.ones(4)
        sd["vae.decoder.conv_in.weight"] = torch.ones(2, 2)
    save_file(sd, str(tmp_path / "qwen_image.safetensors"))
    _load_equal(tmp_path / "qwen_image.safetensors", qwen_sd, family="qwen-image")


def test_fp8_and_scaled_fp8_single_files(tmp_path, qwen_sd):
    from safetensors.torch import save_file

    save_file({k: v.to(FP8) for k, v in qwen_sd.items()}, str(tmp_path / "fp8.safetensors"))
    rounded = {k: v.to(FP8).float() for k, v in qwen_sd.items()}
    assert any(not torch.equal(rounded[k], v) for k, v in qwen_sd.items())
    _load_equal(tmp_path / "fp8.safetensors", rounded)
    scaled, expected = {"scaled_fp8": torch.zeros(0, dtype=FP8)}, {}
    for k, v in qwen_sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448
            scaled[k], scaled[k[:-6] + "scale_weight"] = (v / scale).to(FP8), scale.reshape(1)
            expected[k] = scaled[k].float() * scale
        else:
            scaled[k] = expected[k] = v
    save_file(scaled, str(tmp_path / "qwen_image_fp8_scaled.safetensors"))
    _load_equal(tmp_path / "qwen_image_fp8_scaled.safetensors", expected)


def test_diffusers_model_and_pipeline_folders(tmp_path, qwen_sd):
    model = get_model({"model": MODEL}).adapter.model
    model.save_pretrained(str(tmp_path / "m"), max_shard_size="2MB")
    assert len(list((tmp_path / "m").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    _load_equal(tmp_path / "m", qwen_sd)
    model.save_pretrained(str(tmp_path / "pipe" / "transformer"))
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    _load_equal(tmp_path / "pipe", qwen_sd, family="qwen-image-t2i")


def test_detection_is_specific(qwen_sd):
    from comfyui_xdit.weights import detect_family

    keys = set(qwen_sd)
    assert detect_family(keys) == "qwen-image"
    assert detect_family("model.diffusion_model." + k for k in keys) == "qwen-image"
    others = {f.name: f for f in families.families().values() if f.name != "qwen-image"}
    assert not any(f.detect(keys) for f in others.values())  # no other family claims Qwen-Image's keys
    not_qwen = {
        # FLUX.2 in BFL layout: img_in / txt_in too, shared modulation, no txt_norm
        "flux2-bfl": {"img_in.weight", "txt_in.weight", "double_stream_modulation_img.lin.weight",
                      "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "final_layer.linear.weight"},
        # FLUX.2 in diffusers layout
        "flux2-diffusers": {"x_embedder.weight", "context_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight",
                            "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight", "norm_out.linear.weight"},
        # Qwen-Image 2.1 (another class): txt_in is a module with its own norm
        "qwen-image-2.1": {"img_in.weight", "txt_in.text_norm.weight", "txt_in.linear.weight",
                           "transformer_blocks.0.img_mod.1.weight"},
        # Z-Image
        "z-image": {"x_embedder.2-1.weight", "cap_embedder.1.weight", "layers.0.attention.to_q.weight",
                    "noise_refiner.0.attention.to_q.weight", "context_refiner.0.attention.to_q.weight"},
        # Flux.1 (BFL): img_in and txt_in, no txt_norm
        "flux1-bfl": {"img_in.weight", "txt_in.weight", "double_blocks.0.img_mod.lin.weight"},
    }
    fam = families.get("qwen-image")
    for name, ks in not_qwen.items():
        assert not fam.detect(ks), name
    incomplete = keys - {"txt_norm.weight"}
    assert not fam.detect(incomplete)


def test_published_config_from_shapes():
    """The shipped 20.4B config builds on the meta device, and config inference recovers it from the key shapes
    alone (what the queue-time checks read from a safetensors header)."""
    import diffusers

    from comfyui_xdit import weights

    fam = families.get("qwen-image")
    base = weights._base_config(fam, "qwen-image-t2i")
    with torch.device("meta"):
        model = diffusers.QwenImageTransformer2DModel.from_config(base)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(20.43, abs=0.01)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    desc = weights.describe({"model.diffusion_model." + k: v for k, v in shapes.items()})
    assert desc.family is fam and desc.variant == "qwen-image-t2i"
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    assert {k: norm(desc.config[k]) for k in base} == {k: norm(v) for k, v in base.items()}
    assert desc.config["use_additional_t_cond"] is False


def test_bad_checkpoints_are_one_line_errors(tmp_path, qwen_sd):
    from safetensors.torch import save_file

    from comfyui_xdit.errors import WeightsError
    from comfyui_xdit.weights import load_transformer

    sd = dict(qwen_sd)
    sd.pop("transformer_blocks.1.txt_mlp.net.2.bias")
    save_file(sd, str(tmp_path / "a.safetensors"))
    with pytest.raises(WeightsError, match=r"missing keys transformer_blocks\.1\.txt_mlp\.net\.2\.bias") as e:
        load_transformer(str(tmp_path / "a.safetensors"))
    assert "\n" not in str(e.value)
    sd = {k: v for k, v in qwen_sd.items() if k != "proj_out.weight"}
    save_file(sd, str(tmp_path / "b.safetensors"))
    with pytest.raises(WeightsError, match="missing keys proj_out.weight"):
        load_transformer(str(tmp_path / "b.safetensors"))


# ------------------------------------------------------------------------------------------------ Qwen-Image-Edit
def test_edit_reference_tokens_fit_the_token_plan(tmp_path):
    """Qwen-Image-Edit appends the reference image's tokens to the image stream (img_shapes gets a second entry;
    Edit-2511 adds a per-token modulate_index): under the same token plan, Ulysses 4, Ring 4 and Ulysses 2 x Ring
    2 give the serial forward (93 image tokens, a 15-token text padded on several ranks)."""
    from tests.distributed import ROOT, free_port

    out = tmp_path / "edit.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                           str(ROOT / "tests" / "qwen_edit_worker.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(out.read_text())
    names = [f"{m}4{z}" for m in ("ulysses", "ring", "usp") for z in ("", "_zero_cond_t")]
    for name in names:
        assert errors[name] <= 1e-5 and errors[name + "_bytes"] > 0, (name, errors[name])


def test_generate_on_a_pool_writes_comfyuis_layout(tmp_path):
    """generate --pool (the nodes' path from the command line): the pool returns [B, 16, H/8, W/8] and the CLI
    writes Qwen-Image's ComfyUI layout, the same latents as generating in this process."""
    from safetensors.torch import load_file

    from comfyui_xdit.cli import main
    from tests.test_runtime_cli import _serve

    proc, address = _serve(tmp_path)
    try:
        job = ["generate", "--model", MODEL, "--height", "112", "--width", "144", "--steps", "3", "--cfg", "2"]
        assert main([*job, "--out", str(tmp_path / "local.safetensors")]) == 0
        assert main([*job, "--out", str(tmp_path / "pool.safetensors"), "--pool", address,
                     "--ulysses-degree", "2"]) == 0
        local, remote = (load_file(tmp_path / f"{n}.safetensors")["latents"] for n in ("local", "pool"))
        assert local.shape == remote.shape == (1, 16, 1, 14, 18)
        assert rel_l2(remote, local) < 1e-5
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
