"""Qwen-Image-Edit end to end in a real ComfyUI (skipped unless COMFYUI_DIR is set; see test_comfyui_e2e_qwen.py):
the reference image reaches both samplers through ComfyUI's own ReferenceLatent node (what TextEncodeQwenImageEdit
(Plus) attach after encoding: `reference_latents` on the CONDITIONING; the Qwen2.5-VL encoder cannot be downloaded
here), from a seeded LATENT shaped like the Wan 2.1 VAE's [1, 16, 1, h, w]. Native UNETLoader + KSampler against
Load Parallel DiT + Parallel Sampler at Ulysses 2 x CFG 2 (four CPU ranks) with true CFG at scale 2, at 1e-5; even token rows and columns
(ComfyUI 0.3.64 centres odd ones differently from diffusers, see test_comfyui_e2e_qwen.py). The native run without
the reference must differ. ComfyUI's own KSampler on Parallel DiT Model (its forwards carry ref_latents to the
pool) must match native too."""
from __future__ import annotations

import textwrap

import pytest

from .comfy_server import COMFYUI_DIR, make_base, running_comfyui
from .conftest import rel_l2
from .test_comfyui_e2e_qwen import CHECKPOINT, COND_NODE, _latent, _write_tiny_qwen

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")

LATENT_NODE = textwrap.dedent('''
    import torch

    class XDiTE2ESeededLatent:
        """A LATENT as VAEEncode gives it for Qwen-Image (the Wan 2.1 VAE): [1, 16, 1, h, w], seeded."""
        CATEGORY = "testing"
        RETURN_TYPES = ("LATENT",)
        FUNCTION = "make"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                                 "width": ("INT", {"default": 128}), "height": ("INT", {"default": 96})}}

        def make(self, seed, width, height):
            g = torch.Generator().manual_seed(seed)
            return ({"samples": torch.randn(1, 16, 1, height // 8, width // 8, generator=g)},)

    NODE_CLASS_MAPPINGS = {"XDiTE2ESeededLatent": XDiTE2ESeededLatent}
''')


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    from queue_workflow import queue_and_wait

    base = tmp_path_factory.mktemp("comfy_qwen_edit")
    models = make_base(base, {"xdit_e2e_qwen_cond.py": COND_NODE, "xdit_e2e_qwen_latent.py": LATENT_NODE})
    _write_tiny_qwen(models / CHECKPOINT)
    sampling = {"seed": 99, "steps": 4, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    common = {"positive": ["5", 0], "negative": ["6", 0], "latent_image": ["3", 0], **sampling}
    graph = {
        "1": {"class_type": "XDiTE2EQwenConditioning", "inputs": {"seed": 1, "tokens": 14, "pad": 0}},
        "2": {"class_type": "XDiTE2EQwenConditioning", "inputs": {"seed": 2, "tokens": 6, "pad": 0}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 96, "batch_size": 1}},
        "13": {"class_type": "XDiTE2ESeededLatent", "inputs": {"seed": 5, "width": 96, "height": 128}},
        "5": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["1", 0], "latent": ["13", 0]}},
        "6": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["2", 0], "latent": ["13", 0]}},
        "4": {"class_type": "UNETLoader", "inputs": {"unet_name": CHECKPOINT, "weight_dtype": "default"}},
        "20": {"class_type": "KSampler", "inputs": {"model": ["4", 0], **common}},
        "21": {"class_type": "KSampler", "inputs": {"model": ["4", 0], **{**common, "positive": ["1", 0],
                                                                          "negative": ["2", 0]}}},
        "7": {"class_type": "XDiTConfigureHybridParallel", "inputs": {
            "device": "cpu", "ulysses_degree": 2, "ring_degree": 1, "pipefusion_degree": 1, "cfg_degree": 2,
            "dp_degree": 1, "num_patches": 0, "warmup_steps": 1, "attention": "auto"}},
        "8": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0], "checkpoint": CHECKPOINT,
                                                              "weight_dtype": "fp32", "family": "auto"}},
        "30": {"class_type": "XDiTParallelSampler", "inputs": {"model": ["8", 0], **common}},
        "40": {"class_type": "SaveLatent", "inputs": {"samples": ["20", 0], "filename_prefix": "native"}},
        "41": {"class_type": "SaveLatent", "inputs": {"samples": ["30", 0], "filename_prefix": "xdit"}},
        "42": {"class_type": "SaveLatent", "inputs": {"samples": ["21", 0], "filename_prefix": "noref"}},
        # ComfyUI's own KSampler on Parallel DiT Model: the forwards carry ref_latents to the pool
        "31": {"class_type": "XDiTParallelDiTModel", "inputs": {"model": ["8", 0]}},
        "32": {"class_type": "KSampler", "inputs": {"model": ["31", 0], **common}},
        "43": {"class_type": "SaveLatent", "inputs": {"samples": ["32", 0], "filename_prefix": "stock"}},
    }
    with running_comfyui(base) as server:
        progress: list[str] = []
        _, entry = queue_and_wait(server, graph, timeout=1500, log=progress.append)
    return base, entry, progress


def test_qwen_image_edit_reference_matches_native_ksampler(ran):
    base, entry, progress = ran
    assert entry["status"]["status_str"] == "success", entry["status"]
    native, ours = _latent(base, "native"), _latent(base, "xdit")
    assert ours.shape == native.shape == (1, 16, 1, 12, 16)
    err = rel_l2(ours, native)
    gap = rel_l2(_latent(base, "noref"), native)
    print(f"Qwen-Image-Edit, one 96x128 reference (6 x 8 tokens) on a 128x96 target, ulysses 2, cfg 2: rel L2 to "
          f"native KSampler {err:.2e} (native without the reference: {gap:.2e})")
    assert err <= 1e-5, err
    assert gap > 1e-3
    stock = rel_l2(_latent(base, "stock"), native)
    print(f"Qwen-Image-Edit, KSampler on Parallel DiT Model (ulysses 2 x cfg 2): rel L2 to native KSampler {stock:.2e}")
    assert stock <= 1e-5, stock
