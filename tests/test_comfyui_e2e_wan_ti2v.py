"""Wan 2.2 TI2V 5B image-to-video end to end in a real ComfyUI (skipped unless COMFYUI_DIR is set; see
test_comfyui_e2e_wan.py): ComfyUI's own Wan22ImageToVideoLatent with a start image (its samples hold the image's
latent on the first frame and a noise_mask 0 there), native UNETLoader + KSampler (WAN22_T2V: per-frame timesteps
from the mask, the given frame held by KSampler's inpainting) against Load Parallel DiT + Parallel Sampler at
Ulysses 2 x CFG 2 (four CPU ranks), at 1e-5. The VAE is a stand-in (ComfyUI builds the Wan 2.2 VAE only at full
size): encode returns a seeded latent of the Wan 2.2 VAE's shape [1, 48, (F - 1) / 4 + 1, H / 16, W / 16], shifted by
the pixels' mean. The checkpoint: a tiny TI2V in the original layout (48 channels in and out, four heads of 128,
two blocks). The native run without the start image must differ."""
from __future__ import annotations

import textwrap

import pytest

from .comfy_server import COMFYUI_DIR, make_base, running_comfyui
from .conftest import rel_l2
from .test_comfyui_e2e_wan import COND_NODE, CONDS, _config, _latent, _save

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
TI2V = "tiny_wan22_ti2v_e2e.safetensors"

IMAGE_NODES = textwrap.dedent('''
    import torch

    class _SeededLatentVAE22:
        """What Wan22ImageToVideoLatent asks of a VAE: encode(pixels [F, H, W, 3]) -> [1, 48, (F-1)//4+1, H/16, W/16]."""
        def __init__(self, seed):
            self.seed = seed

        def encode(self, pixels):
            f, h, w, _ = pixels.shape
            g = torch.Generator().manual_seed(self.seed)
            return torch.randn(1, 48, (f - 1) // 4 + 1, h // 16, w // 16, generator=g) + pixels.float().mean()

    class XDiTE2EStandInVAE22:
        CATEGORY = "testing"
        RETURN_TYPES = ("VAE",)
        FUNCTION = "make"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

        def make(self, seed):
            return (_SeededLatentVAE22(seed),)

    class XDiTE2EStartImage22:
        CATEGORY = "testing"
        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "make"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                                 "width": ("INT", {"default": 96}), "height": ("INT", {"default": 64})}}

        def make(self, seed, width, height):
            g = torch.Generator().manual_seed(seed)
            return (torch.rand(1, height, width, 3, generator=g),)

    NODE_CLASS_MAPPINGS = {"XDiTE2EStandInVAE22": XDiTE2EStandInVAE22, "XDiTE2EStartImage22": XDiTE2EStartImage22}
''')


def _write_tiny_ti2v(path, seed: int) -> None:
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    from comfyui_xdit.tiny import fill_deterministic

    from .test_wan import wan_to_original

    model = WanTransformer3DModel(num_attention_heads=4, attention_head_dim=128, in_channels=48, out_channels=48,
                                  text_dim=4096, freq_dim=256, ffn_dim=256, num_layers=2)
    fill_deterministic(model, seed)
    save_file({k: v.contiguous() for k, v in wan_to_original(model).items()}, str(path))


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    from queue_workflow import queue_and_wait

    base = tmp_path_factory.mktemp("comfy_wan_ti2v")
    models = make_base(base, {"xdit_e2e_wan_cond.py": COND_NODE, "xdit_e2e_wan_ti2v.py": IMAGE_NODES})
    _write_tiny_ti2v(models / TI2V, 6464)
    sampling = {"seed": 99, "steps": 4, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    latent = {"vae": ["30", 0], "width": 96, "height": 64, "length": 9, "batch_size": 1}
    common = {"positive": ["1", 0], "negative": ["2", 0], "latent_image": ["33", 0], **sampling}
    graph = {
        **CONDS,
        "30": {"class_type": "XDiTE2EStandInVAE22", "inputs": {"seed": 7}},
        "31": {"class_type": "XDiTE2EStartImage22", "inputs": {"seed": 8, "width": 96, "height": 64}},
        "33": {"class_type": "Wan22ImageToVideoLatent", "inputs": {**latent, "start_image": ["31", 0]}},
        "34": {"class_type": "Wan22ImageToVideoLatent", "inputs": latent},
        "4": {"class_type": "UNETLoader", "inputs": {"unet_name": TI2V, "weight_dtype": "default"}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["4", 0], **common}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["4", 0], **{**common, "latent_image": ["34", 0]}}},
        **_config("7", ulysses_degree=2, cfg_degree=2),
        "8": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0], "checkpoint": TI2V,
                                                              "weight_dtype": "fp32", "family": "auto"}},
        "9": {"class_type": "XDiTParallelSampler", "inputs": {"model": ["8", 0], **common}},
        **_save("10", "5", "native"), **_save("11", "9", "xdit"), **_save("12", "6", "noimage"),
    }
    with running_comfyui(base) as server:
        progress: list[str] = []
        _, result = queue_and_wait(server, graph, timeout=1200, log=progress.append)
    return base, result, progress


def test_ti2v_start_image_matches_native_ksampler(ran):
    base, result, progress = ran
    assert result["status"]["status_str"] == "success", result["status"]
    assert "node 9: step 4/4" in progress
    native, ours = _latent(base, "native"), _latent(base, "xdit")
    assert ours.shape == native.shape == (1, 48, 3, 4, 6)
    assert native.abs().mean() > 0.01
    err = rel_l2(ours, native)
    gap = rel_l2(_latent(base, "noimage"), native)
    print(f"Wan 2.2 TI2V start image, ulysses 2 x cfg 2, 96x64x9 (18 tokens): rel L2 to native KSampler {err:.2e} "
          f"(native without the image: {gap:.2e})")
    assert err <= 1e-5, err
    assert gap > 1e-3
