"""Qwen-Image-Edit (2509: QwenImageEditPlusPipeline; 2511: the same with zero_cond_t) in the engine: reference
latents appended to the image tokens; serial equals QwenImageEditPlusPipeline given the same embeddings, reference
latents and seed noise (its VAE step replaced by them), with one and two reference images of other sizes; the
reference reaches the result; every exact method equals serial on a token count no degree divides."""
from __future__ import annotations

import pytest
import torch

from comfyui_xdit.errors import ConfigError, XDiTError
from comfyui_xdit.families.flux import pack, unpack
from comfyui_xdit.sampling import SampleRequest, latent_shape, prepare, sample, seed_noise
from tests.cases import case_ok, get_model, serial_of
from tests.conftest import rel_l2
from tests.distributed import run_cases

MODEL = "tiny-qwen-image"
EDIT_2511 = {"zero_cond_t": True}
REF_SIZES = [(6, 8), (4, 10)]  # latent h x w of the reference images (12 and 10 tokens)


def _inputs(seed: int, refs: int):
    g = torch.Generator().manual_seed(seed)
    inputs = dict(cond=torch.randn(1, 15, 3584, generator=g), neg_cond=torch.randn(1, 9, 3584, generator=g))
    names = ["reference_latent", "reference_latent_2"][:refs]
    for name, (h, w) in zip(names, REF_SIZES):
        inputs[name] = torch.randn(1, 16, 1, h, w, generator=g)  # ComfyUI's convention (one frame)
    return inputs


def edit_pipeline_latents(ad, req: SampleRequest, refs: int) -> torch.Tensor:
    """QwenImageEditPlusPipeline with the request's embeddings, the references (model space, packed, in order)
    for its VAE step, their sizes for img_shapes, and the seed noise; ComfyUI's convention."""
    import diffusers
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus
    from PIL import Image

    from comfyui_xdit.schedules import make_schedule

    sched = make_schedule(ad.family, ad.variant, "default", req.steps, ad.image_tokens(req.height, req.width)).scheduler
    pipe = diffusers.QwenImageEditPlusPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                                               processor=None, transformer=ad.model)
    pipe.set_progress_bar_config(disable=True)
    refs_model = [ad.to_model_space(req.inputs[n][:, :, 0]) for n in ("reference_latent", "reference_latent_2")[:refs]]
    noise = pack(seed_noise(req.seed, latent_shape(ad, req)))
    pipe.prepare_latents = lambda *a, **k: (noise, torch.cat([pack(r) for r in refs_model], dim=1))
    # the VAE images' (width, height): each reference's own size (their aspect ratios differ)
    sizes = {round(r.shape[3] / r.shape[2], 6): (r.shape[3] * 8, r.shape[2] * 8) for r in refs_model}
    original = plus.calculate_dimensions
    plus.calculate_dimensions = lambda area, ratio: sizes[round(ratio, 6)] if area == plus.VAE_IMAGE_SIZE else (32, 32)
    try:
        images = [Image.new("RGB", (r.shape[3] * 8, r.shape[2] * 8)) for r in refs_model]
        out = pipe(image=images, prompt_embeds=req.inputs["cond"], negative_prompt_embeds=req.inputs["neg_cond"],
                   prompt_embeds_mask=torch.ones(1, 15, dtype=torch.long),
                   negative_prompt_embeds_mask=torch.ones(1, 9, dtype=torch.long), true_cfg_scale=req.cfg,
                   height=req.height, width=req.width, num_inference_steps=req.steps, output_type="latent",
                   return_dict=False)[0]
    finally:
        plus.calculate_dimensions = original
    return ad.from_model_space(unpack(out.float(), req.height // 8, req.width // 8))


@pytest.mark.parametrize("overrides,refs", [({}, 1), ({}, 2), (EDIT_2511, 1), (EDIT_2511, 2)],
                         ids=["2509-one", "2509-two", "2511-one", "2511-two"])
def test_matches_qwen_image_edit_plus_pipeline(overrides, refs):
    ad = get_model({"model": MODEL, "overrides": overrides}).adapter
    req = SampleRequest(height=80, width=112, steps=5, seed=4, cfg=4.0, inputs=_inputs(1, refs))
    ours = sample(ad, req, tiny=True)
    ref = edit_pipeline_latents(ad, req, refs)
    err = rel_l2(ours, ref)
    print(f"Qwen-Image-Edit {'2511' if overrides else '2509'}, {refs} reference(s): {err:.2e} from "
          "QwenImageEditPlusPipeline")
    assert err <= 1e-4
    last = ("reference_latent", "reference_latent_2")[refs - 1]  # the last reference reaches the result
    other = {**req.inputs, last: req.inputs[last].flip(-1)}
    assert rel_l2(sample(ad, SampleRequest(**{**req.__dict__, "inputs": other}), tiny=True), ours) > 1e-3
    if overrides:  # 2511's zero_cond_t (the references' tokens at timestep 0) changes the result
        plain = get_model({"model": MODEL}).adapter
        assert rel_l2(sample(plain, req, tiny=True), ours) > 1e-3


def test_reference_latents_are_checked():
    from comfyui_xdit.cache import CacheSettings
    from comfyui_xdit.parallel import ParallelConfig

    ad = get_model({"model": MODEL}).adapter
    base = dict(height=64, width=64, steps=2)
    with pytest.raises(XDiTError, match=r"reference_latent has shape \[1, 16, 5, 8\], expected \[B, 16, h, w\]"):
        prepare(ad, SampleRequest(**base, inputs={"reference_latent": torch.zeros(1, 16, 5, 8)}), tiny=True)
    with pytest.raises(XDiTError, match="reference latents must be given in order"):
        prepare(ad, SampleRequest(**base, inputs={"reference_latent_2": torch.zeros(1, 16, 4, 8)}), tiny=True)
    refs = {"reference_latent": torch.zeros(1, 16, 4, 8)}
    with pytest.raises(ConfigError, match="step cache is not available with reference latents"):
        prepare(ad, SampleRequest(**base, inputs=refs, cache=CacheSettings(threshold=0.1)), tiny=True)
    with pytest.raises(ConfigError, match="pipefusion is not available with reference latents"):
        ad.check_request(SampleRequest(**base, inputs=refs), ParallelConfig(pipefusion=2, num_patches=2))


def _cases() -> list[dict]:
    # 80x112: 5 x 7 = 35 target tokens + 12 + 10 reference tokens = 57, divisible by neither 2 nor 4
    base = {"model": MODEL, "seed": 9, "steps": 3, "height": 80, "width": 112, "text_tokens": 15,
            "neg_text_tokens": 9, "cfg": 4.0,
            "random_inputs": {"reference_latent": [1, 16, 6, 8], "reference_latent_2": [1, 16, 4, 10]}}
    edit = {**base, "overrides": EDIT_2511}
    return [{**base, "id": "edit_ulysses2", "parallel": {"ulysses": 2}},
            {**base, "id": "edit_ring2", "parallel": {"ring": 2}},
            {**base, "id": "edit_cfg2", "parallel": {"cfg": 2}},
            {**edit, "id": "edit2511_ulysses2", "parallel": {"ulysses": 2}},
            {**edit, "id": "edit2511_ring2", "parallel": {"ring": 2}}]


def test_world2_exact_methods_match_serial(tmp_path):
    results = run_cases(2, _cases(), tmp_path)
    for case in _cases():
        info = case_ok(results, case["id"])
        assert rel_l2(info["latents"], serial_of(case)) <= 1e-4, case["id"]


def test_edit_variants_from_files_and_the_cli(tmp_path, capsys):
    """A diffusers folder with zero_cond_t is Edit-2511; a single file cannot say so (the same weights), so
    --family qwen-image-edit-2511 sets it; the CLI takes the reference latents through --inputs."""
    from safetensors.torch import load_file, save_file

    from comfyui_xdit.cli import main
    from comfyui_xdit.models import load_model

    edit = get_model({"model": MODEL, "overrides": EDIT_2511}).adapter
    edit.model.save_pretrained(str(tmp_path / "folder"))
    assert load_model(str(tmp_path / "folder")).adapter.variant == "qwen-image-edit-2511"
    save_file({k: v.contiguous() for k, v in edit.model.state_dict().items()}, str(tmp_path / "edit.safetensors"))
    one = load_model(str(tmp_path / "edit.safetensors")).adapter
    assert one.variant == "qwen-image-t2i" and not one.model.config.zero_cond_t
    ad = load_model(str(tmp_path / "edit.safetensors"), "qwen-image-edit-2511").adapter
    assert ad.variant == "qwen-image-edit-2511" and ad.model.config.zero_cond_t
    inputs = _inputs(2, 1)
    save_file(inputs, str(tmp_path / "in.safetensors"))
    assert main(["generate", "--model", str(tmp_path / "edit.safetensors"), "--family", "qwen-image-edit-2511",
                 "--height", "80", "--width", "112", "--steps", "3", "--cfg", "4", "--inputs",
                 str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out.safetensors")]) == 0, \
        capsys.readouterr().err
    ref = sample(edit, SampleRequest(height=80, width=112, steps=3, cfg=4.0, inputs=inputs))
    out = load_file(tmp_path / "out.safetensors")["latents"]
    assert out.shape == (1, 16, 1, 10, 14) and rel_l2(out[:, :, 0], ref) <= 1e-5
