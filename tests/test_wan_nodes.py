"""Wan through the nodes without ComfyUI (stand-ins): ComfyUI's Wan CONDITIONING (umT5-xxl [B, L, 4096], no pooled
vector), video LATENTs [B, C, T, H/8, W/8] in and out (EmptyHunyuanLatentVideo's 16 channels; Wan 2.2 TI2V's 48
channels at 16x), the pixel frames sent to the pool, sigmas from ComfyUI's WAN21_T2V sampling (FLOW, shift 8),
image-to-video conditioning mapped as ComfyUI's WAN21 model maps it (refused for text-to-video models, in one line),
the queue-time checks over video tokens, and runs on a real 2-rank CPU pool (Ulysses 2, CFG) equal to the engine,
text- and image-to-video."""
from __future__ import annotations

import pytest
import torch

from comfyui_xdit.engine import run_job
from comfyui_xdit.models import load_model
from comfyui_xdit.sampling import SampleRequest

from . import comfy_standins as cs
from .conftest import rel_l2
from .test_nodes import CONFIG_DEFAULTS, _queue

T2V = "wan2.1-t2v-1.3b"
TI2V = "wan2.2-ti2v-5b"


def _cond(seed: int, tokens: int = 512, **extras):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 4096, generator=g), dict(extras)]]


def test_variant_specs(ext):
    f = ext.nodes.families
    s = f.spec(T2V)
    assert (s.family, s.supported_model, s.model_type, s.latent_format, s.channels, s.dims, s.downscale,
            s.time_downscale) == ("wan", "WAN21_T2V", "FLOW", "Wan21", 16, 3, 8, 4)
    s5 = f.spec(TI2V)
    assert (s5.supported_model, s5.latent_format, s5.channels, s5.downscale) == ("WAN22_T2V", "Wan22", 48, 16)
    assert f.spec("wan2.2-t2v-a14b").supported_model == "WAN21_T2V"  # each expert file is a Wan 14B T2V model
    ck = ext.nodes.checkpoints
    assert ck.detect_variant("tiny-wan") == T2V
    assert ck.detect_variant("tiny-wan-ti2v") == TI2V


def test_conditioning_umt5_without_pooled(ext):
    cv = ext.nodes.convert
    tensors, guidance = cv.conditioning_tensors(_cond(1), _cond(2, 300), "wan", True, T2V)
    assert set(tensors) == {"cond", "neg_cond"} and guidance is None
    assert tensors["cond"].shape == (1, 512, 4096) and tensors["neg_cond"].shape == (1, 300, 4096)
    only, _ = cv.conditioning_tensors(_cond(1), None, "wan", False, T2V)  # cfg 1: the negative is not read
    assert set(only) == {"cond"}


@pytest.mark.parametrize("extra", ["concat_latent_image", "concat_mask", "clip_vision_output"])
def test_image_to_video_conditioning_refused_in_one_line(ext, extra):
    cv = ext.nodes.convert
    with pytest.raises(cv.ConversionError, match="image conditioning") as e:
        cv.conditioning_tensors(_cond(1, 8, **{extra: torch.zeros(1, 16, 2, 4, 4)}), None, "wan", False, T2V)
    assert extra in str(e.value) and "\n" not in str(e.value)


def test_video_latent_in_and_out(ext):
    cv = ext.nodes.convert
    video = {"samples": torch.zeros(2, 16, 5, 6, 10)}  # EmptyHunyuanLatentVideo: 17 frames, 80x48, batch 2
    assert cv.latent_input(video, T2V)["samples"].shape == (2, 16, 5, 6, 10)
    assert cv.latent_input({"samples": torch.zeros(1, 4, 6, 10)}, T2V)["samples"].shape == (1, 16, 1, 6, 10)
    encoded = torch.randn(1, 16, 6, 10)  # a 4-D latent is one frame, as ComfyUI takes it
    assert torch.equal(cv.latent_input({"samples": encoded}, T2V)["samples"], encoded.unsqueeze(2))
    with pytest.raises(cv.ConversionError, match="expected a video latent"):
        cv.latent_input({"samples": torch.zeros(1, 16, 10)}, T2V)
    with pytest.raises(cv.ConversionError, match="has 16 channels but wan2.2-ti2v-5b uses 48"):
        cv.latent_input({"samples": torch.ones(1, 16, 2, 4, 4)}, TI2V)
    assert cv.latent_input({"samples": torch.zeros(1, 48, 3, 4, 4)}, TI2V)["samples"].shape == (1, 48, 3, 4, 4)
    out = cv.output_latent({"samples": video["samples"], "batch_index": [3, 4]}, torch.ones(2, 16, 5, 6, 10), T2V)
    assert out["samples"].shape == (2, 16, 5, 6, 10) and out["batch_index"] == [3, 4]
    assert cv.unchanged_latent({"samples": torch.zeros(1, 4, 6, 10)}, T2V)["samples"].shape == (1, 16, 1, 6, 10)


def test_request_fields_carry_frames_and_pixels(ext):
    cv = ext.nodes.convert
    f = cv.request_fields(torch.zeros(1, 16, 5, 6, 10), 8, 1, 5.0, None, "euler", T2V)
    assert (f["frames"], f["height"], f["width"]) == (17, 48, 80)
    f5 = cv.request_fields(torch.zeros(1, 48, 31, 44, 80), 8, 1, 5.0, None, "euler", TI2V)  # 1280x704, 121 frames
    assert (f5["frames"], f5["height"], f5["width"]) == (121, 704, 1280)
    assert "frames" not in cv.request_fields(torch.zeros(1, 16, 6, 10), 8, 1, 5.0, None, "euler", "flux-dev")


def test_sigmas_from_comfyuis_wan_sampling(ext, rec):
    sig = ext.nodes.convert.sigmas_for(T2V, "euler", "simple", 6, 1.0)
    ms, scheduler, steps = rec.sigma_calls[-1]
    assert (ms.model_type.name, ms.settings, scheduler, steps) == ("FLOW", {"shift": 8.0}, "simple", 6)
    assert sig.shape == (7,)


def test_shift_replaces_wans_as_model_sampling_sd3_does(ext, rec):
    """The samplers' `shift` (ModelSamplingSD3's): ComfyUI's flow model sampling with that shift; 0 keeps Wan's 8.
    Refused for a model that is not a flow model, at queue time and at sampling."""
    fam = ext.nodes.families
    ms, _ = fam.comfy_objects(T2V, (6, 6), 4, 5.0)
    assert (ms.model_type.name, ms.settings) == ("FLOW", {"shift": 5.0})
    assert fam.comfy_objects(T2V, (6, 6), 4, 0.0)[0].settings == {"shift": 8.0}
    with pytest.raises(ValueError, match="shift applies to flow models"):
        fam.comfy_objects("flux-dev", (64, 64), 4, 3.0)
    g = _graph(checkpoint="tiny-flux", cfg=1.0)
    g["8"]["inputs"]["shift"] = 3.0
    found = _queue(ext, rec, g)["8"][0]
    assert "shift applies to flow models (Wan, SD3; ComfyUI's ModelSamplingSD3), not flux" in found
    g = _graph(length=5)
    g["8"]["inputs"]["shift"] = 5.0
    assert _queue(ext, rec, g) == {}


def _graph(config=None, checkpoint="tiny-wan", cfg=5.0, width=32, height=16, length=1, batch=1,
           latent="EmptyHunyuanLatentVideo"):
    return {
        "5": {"class_type": "XDiTConfigureHybridParallel", "inputs": dict(CONFIG_DEFAULTS, **(config or {}))},
        "6": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["5", 0], "checkpoint": checkpoint,
                                                              "weight_dtype": "fp32", "family": "auto"}},
        "7": {"class_type": latent, "inputs": {"width": width, "height": height, "length": length,
                                               "batch_size": batch}},
        "8": {"class_type": "XDiTParallelSampler", "inputs": {
            "model": ["6", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["7", 0], "seed": 1,
            "steps": 4, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
    }


def test_queue_checks_count_video_tokens(ext, rec):
    sp4 = dict(ulysses_degree=2, ring_degree=2)
    # 32x16 is 2 tokens a frame: one latent frame is too few for ring x ulysses 4, two frames (length 5) enough
    found = _queue(ext, rec, _graph(sp4, length=1))
    assert "has 2 image tokens, fewer than ring x ulysses (4)" in found["8"][0]
    assert _queue(ext, rec, _graph(sp4, length=5)) == {}
    found = _queue(ext, rec, _graph(sp4, length=3, width=16))  # 1 frame of 1 token
    assert "fewer than ring x ulysses (4)" in found["8"][0]
    found = _queue(ext, rec, _graph(dict(ulysses_degree=3), length=9))  # tiny-wan: 4 heads
    assert "ulysses_degree 3 does not divide the 4 attention heads of tiny-wan" in found["5"][0]
    # Wan 2.2 TI2V 5B: 32 px per token side
    found = _queue(ext, rec, _graph(checkpoint="tiny-wan-ti2v", width=48, height=32, length=5,
                                    latent="Wan22ImageToVideoLatent"))
    assert "48x32 is not a multiple of 32 px" in found["8"][0]
    assert _queue(ext, rec, _graph(dict(ulysses_degree=2), checkpoint="tiny-wan-ti2v", width=64, height=32,
                                   length=5, latent="Wan22ImageToVideoLatent")) == {}


def _i2v_node(width=32, height=16, length=5, clip=False, kind="WanImageToVideo"):
    inputs = {"positive": ["20", 0], "negative": ["21", 0], "vae": ["22", 0], "width": width, "height": height,
              "length": length, "batch_size": 1, "start_image": ["23", 0]}
    if clip:
        inputs["clip_vision_output"] = ["24", 0]
    return {"class_type": kind, "inputs": inputs}


def _from_i2v(g: dict, node: dict) -> dict:
    g["2"] = node
    g["8"]["inputs"].update(positive=["2", 0], negative=["2", 1], latent_image=["2", 2])
    return g


def test_queue_refuses_image_conditioning_for_text_to_video_and_camera(ext, rec):
    found = _queue(ext, rec, _from_i2v(_graph(), _i2v_node()))["8"][0]
    assert "positive comes from WanImageToVideo, image-to-video conditioning, but the checkpoint is a " \
           "text-to-video model" in found and "negative comes from WanImageToVideo" in found
    found = _queue(ext, rec, _from_i2v(_graph(), _i2v_node(kind="WanCameraImageToVideo")))["8"][0]
    assert "WanCameraImageToVideo (camera conditioning)" in found
    g = _graph(checkpoint="tiny-wan-ti2v", width=64, height=32, length=5, latent="Wan22ImageToVideoLatent")
    g["7"]["inputs"].update(vae=["22", 0], start_image=["23", 0])
    assert _queue(ext, rec, g) == {}  # Wan 2.2 TI2V 5B's image-to-video
    g = _graph(width=64, height=32, length=5, latent="Wan22ImageToVideoLatent")
    g["7"]["inputs"].update(vae=["22", 0], start_image=["23", 0])
    assert "with a start_image (an inpainting noise_mask), which only Wan 2.2 TI2V 5B takes" in _queue(ext, rec,
                                                                                                        g)["8"][0]


def _write_i2v(path, clip: bool, seed: int = 3) -> None:
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    from comfyui_xdit.tiny import fill_deterministic

    from .test_wan import wan_to_original

    extra = dict(image_dim=32, added_kv_proj_dim=64) if clip else {}
    model = WanTransformer3DModel(num_attention_heads=4, attention_head_dim=16, in_channels=36, out_channels=16,
                                  text_dim=4096, freq_dim=32, ffn_dim=64, num_layers=2, **extra)
    fill_deterministic(model, seed)
    save_file({k: v.contiguous() for k, v in wan_to_original(model).items()}, str(path))


def test_queue_takes_image_to_video_checkpoints(ext, rec, tmp_path):
    """Wan I2V files (36 input channels; read from their header only) load and take WanImageToVideo's
    conditioning; the one with a CLIP embedding (Wan 2.1 I2V) is refused without CLIP vision, in one line."""
    _write_i2v(tmp_path / "wan_i2v.safetensors", clip=False)
    _write_i2v(tmp_path / "wan21_i2v.safetensors", clip=True)
    rec.folders["diffusion_models"] = [str(tmp_path / "wan_i2v.safetensors"), str(tmp_path / "wan21_i2v.safetensors")]
    assert _queue(ext, rec, _graph(checkpoint="wan_i2v.safetensors", length=5)) == {}
    assert _queue(ext, rec, _from_i2v(_graph(checkpoint="wan_i2v.safetensors"), _i2v_node())) == {}
    assert _queue(ext, rec, _from_i2v(_graph(checkpoint="wan21_i2v.safetensors"), _i2v_node(clip=True))) == {}
    found = _queue(ext, rec, _from_i2v(_graph(checkpoint="wan21_i2v.safetensors"), _i2v_node()))["8"][0]
    assert "without a CLIP vision output, which this Wan 2.1 image-to-video checkpoint needs" in found
    assert "\n" not in found


class _Clip:  # comfy.clip_vision.Output's one field Wan reads
    def __init__(self, states):
        self.penultimate_hidden_states = states


def _wan_i2v_cond(seed: int, tokens: int, image: torch.Tensor, mask: torch.Tensor, clip=None):
    extras = {"concat_latent_image": image, "concat_mask": mask}
    if clip is not None:
        extras["clip_vision_output"] = clip
    return _cond(seed, tokens, **extras)


def _wan_i2v_inputs(t=3, h=4, w=6, given=1, seed=0):
    """concat_latent_image and concat_mask as WanImageToVideo makes them: the mask 0 on the given latent frames."""
    image = torch.randn(1, 16, t, h, w, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(1, 1, t, h, w)
    mask[:, :, :given] = 0.0
    return image, mask


def test_image_channels_as_comfyuis_wan21_builds_them(ext):
    """ComfyUI's WAN21.concat_cond: [4 x (1 - mask), process_in(image)], zeros without an image; a short mask
    padded with 0; one image for a batch of latents. The CLIP output's penultimate states go as image_embeds."""
    wi = ext.nodes.wan_image
    fmt = type("Fmt", (), {"latent_channels": 16, "process_in": staticmethod(lambda x: 2.0 * x - 1.0)})()
    samples = torch.zeros(2, 16, 3, 4, 6)
    image, mask = _wan_i2v_inputs()
    ch = wi.concat_channels(image, mask, samples, 20, fmt)
    assert ch.shape == (2, 20, 3, 4, 6)
    assert torch.equal(ch[:, :4, 0], torch.ones(2, 4, 4, 6)) and torch.equal(ch[:, :4, 1:], torch.zeros(2, 4, 2, 4, 6))
    assert torch.equal(ch[:, 4:], (2.0 * image - 1.0).expand(2, -1, -1, -1, -1))
    short = wi.concat_channels(image, mask[:, :, :1], samples, 20, fmt)  # a mask of one frame: 0 after it
    assert torch.equal(short[:, :4], ch[:, :4])
    four = wi.concat_channels(image, torch.full((1, 4, 3, 4, 6), 0.25), samples, 20, fmt)  # 4 channels kept
    assert torch.equal(four[:, :4], torch.full((2, 4, 3, 4, 6), 0.75))
    assert torch.equal(wi.concat_channels(None, mask, samples, 20, fmt), torch.zeros(2, 20, 3, 4, 6))
    with pytest.raises(ext.nodes.convert.ConversionError, match="take the latent from the same WanImageToVideo"):
        wi.concat_channels(image[:, :, :2], mask, samples, 20, fmt)
    clip = _Clip(torch.randn(1, 257, 32))
    pos = _wan_i2v_cond(1, 512, image, mask, clip)
    out = wi.image_inputs(pos, _wan_i2v_cond(2, 512, image, mask, clip), True, samples, 36, 32, fmt)
    assert set(out) == {"image_cond", "image_embeds"}
    assert torch.equal(out["image_embeds"], clip.penultimate_hidden_states.expand(2, -1, -1))  # per latent
    assert set(wi.image_inputs(pos, None, False, samples, 36, None, fmt)) == {"image_cond"}  # no CLIP embedding
    other, _ = _wan_i2v_inputs(seed=1)
    with pytest.raises(ext.nodes.convert.ConversionError, match="positive and negative carry different image"):
        wi.image_inputs(pos, _wan_i2v_cond(2, 512, other, mask, clip), True, samples, 36, 32, fmt)
    with pytest.raises(ext.nodes.convert.ConversionError, match="positive conditioning has no clip_vision_output"):
        wi.image_inputs(_wan_i2v_cond(1, 512, image, mask), None, False, samples, 36, 32, fmt)
    cv = ext.nodes.convert  # an image model takes the image extras; anything else is still refused
    tensors, _ = cv.conditioning_tensors(pos, None, "wan", False, "wan2.2-i2v-a14b", image_input=True)
    assert set(tensors) == {"cond"}
    with pytest.raises(cv.ConversionError, match="concat_mask_index"):
        cv.conditioning_tensors(_cond(1, 8, concat_latent_image=image, concat_mask_index=16), None, "wan", False,
                                "wan2.2-i2v-a14b", image_input=True)


@pytest.mark.parametrize("clip", [False, True], ids=["wan22_like", "wan21_clip"])
def test_image_to_video_sampler_on_pool_matches_the_engine(ext, rec, tmp_path, clip):
    """Parallel Sampler on a 2-rank pool (Ulysses 2 with CFG) with WanImageToVideo-style conditioning equals the
    engine given image_cond in WanImageToVideoPipeline's convention (4 mask channels, 1 on the given frame, then the
    image latent) on 3 x 3 x 3 = 27 video tokens; another image gives another video."""
    name = "wan_i2v.safetensors"
    _write_i2v(tmp_path / name, clip)
    rec.folders["diffusion_models"] = [str(tmp_path / name)]
    m = ext.nodes.NODE_CLASS_MAPPINGS
    (config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2))
    (model,) = m["XDiTLoadParallelDiT"].execute(config, name, "fp32", "auto")
    assert model.variant == ("wan2.1-i2v-14b" if clip else "wan2.2-i2v-a14b")
    image, mask = _wan_i2v_inputs(t=3, h=6, w=6)
    states = _Clip(torch.randn(1, 257, 32, generator=torch.Generator().manual_seed(5))) if clip else None
    pos, neg = _wan_i2v_cond(3, 512, image, mask, states), _wan_i2v_cond(4, 512, image, mask, states)
    latent = {"samples": torch.zeros(1, 16, 3, 6, 6)}
    (out,) = m["XDiTParallelSampler"].execute(model, pos, neg, latent, 5, 3, 4.0, "euler", "simple", 1.0)
    sigmas = ext.nodes.convert.sigmas_for(model.variant, "euler", "simple", 3, 1.0)
    noise = torch.randn(1, 16, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    first = torch.zeros(1, 4, 3, 6, 6)
    first[:, :, 0] = 1.0
    inputs = {"cond": pos[0][0], "neg_cond": neg[0][0], "latent": torch.zeros(1, 16, 3, 6, 6), "sigmas": sigmas,
              "noise": noise, "image_cond": torch.cat([first, image], 1)}
    if clip:
        inputs["image_embeds"] = states.penultimate_hidden_states
    engine = load_model(str(tmp_path / name))

    def run(inp):
        return run_job(engine, SampleRequest(48, 48, 3, seed=5, cfg=4.0, frames=9, sampler="euler",
                                             inputs=inp)).latents

    ref = run(inputs)
    err = rel_l2(out["samples"], ref)
    print(f"Wan I2V nodes ({'CLIP' if clip else 'no CLIP'}), Ulysses 2 + CFG, 27 tokens: rel L2 to the engine "
          f"{err:.2e}")
    assert err <= 1e-5, err
    assert rel_l2(run({**inputs, "image_cond": torch.cat([first, image.flip(2)], 1)}), ref) > 1e-3


def test_sampler_on_pool_matches_the_engine(ext, rec):
    """Ulysses 2 with CFG on 3 x 3 x 5 = 45 video tokens (not divisible by 2), a padded positive and a shorter
    negative; the 5-D latent comes back 5-D, progress each step, previews of one frame."""
    m = ext.nodes.NODE_CLASS_MAPPINGS
    (config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2))
    (model,) = m["XDiTLoadParallelDiT"].execute(config, "tiny-wan", "fp32", "auto")
    assert (model.family, model.variant) == ("wan", T2V)
    pos, neg = _cond(3, 24), _cond(4, 9)
    rec.progress[:] = []
    latent = {"samples": torch.zeros(1, 16, 3, 6, 10)}  # 9 frames at 80x48
    (out,) = cs.with_id(m["XDiTParallelSampler"], "9").execute(model, pos, neg, latent, 5, 3, 4.0, "euler",
                                                                 "simple", 1.0)
    assert out["samples"].shape == (1, 16, 3, 6, 10)
    assert [p[0] for p in rec.progress] == [1, 2, 3]
    assert all(p[3] is not None and p[3][1] == (1, 16, 1, 6, 10) for p in rec.progress)  # one frame
    sigmas = ext.nodes.convert.sigmas_for(T2V, "euler", "simple", 3, 1.0)
    noise = torch.randn(1, 16, 3, 6, 10, generator=torch.Generator().manual_seed(5))
    inputs = {"cond": pos[0][0], "neg_cond": neg[0][0], "latent": torch.zeros(1, 16, 3, 6, 10), "sigmas": sigmas,
              "noise": noise}
    ref = run_job(load_model("tiny-wan"), SampleRequest(48, 80, 3, seed=5, cfg=4.0, frames=9, sampler="euler",
                                                        inputs=inputs)).latents
    assert ref.shape == out["samples"].shape
    err = rel_l2(out["samples"], ref)
    print(f"Wan nodes, Ulysses 2 + CFG, 45 tokens: rel L2 to the engine {err:.2e}")
    assert err <= 1e-5, err
    other = run_job(load_model("tiny-wan"), SampleRequest(48, 80, 3, seed=5, cfg=4.0, frames=9, sampler="euler",
                                                          inputs={**inputs, "noise": noise.flip(2)})).latents
    assert rel_l2(other, ref) > 1e-2  # the frames' order matters: the comparison can fail


def test_two_stage_advanced_on_pool_matches_one_run(ext, rec):
    """Wan 2.2 A14B's graph shape: a high-noise Parallel Sampler (Advanced) over steps 0..2 with leftover noise and
    a low-noise one over 2..4 without adding noise (both models stay loaded); with one model for both stages and
    euler this is the 4-step run."""
    m = ext.nodes.NODE_CLASS_MAPPINGS
    (config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, cfg_degree=2))
    (high,) = m["XDiTLoadParallelDiT"].execute(config, "tiny-wan", "fp32", "auto")
    (low,) = m["XDiTLoadParallelDiT"].execute(config, "tiny-wan", "fp32", "auto")
    pos, neg = _cond(6, 16), _cond(7, 16)
    latent = {"samples": torch.zeros(1, 16, 2, 4, 6)}
    adv = m["XDiTParallelSamplerAdvanced"]()
    (mid,) = adv.execute(high, "enable", 11, 4, 3.0, "euler", "simple", pos, neg, latent, 0, 2, "enable")
    (out,) = adv.execute(low, "disable", 11, 4, 3.0, "euler", "simple", pos, neg, mid, 2, 10000, "disable")
    (one,) = m["XDiTParallelSampler"].execute(high, pos, neg, latent, 11, 4, 3.0, "euler", "simple", 1.0)
    assert out["samples"].shape == (1, 16, 2, 4, 6)
    err = rel_l2(out["samples"], one["samples"])
    print(f"Wan nodes, two Advanced stages (cfg parallel 2) against one run: rel L2 {err:.2e}")
    assert err <= 1e-5, err
    assert rel_l2(mid["samples"], one["samples"]) > 1e-2  # the first stage alone is not done


def test_load_parallel_dit_takes_the_two_expert_files(ext, rec, tmp_path):
    """Load Parallel DiT with the high-noise file as checkpoint and the low-noise one as checkpoint_2 loads Wan 2.2
    A14B as one two-expert model on the pool (Ulysses 2 with CFG): Parallel Sampler equals the engine's pair over
    the same sigmas; a family the pair cannot be is refused in one line."""
    from safetensors.torch import save_file

    from comfyui_xdit.weights import pair_source

    from .test_wan import EXPERTS, wan_to_original

    experts = load_model(EXPERTS).adapter.model
    names = ("wan2.2_t2v_high_noise_14B.safetensors", "wan2.2_t2v_low_noise_14B.safetensors")
    for model, name in zip((experts.transformer, experts.transformer_2), names):
        save_file({k: v.contiguous() for k, v in wan_to_original(model).items()}, str(tmp_path / name))
    rec.folders["diffusion_models"] = [str(tmp_path / n) for n in names]
    m = ext.nodes.NODE_CLASS_MAPPINGS
    (config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2))
    (model,) = m["XDiTLoadParallelDiT"].execute(config, names[0], "fp32", "auto", checkpoint_2=names[1])
    assert (model.family, model.variant) == ("wan", "wan2.2-t2v-a14b")
    pos, neg = _cond(3, 24), _cond(4, 9)
    latent = {"samples": torch.zeros(1, 16, 3, 6, 10)}
    (out,) = m["XDiTParallelSampler"].execute(model, pos, neg, latent, 5, 6, 4.0, "euler", "simple", 1.0)
    sigmas = ext.nodes.convert.sigmas_for("wan2.2-t2v-a14b", "euler", "simple", 6, 1.0)
    noise = torch.randn(1, 16, 3, 6, 10, generator=torch.Generator().manual_seed(5))
    inputs = {"cond": pos[0][0], "neg_cond": neg[0][0], "latent": torch.zeros(1, 16, 3, 6, 10), "sigmas": sigmas,
              "noise": noise}
    pair = load_model(pair_source(*(str(tmp_path / n) for n in names)))
    assert pair.adapter.experts
    ref = run_job(pair, SampleRequest(48, 80, 6, seed=5, cfg=4.0, frames=9, sampler="euler", inputs=inputs)).latents
    err = rel_l2(out["samples"], ref)
    print(f"Wan 2.2 A14B pair in Load Parallel DiT, Ulysses 2 + CFG: rel L2 to the engine {err:.2e}")
    assert err <= 1e-5, err
    high = run_job(load_model(str(tmp_path / names[0])), SampleRequest(48, 80, 6, seed=5, cfg=4.0, frames=9,
                                                                       sampler="euler", inputs=inputs)).latents
    assert rel_l2(high, ref) > 1e-2  # the low-noise expert ran
    with pytest.raises(Exception) as e:
        m["XDiTLoadParallelDiT"].execute(config, names[0], "fp32", "wan2.1-t2v-14b", checkpoint_2=names[1])
    assert "two experts (wan2.2-t2v-a14b), not wan2.1-t2v-14b" in str(e.value) and "\n" not in str(e.value)


def test_ti2v_start_image_on_pool_matches_the_engine(ext, rec):
    """Wan22ImageToVideoLatent with a start image (its samples: the image's latent on the first frame, the Wan 2.2
    mean elsewhere; noise_mask 0 on that frame): Parallel Sampler on a 2-rank pool (Ulysses 2 with CFG) equals the
    engine given image_latent over the same sigmas; the result keeps the given frame; a mask that is not a start
    image's is refused in one line."""
    from comfyui_xdit.families.wan import WAN22_MEAN

    m = ext.nodes.NODE_CLASS_MAPPINGS
    (config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2))
    (model,) = m["XDiTLoadParallelDiT"].execute(config, "tiny-wan-ti2v", "fp32", "auto")
    assert model.variant == TI2V
    shape = (1, 48, 3, 6, 10)  # 9 frames at 160x96
    image = torch.randn(1, 48, 1, 6, 10, generator=torch.Generator().manual_seed(2))
    samples = torch.tensor(WAN22_MEAN).view(1, 48, 1, 1, 1).expand(shape).clone()
    samples[:, :, :1] = image
    mask = torch.ones(1, 1, 3, 6, 10)
    mask[:, :, :1] = 0.0
    pos, neg = _cond(3, 24), _cond(4, 9)
    latent = {"samples": samples, "noise_mask": mask}
    (out,) = m["XDiTParallelSampler"].execute(model, pos, neg, latent, 5, 4, 4.0, "euler", "simple", 1.0)
    sigmas = ext.nodes.convert.sigmas_for(TI2V, "euler", "simple", 4, 1.0)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    inputs = {"cond": pos[0][0], "neg_cond": neg[0][0], "latent": samples, "sigmas": sigmas, "noise": noise,
              "image_latent": image}
    ref = run_job(load_model("tiny-wan-ti2v"), SampleRequest(96, 160, 4, seed=5, cfg=4.0, frames=9, sampler="euler",
                                                             inputs=inputs)).latents
    err = rel_l2(out["samples"], ref)
    print(f"Wan 2.2 TI2V start image, nodes Ulysses 2 + CFG: rel L2 to the engine {err:.2e}")
    assert err <= 1e-5, err
    assert torch.allclose(out["samples"][:, :, :1], image, atol=1e-5)
    other = {**inputs, "image_latent": 0 * image}
    plain = run_job(load_model("tiny-wan-ti2v"), SampleRequest(96, 160, 4, seed=5, cfg=4.0, frames=9,
                                                               sampler="euler", inputs=other)).latents
    assert rel_l2(plain[:, :, 1:], ref[:, :, 1:]) > 1e-2
    bad = mask.clone()
    bad[:, :, 2] = 0.0
    with pytest.raises(Exception, match="noise_mask is not a start image's"):
        m["XDiTParallelSampler"].execute(model, pos, neg, {"samples": samples, "noise_mask": bad}, 5, 4, 4.0,
                                          "euler", "simple", 1.0)


def test_a_pair_of_i2v_expert_files_has_the_first_files_geometry(ext, tmp_path):
    """Load Parallel DiT's two-file pair (I2V A14B experts) reads its geometry (image input channels, the heads) from
    the first file, so Parallel Sampler maps WanImageToVideo's conditioning for it as for one expert; the engine
    loads the pair as two experts of wan2.2-i2v-a14b."""
    from comfyui_xdit.weights import pair_source

    _write_i2v(tmp_path / "wan2.2_i2v_high_noise_14B.safetensors", clip=False, seed=3)
    _write_i2v(tmp_path / "wan2.2_i2v_low_noise_14B.safetensors", clip=False, seed=4)
    high, low = (str(tmp_path / f"wan2.2_i2v_{n}_noise_14B.safetensors") for n in ("high", "low"))
    geometry = ext.nodes.geometry.geometry
    assert geometry(pair_source(high, low)) == geometry(high)
    assert geometry(high).image_input and geometry(high).in_channels == 36
    assert ext.nodes.checkpoints.detect_variant(pair_source(high, low)) == "wan2.2-i2v-a14b"
    ad = load_model(pair_source(high, low)).adapter
    assert ad.experts and ad.variant == "wan2.2-i2v-a14b" and ad.model.boundary_ratio == 0.9
