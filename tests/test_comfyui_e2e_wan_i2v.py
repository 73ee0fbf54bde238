"""Wan image-to-video end to end in a real ComfyUI (skipped unless COMFYUI_DIR is set; see test_comfyui_e2e_wan.py).

The graphs use ComfyUI's own WanImageToVideo node; what it is fed is made by test-only nodes, since neither a VAE
nor CLIP vision can be downloaded here and ComfyUI builds its Wan VAE only at full size (a 127M-parameter random
VAE on two shared CPU cores is impractical): a stand-in VAE whose encode returns a seeded latent of the shape the
Wan 2.1 VAE gives ([1, 16, (F - 1) / 4 + 1, H / 8, W / 8], shifted by the pixels' mean so the image matters), a
seeded start IMAGE, and a CLIP_VISION_OUTPUT with seeded penultimate hidden states [1, 257, 1280] (ViT-H's).
WanImageToVideo then builds concat_latent_image, concat_mask and clip_vision_output itself.

Two tiny I2V checkpoints in the original layout (36 input channels, four heads of 128: ComfyUI takes width / 128
heads, two blocks): one like Wan 2.2 I2V A14B's experts (no CLIP embedding; ComfyUI takes it as WAN21_T2V with 36
channels), one like Wan 2.1 I2V (an image embedding of width 1280, image K/V; WAN21_I2V). Native UNETLoader +
KSampler against Load Parallel DiT + Parallel Sampler: Ulysses 2 x CFG 2 (four ranks) on 27 video tokens for the first, CFG 2 for the second, at 1e-5.
A native run without the image (the plain text conditioning) must differ: the image channels are read. And the
samplers' `shift` against ModelSamplingSD3 (shift 5 instead of Wan's 8) before the native KSampler."""
from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import save_file

from .comfy_server import COMFYUI_DIR, ROOT, comfy_python, make_base, running_comfyui
from .conftest import rel_l2
from .test_comfyui_e2e_wan import COND_NODE, CONDS, _config, _latent, _save

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
A14B, I2V21 = "tiny_wan22_i2v_e2e.safetensors", "tiny_wan21_i2v_e2e.safetensors"

IMAGE_NODES = textwrap.dedent('''
    import torch

    class _SeededLatentVAE:
        """What WanImageToVideo asks of a VAE: encode(pixels [F, H, W, 3]) -> [1, 16, (F-1)//4 + 1, H/8, W/8]."""
        def __init__(self, seed):
            self.seed = seed

        def encode(self, pixels):
            f, h, w, _ = pixels.shape
            g = torch.Generator().manual_seed(self.seed)
            return torch.randn(1, 16, (f - 1) // 4 + 1, h // 8, w // 8, generator=g) + pixels.float().mean()

    class XDiTE2EStandInVAE:
        CATEGORY = "testing"
        RETURN_TYPES = ("VAE",)
        FUNCTION = "make"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

        def make(self, seed):
            return (_SeededLatentVAE(seed),)

    class XDiTE2EStartImage:
        CATEGORY = "testing"
        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "make"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                                 "width": ("INT", {"default": 48}), "height": ("INT", {"default": 48})}}

        def make(self, seed, width, height):
            g = torch.Generator().manual_seed(seed)
            return (torch.rand(1, height, width, 3, generator=g),)

    class XDiTE2EClipVision:
        CATEGORY = "testing"
        RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
        FUNCTION = "make"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

        def make(self, seed):
            import comfy.clip_vision

            out = comfy.clip_vision.Output()
            out.penultimate_hidden_states = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(seed))
            return (out,)

    NODE_CLASS_MAPPINGS = {"XDiTE2EStandInVAE": XDiTE2EStandInVAE, "XDiTE2EStartImage": XDiTE2EStartImage,
                           "XDiTE2EClipVision": XDiTE2EClipVision}
''')


def _write_tiny_i2v(path: Path, seed: int, clip: bool) -> None:
    from diffusers import WanTransformer3DModel

    from comfyui_xdit.tiny import fill_deterministic

    from .test_wan import wan_to_original

    extra = dict(image_dim=1280, added_kv_proj_dim=512) if clip else {}
    model = WanTransformer3DModel(num_attention_heads=4, attention_head_dim=128, in_channels=36, out_channels=16,
                                  text_dim=4096, freq_dim=256, ffn_dim=256, num_layers=2, **extra)
    fill_deterministic(model, seed)
    save_file({k: v.contiguous() for k, v in wan_to_original(model).items()}, str(path))


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_wan_i2v")
    models = make_base(base, {"xdit_e2e_wan_cond.py": COND_NODE, "xdit_e2e_wan_image.py": IMAGE_NODES})
    _write_tiny_i2v(models / A14B, 4242, clip=False)
    _write_tiny_i2v(models / I2V21, 5353, clip=True)
    with running_comfyui(base) as server:
        yield server, base


def test_comfyui_detects_the_tiny_i2v_checkpoints(comfy):
    """ComfyUI's loader: the expert-like file as WAN21_T2V with 36 input channels, the CLIP one as WAN21_I2V; every
    weight used."""
    _, base = comfy
    folder = base / "models" / "diffusion_models"
    code = textwrap.dedent(f"""
        import logging, sys
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
        import comfy.sd
        for name in ({A14B!r}, {I2V21!r}):
            m = comfy.sd.load_diffusion_model({str(folder)!r} + "/" + name)
            net = m.model.diffusion_model
            print("RESULT", type(m.model.model_config).__name__, net.patch_embedding.weight.shape[1],
                  net.img_emb is not None)
    """)
    res = subprocess.run([comfy_python(), "-c", code], capture_output=True, text=True, cwd=COMFYUI_DIR, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "unet missing" not in res.stdout and "unet unexpected" not in res.stdout, res.stdout[-2000:]
    lines = [line.split()[1:] for line in res.stdout.splitlines() if line.startswith("RESULT")]
    assert lines == [["WAN21_T2V", "36", "False"], ["WAN21_I2V", "36", "True"]]


def test_image_channels_equal_comfyuis_wan21_concat_cond(comfy):
    """nodes/wan_image.concat_channels against ComfyUI's own WAN21.concat_cond on the loaded tiny I2V model, exactly:
    WanImageToVideo's mask, a 4-channel mask, a mask shorter than the latent, a batch of 2, no image latent."""
    _, base = comfy
    code = textwrap.dedent(f"""
        import sys, types, importlib, torch
        sys.path.insert(0, {str(ROOT)!r})
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import comfy.sd
        pkg = types.ModuleType("xdit_nodes_under_test")
        pkg.__path__ = [{str(ROOT / "nodes")!r}]
        sys.modules[pkg.__name__] = pkg
        wan_image = importlib.import_module(pkg.__name__ + ".wan_image")
        model = comfy.sd.load_diffusion_model({str(base / "models" / "diffusion_models" / A14B)!r}).model
        g = torch.Generator().manual_seed(3)
        image = torch.randn(1, 16, 3, 6, 6, generator=g)
        given = torch.ones(1, 1, 3, 6, 6)
        given[:, :, :1] = 0.0
        cases = [(1, image, given), (2, image, given), (1, image, torch.rand(1, 4, 3, 6, 6, generator=g)),
                 (1, image, given[:, :, :2]), (2, None, given), (1, image, None)]
        for batch, img, mask in cases:
            noise = torch.randn(batch, 16, 3, 6, 6, generator=g)
            kw = {{k: v for k, v in (("concat_latent_image", img), ("concat_mask", mask)) if v is not None}}
            ref = model.concat_cond(noise=noise, device="cpu", **kw)
            ours = wan_image.concat_channels(img, mask, noise, 20, model.latent_format)
            print("CASE", tuple(ref.shape) == tuple(ours.shape) and torch.equal(ref, ours))
    """)
    res = subprocess.run([comfy_python(), "-c", code], capture_output=True, text=True, cwd=COMFYUI_DIR, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-2000:]
    cases = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("CASE")]
    assert cases == ["True"] * 6, res.stdout[-2000:]


def _i2v_graph(checkpoint: str, clip: bool, degrees: dict, prefix: str) -> dict:
    sampling = {"seed": 99, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    i2v_inputs = {"positive": ["1", 0], "negative": ["2", 0], "vae": ["30", 0], "width": 48, "height": 48,
                  "length": 9, "batch_size": 1, "start_image": ["31", 0]}
    if clip:
        i2v_inputs["clip_vision_output"] = ["32", 0]
    common = {"positive": ["33", 0], "negative": ["33", 1], "latent_image": ["33", 2], **sampling}
    return {
        **CONDS,
        "30": {"class_type": "XDiTE2EStandInVAE", "inputs": {"seed": 7}},
        "31": {"class_type": "XDiTE2EStartImage", "inputs": {"seed": 8, "width": 48, "height": 48}},
        "32": {"class_type": "XDiTE2EClipVision", "inputs": {"seed": 9}},
        "33": {"class_type": "WanImageToVideo", "inputs": i2v_inputs},
        "4": {"class_type": "UNETLoader", "inputs": {"unet_name": checkpoint, "weight_dtype": "default"}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["4", 0], **common}},
        # without the image (plain text conditioning; the same noise): must differ
        "6": {"class_type": "KSampler", "inputs": {"model": ["4", 0], **{**common, "positive": ["1", 0],
                                                                         "negative": ["2", 0]}}},
        **_config("7", **degrees),
        "8": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0], "checkpoint": checkpoint,
                                                              "weight_dtype": "fp32", "family": "auto"}},
        "9": {"class_type": "XDiTParallelSampler", "inputs": {"model": ["8", 0], **common}},
        **_save("10", "5", f"native{prefix}"), **_save("11", "9", f"xdit{prefix}"),
        **_save("12", "6", f"noimage{prefix}"),
        # the sampling shift: native ModelSamplingSD3 against the samplers' shift input
        "40": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["4", 0], "shift": 5.0}},
        "41": {"class_type": "KSampler", "inputs": {"model": ["40", 0], **common}},
        "42": {"class_type": "XDiTParallelSampler", "inputs": {"model": ["8", 0], **common, "shift": 5.0}},
        **_save("43", "41", f"nativeshift{prefix}"), **_save("44", "42", f"xditshift{prefix}"),
    }


@pytest.fixture(scope="module")
def ran(comfy):
    from queue_workflow import queue_and_wait

    server, base = comfy
    progress: list[str] = []
    _, a14b = queue_and_wait(server, _i2v_graph(A14B, False, dict(ulysses_degree=2, cfg_degree=2), "a14b"),
                             timeout=1200, log=progress.append)
    _, i2v21 = queue_and_wait(server, _i2v_graph(I2V21, True, dict(cfg_degree=2), "i2v21"), timeout=1200,
                              log=progress.append)
    return base, a14b, i2v21, progress


def test_i2v_graphs_run(ran):
    _, a14b, i2v21, progress = ran
    assert a14b["status"]["status_str"] == "success", a14b["status"]
    assert i2v21["status"]["status_str"] == "success", i2v21["status"]
    assert "node 9: step 3/3" in progress


@pytest.mark.parametrize("prefix,what", [("a14b", "Wan 2.2 I2V-like (no CLIP), ulysses 2 x cfg 2"),
                                         ("i2v21", "Wan 2.1 I2V-like (CLIP vision), cfg 2")])
def test_parallel_sampler_matches_native_ksampler_on_image_to_video(ran, prefix, what):
    base = ran[0]
    native, ours = _latent(base, f"native{prefix}"), _latent(base, f"xdit{prefix}")
    assert ours.shape == native.shape == (1, 16, 3, 6, 6)
    assert native.abs().mean() > 0.01
    err = rel_l2(ours, native)
    gap = rel_l2(_latent(base, f"noimage{prefix}"), native)
    print(f"{what}, WanImageToVideo 48x48x9 (27 tokens): rel L2 to native KSampler {err:.2e} "
          f"(native without the image: {gap:.2e})")
    assert err <= 1e-5, err
    assert gap > 1e-3  # the image channels (and CLIP vision) change the result: the comparison can fail


@pytest.mark.parametrize("prefix", ["a14b", "i2v21"])
def test_shift_matches_native_model_sampling_sd3(ran, prefix):
    base = ran[0]
    native, ours = _latent(base, f"nativeshift{prefix}"), _latent(base, f"xditshift{prefix}")
    err = rel_l2(ours, native)
    gap = rel_l2(native, _latent(base, f"native{prefix}"))
    print(f"{prefix}: shift 5 (ModelSamplingSD3 + KSampler native): rel L2 {err:.2e} (shift 8 against 5: {gap:.2e})")
    assert err <= 1e-5, err
    assert gap > 1e-3
