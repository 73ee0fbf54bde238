"""Wan 2.2 TI2V 5B image-to-video: the given first latent frame(s) (`image_latent`, ComfyUI's convention) read in
place of the noisy latent's at timestep 0 on their tokens, and the result ends with them; serial equals diffusers'
WanImageToVideoPipeline with expand_timesteps (its VAE step replaced by the seed noise and the same condition), and
every exact method equals serial. tiny-wan-ti2v: 48 channels, 16x spatial; 5 frames of 96x160 = 2 x 3 x 5 = 30
video tokens (3 x 3 x 5 = 45 for 9 frames)."""
from __future__ import annotations

import pytest
import torch

from comfyui_xdit.errors import XDiTError
from comfyui_xdit.sampling import SampleRequest, latent_shape, prepare, sample, seed_noise
from tests.cases import case_ok, get_model, serial_of
from tests.conftest import rel_l2
from tests.distributed import run_cases
from tests.test_wan import NEG, TI2V, published_scheduler


def _inputs(seed: int, frames_given: int = 1, t: int = 3):
    gen = torch.Generator().manual_seed(seed)
    cond, neg = torch.randn(1, 12, 4096, generator=gen), torch.randn(1, 7, 4096, generator=gen)
    first = torch.randn(1, 48, frames_given, 6, 10, generator=gen)  # model space
    return cond, neg, first


def test_ti2v_image_to_video_matches_wan_i2v_pipeline():
    import diffusers

    ad = get_model({"model": TI2V}).adapter
    cond, neg, first = _inputs(1)
    image_latent = ad.from_model_space(first)  # ComfyUI's convention, as Wan22ImageToVideoLatent holds it
    req = SampleRequest(height=96, width=160, frames=9, steps=5, seed=3, cfg=4.0,
                        inputs={"cond": cond, "neg_cond": neg, "image_latent": image_latent})
    ours = sample(ad, req)
    assert torch.allclose(ours[:, :, :1], image_latent, atol=1e-5)  # it ends with the given frame
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     scale_factor_spatial=16)
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, image_encoder=None,
                                             image_processor=None, transformer=ad.model, expand_timesteps=True,
                                             scheduler=published_scheduler("wan2.2-ti2v-5b"))
    pipe.set_progress_bar_config(disable=True)
    noise = seed_noise(3, latent_shape(ad, req))
    mask = torch.ones(1, 1, noise.shape[2], noise.shape[3], noise.shape[4])
    mask[:, :, 0] = 0
    pipe.prepare_latents = lambda *args, **kwargs: (noise, first, mask)
    out = pipe(image=torch.zeros(1, 3, 96, 160), prompt_embeds=cond, negative_prompt_embeds=neg, guidance_scale=4.0,
               height=96, width=160, num_frames=9, num_inference_steps=5, output_type="latent", return_dict=False)[0]
    err = rel_l2(ours, ad.from_model_space(out.float()))
    print(f"TI2V 5B image-to-video vs WanImageToVideoPipeline(expand_timesteps): {err:.2e}")
    assert err <= 1e-4
    t2v = sample(ad, SampleRequest(**{**req.__dict__, "inputs": {"cond": cond, "neg_cond": neg}}))
    assert rel_l2(ours[:, :, 1:], t2v[:, :, 1:]) > 1e-2  # the given frame reaches the others


def test_image_latent_is_checked():
    ad = get_model({"model": TI2V}).adapter
    base = dict(height=96, width=160, frames=9, steps=2, seed=1)
    with pytest.raises(XDiTError, match=r"image_latent has shape \[1, 48, 4, 6, 10\], expected \[B, 48, n, 6, 10\] "
                                        r"with 1 <= n <= 3 latent frames"):
        prepare(ad, SampleRequest(**base, inputs={"image_latent": torch.zeros(1, 48, 4, 6, 10)}), tiny=True)
    with pytest.raises(XDiTError, match="wan2.1-t2v-1.3b takes no image_latent"):
        prepare(get_model({"model": "tiny-wan"}).adapter,
                SampleRequest(height=48, width=80, frames=5, steps=2, inputs={"image_latent": torch.zeros(
                    1, 16, 1, 6, 10)}), tiny=True)


def _cases() -> list[dict]:
    base = {"model": TI2V, "seed": 13, "steps": 3, "height": 96, "width": 160, "frames": 9, "text_tokens": 15,
            "random_inputs": {"image_latent": [1, 48, 1, 6, 10]}, **NEG}
    return [{**base, "id": "ti2v_i2v_ulysses2", "parallel": {"ulysses": 2}},
            {**base, "id": "ti2v_i2v_ring2", "parallel": {"ring": 2}},
            {**base, "id": "ti2v_i2v_cfg2", "parallel": {"cfg": 2}},
            {**base, "id": "ti2v_i2v_dp2", "parallel": {"dp": 2}, "batch": 3},
            {**base, "id": "ti2v_i2v_pf2_allwarm", "parallel": {"pipefusion": 2, "num_patches": 2,
                                                                "warmup_steps": 3}}]


def test_world2_exact_methods_match_serial(tmp_path):
    results = run_cases(2, _cases(), tmp_path)
    for case in _cases():
        info = case_ok(results, case["id"])
        serial = serial_of(case)
        assert rel_l2(info["latents"], serial) <= 1e-4, case["id"]
