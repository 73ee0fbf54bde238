"""HunyuanVideo 1.5 (text-to-video): serial sampling equals diffusers' HunyuanVideo15Pipeline (padded prompts, a
negative of another length, CFG); every exact parallel method equals serial at world sizes 2 and 4 on odd token
counts, with the bytes each method must exchange; padded text never reaches attention; PipeFusion; the published
configs; the CLI.

The tiny model: 4 heads x 16, 2 blocks, 3584-wide text; ODD is 9 frames (3 latent frames) of 48x80 pixels: 3 x 3 x
5 = 45 video tokens, 13 text tokens (+ 2 masked slots: 15 in the blocks), divisible by neither 2 nor 4.
"""
from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_xdit.errors import XDiTError
from comfyui_xdit.sampling import SampleRequest, latent_shape, sample, seed_noise
from tests.cases import case_ok, get_model, serial_of
from tests.conftest import rel_l2
from tests.distributed import assert_exchanged, run_cases
from tests.pipefusion_reference import stale_reference

MODEL = "tiny-hunyuanvideo15"
ODD = dict(height=48, width=80, frames=9, text_tokens=13)    # 3 x 3 x 5 = 45 video tokens
# a padded prompt (13 tokens, 4 of them padding) and a shorter padded negative (7 tokens, 2 padding)
MASKS = {"cond_mask": [[1] * 9 + [0] * 4], "neg_cond_mask": [[1] * 5 + [0] * 2]}
NEG = dict(cfg=4.0, masks=MASKS)
# scheduler/scheduler_config.json shift of the diffusers releases (diffusers' conversion script: 480p T2V 5.0,
# 720p T2V 9.0); the reference pipeline is built from these numbers, not from the engine's scheduler
PUBLISHED_SHIFT = {"hunyuanvideo-1.5-480p-t2v": 5.0, "hunyuanvideo-1.5-720p-t2v": 9.0}
IMAGE_SLOTS, BYT5_TOKENS = 729, 256  # what HunyuanVideo15Pipeline passes for text-to-video (all masked)


class _NoVAE:
    """Stands in for the VAE: the pipeline reads its latent channels and compression ratios only (the latents are
    given, and output_type="latent" decodes nothing)."""
    config = types.SimpleNamespace(latent_channels=32)
    temporal_compression_ratio, spatial_compression_ratio = 4, 16


def pipeline_latents(adapter, req: SampleRequest, cond, mask, neg=None, neg_mask=None) -> torch.Tensor:
    """HunyuanVideo15Pipeline with the same transformer, embeddings, masks and the seed noise as latents, the
    release's scheduler and guider; no text encoders or VAE (output_type="latent"); ComfyUI-convention latents."""
    import diffusers

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=PUBLISHED_SHIFT[adapter.variant])
    guider = diffusers.ClassifierFreeGuidance(guidance_scale=req.cfg)
    pipe = diffusers.HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=adapter.model, vae=_NoVAE(),
                                            scheduler=sched, text_encoder_2=None, tokenizer_2=None, guider=guider)
    pipe.set_progress_bar_config(disable=True)
    b = cond.shape[0]
    width_2 = adapter.model.config.text_embed_2_dim
    byt5, byt5_mask = torch.zeros(b, BYT5_TOKENS, width_2), torch.zeros(b, BYT5_TOKENS, dtype=torch.long)
    kw = {}
    if req.cfg > 1:
        kw = dict(negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask, negative_prompt_embeds_2=byt5,
                  negative_prompt_embeds_mask_2=byt5_mask)
    noise = seed_noise(req.seed, latent_shape(adapter, req))
    out = pipe(prompt_embeds=cond, prompt_embeds_mask=mask, prompt_embeds_2=byt5, prompt_embeds_mask_2=byt5_mask,
               height=req.height, width=req.width, num_frames=req.frames, num_inference_steps=req.steps,
               latents=noise, output_type="latent", return_dict=False, **kw)[0]
    return adapter.from_model_space(out.float())


def _embeddings(seed: int, batch: int = 1, pos: int = 12, neg: int = 7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, pos, 3584, generator=gen), torch.randn(batch, neg, 3584, generator=gen)


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize("height,width,frames,batch,cfg", [
    (48, 80, 9, 1, 4.0),   # 3 latent frames of 3 x 5 tokens, padded prompt and a shorter padded negative
    (64, 32, 5, 2, 1.0),   # batch 2, rows with different padding, no CFG
])
def test_serial_matches_hunyuan_video15_pipeline(height, width, frames, batch, cfg):
    ad = get_model({"model": MODEL}).adapter
    assert ad.variant == "hunyuanvideo-1.5-720p-t2v"
    cond, neg = _embeddings(0, batch)
    mask = _mask([[1] * 9 + [0] * 3, [1] * 12][:batch])
    neg_mask = _mask([[1] * 5 + [0] * 2, [1] * 7][:batch])
    req = SampleRequest(height=height, width=width, frames=frames, steps=4, seed=3, batch_size=batch, cfg=cfg,
                        inputs={"cond": cond, "cond_mask": mask, "neg_cond": neg, "neg_cond_mask": neg_mask})
    ours = sample(ad, req)
    assert ours.shape == (batch, 32, (frames - 1) // 4 + 1, height // 16, width // 16)
    assert torch.isfinite(ours).all() and ours.std() > 0.5
    ref = pipeline_latents(ad, req, cond, mask, neg, neg_mask)
    assert rel_l2(ours, ref) <= 1e-4
    # the comparison can fail: the padded tokens' values matter once unmasked, and so does the shift
    unmasked = sample(ad, SampleRequest(**{**req.__dict__,
                                           "inputs": {**req.inputs, "cond_mask": torch.ones_like(mask)}}))
    assert rel_l2(unmasked, ref) > 1e-3
    assert rel_l2(sample(ad, SampleRequest(**{**req.__dict__, "shift": 5.0})), ref) > 1e-3


def test_padding_values_never_matter():
    """What sits under the mask (the prompt's padding) changes nothing, to the bit pattern of a serial run."""
    ad = get_model({"model": MODEL}).adapter
    cond, _ = _embeddings(1)
    mask = _mask([[1] * 8 + [0] * 4])
    other = cond.clone()
    other[:, 8:] = 100 * torch.randn(1, 4, 3584)
    req = dict(height=48, width=80, frames=5, steps=2, seed=1)
    a = sample(ad, SampleRequest(**req, inputs={"cond": cond, "cond_mask": mask}))
    b = sample(ad, SampleRequest(**req, inputs={"cond": other, "cond_mask": mask}))
    assert rel_l2(a, b) <= 1e-6


def test_frames_sizes_and_variants():
    ad = get_model({"model": MODEL}).adapter
    cond, _ = _embeddings(2)
    base = dict(height=48, width=80, steps=1, seed=1, inputs={"cond": cond})
    with pytest.raises(XDiTError, match="frames must be 4k"):
        sample(ad, SampleRequest(**base, frames=8))
    with pytest.raises(XDiTError, match="multiples of 16"):
        sample(ad, SampleRequest(**{**base, "height": 40}, frames=5))
    assert ad.image_tokens(48, 80, 9) == 45
    from comfyui_xdit import families

    fam = families.get("hunyuanvideo-1.5")
    assert fam.variant_of({"target_size": 640}, "") == "hunyuanvideo-1.5-480p-t2v"
    assert fam.variant_of({"target_size": 960}, "") == "hunyuanvideo-1.5-720p-t2v"


@pytest.mark.parametrize("variant", ["hunyuanvideo-1.5-720p-t2v", "hunyuanvideo-1.5-480p-t2v",
                                     "hunyuanvideo-1.5-720p-i2v", "hunyuanvideo-1.5-480p-i2v"])
def test_published_configs(variant):
    """Each shipped config builds the published 8.3B transformer (meta tensors); the config inferred from its
    shapes is the shipped one (target_size, which no weight encodes, aside); detection finds the family."""
    from diffusers import HunyuanVideo15Transformer3DModel

    from comfyui_xdit import families, weights

    fam = families.get("hunyuanvideo-1.5")
    base = weights._base_config(fam, variant)
    with torch.device("meta"):
        model = HunyuanVideo15Transformer3DModel.from_config(base)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(8.327, abs=0.001)
    sd = model.state_dict()
    assert families.detect(sd) is fam
    inferred = fam.infer_config(sd, {})
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in inferred.items()} == {k: base[k] for k in inferred}
    assert fam.variant_of(base, "") == variant


def test_generate_cli(tmp_path, capsys):
    from comfyui_xdit.cli import main

    cond, _ = _embeddings(4, pos=10)
    mask = _mask([[1] * 7 + [0] * 3])
    save_file({"cond": cond, "cond_mask": mask}, str(tmp_path / "in.safetensors"))
    args = ["generate", "--model", MODEL, "--height", "48", "--width", "80", "--steps", "2", "--seed", "2",
            "--inputs", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out.safetensors")]
    assert main([*args, "--frames", "9"]) == 0, capsys.readouterr().err
    out = load_file(tmp_path / "out.safetensors")["latents"]
    ref = sample(get_model({"model": MODEL}).adapter,
                 SampleRequest(height=48, width=80, frames=9, steps=2, seed=2,
                               inputs={"cond": cond, "cond_mask": mask}))
    assert out.shape == (1, 32, 3, 3, 5) and torch.equal(out, ref)
    assert main([*args, "--frames", "8"]) == 2
    assert "frames must be 4k+1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ parallel
def test_self_attention_padding_masks():
    """The processor's mask hides padded tokens as keys and as queries (valid_q & valid_k): sequence-parallel
    attention takes its key mask and zeroes the padded queries' rows, as SDPA does; other non-key masks are
    refused in one line."""
    import torch.nn.functional as F

    from comfyui_xdit.errors import ConfigError
    from comfyui_xdit.parallel.attention import padding_of, zero_padded_queries

    valid = torch.tensor([[True, True, False, True, False], [True, False, True, True, True]])
    assert padding_of(valid[:, None, None, :], 2, 5)[0].equal(valid) and not padding_of(valid[:, None, None], 2, 5)[1]
    both = (valid[:, :, None] & valid[:, None, :])[:, None]
    keys, queries = padding_of(both, 2, 5)
    assert keys.equal(valid) and queries
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    serial = F.scaled_dot_product_attention(q, k, v, attn_mask=both)
    key_only = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
    assert torch.allclose(zero_padded_queries(key_only, valid), serial, atol=1e-6)
    with pytest.raises(ConfigError, match="key-padding masks only"):
        padding_of(torch.ones(5, 5, dtype=torch.bool).tril()[None, None], 1, 5)  # causal


def _exact_world2() -> list[dict]:
    base = {"model": MODEL, "seed": 7, "steps": 3, **ODD}
    return [{**base, "id": "ulysses2", "parallel": {"ulysses": 2}, **NEG},
            {**base, "id": "ring2", "parallel": {"ring": 2}, **NEG},
            {**base, "id": "cfg2", "parallel": {"cfg": 2}, **NEG},
            {**base, "id": "dp2", "parallel": {"dp": 2}, "batch": 3},
            {**base, "id": "shard2", "parallel": {"shard": 2}, **NEG},
            {**base, "id": "i2v_ulysses2", "overrides": {"task_type": "i2v"}, "parallel": {"ulysses": 2}, **NEG,
             "random_inputs": {"image_latent": [1, 32, 1, 3, 5], "image_embeds": [1, 6, 8]}},
            # every step synchronous: patches of 5 | 4 token rows (the first ends inside the second frame)
            {**base, "id": "pf2_allwarm", "parallel": {"pipefusion": 2, "num_patches": 2, "warmup_steps": 3}, **NEG}]


def _exact_world4() -> list[dict]:
    base = {"model": MODEL, "seed": 11, "steps": 3, **ODD}
    return [{**base, "id": "ulysses2_ring2", "parallel": {"ulysses": 2, "ring": 2}, **NEG},
            {**base, "id": "ulysses4", "parallel": {"ulysses": 4}, **NEG},
            {**base, "id": "ring4", "parallel": {"ring": 4}, **NEG},
            {**base, "id": "cfg2_ulysses2", "parallel": {"cfg": 2, "ulysses": 2}, **NEG},
            {**base, "id": "cfg2_ring2", "parallel": {"cfg": 2, "ring": 2}, **NEG},
            {**base, "id": "dp2_ulysses2", "parallel": {"dp": 2, "ulysses": 2}, "batch": 2},
            {**base, "id": "shard4_ulysses4", "parallel": {"shard": 4, "ulysses": 4}, **NEG},
            {**base, "id": "shard2_ulysses2_cfg2", "parallel": {"shard": 2, "ulysses": 2, "cfg": 2}, **NEG},
            {**base, "id": "shard4", "parallel": {"shard": 4}, **NEG},
            {**base, "id": "i2v_ulysses2_ring2", "overrides": {"task_type": "i2v"},
             "parallel": {"ulysses": 2, "ring": 2}, **NEG,
             "random_inputs": {"image_latent": [1, 32, 1, 3, 5], "image_embeds": [1, 6, 8]}},
            {**base, "id": "pf4_allwarm", "parallel": {"pipefusion": 4, "num_patches": 3, "warmup_steps": 3}, **NEG,
             "overrides": {"num_layers": 4}},
            {**base, "id": "pf2_ulysses2_allwarm", "parallel": {"pipefusion": 2, "num_patches": 2, "warmup_steps": 3,
                                                                 "ulysses": 2}, **NEG}]


def stale_cases() -> list[dict]:
    """PipeFusion 2 with stale K/V after one warm-up step: 9 frames of 48x80 (45 tokens, 9 token rows), padded
    prompt and negative."""
    return [{"id": f"hv_s6_m{m}_w1", "model": MODEL, "seed": 5, "steps": 6, **ODD, **NEG,
             "parallel": {"pipefusion": 2, "num_patches": m, "warmup_steps": 1}} for m in (2, 3)]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_cases(2, _exact_world2() + stale_cases(), tmp_path_factory.mktemp("hv2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return run_cases(4, _exact_world4(), tmp_path_factory.mktemp("hv4"))


@pytest.mark.parametrize("case", _exact_world2(), ids=lambda c: c["id"])
def test_world2_exact_methods_match_serial(world2, case):
    info = case_ok(world2, case["id"])
    assert rel_l2(info["latents"], serial_of(case)) <= 1e-4
    assert_exchanged(info, case["parallel"])
    if case["parallel"] != {"dp": 2}:
        assert sum(info["rank_comm"][0][0].values()) > 0  # the ranks really exchanged data


@pytest.mark.parametrize("case", _exact_world4(), ids=lambda c: c["id"])
def test_world4_exact_methods_match_serial(world4, case):
    info = case_ok(world4, case["id"])
    assert rel_l2(info["latents"], serial_of(case)) <= 1e-4
    assert_exchanged(info, case["parallel"])


@pytest.mark.parametrize("case", stale_cases(), ids=lambda c: c["id"])
def test_pipefusion_stale_phase_is_the_stale_rule(world2, case):
    """Against the plain-hook stale reference (tests/pipefusion_reference.py): patches are ranges of token rows
    with the frames folded in; the padded text is fresh and masked in every patch."""
    info = case_ok(world2, case["id"])
    assert rel_l2(info["latents"], stale_reference(case)) <= 1e-4
    assert rel_l2(info["latents"], serial_of(case)) > 1e-3  # stale K/V really used
    assert_exchanged(info, case["parallel"])


# ------------------------------------------------------------------------------------------------ weights, memory
def test_single_file_and_folder(tmp_path):
    """A file in diffusers' names and a diffusers folder load as this family (the folder's target_size picks the
    variant); the loaded weights are the saved ones."""
    from comfyui_xdit.tiny import build_tiny
    from comfyui_xdit.weights import load_transformer

    _, model = build_tiny(MODEL, target_size=960)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "hv.safetensors"))
    model.save_pretrained(str(tmp_path / "folder"))
    # a file says nothing of its size class (480p, the pipeline's default); the folder's config says 720p
    for source, variant in ((tmp_path / "hv.safetensors", "hunyuanvideo-1.5-480p-t2v"),
                            (tmp_path / "folder", "hunyuanvideo-1.5-720p-t2v")):
        loaded = load_transformer(str(source))
        assert (loaded.family, loaded.variant) == ("hunyuanvideo-1.5", variant)
        got = loaded.model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_memory_rows_and_plan_at_published_size():
    """Per-rank memory of the 8.33B transformer at 1280x720, 121 frames (meta build): USP replicates 15.5 GiB of
    bf16 weights, FSDP over 8 holds about 1/8 plus two blocks, PipeFusion is offered; the planner fits a job on
    2 x 24 GB."""
    from comfyui_xdit import planner as P
    from comfyui_xdit.bench import build_random
    from comfyui_xdit.memory_estimate import memory_table

    adapter = build_random("hunyuanvideo-1.5-720p-t2v", torch.bfloat16, "meta")
    assert adapter.image_tokens(720, 1280, 121) == 31 * 45 * 80
    rows = {(r.method, r.degree): r for r in memory_table(adapter, "1280x720", 121)}
    total = 2 * sum(p.numel() for p in adapter.model.parameters())
    assert rows[("usp", 2)].weights == total and total / 2**30 == pytest.approx(15.51, abs=0.01)
    assert total / 8 < rows[("fsdp x usp", 8)].weights < total / 8 + 3 * total / 54
    assert {m for m, _ in rows} == {"usp", "fsdp x usp", "pipefusion"}
    plan = P.plan(P.facts_of(adapter, "hunyuanvideo-1.5-720p-t2v"), "2x24GB,pcie",
                  P.Job(720, 1280, frames=121, cfg=6.0, steps=50))
    assert plan.choice is not None and plan.choice.memory / 2**30 + 2 <= 24


# ------------------------------------------------------------------------------------------------ image-to-video
I2V = {"task_type": "i2v"}  # tiny-hunyuanvideo15 as the 720p image-to-video release (shift 7.0)
PUBLISHED_SHIFT.update({"hunyuanvideo-1.5-720p-i2v": 7.0, "hunyuanvideo-1.5-480p-i2v": 5.0})


def _image_inputs(seed: int, latent_shape: tuple[int, ...], tokens: int = 6):
    gen = torch.Generator().manual_seed(seed)
    b, c, _, h, w = latent_shape
    return torch.randn(b, c, 1, h, w, generator=gen), torch.randn(b, tokens, 8, generator=gen)


def i2v_pipeline_latents(adapter, req: SampleRequest, cond, mask, neg, neg_mask, image_latent, embeds):
    """HunyuanVideo15ImageToVideoPipeline with the same transformer; its two encoders are replaced by what they
    would return (the VAE's first-frame latent, scaled as the pipeline scales it, and the SigLIP states), so the
    condition channels, the mask and the loop are the pipeline's own."""
    import diffusers
    import PIL.Image

    pipe = diffusers.HunyuanVideo15ImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=adapter.model, vae=_NoVAE(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=PUBLISHED_SHIFT[adapter.variant]),
        text_encoder_2=None, tokenizer_2=None, guider=diffusers.ClassifierFreeGuidance(guidance_scale=req.cfg),
        image_encoder=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.encode_image = lambda image, batch_size, device, dtype: embeds.repeat(batch_size, 1, 1).to(device, dtype)
    pipe._get_image_latents = lambda **kw: image_latent * 1.03682  # the VAE latent times its scaling factor
    b, width_2 = cond.shape[0], adapter.model.config.text_embed_2_dim
    byt5, byt5_mask = torch.zeros(b, BYT5_TOKENS, width_2), torch.zeros(b, BYT5_TOKENS, dtype=torch.long)
    noise = seed_noise(req.seed, latent_shape(adapter, req))
    out = pipe(image=PIL.Image.new("RGB", (req.width, req.height)), prompt_embeds=cond, prompt_embeds_mask=mask,
               prompt_embeds_2=byt5, prompt_embeds_mask_2=byt5_mask, negative_prompt_embeds=neg,
               negative_prompt_embeds_mask=neg_mask, negative_prompt_embeds_2=byt5,
               negative_prompt_embeds_mask_2=byt5_mask, num_frames=req.frames, num_inference_steps=req.steps,
               latents=noise, output_type="latent", return_dict=False)[0]
    return adapter.from_model_space(out.float())


def test_i2v_serial_matches_the_i2v_pipeline():
    ad = get_model({"model": MODEL, "overrides": I2V}).adapter
    assert ad.variant == "hunyuanvideo-1.5-720p-i2v"
    cond, neg = _embeddings(6)
    mask, neg_mask = _mask([[1] * 10 + [0] * 2]), _mask([[1] * 6 + [0]])
    req = SampleRequest(height=48, width=80, frames=9, steps=4, seed=3, cfg=4.0,
                        inputs={"cond": cond, "cond_mask": mask, "neg_cond": neg, "neg_cond_mask": neg_mask})
    first, embeds = _image_inputs(8, latent_shape(ad, req))
    req.inputs.update(image_latent=first, image_embeds=embeds)
    ours = sample(ad, req)
    ref = i2v_pipeline_latents(ad, req, cond, mask, neg, neg_mask, first, embeds)
    assert rel_l2(ours, ref) <= 1e-4
    # the image inputs matter (so the comparison can fail; not their order or scale: no positions, a LayerNorm first)
    rolled = {**req.inputs, "image_embeds": embeds.roll(1, dims=-1)}
    other = sample(ad, SampleRequest(**{**req.__dict__, "inputs": rolled}))
    assert rel_l2(other, ref) > 1e-3


def test_i2v_inputs_are_checked():
    from comfyui_xdit.errors import ConfigError
    from comfyui_xdit.parallel import ParallelConfig

    t2v, i2v = get_model({"model": MODEL}).adapter, get_model({"model": MODEL, "overrides": I2V}).adapter
    cond, _ = _embeddings(7)
    first, embeds = _image_inputs(9, (1, 32, 3, 3, 5))
    base = dict(height=48, width=80, frames=9, steps=1, seed=1)
    with pytest.raises(XDiTError, match="takes no image_latent"):
        t2v.check_request(SampleRequest(**base, inputs={"cond": cond, "image_latent": first, "image_embeds": embeds}))
    with pytest.raises(XDiTError, match="needs image_latent"):
        i2v.check_request(SampleRequest(**base, inputs={"cond": cond, "image_latent": first}))
    with pytest.raises(XDiTError, match="image_latent has shape"):
        i2v.check_request(SampleRequest(**base, inputs={"cond": cond, "image_latent": first[:, :, :, :2],
                                                        "image_embeds": embeds}))
    with pytest.raises(ConfigError, match="pipefusion is not available"):
        i2v.check_request(SampleRequest(**base, inputs={"cond": cond, "image_latent": first, "image_embeds": embeds}),
                          ParallelConfig(pipefusion=2))
