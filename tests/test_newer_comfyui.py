"""The nodes on the newer ComfyUI's API (tests/comfy_newer_standins.py, modelled on its files) and, for the same calls,
on 0.3.64's (tests/comfy_standins.py): empty latents go through ComfyUI's fix_empty_latent_channels with ComfyUI's
own latent format object of the variant and the LATENT's ratios where that ComfyUI takes them, and Qwen-Image's
attention_mask reaches the pool exactly where the running ComfyUI's QwenImage applies it (detected, not by
version). ComfyUI's own FLUX.2 (its 128-channel LATENT, context padding, Flux2 sampling) and Z-Image (Lumina2's
num_tokens), where it has them, give through Parallel Sampler and Parallel DiT Model what the native model call gives.
The real 0.3.64 keeps its end-to-end tests (test_comfyui_e2e*.py)."""
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
        native = newer and s.native is not None  # FLUX.2: the newer ComfyUI's own model and its format
        assert lat["native"] is native, variant
        if newer:  # ComfyUI's own format object ran (its fix_empty_latent), not one of ours
            want = s.native.latent_format if native else s.latent_format
            assert rec.fixed_empty and {name for name, _ in rec.fixed_empty} == {want}, variant
        unchanged = cv.unchanged_latent(empty, variant)  # KSamplerAdvanced with no step left: ComfyUI's fixed latent
        assert "downscale_ratio_spacial" not in unchanged and not unchanged["samples"].any()
        ours = lat["samples"].unsqueeze(2) if s.frame_axis else lat["samples"]
        if native:  # in ComfyUI's own layout, as its KSampler returns it: 128 channels at 1/16
            ours = lat["comfy_samples"]
            assert ours.shape == (2, 128, 6, 8)
        assert unchanged["samples"].shape == ours.shape, variant  # Qwen-Image: [B, 16, 1, h, w] as KSampler's
        out = cv.output_latent(empty, torch.ones_like(lat["samples"]), variant)
        assert set(out) == {"samples"}  # the empty latent's ratio goes, as common_ksampler drops it


def test_flux2_empty_latent_of_the_newer_comfyuis_native_format(api):
    """The newer ComfyUI's native FLUX.2 empty latent is 128 channels at 1/16 (EmptyFlux2LatentImage): there it is
    ComfyUI's own FLUX.2 LATENT, sampled in the engine's [B, 32, H/8, W/8] and returned as ComfyUI's; 0.3.64 (no
    FLUX.2 of its own, no ratios) widens it to the pack's 32 channels as before."""
    cv = api.nodes.convert
    native = {"samples": torch.zeros(1, 128, 6, 8), "downscale_ratio_spacial": 16}
    lat = cv.latent_input(native, "flux2-dev")
    if api.api == "newer":
        assert lat["native"] and lat["samples"].shape == (1, 32, 12, 16)
        assert lat["comfy_samples"].shape == (1, 128, 6, 8)
        out = cv.output_latent(native, torch.ones(1, 32, 12, 16), "flux2-dev", use_native=True)
        assert set(out) == {"samples"} and out["samples"].shape == (1, 128, 6, 8)
        pack = {"samples": torch.randn(1, 32, 12, 16)}  # the pack's own layout (not empty): sampled as before
        assert not cv.latent_input(pack, "flux2-dev")["native"]
        with pytest.raises(cv.ConversionError, match="has 16 channels but flux2-dev uses 32"):
            cv.latent_input({"samples": torch.ones(1, 16, 8, 8)}, "flux2-dev")
    else:  # 0.3.64 takes no ratio (and has no such node): the channels only
        assert not lat["native"] and lat["samples"].shape == (1, 32, 6, 8)
        with pytest.raises(cv.ConversionError, match="has 128 channels but flux2-dev uses 32"):
            cv.latent_input({"samples": torch.ones(1, 128, 6, 8)}, "flux2-dev")
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

    m = api.nodes.NODE_CLASS_MAPPINGS
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


def test_flux2_native_latent_conversion_is_an_exact_bijection(api):
    """ComfyUI's FLUX.2 LATENT <-> the engine's: the 2x2 fold FLUX.2's VAE and Flux2Pipeline use (the family's own
    patchify: channel c*4 + 2*dy + dx), through the latent format's process_in / process_out, exactly both ways;
    only where the running ComfyUI has its own FLUX.2."""
    from comfyui_xdit.families.flux2 import patchify, unpatchify

    cv, fam = api.nodes.convert, api.nodes.families
    if api.api != "newer":
        assert fam.native("flux2-dev") is None  # 0.3.64: no Flux2 latent format or supported model
        return
    assert fam.native("flux2-dev").patch == 2 and fam.native("flux-dev") is None
    native = torch.randn(2, 128, 6, 8, generator=torch.Generator().manual_seed(0))
    engine = cv.native_to_engine(native, "flux2-dev")
    assert engine.shape == (2, 32, 12, 16)
    assert torch.equal(engine, unpatchify(native)) and torch.equal(patchify(engine), native)
    assert torch.equal(cv.engine_to_native(engine, "flux2-dev"), native)
    back = torch.randn(1, 32, 10, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cv.native_to_engine(cv.engine_to_native(back, "flux2-dev"), "flux2-dev"), back)
    # pixel (2i + dy, 2j + dx) of engine channel c is native channel 4c + 2dy + dx at (i, j)
    assert engine[1, 5, 2 * 3 + 1, 2 * 4 + 0] == native[1, 4 * 5 + 2 * 1 + 0, 3, 4]
    ms, fmt = fam.comfy_objects("flux2-dev", (12, 16), 4, use_native=True)  # KSampler's for ComfyUI's own FLUX.2
    assert ms.model_type.name == "FLUX" and ms.settings == {"shift": 2.02} and type(fmt).__name__ == "Flux2"


def test_flux2_conditioning_as_the_native_model_takes_it(api):
    """On the newer ComfyUI the FLUX.2 text is what its model_base.Flux2 makes of it (padded at the front to 512
    tokens, Flux's guidance 3.5 when the CONDITIONING has none); the pack's conventions otherwise."""
    cv = api.nodes.convert
    cond = torch.randn(1, 11, 15360, generator=torch.Generator().manual_seed(2))
    tensors, guidance = cv.conditioning_tensors([[cond, {}]], None, "flux2", False, "flux2-dev", use_native=True)
    if api.api == "newer":
        assert tensors["cond"].shape == (1, 512, 15360) and guidance == 3.5
        assert torch.equal(tensors["cond"][:, -11:], cond) and not tensors["cond"][:, :-11].any()
        full = torch.randn(1, 512, 15360)  # the Mistral encoder's own length: as it is
        tensors, guidance = cv.conditioning_tensors([[full, {"guidance": 2.5}]], None, "flux2", False, "flux2-dev",
                                                    use_native=True)
        assert torch.equal(tensors["cond"], full) and guidance == 2.5
    else:  # no native model to ask: the pack's (the text as it is, Flux2Pipeline's guidance 4.0)
        assert torch.equal(tensors["cond"], cond) and guidance == 4.0


def _pool_model(api, checkpoint):
    from .test_nodes import CONFIG_DEFAULTS

    m = api.nodes.NODE_CLASS_MAPPINGS
    (config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2))
    (model,) = m["XDiTLoadParallelDiT"].execute(config, checkpoint, "fp32", "auto")
    return model


def test_sampler_on_native_flux2_gives_the_native_models_euler(api):
    """Parallel Sampler (2-rank CPU pool, Ulysses 2) on the newer ComfyUI's own FLUX.2 inputs: EmptyFlux2LatentImage's
    LATENT and an encoder's short CONDITIONING without guidance. The result is ComfyUI's FLUX.2 LATENT and equals
    KSampler's euler over the native model call (tests/comfy_newer_standins.flux2_native_forward: ComfyUI's layout,
    its model's padded context and default guidance, its Flux2 sampling)."""
    if api.api != "newer":
        pytest.skip("ComfyUI 0.3.64 has no FLUX.2 of its own (tests/test_flux2_nodes.py covers the pack's)")
    from comfyui_xdit.models import load_model

    from .comfy_newer_standins import flux2_native_forward

    cv, fam = api.nodes.convert, api.nodes.families
    model = _pool_model(api, "tiny-flux2")
    cond = torch.randn(1, 11, 15360, generator=torch.Generator().manual_seed(1))
    latent = {"samples": torch.zeros(1, 128, 8, 8), "downscale_ratio_spacial": 16}  # 128 x 128 px
    (out,) = cs.with_id(api.nodes.NODE_CLASS_MAPPINGS["XDiTParallelSampler"], "3").execute(
        model, [[cond, {}]], [[cond, {}]], latent, 7, 4, 1.0, "euler", "simple", 1.0)
    assert set(out) == {"samples"} and out["samples"].shape == (1, 128, 8, 8)
    previews = [p[3] for p in api.rec.progress[-4:]]  # in ComfyUI's FLUX.2 layout, which its previewer reshapes
    assert all(p is not None and p[1] == (1, 128, 8, 8) for p in previews), previews
    ms = api.rec.sigma_calls[-1][0]
    assert ms.settings == {"shift": 2.02}  # supported_models.Flux2's, as KSampler samples the native model
    sigmas = cv.sigmas_for("flux2-dev", "euler", "simple", 4, 1.0, fam.comfy_objects("flux2-dev", use_native=True)[0])
    tiny = load_model("tiny-flux2").adapter.model
    ctx = torch.cat([torch.zeros(1, 512 - 11, 15360), cond], dim=1)  # model_base.Flux2's padding
    noise = torch.randn(1, 128, 8, 8, generator=torch.Generator().manual_seed(7))
    x = sigmas[0] * noise
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s_next - s) * flux2_native_forward(tiny, x, s.reshape(1), ctx, torch.tensor([3.5]))
    assert rel_l2(out["samples"], x) <= 1e-4 and rel_l2(out["samples"], noise) > 0.05


def test_parallel_dit_model_forward_on_native_flux2_is_the_native_call(api):
    """The Parallel DiT Model proxy fed as ComfyUI's own FLUX.2 model is (its latent layout, padded context,
    guidance): the pool's forward (Ulysses 2) equals the native model call."""
    if api.api != "newer":
        pytest.skip("ComfyUI 0.3.64 has no FLUX.2 of its own")
    from comfyui_xdit.models import load_model

    from .comfy_newer_standins import flux2_native_forward

    proxy = api.nodes.stock_model.PoolDiffusionModel(_pool_model(api, "tiny-flux2"), None)
    g = torch.Generator().manual_seed(3)
    x, cond = torch.randn(2, 128, 4, 6, generator=g), torch.randn(2, 9, 15360, generator=g)
    ctx = torch.cat([torch.zeros(2, 503, 15360), cond], dim=1)  # as model_base.Flux2 pads it
    t = torch.tensor([0.6, 0.6])
    out = proxy(x, t, context=ctx, guidance=torch.tensor([3.5, 3.5]), transformer_options={"sigmas": t[:1]})
    with torch.no_grad():
        ref = flux2_native_forward(load_model("tiny-flux2").adapter.model, x, t, ctx, torch.tensor([3.5, 3.5]))
    assert out.shape == x.shape and rel_l2(out, ref) <= 1e-4
    with pytest.raises(api.nodes.stock_model.StockModelError, match="64 channels"):
        proxy(torch.randn(1, 64, 4, 4), t[:1], context=ctx[:1], transformer_options={"sigmas": t[:1]})


def test_parallel_dit_model_takes_z_images_num_tokens_as_the_native_model(api):
    """Z-Image as ComfyUI's Lumina2 calls it: `num_tokens` on every call (the prompt's real tokens, from the
    attention_mask when it pads, else the context's length). The pool's forward (Ulysses 2) equals the native call
    on those tokens, with or without the mask; a num_tokens the mask disagrees with is one line."""
    if api.api != "newer":
        pytest.skip("the proxy's num_tokens does not depend on the ComfyUI; run once")
    from comfyui_xdit.models import load_model

    from .comfy_newer_standins import lumina2_native_forward

    stock = api.nodes.stock_model
    proxy = stock.PoolDiffusionModel(_pool_model(api, "tiny-z-image"), None)
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 10, 2560, generator=g)
    lumina2 = sys.modules["comfy.model_base"].Lumina2
    probe = lumina2.__new__(lumina2)
    probe.concat_cond = probe.encode_adm = lambda **kwargs: None
    assert lumina2.extra_conds(probe, cross_attn=ctx)["num_tokens"] == 10  # what every call carries
    t = torch.tensor([0.7, 0.7])
    opts = {"sigmas": t[:1]}
    with torch.no_grad():
        ref = lumina2_native_forward(load_model("tiny-z-image").adapter.model, x, t, ctx, 10)
    out = proxy(x, t, context=ctx, num_tokens=10, transformer_options=opts)
    assert rel_l2(out, ref) <= 1e-4
    padded = torch.cat([ctx, torch.randn(2, 3, 2560, generator=g)], dim=1)
    mask = torch.tensor([[1.0] * 10 + [0.0] * 3] * 2)
    assert lumina2.extra_conds(probe, cross_attn=padded[:1], attention_mask=mask[:1])["num_tokens"] == 10
    assert rel_l2(proxy(x, t, context=padded, num_tokens=10, attention_mask=mask, transformer_options=opts),
                  ref) <= 1e-4
    assert rel_l2(proxy(x, t, context=padded, num_tokens=10, transformer_options=opts), ref) <= 1e-4
    with torch.no_grad():
        assert rel_l2(lumina2_native_forward(load_model("tiny-z-image").adapter.model, x, t, padded, 13), ref) > 1e-3
    for n, kw, reason in ((9, dict(attention_mask=mask), "disagrees"), (14, {}, "14 for a context of 13")):
        with pytest.raises(stock.StockModelError, match=reason):
            proxy(x, t, context=padded, num_tokens=n, transformer_options=opts, **kw)
