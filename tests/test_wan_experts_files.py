"""Wan 2.2 A14B as users have it: a diffusers pipeline folder (model_index.json, transformer/, transformer_2/)
saved by WanPipeline.save_pretrained loads as both experts and samples what WanPipeline with transformer_2 samples
from that folder's scheduler; every method that runs the built-in two-expert model runs it; a requested variant
the files cannot be is refused in one line, never replaced."""
from __future__ import annotations

import json

import pytest
import torch

from comfyui_xdit.errors import WeightsError
from comfyui_xdit.models import load_model
from comfyui_xdit.sampling import SampleRequest, latent_shape, sample, seed_noise
from tests.cases import case_ok, get_model, serial_of
from tests.conftest import rel_l2
from tests.distributed import assert_exchanged, run_cases
from tests.test_wan import EXPERTS, NEG, ODD, published_scheduler


def _save_pipeline(folder, experts, boundary: float, variant: str, image: bool = False) -> None:
    """A WanPipeline (or WanImageToVideoPipeline) folder of the two experts, no text encoder or VAE, with the
    published scheduler config."""
    import diffusers

    cls = diffusers.WanImageToVideoPipeline if image else diffusers.WanPipeline
    extra = dict(image_encoder=None, image_processor=None) if image else {}
    pipe = cls(tokenizer=None, text_encoder=None, vae=None, scheduler=published_scheduler(variant),
               transformer=experts.transformer, transformer_2=experts.transformer_2, boundary_ratio=boundary, **extra)
    pipe.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def t2v_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan22") / "Wan2.2-T2V-A14B-Diffusers"
    _save_pipeline(folder, get_model({"model": EXPERTS}).adapter.model, 0.875, "wan2.2-t2v-a14b")
    return folder


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """The two experts as ComfyUI keeps them: single files in the original layout behind model.diffusion_model.,
    named as the published ones are."""
    from safetensors.torch import save_file

    from tests.test_wan import wan_to_original

    folder = tmp_path_factory.mktemp("diffusion_models")
    experts = get_model({"model": EXPERTS}).adapter.model
    paths = []
    for model, name in ((experts.transformer, "high"), (experts.transformer_2, "low")):
        path = folder / f"wan2.2_t2v_{name}_noise_14B_fp16.safetensors"
        save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in wan_to_original(model).items()},
                  str(path))
        paths.append(str(path))
    return tuple(paths)


def _embeddings(seed: int, pos: int = 12, neg: int = 7, width: int = 4096):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, pos, width, generator=gen), torch.randn(1, neg, width, generator=gen)


def test_pipeline_folder_loads_both_experts_and_matches_wan_pipeline(t2v_folder):
    import diffusers

    index = json.loads((t2v_folder / "model_index.json").read_text())
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"] and index["boundary_ratio"] == 0.875
    for family in (None, "wan", "wan2.2-t2v-a14b"):
        ad = load_model(str(t2v_folder), family).adapter
        assert ad.experts and ad.variant == "wan2.2-t2v-a14b" and ad.model.boundary_ratio == 0.875
    built = get_model({"model": EXPERTS}).adapter.model
    for name, t in built.state_dict().items():  # both experts read, each from its own folder
        assert torch.equal(ad.model.state_dict()[name], t), name
    cond, neg = _embeddings(6)
    req = SampleRequest(height=48, width=80, frames=9, steps=6, seed=4, cfg=3.5, inputs={"cond": cond,
                                                                                         "neg_cond": neg})
    ours = sample(ad, req)
    sched = diffusers.UniPCMultistepScheduler.from_pretrained(str(t2v_folder), subfolder="scheduler")
    assert sched.config.flow_shift == 3.0
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sched,
                                 transformer=ad.model.transformer, transformer_2=ad.model.transformer_2,
                                 boundary_ratio=index["boundary_ratio"])
    pipe.set_progress_bar_config(disable=True)
    noise = seed_noise(4, latent_shape(ad, req))
    ref = pipe(prompt_embeds=cond, negative_prompt_embeds=neg, guidance_scale=3.5, height=48, width=80, num_frames=9,
               num_inference_steps=6, latents=noise, output_type="latent", return_dict=False)[0]
    assert rel_l2(ours, ad.from_model_space(ref.float())) <= 1e-4
    # the high-noise expert alone (what loading transformer/ only sampled) is far from it
    alone = sample(load_model(str(t2v_folder / "transformer")).adapter, req)
    assert rel_l2(alone, ours) > 0.1


def test_a_variant_the_files_cannot_be_is_refused_in_one_line(t2v_folder):
    one = str(t2v_folder / "transformer")
    assert load_model(one).adapter.variant == "wan2.1-t2v-1.3b"  # one tiny expert alone: a Wan 2.1 T2V
    cases = [(one, "wan2.2-t2v-a14b", "transformer: one transformer (wan2.1-t2v-1.3b), not wan2.2-t2v-a14b, which "
                                      "is two experts: load a pipeline folder with transformer/ and transformer_2/"),
             (str(t2v_folder), "wan2.1-t2v-1.3b", "two experts (wan2.2-t2v-a14b), not wan2.1-t2v-1.3b"),
             (str(t2v_folder), "wan2.2-i2v-a14b", "these weights are wan2.2-t2v-a14b, not wan2.2-i2v-a14b"),
             (one, "wan2.2-ti2v-5b", "these weights are wan2.1-t2v-1.3b, not wan2.2-ti2v-5b")]
    for source, family, message in cases:
        with pytest.raises(WeightsError) as e:
            load_model(source, family)
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WeightsError, match="family mismatch"):
        load_model(str(t2v_folder), "flux")


def test_cli_generate_from_the_folder_and_refusal(t2v_folder, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from comfyui_xdit.cli import main

    cond, neg = _embeddings(7)
    save_file({"cond": cond, "neg_cond": neg}, str(tmp_path / "in.safetensors"))
    args = ["generate", "--model", str(t2v_folder), "--family", "wan2.2-t2v-a14b", "--height", "48", "--width", "48",
            "--frames", "5", "--steps", "4", "--cfg", "3", "--inputs", str(tmp_path / "in.safetensors"),
            "--out", str(tmp_path / "out.safetensors")]
    assert main(args) == 0, capsys.readouterr().err
    ref = sample(get_model({"model": EXPERTS}).adapter,
                 SampleRequest(height=48, width=48, frames=5, steps=4, cfg=3.0, inputs={"cond": cond,
                                                                                        "neg_cond": neg}))
    assert rel_l2(load_file(tmp_path / "out.safetensors")["latents"], ref) <= 1e-5
    args[2] = str(t2v_folder / "transformer")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: transformer: one transformer (wan2.1-t2v-1.3b), not wan2.2-t2v-a14b")
    assert err.count("\n") == 1


def test_i2v_pipeline_folder_matches_wan_i2v_pipeline(tmp_path):
    """Wan 2.2 I2V A14B (in_channels 36, no CLIP input, boundary 0.9): the folder's two experts equal
    WanImageToVideoPipeline with transformer_2 (its VAE step replaced by the seed noise and the same
    image_cond)."""
    import diffusers

    experts = get_model({"model": EXPERTS, "overrides": {"in_channels": 36}}).adapter
    assert experts.variant == "wan2.2-i2v-a14b"
    _save_pipeline(tmp_path / "i2v", experts.model, 0.9, "wan2.2-i2v-a14b", image=True)
    ad = load_model(str(tmp_path / "i2v"), "wan2.2-i2v-a14b").adapter
    assert ad.experts and ad.variant == "wan2.2-i2v-a14b" and ad.model.boundary_ratio == 0.9
    cond, neg = _embeddings(8)
    image_cond = torch.randn(1, 20, 3, 6, 10, generator=torch.Generator().manual_seed(9))
    req = SampleRequest(height=48, width=80, frames=9, steps=5, seed=3, cfg=4.0,
                        inputs={"cond": cond, "neg_cond": neg, "image_cond": image_cond})
    ours = sample(ad, req)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    sched = diffusers.UniPCMultistepScheduler.from_pretrained(str(tmp_path / "i2v"), subfolder="scheduler")
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, image_encoder=None,
                                             image_processor=None, scheduler=sched, transformer=ad.model.transformer,
                                             transformer_2=ad.model.transformer_2, boundary_ratio=0.9)
    pipe.set_progress_bar_config(disable=True)
    noise = seed_noise(3, latent_shape(ad, req))
    pipe.prepare_latents = lambda *args, **kwargs: (noise, image_cond)
    out = pipe(image=torch.zeros(1, 3, 48, 80), prompt_embeds=cond, negative_prompt_embeds=neg, guidance_scale=4.0,
               height=48, width=80, num_frames=9, num_inference_steps=5, output_type="latent", return_dict=False)[0]
    assert rel_l2(ours, ad.from_model_space(out.float())) <= 1e-4
    one = load_model(str(tmp_path / "i2v" / "transformer")).adapter  # one expert alone, as ComfyUI runs each
    assert not one.experts and rel_l2(ours, sample(one, req)) > 0.1
    # the same pair as ComfyUI keeps it: two single files in the original layout, high noise first
    from safetensors.torch import save_file

    from comfyui_xdit.weights import pair_source
    from tests.test_wan import wan_to_original

    files = []
    for model, name in ((ad.model.transformer, "high"), (ad.model.transformer_2, "low")):
        files.append(str(tmp_path / f"wan2.2_i2v_{name}_noise_14B_fp16.safetensors"))
        save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in wan_to_original(model).items()}, files[-1])
    for family in (None, "wan2.2-i2v-a14b"):
        pair = load_model(pair_source(*files), family).adapter
        assert pair.experts and pair.variant == "wan2.2-i2v-a14b" and pair.model.boundary_ratio == 0.9
    assert rel_l2(sample(pair, req), ours) <= 1e-5
    with pytest.raises(WeightsError, match=r"one transformer \(one expert of wan2.2-i2v-a14b\), not wan2.2-i2v-a14b"):
        load_model(str(tmp_path / "i2v" / "transformer"), "wan2.2-i2v-a14b")


# ------------------------------------------------------------------------------------------------ two single files
def test_two_single_files_load_as_the_pair(pair_files, tmp_path):
    """The high- and low-noise files (ComfyUI's original layout, converted by diffusers' converter) make the same
    two-expert model as the pipeline folder: equal weights, WanPipeline with transformer_2's result."""
    from safetensors.torch import save_file

    from comfyui_xdit.weights import pair_source
    from tests.test_wan import pipeline_latents, wan_to_original

    high, low = pair_files
    built = get_model({"model": EXPERTS}).adapter
    for family in (None, "wan", "wan2.2-t2v-a14b"):
        ad = load_model(pair_source(high, low), family).adapter
        assert ad.experts and ad.variant == "wan2.2-t2v-a14b" and ad.model.boundary_ratio == 0.875
    for name, t in built.model.state_dict().items():
        assert torch.equal(ad.model.state_dict()[name], t), name
    cond, neg = _embeddings(10)
    req = SampleRequest(height=48, width=80, frames=9, steps=6, seed=5, cfg=3.0, inputs={"cond": cond,
                                                                                         "neg_cond": neg})
    assert rel_l2(sample(ad, req), pipeline_latents(built, req, cond, neg)) <= 1e-4
    refusals = [(pair_source(low, high), None, "the high-noise expert comes first (these names say low, then high)"),
                (pair_source(high, low), "wan2.1-t2v-1.3b", "two experts (wan2.2-t2v-a14b), not wan2.1-t2v-1.3b"),
                (high, "wan2.2-t2v-a14b", "one transformer (wan2.1-t2v-1.3b), not wan2.2-t2v-a14b")]
    other = get_model({"model": EXPERTS, "overrides": {"in_channels": 36}}).adapter.model.transformer_2
    save_file({k: v.contiguous() for k, v in wan_to_original(other).items()}, str(tmp_path / "i2v_low.safetensors"))
    refusals.append((pair_source(high, str(tmp_path / "i2v_low.safetensors")), None,
                     "not two experts of one architecture (wan wan2.1-t2v-1.3b, wan wan2.2-i2v-a14b)"))
    torch.save({"x": torch.zeros(1)}, str(tmp_path / "a.pt"))
    refusals.append((pair_source(str(tmp_path / "a.pt"), low), None, "two expert files load from safetensors only"))
    for source, family, message in refusals:
        with pytest.raises(WeightsError) as e:
            load_model(source, family)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_generate_from_two_files(pair_files, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from comfyui_xdit.cli import main

    cond, neg = _embeddings(11)
    save_file({"cond": cond, "neg_cond": neg}, str(tmp_path / "in.safetensors"))
    args = ["generate", "--model", pair_files[0], "--model-2", pair_files[1], "--family", "wan2.2-t2v-a14b",
            "--height", "48", "--width", "48", "--frames", "5", "--steps", "4", "--cfg", "3",
            "--inputs", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out.safetensors")]
    assert main(args) == 0, capsys.readouterr().err
    ref = sample(get_model({"model": EXPERTS}).adapter,
                 SampleRequest(height=48, width=48, frames=5, steps=4, cfg=3.0, inputs={"cond": cond,
                                                                                        "neg_cond": neg}))
    assert rel_l2(load_file(tmp_path / "out.safetensors")["latents"], ref) <= 1e-5


# ------------------------------------------------------------------------------------------------ parallel
def _cases(folder, pair: str) -> list[dict]:
    base = {"model": str(folder), "seed": 12, "steps": 4, **ODD, **NEG}
    return [{**base, "id": "folder_ulysses2", "parallel": {"ulysses": 2}},
            {**base, "id": "folder_ring2", "parallel": {"ring": 2}},
            {**base, "id": "folder_cfg2", "parallel": {"cfg": 2}},
            {**base, "id": "folder_dp2", "parallel": {"dp": 2}, "batch": 3},
            {**base, "id": "folder_shard2", "parallel": {"shard": 2}},
            {**base, "id": "files_ulysses2", "model": pair, "parallel": {"ulysses": 2}},
            {**base, "id": "files_ring2", "model": pair, "parallel": {"ring": 2}},
            {**base, "id": "files_cfg2", "model": pair, "parallel": {"cfg": 2}},
            {**base, "id": "files_dp2", "model": pair, "parallel": {"dp": 2}, "batch": 3},
            {**base, "id": "files_shard2", "model": pair, "parallel": {"shard": 2}}]


def test_world2_methods_on_the_folder_and_files_match_serial_and_the_built_in(t2v_folder, pair_files, tmp_path):
    from comfyui_xdit.weights import pair_source

    cases = _cases(t2v_folder, pair_source(*pair_files))
    results = run_cases(2, cases, tmp_path / "runs")
    for case in cases:
        info = case_ok(results, case["id"])
        assert_exchanged(info, case["parallel"])  # the degrees really split the work
        serial = serial_of(case)
        assert rel_l2(info["latents"], serial) <= 1e-4, case["id"]
        assert rel_l2(serial, serial_of({**case, "model": EXPERTS})) <= 1e-5, case["id"]
