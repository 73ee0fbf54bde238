"""End to end in a real ComfyUI (skipped unless COMFYUI_DIR points at a ComfyUI checkout with its dependencies;
COMFYUI_PYTHON picks its interpreter, default COMFYUI_DIR/.venv/bin/python, else this one).

The test gives ComfyUI a base directory of its own: this repository linked into custom_nodes, small DiTs written
here in models/diffusion_models that ComfyUI's model detection accepts (SD3-style with hidden = 64 x depth; Flux
and PixArt at their published widths, which ComfyUI's detection fixes, with 2 blocks; PixArt in its original key
layout), and a test-only node that makes seeded CONDITIONING (no text encoder download). It starts
`main.py --cpu` on loopback, checks /object_info, and queues API graphs that sample the same seed with the
native UNETLoader + KSampler and with our three nodes (Ulysses 2 or Ring 2 on two CPU ranks), saving both
latents; they must agree to 1e-4 (fp32, exact parallel methods), for euler and dpmpp_2m."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from .comfy_server import COMFYUI_DIR, ROOT, comfy_python, make_base, running_comfyui, saved_latent as _saved
from .conftest import rel_l2
from .node_views import options

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
sys.path.insert(0, str(ROOT / "scripts"))

COND_NODE = textwrap.dedent('''
    import torch

    class XDiTE2EConditioning:
        CATEGORY = "testing"
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "make"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                                 "tokens": ("INT", {"default": 16, "min": 1, "max": 512})},
                    "optional": {"pooled": ("INT", {"default": 2048, "min": 0, "max": 4096})}}

        def make(self, seed, tokens, pooled=2048):
            g = torch.Generator().manual_seed(seed)
            cond = torch.randn(1, tokens, 4096, generator=g)
            return ([[cond, {"pooled_output": torch.randn(1, pooled, generator=g)} if pooled else {}]],)

    NODE_CLASS_MAPPINGS = {"XDiTE2EConditioning": XDiTE2EConditioning}
''')


def _write_tiny_sd3(path: Path) -> None:
    from diffusers import SD3Transformer2DModel

    from comfyui_xdit.tiny import fill_deterministic

    depth = 4  # heads = depth, head size 64: ComfyUI's MMDiT rule and the engine's (>= 4 heads of 64) agree
    model = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=depth,
                                  attention_head_dim=64, num_attention_heads=depth, joint_attention_dim=4096,
                                  caption_projection_dim=64 * depth, pooled_projection_dim=2048, out_channels=16,
                                  pos_embed_max_size=32)
    fill_deterministic(model, 1234)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _write_tiny_flux(path: Path) -> None:
    """Flux.1-dev's width (ComfyUI's detection fixes hidden 3072 = 24 heads of 128) with the guidance embedder,
    but 1 double + 1 single block: about 0.5 B parameters, 2 GB in fp32; diffusers layout."""
    from diffusers import FluxTransformer2DModel

    from comfyui_xdit.tiny import fill_deterministic

    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    fill_deterministic(model, 4321)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _write_tiny_pixart(path: Path) -> None:
    """PixArt-Sigma's width (ComfyUI's detection fixes 1152 = 16 heads of 72) with 2 blocks, 512px positions, in
    the original key layout ComfyUI detects."""
    from diffusers import PixArtTransformer2DModel

    from comfyui_xdit.tiny import fill_deterministic

    from .test_weights import pixart_to_original

    model = PixArtTransformer2DModel(sample_size=64, num_layers=2, attention_head_dim=72, num_attention_heads=16,
                                     in_channels=4, out_channels=8, caption_channels=4096, cross_attention_dim=1152,
                                     use_additional_conditions=False, norm_type="ada_norm_single",
                                     norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1)
    fill_deterministic(model, 999)
    save_file({k: v.contiguous() for k, v in pixart_to_original(model).items()}, str(path))


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    models = make_base(base, {"xdit_e2e_cond.py": COND_NODE})
    _write_tiny_sd3(models / "tiny_sd3_e2e.safetensors")
    _write_tiny_flux(models / "tiny_flux_e2e.safetensors")
    _write_tiny_pixart(models / "tiny_pixart_e2e.safetensors")
    with running_comfyui(base) as server:
        yield server, base


def test_nodes_registered(comfy):
    server, _ = comfy
    info = json.load(urllib.request.urlopen(server + "/object_info", timeout=30))
    for name in ("XDiTConfigureHybridParallel", "XDiTLoadParallelDiT", "XDiTParallelSampler"):
        assert name in info and info[name]["category"] == "xDiT"
    assert "tiny_sd3_e2e.safetensors" in options(info["XDiTLoadParallelDiT"]["input"]["required"]["checkpoint"])
    assert info["XDiTParallelSampler"]["output"] == ["LATENT"]
    ours = options(info["XDiTParallelSampler"]["input"]["required"]["scheduler"])
    assert ours == options(info["KSampler"]["input"]["required"]["scheduler"])  # every scheduler ComfyUI has


@pytest.fixture(scope="module")
def ran(comfy):
    from queue_workflow import queue_and_wait

    server, base = comfy
    steps, seed, cfg = 6, 1234, 3.0
    sampling = {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
                "denoise": 1.0}
    dpm = {**sampling, "sampler_name": "dpmpp_2m", "scheduler": "karras"}
    graph = {
        "1": {"class_type": "XDiTE2EConditioning", "inputs": {"seed": 1, "tokens": 16}},
        "2": {"class_type": "XDiTE2EConditioning", "inputs": {"seed": 2, "tokens": 16}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "4": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd3_e2e.safetensors",
                                                     "weight_dtype": "default"}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["1", 0], "negative": ["2", 0],
                                                   "latent_image": ["3", 0], **sampling}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "native"}},
        "7": {"class_type": "XDiTConfigureHybridParallel", "inputs": {
            "device": "cpu", "ulysses_degree": 2, "ring_degree": 1, "pipefusion_degree": 1, "cfg_degree": 1,
            "dp_degree": 1, "num_patches": 0, "warmup_steps": 1, "attention": "auto"}},
        "8": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0],
                                                              "checkpoint": "tiny_sd3_e2e.safetensors",
                                                              "weight_dtype": "fp32", "family": "auto"}},
        "9": {"class_type": "XDiTParallelSampler", "inputs": {"model": ["8", 0], "positive": ["1", 0],
                                                              "negative": ["2", 0], "latent_image": ["3", 0],
                                                              **sampling}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "xdit"}},
        # the same pair with DPM-Solver++(2M) on Karras noise levels
        "11": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["1", 0], "negative": ["2", 0],
                                                    "latent_image": ["3", 0], **dpm}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "ksdpm"}},
        "13": {"class_type": "XDiTParallelSampler", "inputs": {"model": ["8", 0], "positive": ["1", 0],
                                                               "negative": ["2", 0], "latent_image": ["3", 0],
                                                               **dpm}},
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "xddpm"}},
        # EmptyLatentImage's 4 channels: both samplers widen it to SD3's 16 with this ComfyUI's own function
        "15": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "16": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["1", 0], "negative": ["2", 0],
                                                    "latent_image": ["15", 0], **sampling}},
        "17": {"class_type": "SaveLatent", "inputs": {"samples": ["16", 0], "filename_prefix": "native4ch"}},
        "18": {"class_type": "XDiTParallelSampler", "inputs": {"model": ["8", 0], "positive": ["1", 0],
                                                               "negative": ["2", 0], "latent_image": ["15", 0],
                                                               **sampling}},
        "19": {"class_type": "SaveLatent", "inputs": {"samples": ["18", 0], "filename_prefix": "xdit4ch"}},
    }
    progress = []
    pid, entry = queue_and_wait(server, graph, timeout=600, log=progress.append)
    return base, entry, progress, steps


def test_workflow_runs_with_progress(ran):
    base, entry, progress, steps = ran
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert f"node 9: step {steps}/{steps}" in progress  # our progress bar reached the UI's websocket
    assert sorted((base / "output").glob("xdit_*.latent")) and sorted((base / "output").glob("native_*.latent"))


def test_parallel_sampler_matches_native_ksampler(ran):
    base = ran[0]

    def latent(prefix):
        files = sorted((base / "output").glob(f"{prefix}_*.latent"))
        assert files, f"no {prefix} latent saved"
        return load_file(str(files[-1]))["latent_tensor"].float()

    for native_prefix, our_prefix in (("native", "xdit"), ("ksdpm", "xddpm"), ("native4ch", "xdit4ch")):
        native, ours = latent(native_prefix), latent(our_prefix)
        assert ours.shape == native.shape == (1, 16, 16, 16)
        assert rel_l2(ours, native) <= 1e-4, (our_prefix, rel_l2(ours, native))
        assert native.abs().mean() > 0.01
    assert rel_l2(latent("ksdpm"), latent("native")) > 1e-3  # the two samplers differ: the check above can fail


def test_cancel_stops_the_job_and_the_pool_stays_usable(comfy, ran):
    from queue_workflow import http, queue_and_wait

    server, base = comfy

    def graph(seed, steps):
        return {
            "1": {"class_type": "XDiTE2EConditioning", "inputs": {"seed": 1, "tokens": 16}},
            "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
            "7": {"class_type": "XDiTConfigureHybridParallel", "inputs": {
                "device": "cpu", "ulysses_degree": 2, "ring_degree": 1, "pipefusion_degree": 1, "cfg_degree": 1,
                "dp_degree": 1, "num_patches": 0, "warmup_steps": 1, "attention": "auto"}},
            "8": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0],
                                                                  "checkpoint": "tiny_sd3_e2e.safetensors",
                                                                  "weight_dtype": "fp32", "family": "auto"}},
            "9": {"class_type": "XDiTParallelSampler", "inputs": {
                "model": ["8", 0], "positive": ["1", 0], "negative": ["1", 0], "latent_image": ["3", 0],
                "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                "denoise": 1.0}},
            "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": f"cancel{seed}"}},
        }

    events = []

    def log(line):
        events.append((time.monotonic(), line))
        if line == "node 9: step 2/2000":
            http(server, "/interrupt", {})

    with pytest.raises(RuntimeError, match="interrupted"):
        queue_and_wait(server, graph(5, 2000), timeout=300, log=log)
    stepped = [line for _, line in events if line.startswith("node 9: step")]
    assert 2 <= len(stepped) < 100, stepped[-3:]
    _, entry = queue_and_wait(server, graph(6, 3), timeout=300, log=lambda line: None)
    assert entry["status"]["status_str"] == "success"
    assert sorted((base / "output").glob("cancel6_*.latent")) and not sorted((base / "output").glob("cancel5_*"))


def test_flux_parallel_sampler_matches_native_ksampler(comfy, ran):
    """Flux-dev with FluxGuidance and cfg 1 (no negative), as Flux.1-dev workflows run; Ulysses 2 x Ring 2 would
    need four ranks, so Ring 2 here (Ulysses is covered by the SD3 graph)."""
    from queue_workflow import queue_and_wait

    server, base = comfy
    sampling = {"seed": 77, "steps": 5, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    graph = {
        "1": {"class_type": "XDiTE2EConditioning", "inputs": {"seed": 3, "tokens": 32, "pooled": 768}},
        "2": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["1", 0], "guidance": 2.5}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "4": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux_e2e.safetensors",
                                                     "weight_dtype": "default"}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                   "latent_image": ["3", 0], **sampling}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "fluxnative"}},
        "7": {"class_type": "XDiTConfigureHybridParallel", "inputs": {
            "device": "cpu", "ulysses_degree": 1, "ring_degree": 2, "pipefusion_degree": 1, "cfg_degree": 1,
            "dp_degree": 1, "num_patches": 0, "warmup_steps": 1, "attention": "auto"}},
        "8": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0],
                                                              "checkpoint": "tiny_flux_e2e.safetensors",
                                                              "weight_dtype": "fp32", "family": "auto"}},
        "9": {"class_type": "XDiTParallelSampler", "inputs": {"model": ["8", 0], "positive": ["2", 0],
                                                              "negative": ["2", 0], "latent_image": ["3", 0],
                                                              **sampling}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "fluxxdit"}},
    }
    _, entry = queue_and_wait(server, graph, timeout=600, log=lambda line: None)
    assert entry["status"]["status_str"] == "success", entry["status"]

    def latent(prefix):
        files = sorted((base / "output").glob(f"{prefix}_*.latent"))
        assert files, f"no {prefix} latent saved"
        return load_file(str(files[-1]))["latent_tensor"].float()

    native, ours = latent("fluxnative"), latent("fluxxdit")
    assert ours.shape == native.shape == (1, 16, 16, 16)
    assert native.abs().mean() > 0.01
    assert rel_l2(ours, native) <= 1e-4, rel_l2(ours, native)


def test_pixart_parallel_sampler_matches_native_ksampler(comfy, ran):
    """PixArt-Sigma (epsilon model, learned sigma, 4-channel latent) with true CFG, Ulysses 2, Euler and
    DPM-Solver++(2M) on Karras levels; sgm_uniform with an even step count (levels half-way between two training
    timesteps) and kl_optimal, one of the schedulers added later."""
    from queue_workflow import queue_and_wait

    server, base = comfy
    graph = {
        "1": {"class_type": "XDiTE2EConditioning", "inputs": {"seed": 5, "tokens": 24, "pooled": 0}},
        "2": {"class_type": "XDiTE2EConditioning", "inputs": {"seed": 6, "tokens": 24, "pooled": 0}},
        # ComfyUI's PixArt derives its position-embedding scale from the image size (512 px and up)
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "4": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_pixart_e2e.safetensors",
                                                     "weight_dtype": "default"}},
        "7": {"class_type": "XDiTConfigureHybridParallel", "inputs": {
            "device": "cpu", "ulysses_degree": 2, "ring_degree": 1, "pipefusion_degree": 1, "cfg_degree": 1,
            "dp_degree": 1, "num_patches": 0, "warmup_steps": 1, "attention": "auto"}},
        "8": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0],
                                                              "checkpoint": "tiny_pixart_e2e.safetensors",
                                                              "weight_dtype": "fp32", "family": "auto"}},
    }
    pairs = (("euler", "simple"), ("dpmpp_2m", "karras"), ("euler", "sgm_uniform"), ("dpmpp_2m", "kl_optimal"))
    for n, (sampler, scheduler) in enumerate(pairs):
        sampling = {"seed": 11, "steps": 4, "cfg": 4.0, "sampler_name": sampler, "scheduler": scheduler,
                    "denoise": 1.0}
        common = {"positive": ["1", 0], "negative": ["2", 0], "latent_image": ["3", 0], **sampling}
        graph[f"{20 + n}"] = {"class_type": "KSampler", "inputs": {"model": ["4", 0], **common}}
        graph[f"{30 + n}"] = {"class_type": "XDiTParallelSampler", "inputs": {"model": ["8", 0], **common}}
        graph[f"{40 + n}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{20 + n}", 0],
                                                                    "filename_prefix": f"pxnative{sampler}{scheduler}"}}
        graph[f"{50 + n}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{30 + n}", 0],
                                                                    "filename_prefix": f"pxxdit{sampler}{scheduler}"}}
    _, entry = queue_and_wait(server, graph, timeout=600, log=lambda line: None)
    assert entry["status"]["status_str"] == "success", entry["status"]

    def latent(prefix):
        files = sorted((base / "output").glob(f"{prefix}_*.latent"))
        assert files, f"no {prefix} latent saved"
        return load_file(str(files[-1]))["latent_tensor"].float()

    for sampler, scheduler in pairs:
        native, ours = latent(f"pxnative{sampler}{scheduler}"), latent(f"pxxdit{sampler}{scheduler}")
        assert ours.shape == native.shape == (1, 4, 64, 64)
        assert native.abs().mean() > 0.01
        print(f"PixArt {sampler}/{scheduler}: rel L2 to native KSampler {rel_l2(ours, native):.2e}")
        assert rel_l2(ours, native) <= 1e-4, (sampler, scheduler, rel_l2(ours, native))


def test_advanced_node_has_ksampler_advanceds_inputs(comfy):
    server, _ = comfy
    info = json.load(urllib.request.urlopen(server + "/object_info", timeout=30))
    ours, native = info["XDiTParallelSamplerAdvanced"], info["KSamplerAdvanced"]
    assert ours["category"] == "xDiT" and ours["output"] == native["output"] == ["LATENT"]
    assert list(ours["input"]["required"]) == list(native["input"]["required"])
    assert list(ours["input_order"]["required"]) == list(native["input_order"]["required"])
    for name, conf in native["input"]["required"].items():
        if name == "model":
            assert ours["input"]["required"][name][0] == "XDIT_MODEL"
        elif name == "sampler_name":  # the samplers the pool runs, a subset of ComfyUI's
            assert set(options(ours["input"]["required"][name])) <= set(options(conf))
        else:  # the same choices and defaults
            assert options(ours["input"]["required"][name]) == options(conf), name
            if options(conf) is None:
                assert ours["input"]["required"][name][0] == conf[0], name
            mine = ours["input"]["required"][name][1] if len(ours["input"]["required"][name]) > 1 else {}
            theirs = conf[1] if len(conf) > 1 else {}
            for key in ("default", "min", "max"):
                assert mine.get(key) == theirs.get(key), (name, key)


ADVANCED_FAMILIES = {  # checkpoint, latent node and size, conditioning, parallel degrees
    "sd3": ("tiny_sd3_e2e.safetensors", "EmptySD3LatentImage", 128, dict(tokens=16), dict(ulysses_degree=2)),
    "pixart": ("tiny_pixart_e2e.safetensors", "EmptyLatentImage", 512, dict(tokens=24, pooled=0),
               dict(ulysses_degree=2)),
}


@pytest.mark.parametrize("family", list(ADVANCED_FAMILIES))
def test_advanced_sampler_matches_native_ksampler_advanced(comfy, family):
    """Parallel Sampler (Advanced) against native KSamplerAdvanced: a single stage over the whole schedule, a first
    stage that returns its leftover noise (flow models: ComfyUI's inverse noise scaling), and the two-sampler graph
    Wan 2.2 workflows use (noise added, steps 0..3 with leftover noise; the second without noise, 3..end), with Euler
    and DPM-Solver++(2M), the same model for both stages."""
    from queue_workflow import queue_and_wait

    server, base = comfy
    checkpoint, latent_node, side, cond, degrees = ADVANCED_FAMILIES[family]
    config = {"device": "cpu", "ulysses_degree": 1, "ring_degree": 1, "pipefusion_degree": 1, "cfg_degree": 1,
              "dp_degree": 1, "num_patches": 0, "warmup_steps": 1, "attention": "auto", **degrees}
    graph = {
        "1": {"class_type": "XDiTE2EConditioning", "inputs": {"seed": 21, **cond}},
        "2": {"class_type": "XDiTE2EConditioning", "inputs": {"seed": 22, **cond}},
        "3": {"class_type": latent_node, "inputs": {"width": side, "height": side, "batch_size": 1}},
        "4": {"class_type": "UNETLoader", "inputs": {"unet_name": checkpoint, "weight_dtype": "default"}},
        "7": {"class_type": "XDiTConfigureHybridParallel", "inputs": config},
        "8": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0], "checkpoint": checkpoint,
                                                              "weight_dtype": "fp32", "family": "auto"}},
    }
    steps, split = 6, 3
    n = [100]

    def add(kind, latent, add_noise, start, end, leftover, sampler, save=None):
        nid = str(n[0])
        n[0] += 1
        model = ["4", 0] if kind == "KSamplerAdvanced" else ["8", 0]
        graph[nid] = {"class_type": kind, "inputs": {
            "model": model, "add_noise": add_noise, "noise_seed": 99, "steps": steps, "cfg": 3.5,
            "sampler_name": sampler, "scheduler": "simple" if sampler == "euler" else "karras",
            "positive": ["1", 0], "negative": ["2", 0], "latent_image": latent, "start_at_step": start,
            "end_at_step": end, "return_with_leftover_noise": leftover}}
        if save:
            graph[str(n[0])] = {"class_type": "SaveLatent", "inputs": {"samples": [nid, 0],
                                                                      "filename_prefix": save}}
            n[0] += 1
        return [nid, 0]

    cases = []
    for kind, tag in (("KSamplerAdvanced", "native"), ("XDiTParallelSamplerAdvanced", "xdit")):
        for sampler in ("euler", "dpmpp_2m"):
            pre = f"adv{family}{sampler}"
            add(kind, ["3", 0], "enable", 0, 10000, "disable", sampler, f"{pre}single{tag}")
            first = add(kind, ["3", 0], "enable", 0, split, "enable", sampler, f"{pre}first{tag}")
            add(kind, first, "disable", split, 10000, "disable", sampler, f"{pre}second{tag}")
            if tag == "native":
                cases += [f"{pre}single", f"{pre}first", f"{pre}second"]
    _, entry = queue_and_wait(server, graph, timeout=900, log=lambda line: None)
    assert entry["status"]["status_str"] == "success", entry["status"]

    for case in cases:
        native, ours = _saved(base, case + "native"), _saved(base, case + "xdit")
        assert ours.shape == native.shape and native.abs().mean() > 0.01
        err = rel_l2(ours, native)
        print(f"{case}: rel L2 to native KSamplerAdvanced {err:.2e}")
        assert err <= 1e-5, (case, err)
    for sampler in ("euler", "dpmpp_2m"):  # the stages differ from each other: the checks above can fail
        pre = f"adv{family}{sampler}"
        assert rel_l2(_saved(base, pre + "firstnative"), _saved(base, pre + "singlenative")) > 1e-2
    # Euler carries no state between steps: natively too, the two stages give the one-run latent
    pre = f"adv{family}euler"
    assert rel_l2(_saved(base, pre + "secondnative"), _saved(base, pre + "singlenative")) <= 1e-5


def _post(server: str, graph: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server + "/prompt", data=json.dumps({"prompt": graph}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _refusal_graph(config: dict, checkpoint="tiny_flux_e2e.safetensors", cfg=1.0, batch=1) -> dict:
    conf = {"device": "cpu", "ulysses_degree": 1, "ring_degree": 1, "pipefusion_degree": 1, "cfg_degree": 1,
            "dp_degree": 1, "num_patches": 0, "warmup_steps": 1, "attention": "auto", **config}
    return {
        "1": {"class_type": "XDiTE2EConditioning", "inputs": {"seed": 3, "tokens": 8, "pooled": 768}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": batch}},
        "7": {"class_type": "XDiTConfigureHybridParallel", "inputs": conf},
        "8": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0], "checkpoint": checkpoint,
                                                              "weight_dtype": "fp32", "family": "auto"}},
        "9": {"class_type": "XDiTParallelSampler", "inputs": {
            "model": ["8", 0], "positive": ["1", 0], "negative": ["1", 0], "latent_image": ["3", 0], "seed": 1,
            "steps": 2, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "refused"}},
    }


@pytest.mark.parametrize("config, graph, node, reason", [
    (dict(pipefusion_degree=4, num_patches=2), {}, "7", "num_patches (2) must be at least the pipefusion degree"),
    (dict(ulysses_degree=5), {}, "7", "ulysses_degree 5 does not divide the 24 attention heads of tiny_flux_e2e"),
    (dict(pipefusion_degree=3), {}, "7", "pipefusion_degree 3 is larger than the 2 transformer blocks"),
    (dict(cfg_degree=2), dict(cfg=1.0), "9", "cfg_degree 2 runs the negative branch"),
    (dict(dp_degree=2), dict(batch=1), "9", "dp_degree 2 is larger than the batch size 1"),
])
def test_invalid_combinations_refused_when_queued(comfy, config, graph, node, reason):
    """POST /prompt answers 400 before anything runs (no pool of the wrong size is started), with one error on the
    offending node: not one per input."""
    server, base = comfy
    status, body = _post(server, _refusal_graph(config, **graph))
    assert status == 400, body
    errors = body["node_errors"]
    assert list(errors) == [node], errors
    (only,) = errors[node]["errors"]
    assert reason in only["details"] and "\n" not in only["details"]


def test_damaged_checkpoint_refused_when_queued(comfy):
    server, base = comfy
    models = base / "models" / "diffusion_models"
    good = (models / "tiny_sd3_e2e.safetensors").read_bytes()
    (models / "truncated_e2e.safetensors").write_bytes(good[: len(good) // 2])
    status, body = _post(server, _refusal_graph({}, checkpoint="truncated_e2e.safetensors"))
    assert status == 400
    (only,) = body["node_errors"]["8"]["errors"]
    assert "checkpoint truncated_e2e.safetensors is damaged or truncated" in only["details"]


def test_quantised_checkpoint_and_unknown_choice_refused_when_queued(comfy):
    """A checkpoint the newer ComfyUI quantised to nvfp4 (its .comfy_quant markers, tests/test_comfy_quant.py) and a
    value not among a V3 combo's choices (which ComfyUI 0.3.64's own validation does not check): 400 with one line
    on the Load node, naming the format / the input."""
    from .test_comfy_quant import _quantised

    server, base = comfy
    sd, _ = _quantised("nvfp4")
    save_file(sd, str(base / "models" / "diffusion_models" / "nvfp4_e2e.safetensors"))
    status, body = _post(server, _refusal_graph({}, checkpoint="nvfp4_e2e.safetensors"))
    assert status == 400, body
    (only,) = body["node_errors"]["8"]["errors"]
    assert "checkpoint nvfp4_e2e.safetensors is quantised by ComfyUI as nvfp4 (" in only["details"]
    assert "\n" not in only["details"]
    graph = _refusal_graph({})
    graph["8"]["inputs"]["weight_dtype"] = "int4"
    status, body = _post(server, graph)
    assert status == 400, body
    (only,) = body["node_errors"]["8"]["errors"]
    assert only["details"].startswith("checkpoint - 'int4' is not among weight_dtype's choices (bf16, ")


def test_pool_log_path_in_comfyui_log(comfy, ran):
    _, base = comfy
    text = (base / "comfyui.log").read_text(errors="replace")
    paths = [line.rsplit("its log: ", 1)[1].strip() for line in text.splitlines() if "starting worker pool" in line
             and "its log: " in line]
    assert paths and Path(paths[0]).is_file(), text[-2000:]


def test_recorded_sigma_tables_and_sampling_settings_are_this_comfyuis():
    """tests/data/comfyui_sigmas.json (the stand-ins' calculate_sigmas and sigma ranges in CI) and the stand-ins'
    supported_models sampling settings and model types against this ComfyUI's own code."""
    from . import comfy_standins as cs

    standin = cs.install(cs.Recorder())
    models, types = standin["comfy.supported_models"], standin["comfy.model_base"].ModelType
    names = [n for n, v in vars(models).items() if isinstance(v, type)]
    code = textwrap.dedent("""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("recorded_sigmas", sys.argv[1])
        rs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rs)
        table = rs.compute(rs.table_entries(json.loads(rs.TABLE.read_text())))
        import comfy.model_base, comfy.supported_models
        settings = {n: dict(getattr(comfy.supported_models, n).sampling_settings) for n in sys.argv[2].split(",")}
        types = {t.name: t.value for t in comfy.model_base.ModelType}
        print(json.dumps([table, settings, types]))
    """)
    res = subprocess.run([comfy_python(), "-c", code, str(ROOT / "tests" / "recorded_sigmas.py"), ",".join(names)],
                         capture_output=True, text=True, cwd=COMFYUI_DIR, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-2000:]
    table, settings, real_types = json.loads(res.stdout.strip().splitlines()[-1])
    recorded = json.loads((ROOT / "tests" / "data" / "comfyui_sigmas.json").read_text())
    assert table["model_sampling"].keys() == recorded["model_sampling"].keys()
    for key, got in table["model_sampling"].items():
        assert got == pytest.approx(recorded["model_sampling"][key], rel=1e-6), key
    assert table["sigmas"].keys() == recorded["sigmas"].keys() and len(table["sigmas"]) > 300
    for key, got in table["sigmas"].items():  # to float32 rounding: exp/log kernels differ by an ulp between CPUs
        assert got == pytest.approx(recorded["sigmas"][key], rel=1e-6, abs=1e-12), key
    for name in names:
        assert settings[name] == dict(getattr(models, name).sampling_settings), name
    assert {t.name: real_types[t.name] for t in types} == {t.name: t.value for t in types}


def test_latents_and_masks_through_this_comfyuis_own_objects():
    """The nodes' empty-latent fixing (ComfyUI's fix_empty_latent_channels with its latent format object of each
    variant) and attention-mask detection run on this ComfyUI's code, imported without a server: every variant's
    EmptyLatentImage latent gets the model's channels (and a video format's frame axis), and the probe reads this
    ComfyUI's model_base classes: QwenImage drops a padded prompt's mask (0.3.64), HunyuanImage21 passes it on."""
    code = textwrap.dedent("""
        import importlib, json, sys, types
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import torch
        import comfy.model_base
        root = sys.argv[1]
        sys.path.append(root)  # comfyui_xdit; ComfyUI's own `nodes` stays first
        for name, path in (("xdit_ext", root), ("xdit_ext.nodes", root + "/nodes")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg
        cv = importlib.import_module("xdit_ext.nodes.convert")
        fam = importlib.import_module("xdit_ext.nodes.families")
        out = {}
        for variant, s in fam.VARIANTS.items():
            lat = cv.latent_input({"samples": torch.zeros(2, 4, 12, 16)}, variant)["samples"]
            kept = cv.unchanged_latent({"samples": torch.zeros(2, 4, 12, 16)}, variant)["samples"]
            out[variant] = dict(spec=[s.channels, s.dims, s.frame_axis], latent=list(lat.shape),
                                unchanged=list(kept.shape), zero=not bool(lat.any()),
                                mask=fam.applies_text_mask(variant))
        probe = {n: fam._passes_attention_mask(getattr(comfy.model_base, n)) for n in ("QwenImage", "HunyuanImage21")}
        print(json.dumps([out, probe]))
    """)
    res = subprocess.run([comfy_python(), "-c", code, str(ROOT)], capture_output=True, text=True, cwd=COMFYUI_DIR,
                         timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-2000:]
    out, probe = json.loads(res.stdout.strip().splitlines()[-1])
    assert probe == {"QwenImage": False, "HunyuanImage21": True}
    assert len(out) > 10
    for variant, got in out.items():
        channels, dims, frame_axis = got["spec"]
        image = [2, channels, 12, 16]
        assert got["latent"] == (image[:2] + [1] + image[2:] if dims == 3 else image), variant
        assert got["unchanged"] == (image[:2] + [1] + image[2:] if dims == 3 or frame_axis else image), variant
        assert got["zero"] and got["mask"] == (not variant.startswith("qwen-image")), variant


def test_recorded_pixart_timesteps_are_this_comfyuis(comfy):
    """tests/data/comfyui_pixart_timesteps.json (used in CI) against this ComfyUI's own code."""
    code = textwrap.dedent("""
        import json, sys
        from types import SimpleNamespace
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import comfy.model_base, comfy.samplers, comfy.supported_models
        settings = comfy.supported_models.PixArtSigma.sampling_settings
        ms = comfy.model_base.model_sampling(SimpleNamespace(sampling_settings=settings),
                                             comfy.model_base.ModelType.EPS)
        out = []
        for case in json.load(sys.stdin)["cases"]:
            sig = comfy.samplers.calculate_sigmas(ms, case["scheduler"], case["steps"])
            out.append([sig.tolist(), [int(ms.timestep(sig[i:i + 1].clone())) for i in range(len(sig) - 1)]])
        print(json.dumps(out))
    """)
    data = (ROOT / "tests" / "data" / "comfyui_pixart_timesteps.json").read_text()
    res = subprocess.run([comfy_python(), "-c", code], input=data, capture_output=True, text=True, cwd=COMFYUI_DIR,
                         timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for case, (sigmas, timesteps) in zip(json.loads(data)["cases"], got):
        # the sigmas to float32 rounding (exp/log kernels differ by an ulp between CPU models), the steps exactly
        assert sigmas == pytest.approx(case["sigmas"], rel=1e-6, abs=1e-12), case["scheduler"]
        assert timesteps == case["timesteps"], case["scheduler"]
