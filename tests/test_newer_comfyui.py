"""The nodes on the newer ComfyUI's API (tests/comfy_newer_standins.py, modelled on its files) and, for the same calls,
on 0.3.64's (tests/comfy_standins.py): empty latents go through ComfyUI's fix_empty_latent_channels with ComfyUI's
own latent format object of the variant and the LATENT's ratios where that ComfyUI takes them, and Qwen-Image's
attention_mask reaches the pool exactly where the running ComfyUI's QwenImage applies it (detected, not by
version). The real 0.3.64 keeps its end-to-end tests (test_comfyui_e2e*.py)."""
from __future__ import annotations

import sys

import pytest
import torch

from . import comfy_standins as cs
from .conftest import rel_l2

QWEN = "qwen-image-t2i"


@pytest.fixture(scope="module", params=["newer", "0.3.64"])
def api(request):
    with cs.extension(newer=request.param == "newer") as ext:
        ext.api = request.param
        yield ext


def _expected_empty(s, h, w, newer):
    """The shape KSampler would sample for EmptyLatentImage's [2, 4, h, w] (downscale_ratio_spacial 8 on the newer
    ComfyUI) on a model of spec `s`, in the pool's layout (a frame axis only for video)."""
    if newer and s.latent_format == "Wan22":  # the newer ComfyUI resizes the 1/8 latent to Wan 2.2's 1/16
        h, w = h // 2, w // 2
    return (2, s.channels, 1, h, w) if s.dims == 3 else (2, s.channels, h, w)


def test_empty_latents_are_fixed_by_comfyuis_latent_format_of_each_variant(api):
    cv, fam, rec = api.nodes.convert, api.nodes.families, api.rec
    newer = api.api == "newer"
    for variant, s in fam.VARIANTS.items():
        rec.fixed_empty[:] = []
        empty = {"samples": torch.zeros(2, 4, 12, 16), "downscale_ratio_spacial": 8}  # EmptyLatentImage's
        lat = cv.latent_input(empty, variant)
        assert tuple(lat["samples"].shape) == _expected_empty(s, 12, 16, newer), variant
        assert not lat["samples"].any()
        if newer:  # ComfyUI's own format object ran (its fix_empty_latent), not one of ours
            assert rec.fixed_empty and {name for name, _ in rec.fixed_empty} == {s.latent_format}, variant
        unchanged = cv.unchanged_latent(empty, variant)  # KSamplerAdvanced with no step left: ComfyUI's fixed latent
        assert "downscale_ratio_spacial" not in unchanged and not unchanged["samples"].any()
        ours = lat["samples"].unsqueeze(2) if s.frame_axis else lat["samples"]
        assert unchanged["samples"].shape == ours.shape, variant  # Qwen-Image: [B, 16, 1, h, w] as KSampler's
        out = cv.output_latent(empty, torch.ones_like(lat["samples"]), variant)
        assert set(out) == {"samples"}  # the empty latent's ratio goes, as common_ksampler drops it


def test_flux2_empty_latent_of_the_newer_comfyuis_native_format_becomes_the_packs(api):
    """The newer ComfyUI's native FLUX.2 empty latent is 128 channels at 1/16 (downscale_ratio_spacial 16): on the
    base LatentFormat with the pack's 32 channels, ComfyUI's own function makes it the pack's [B, 32, H/8, W/8]."""
    cv = api.nodes.convert
    native = {"samples": torch.zeros(1, 128, 6, 8), "downscale_ratio_spacial": 16}
    if api.api == "newer":
        assert cv.latent_input(native, "flux2-dev")["samples"].shape == (1, 32, 12, 16)
    else:  # 0.3.64 takes no ratio (and has no such node): the channels only
        assert cv.latent_input(native, "flux2-dev")["samples"].shape == (1, 32, 6, 8)
    with pytest.raises(cv.ConversionError, match="has 4 channels but flux-dev uses 16"):
        cv.latent_input({"samples": torch.ones(1, 4, 8, 8)}, "flux-dev")  # not empty: never widened


def _cond(seed: int, tokens: int, **extras):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 3584, generator=g), {"pooled_output": None, **extras}]]


def test_qwen_image_mask_follows_what_the_running_comfyui_applies(api):
    fam, cv = api.nodes.families, api.nodes.convert
    newer = api.api == "newer"
    assert fam.applies_text_mask(QWEN) is newer
    assert fam.applies_text_mask("z-image-turbo") and fam.applies_text_mask("flux-dev")  # their ComfySpec's
    mask, neg_mask = torch.tensor([[1, 1, 1, 1, 0, 0]]), torch.tensor([[1, 1, 1, 0]])
    tensors, _ = cv.conditioning_tensors(_cond(1, 6, attention_mask=mask), _cond(2, 4, attention_mask=neg_mask),
                                         "qwen-image", True, QWEN)
    if newer:
        assert torch.equal(tensors["cond_mask"], mask) and torch.equal(tensors["neg_cond_mask"], neg_mask)
    else:
        assert set(tensors) == {"cond", "neg_cond"}


def test_stock_forward_sends_qwen_images_mask_where_comfyui_applies_it(api, monkeypatch):
    stock, pool = api.nodes.stock_model, api.nodes.pool
    calls = []

    class Client:
        def load(self, *args):
            return {"key": "k"}

        def pool_alive(self):
            return True

        def forward(self, key, x, t, conds, **kw):
            calls.append(conds)
            return -x

    monkeypatch.setattr(stock.MANAGER, "client_for", lambda settings: Client())
    handle = pool.ModelHandle(pool.ParallelSettings(device="cpu"), "/m.safetensors", "fp32", "qwen-image", QWEN,
                              "/m.safetensors|auto|fp32")
    model = stock.PoolDiffusionModel(handle, torch.nn.Linear(2, 3, device="meta"))
    x, ctx = torch.randn(2, 16, 1, 4, 4), torch.randn(2, 6, 3584)
    mask = torch.tensor([[1.0] * 4 + [0.0] * 2] * 2)  # a padded prompt, batched cond + uncond
    run = dict(context=ctx, attention_mask=mask, transformer_options={"sigmas": torch.tensor([0.5])})
    if api.api == "newer":
        model(x, torch.tensor([0.5, 0.5]), **run)
        assert torch.equal(calls[0]["cond_mask"], mask.long())
    else:  # 0.3.64's QwenImage never passes one: refused rather than dropped, as before
        with pytest.raises(stock.StockModelError, match="attention_mask"):
            model(x, torch.tensor([0.5, 0.5]), **run)


def test_mask_probe_asks_the_class_not_its_name(api):
    """A model_base class whose extra_conds passes the mask on, but only after reading what a bare instance lacks,
    is taken to drop it (the ComfySpec's answer), and one that passes it is detected whatever ComfyUI's version."""
    fam = api.nodes.families
    base = sys.modules["comfy.model_base"].BaseModel  # the stand-in ComfyUI's, as the extension sees it

    class Passes(base):
        def extra_conds(self, **kwargs):
            return {**super().extra_conds(**kwargs), "attention_mask": kwargs.get("attention_mask")}

    class NeedsInit(Passes):
        def extra_conds(self, **kwargs):
            return {**super().extra_conds(**kwargs), "device": self.device}

    assert fam._passes_attention_mask(Passes) is True and fam._passes_attention_mask(NeedsInit) is None
    assert fam._passes_attention_mask(sys.modules["comfy.model_base"].QwenImage) is (api.api == "newer")


def test_sampler_on_pool_applies_the_mask_on_the_newer_comfyui(api):
    """A padded Qwen-Image prompt through Parallel Sampler on a 2-rank CPU pool (Ulysses 2, CFG): on the newer
    ComfyUI the result is the engine's with the mask, on 0.3.64 the engine's without it (as each KSampler)."""
    from comfyui_xdit.engine import run_job
    from comfyui_xdit.models import load_model
    from comfyui_xdit.sampling import SampleRequest

    from .test_nodes import CONFIG_DEFAULTS

    m = api.NODE_CLASS_MAPPINGS
    (config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2))
    (model,) = m["XDiTLoadParallelDiT"].execute(config, "tiny-qwen-image", "fp32", "auto")
    mask = torch.tensor([[1] * 8 + [0] * 3])
    pos, neg = _cond(3, 11, attention_mask=mask), _cond(4, 5)
    latent = {"samples": torch.zeros(1, 4, 14, 18), "downscale_ratio_spacial": 8}  # EmptyLatentImage, 7 x 9 tokens
    (out,) = cs.with_id(m["XDiTParallelSampler"], "7").execute(model, pos, neg, latent, 5, 4, 3.5, "euler",
                                                                 "simple", 1.0)
    assert out["samples"].shape == (1, 16, 1, 14, 18) and set(out) == {"samples"}
    sigmas = api.nodes.convert.sigmas_for(QWEN, "euler", "simple", 4, 1.0)
    inputs = {"cond": pos[0][0], "neg_cond": neg[0][0], "latent": torch.zeros(1, 16, 14, 18), "sigmas": sigmas,
              "noise": torch.randn(1, 16, 14, 18, generator=torch.Generator().manual_seed(5))}
    tiny = load_model("tiny-qwen-image")
    plain = run_job(tiny, SampleRequest(112, 144, 4, seed=5, cfg=3.5, inputs=inputs)).latents
    masked = run_job(tiny, SampleRequest(112, 144, 4, seed=5, cfg=3.5, inputs={**inputs, "cond_mask": mask})).latents
    assert rel_l2(masked, plain) > 1e-3  # the mask matters at this size: the checks below can fail
    want, other = (masked, plain) if api.api == "newer" else (plain, masked)
    assert rel_l2(out["samples"][:, :, 0], want) <= 1e-4
    assert rel_l2(out["samples"][:, :, 0], other) > 1e-3
