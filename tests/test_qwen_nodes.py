"""Qwen-Image through the nodes without ComfyUI (stand-ins): ComfyUI's Qwen-Image CONDITIONING (Qwen2.5-VL 7B
hidden states [1, L, 3584], an attention_mask only when padded, which ComfyUI's QwenImage model ignores) and
LATENT (EmptySD3LatentImage's [B, 16, H/8, W/8] in, [B, 16, 1, H/8, W/8] out as KSampler returns it), sigmas from
the FLUX model sampling with shift 1.15, and a run on a real 2-rank CPU pool (Ulysses 2, CFG) equal to the engine."""
from __future__ import annotations


import pytest
import torch

from comfyui_xdit.engine import run_job
from comfyui_xdit.models import load_model
from comfyui_xdit.sampling import SampleRequest

from . import comfy_standins as cs
from .conftest import rel_l2
from .test_nodes import CONFIG_DEFAULTS

VARIANT = "qwen-image-t2i"


@pytest.fixture(scope="module")
def ext():
    with cs.extension() as ext:
        yield ext


def _cond(seed: int, tokens: int, **extras):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 3584, generator=g), {"pooled_output": None, **extras}]]


def test_variant_spec(ext):
    s = ext.nodes.families.spec(VARIANT)
    assert (s.family, s.supported_model, s.model_type, s.latent_format, s.channels) == \
        ("qwen-image", "QwenImage", "FLUX", "Wan21", 16)
    assert s.frame_axis and not s.text_mask
    assert ext.nodes.families.TINY_VARIANT["tiny-qwen-image"] == VARIANT
    ck = ext.nodes.checkpoints
    assert ck.detect_variant("tiny-qwen-image") == VARIANT


def test_conditioning_drops_the_mask_comfyui_ignores(ext):
    cv = ext.nodes.convert
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    tensors, guidance = cv.conditioning_tensors(_cond(1, 6, attention_mask=mask), _cond(2, 4), "qwen-image", True,
                                                VARIANT)
    assert set(tensors) == {"cond", "neg_cond"} and guidance is None  # no pooled vector, no distilled guidance
    assert tensors["cond"].shape == (1, 6, 3584) and tensors["neg_cond"].shape == (1, 4, 3584)
    kept, _ = cv.conditioning_tensors(_cond(1, 6, attention_mask=mask), None, "qwen-image", False)
    assert torch.equal(kept["cond_mask"], mask)  # without a variant (the engine's own rule): kept
    edit, _ = cv.conditioning_tensors(_cond(1, 6, reference_latents=[torch.zeros(1, 16, 1, 8, 8)]), None,
                                      "qwen-image", False, VARIANT)  # Qwen-Image-Edit's conditioning: taken
    assert edit["reference_latent"].shape == (1, 16, 8, 8)


def test_latent_in_and_out(ext):
    cv = ext.nodes.convert
    empty = {"samples": torch.zeros(2, 16, 12, 16)}  # EmptySD3LatentImage
    assert cv.latent_input(empty, VARIANT)["samples"].shape == (2, 16, 12, 16)
    framed = torch.randn(2, 16, 1, 12, 16)  # a VAE-encoded image or an earlier sampler's output
    assert torch.equal(cv.latent_input({"samples": framed}, VARIANT)["samples"], framed[:, :, 0])
    assert cv.latent_input({"samples": torch.zeros(1, 4, 8, 8)}, VARIANT)["samples"].shape == (1, 16, 8, 8)
    with pytest.raises(cv.ConversionError, match=r"expected \[batch, channels, 1, h, w\]"):
        cv.latent_input({"samples": torch.zeros(1, 16, 2, 8, 8)}, VARIANT)
    with pytest.raises(cv.ConversionError, match=r"expected \[batch, channels, h, w\]$"):
        cv.latent_input({"samples": torch.zeros(1, 16, 1, 8, 8)}, "flux-dev")
    out = cv.output_latent({"samples": empty["samples"], "batch_index": [0, 1]}, torch.ones(2, 16, 12, 16), VARIANT)
    assert out["samples"].shape == (2, 16, 1, 12, 16) and out["batch_index"] == [0, 1]
    assert cv.output_latent(empty, torch.ones(2, 16, 12, 16), "flux-dev")["samples"].shape == (2, 16, 12, 16)


def test_sigmas_from_comfyuis_qwen_image_sampling(ext):
    cv, rec = ext.nodes.convert, ext.rec
    sig = cv.sigmas_for(VARIANT, "euler", "simple", 8, 1.0)
    ms, scheduler, steps = rec.sigma_calls[-1]
    assert (ms.model_type.name, ms.settings, scheduler, steps) == ("FLUX", {"multiplier": 1.0, "shift": 1.15},
                                                                   "simple", 8)
    assert sig.shape == (9,)


def test_sampler_on_pool_matches_the_engine(ext):
    """Ulysses 2 with CFG, a padded positive (its mask dropped as ComfyUI drops it) and a shorter negative; the
    empty 4-D latent comes back [1, 16, 1, h, w], previews in the Wan21 layout."""
    rec, m = ext.rec, ext.nodes.NODE_CLASS_MAPPINGS
    (config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2))
    (model,) = m["XDiTLoadParallelDiT"].execute(config, "tiny-qwen-image", "fp32", "auto")
    assert (model.family, model.variant) == ("qwen-image", VARIANT)
    pos = _cond(3, 11, attention_mask=torch.tensor([[1] * 8 + [0] * 3]))
    neg = _cond(4, 5)
    rec.progress[:] = []
    latent = {"samples": torch.zeros(1, 16, 14, 18)}  # 7 x 9 tokens
    (out,) = cs.with_id(m["XDiTParallelSampler"], "7").execute(model, pos, neg, latent, 5, 4, 3.5, "euler",
                                                                 "simple", 1.0)
    assert out["samples"].shape == (1, 16, 1, 14, 18)
    assert [p[0] for p in rec.progress] == [1, 2, 3, 4]
    assert all(p[3] is not None and len(p[3][1]) == 5 for p in rec.progress)  # previews reached the previewer
    sigmas = ext.nodes.convert.sigmas_for(VARIANT, "euler", "simple", 4, 1.0)
    z = torch.zeros(1, 16, 14, 18)
    inputs = {"cond": pos[0][0], "neg_cond": neg[0][0], "latent": z, "sigmas": sigmas,
              "noise": torch.randn(1, 16, 14, 18, generator=torch.Generator().manual_seed(5))}
    ref = run_job(load_model("tiny-qwen-image"), SampleRequest(112, 144, 4, seed=5, cfg=3.5, inputs=inputs)).latents
    assert rel_l2(out["samples"][:, :, 0], ref) <= 1e-4
    masked = run_job(load_model("tiny-qwen-image"), SampleRequest(
        112, 144, 4, seed=5, cfg=3.5, inputs={**inputs, "cond_mask": pos[0][1]["attention_mask"]})).latents
    assert rel_l2(masked, ref) > 1e-3  # the dropped mask would have mattered


def test_reference_latents_become_the_engine_inputs(ext):
    """TextEncodeQwenImageEdit(Plus)' reference_latents ([1, 16, 1, h, w] each; odd sizes padded circularly as
    ComfyUI's model pads them) become reference_latent, _2 in order; a negative with other references, another
    reference method, or references for another family are refused in one line."""
    cv = ext.nodes.convert
    g = torch.Generator().manual_seed(4)
    refs = [torch.randn(1, 16, 1, 6, 8, generator=g), torch.randn(1, 16, 1, 5, 7, generator=g)]
    pos, neg = _cond(1, 9, reference_latents=refs), _cond(2, 5, reference_latents=list(refs))
    tensors, _ = cv.conditioning_tensors(pos, neg, "qwen-image", True, VARIANT)
    assert torch.equal(tensors["reference_latent"], refs[0][:, :, 0])
    padded = torch.nn.functional.pad(refs[1][:, :, 0], (0, 1, 0, 1), mode="circular")
    assert tensors["reference_latent_2"].shape == (1, 16, 6, 8) and torch.equal(tensors["reference_latent_2"], padded)
    refusals = [((pos, _cond(2, 5)), "the negative conditioning's reference_latents differ from the positive's"),
                ((pos, _cond(2, 5, reference_latents=refs[:1])), "differ from the positive's"),
                ((_cond(1, 9, reference_latents=refs, reference_latents_method="offset"), neg),
                 "reference_latents_method 'offset'")]
    for (p, n), message in refusals:
        with pytest.raises(cv.ConversionError) as e:
            cv.conditioning_tensors(p, n, "qwen-image", True, VARIANT)
        assert message in str(e.value) and "\n" not in str(e.value)
    tensors, _ = cv.conditioning_tensors(pos, _cond(2, 5), "qwen-image", False, VARIANT)  # cfg 1: no negative read
    assert "reference_latent_2" in tensors
    with pytest.raises(cv.ConversionError, match="reference_latents, which Parallel Sampler does not support"):
        cv.conditioning_tensors(_cond(1, 9, reference_latents=refs), None, "flux", False)


def test_reference_method_follows_the_loaded_edit_variant(ext):
    """The newer ComfyUI's FluxKontextMultiReferenceLatentMethod option 'index_timestep_zero' (the references'
    tokens at timestep 0) is Edit-2511's zero_cond_t: taken on a model loaded as qwen-image-edit-2511, refused in one
    line on 2509 / Qwen-Image (and 'index' the other way round); no method is the loaded variant's own. Both paths:
    Parallel Sampler's conversion and Parallel DiT Model's forwards read the same rule."""
    cv, fams = ext.nodes.convert, ext.nodes.families
    refs = [torch.randn(1, 16, 1, 6, 8, generator=torch.Generator().manual_seed(4))]
    zero = _cond(1, 9, reference_latents=refs, reference_latents_method="index_timestep_zero")
    index = _cond(1, 9, reference_latents=refs, reference_latents_method="index")
    plain = _cond(1, 9, reference_latents=refs)
    for variant, ok, refused in (("qwen-image-edit-2511", (zero, plain), index),
                                 ("qwen-image-edit-2509", (index, plain), zero), (VARIANT, (index, plain), zero)):
        for p in ok:
            tensors, _ = cv.conditioning_tensors(p, None, "qwen-image", False, variant)
            assert torch.equal(tensors["reference_latent"], refs[0][:, :, 0])
        with pytest.raises(cv.ConversionError) as e:
            cv.conditioning_tensors(refused, None, "qwen-image", False, variant)
        assert "reference_latents_method" in str(e.value) and "\n" not in str(e.value)
    assert "qwen-image-edit-2511" in fams.reference_method_error("index_timestep_zero", "qwen-image-edit-2509")
    assert fams.reference_method_error("index_timestep_zero", "qwen-image-edit-2511") is None
    s = fams.spec("qwen-image-edit-2511")  # ComfyUI runs 2511 as its QwenImage model (sampling, latent format)
    assert (s.supported_model, s.model_type, s.latent_format, s.text_mask) == ("QwenImage", "FLUX", "Wan21", False)


def test_comfyui_2511_file_loads_as_edit_2511(ext, tmp_path):
    """ComfyUI's Edit-2511 files carry an empty `__index_timestep_zero__` tensor (its default reference method):
    the file is detected as qwen-image-edit-2511 by the nodes and loads with zero_cond_t, the marker dropped; the
    same weights without the marker load as Qwen-Image."""
    from safetensors.torch import save_file

    from comfyui_xdit.weights import load_transformer

    sd = {k: v.contiguous() for k, v in load_model("tiny-qwen-image").adapter.model.state_dict().items()}
    marked, plain = tmp_path / "edit2511.safetensors", tmp_path / "plain.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()} |
              {"model.diffusion_model.__index_timestep_zero__": torch.tensor([])}, str(marked))
    save_file(sd, str(plain))
    ck = ext.nodes.checkpoints
    assert ck.detect_variant(str(marked)) == "qwen-image-edit-2511"
    assert ck.detect_variant(str(plain)) == VARIANT
    loaded = load_transformer(str(marked))
    assert loaded.variant == "qwen-image-edit-2511" and loaded.model.config.zero_cond_t
    assert all(b.zero_cond_t for b in loaded.model.transformer_blocks)
    other = load_transformer(str(plain))
    assert other.variant == VARIANT and not other.model.config.zero_cond_t
