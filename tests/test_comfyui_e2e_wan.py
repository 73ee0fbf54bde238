"""Wan end to end in a real ComfyUI (skipped unless COMFYUI_DIR points at a ComfyUI checkout with its dependencies;
COMFYUI_PYTHON picks its interpreter, default COMFYUI_DIR/.venv/bin/python, else this one).

ComfyUI's model detection of a Wan file (the original layout: `head.modulation`, `blocks.N.self_attn.q`) reads the
width, the FFN width, the block count and the input and output channels; the heads are width / 128 and the rest
is fixed (frequency width 256, text width 4096, q/k norms, cross-attention norm). So the tiny checkpoints here are
two heads of 128 (width 256) and two blocks, written in the original layout without a prefix, as Comfy-Org's
repackaged diffusion_models files are. A test-only node makes seeded CONDITIONING shaped like ComfyUI's umT5-xxl
output ([1, 512, 4096], the padding zeroed as ComfyUI zeroes it, no pooled vector), since umT5-xxl cannot be
downloaded here.

Two prompts: (1) EmptyHunyuanLatentVideo at 48x48, 9 frames (3 latent frames of 3 x 3 tokens: 27 video tokens,
odd), native UNETLoader + KSampler against Load Parallel DiT + Parallel Sampler on Ulysses 2 x CFG 2 (four CPU
ranks); (2) Wan 2.2 A14B's graph: two expert files, native two UNETLoaders + two KSamplerAdvanced (high noise:
add_noise, steps 0..2, leftover noise; low noise: no noise, 2..4) against two Load Parallel DiT + two Parallel
Sampler (Advanced) on Ring 2. The latents must agree to 1e-5."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import save_file

from .comfy_server import (
    COMFYUI_DIR, ROOT, comfy_python, make_base, running_comfyui, saved_latent as _latent, config_node as _config)
from .conftest import rel_l2

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
sys.path.insert(0, str(ROOT / "scripts"))
T2V, HIGH, LOW = "tiny_wan_t2v_e2e.safetensors", "tiny_wan_high_noise_e2e.safetensors", \
    "tiny_wan_low_noise_e2e.safetensors"

COND_NODE = textwrap.dedent('''
    import torch

    class XDiTE2EWanConditioning:
        """CONDITIONING as ComfyUI's umT5-xxl encoder gives it for Wan: [1, 512, 4096], the tokens after the
        prompt's `tokens` zeroed (ComfyUI pads to 512 and zeroes the masked ones), no pooled vector."""
        CATEGORY = "testing"
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "make"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                                 "tokens": ("INT", {"default": 16, "min": 1, "max": 512})}}

        def make(self, seed, tokens):
            g = torch.Generator().manual_seed(seed)
            cond = torch.randn(1, 512, 4096, generator=g)
            cond[:, tokens:] = 0
            return ([[cond, {"pooled_output": None}]],)

    NODE_CLASS_MAPPINGS = {"XDiTE2EWanConditioning": XDiTE2EWanConditioning}
''')


def _write_tiny_wan(path: Path, seed: int) -> None:
    from diffusers import WanTransformer3DModel

    from comfyui_xdit.tiny import fill_deterministic

    from .test_wan import wan_to_original

    model = WanTransformer3DModel(num_attention_heads=4, attention_head_dim=128, in_channels=16, out_channels=16,
                                  text_dim=4096, freq_dim=256, ffn_dim=256, num_layers=2)
    fill_deterministic(model, seed)
    save_file({k: v.contiguous() for k, v in wan_to_original(model).items()}, str(path))


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_wan")
    models = make_base(base, {"xdit_e2e_wan_cond.py": COND_NODE})
    for name, seed in ((T2V, 1357), (HIGH, 2468), (LOW, 3579)):
        _write_tiny_wan(models / name, seed)
    with running_comfyui(base) as server:
        yield server, base


def test_comfyui_detects_the_tiny_checkpoint_as_wan21_t2v(comfy):
    """ComfyUI's own loader (UNETLoader's load_diffusion_model) takes the file as supported_models.WAN21_T2V, every
    weight used, in fp32 on the CPU, with flow model sampling at shift 8 and the Wan21 latent format."""
    _, base = comfy
    code = textwrap.dedent(f"""
        import logging, sys
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
        import comfy.model_sampling, comfy.sd
        m = comfy.sd.load_diffusion_model({str(base / "models" / "diffusion_models" / T2V)!r})
        net = m.model.diffusion_model
        ms = m.model.model_sampling
        print("RESULT", type(m.model.model_config).__name__, type(net).__module__, len(net.blocks), net.num_heads,
              m.model.get_dtype(), isinstance(ms, comfy.model_sampling.ModelSamplingDiscreteFlow), ms.shift,
              type(m.model.latent_format).__name__)
    """)
    res = subprocess.run([comfy_python(), "-c", code], capture_output=True, text=True, cwd=COMFYUI_DIR, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "unet missing" not in res.stdout and "unet unexpected" not in res.stdout, res.stdout[-2000:]
    result = next(line for line in res.stdout.splitlines() if line.startswith("RESULT")).split()[1:]
    assert result[:4] == ["WAN21_T2V", "comfy.ldm.wan.model", "2", "4"]
    assert result[4:] == ["torch.float32", "True", "8.0", "Wan21"]


def _save(nid: str, src: str, prefix: str) -> dict:
    return {nid: {"class_type": "SaveLatent", "inputs": {"samples": [src, 0], "filename_prefix": prefix}}}


CONDS = {
    "1": {"class_type": "XDiTE2EWanConditioning", "inputs": {"seed": 1, "tokens": 13}},
    "2": {"class_type": "XDiTE2EWanConditioning", "inputs": {"seed": 2, "tokens": 5}},
}


@pytest.fixture(scope="module")
def ran(comfy):
    from queue_workflow import queue_and_wait

    server, base = comfy
    sampling = {"seed": 99, "steps": 4, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    common = {"positive": ["1", 0], "negative": ["2", 0], "latent_image": ["3", 0], **sampling}
    t2v = {
        **CONDS,
        "3": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 48, "height": 48, "length": 9,
                                                                  "batch_size": 1}},
        "4": {"class_type": "UNETLoader", "inputs": {"unet_name": T2V, "weight_dtype": "default"}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["4", 0], **common}},
        **_config("7", ulysses_degree=2, cfg_degree=2),
        "8": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0], "checkpoint": T2V,
                                                              "weight_dtype": "fp32", "family": "auto"}},
        "9": {"class_type": "XDiTParallelSampler", "inputs": {"model": ["8", 0], **common}},
        **_save("10", "5", "nativet2v"), **_save("11", "9", "xditt2v"),
    }
    progress = []
    _, entry_t2v = queue_and_wait(server, t2v, timeout=1200, log=progress.append)

    adv = {"noise_seed": 77, "steps": 4, "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple",
           "positive": ["1", 0], "negative": ["2", 0]}
    high = {**adv, "add_noise": "enable", "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}
    low = {**adv, "add_noise": "disable", "start_at_step": 2, "end_at_step": 10000,
           "return_with_leftover_noise": "disable"}
    experts = {
        **CONDS,
        "3": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 32, "length": 5,
                                                                  "batch_size": 1}},
        "4": {"class_type": "UNETLoader", "inputs": {"unet_name": HIGH, "weight_dtype": "default"}},
        "5": {"class_type": "UNETLoader", "inputs": {"unet_name": LOW, "weight_dtype": "default"}},
        "6": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["4", 0], "latent_image": ["3", 0], **high}},
        "12": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["5", 0], "latent_image": ["6", 0], **low}},
        "13": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["4", 0], "latent_image": ["6", 0], **low}},
        **_config("7", ring_degree=2),
        "8": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0], "checkpoint": HIGH,
                                                              "weight_dtype": "fp32", "family": "auto"}},
        "9": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0], "checkpoint": LOW,
                                                              "weight_dtype": "fp32", "family": "auto"}},
        "14": {"class_type": "XDiTParallelSamplerAdvanced", "inputs": {"model": ["8", 0], "latent_image": ["3", 0],
                                                                       **high}},
        "15": {"class_type": "XDiTParallelSamplerAdvanced", "inputs": {"model": ["9", 0], "latent_image": ["14", 0],
                                                                       **low}},
        **_save("20", "12", "nativeexperts"), **_save("21", "15", "xditexperts"), **_save("22", "13", "nativehigh"),
        **_save("23", "6", "nativestage1"), **_save("24", "14", "xditstage1"),
    }
    _, entry_experts = queue_and_wait(server, experts, timeout=1200, log=progress.append)
    return base, entry_t2v, entry_experts, progress


def test_wan_graphs_run(ran):
    _, t2v, experts, progress = ran
    assert t2v["status"]["status_str"] == "success", t2v["status"]
    assert experts["status"]["status_str"] == "success", experts["status"]
    assert "node 9: step 4/4" in progress  # our progress bar reached the UI's websocket
    assert "node 15: step 2/2" in progress


def test_parallel_sampler_matches_native_ksampler_on_video(ran):
    base = ran[0]
    native, ours = _latent(base, "nativet2v"), _latent(base, "xditt2v")
    assert ours.shape == native.shape == (1, 16, 3, 6, 6)
    assert native.abs().mean() > 0.01
    err = rel_l2(ours, native)
    print(f"Wan T2V 48x48x9 (27 tokens), ulysses 2 x cfg 2: rel L2 to native KSampler {err:.2e}")
    assert err <= 1e-5, err


def test_two_experts_match_native_ksampler_advanced_pair(ran):
    base = ran[0]
    native, ours = _latent(base, "nativeexperts"), _latent(base, "xditexperts")
    assert ours.shape == native.shape == (1, 16, 2, 4, 8)
    err1 = rel_l2(_latent(base, "xditstage1"), _latent(base, "nativestage1"))
    err = rel_l2(ours, native)
    print(f"Wan 2.2 two experts 64x32x5, ring 2: rel L2 to native KSamplerAdvanced pair {err:.2e} "
          f"(after the high-noise stage {err1:.2e})")
    assert err1 <= 1e-5, err1
    assert err <= 1e-5, err
    assert rel_l2(native, _latent(base, "nativehigh")) > 1e-3  # the low-noise expert mattered
