"""LoRA end to end in a real ComfyUI (skipped unless COMFYUI_DIR is set): the tiny checkpoints of the Flux,
Qwen-Image and Wan end-to-end files, each with two tiny LoRAs in models/loras, one in kohya's names and one in
diffusers' (Wan: ComfyUI/LightX2V's `diffusion_model.` names, ComfyUI 0.3.64 reads no diffusers Wan LoRA), stacked
at strengths 0.8 and -0.6. Native UNETLoader -> LoraLoaderModelOnly x2 -> KSampler against Load Parallel DiT ->
Parallel LoRA x2 -> Parallel Sampler (one CPU rank: the parallel layouts are checked against serial in
tests/test_lora.py): the latents must agree to 1e-5, and differ from the LoRA-free native result."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from . import lora_files as lf
from .comfy_server import COMFYUI_DIR, ROOT, make_base, running_comfyui, saved_latent as _latent
from .conftest import rel_l2

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
sys.path.insert(0, str(ROOT / "scripts"))


def _flux_layouts() -> tuple[dict, dict]:
    """(diffusers, original BFL) shapes of the Flux end-to-end checkpoint, from a meta-device build."""
    from diffusers import FluxTransformer2DModel

    from .test_weights import flux_to_bfl

    with torch.device("meta"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                       pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    return dict(model.state_dict()), flux_to_bfl(model)


def _write(folder: Path, name: str, sd: dict) -> str:
    save_file(sd, str(folder / name))
    return name


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    from .test_comfyui_e2e import COND_NODE as FLUX_COND
    from .test_comfyui_e2e import _write_tiny_flux
    from .test_comfyui_e2e_qwen import COND_NODE as QWEN_COND
    from .test_comfyui_e2e_qwen import _write_tiny_qwen
    from .test_comfyui_e2e_wan import COND_NODE as WAN_COND
    from .test_comfyui_e2e_wan import _write_tiny_wan

    base = tmp_path_factory.mktemp("comfy_lora")
    models = make_base(base, {"xdit_e2e_cond.py": FLUX_COND, "xdit_e2e_qwen_cond.py": QWEN_COND,
                              "xdit_e2e_wan_cond.py": WAN_COND})
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    _write_tiny_flux(models / "flux.safetensors")
    _write_tiny_qwen(models / "qwen.safetensors")
    _write_tiny_wan(models / "wan.safetensors", 1357)
    diff, bfl = _flux_layouts()
    qwen, wan = (load_file(str(models / f"{n}.safetensors")) for n in ("qwen", "wan"))
    # family -> two files: (name, writer, the layout its names are in, modules containing, seed, alpha)
    specs = {
        "flux": (("flux_kohya", lf.kohya, bfl, ("qkv", "linear1", "proj", "mlp"), 1, 2.0),
                 ("flux_diffusers", lf.diffusers, diff, ("to_q", "to_k", "to_v", "add_q_proj", "proj_out"), 2, None)),
        "qwen": (("qwen_kohya", lf.kohya, qwen, ("attn.to_", "attn.add_", "img_mlp"), 3, 2.0),
                 ("qwen_diffusers", lf.diffusers, qwen, ("attn.to_", "txt_mlp", "img_mod"), 4, None)),
        "wan": (("wan_kohya", lf.kohya, wan, ("self_attn", "cross_attn", "ffn"), 5, 2.0),
                ("wan_comfy", lf.comfy, wan, ("self_attn", "ffn", "head.head"), 6, None)),
    }
    files = {family: tuple(_write(loras, f"{name}.safetensors", writer(lf.draw_pairs(
        sd, lf.matrices(sd, include), 4, seed, alpha))) for name, writer, sd, include, seed, alpha in pair)
        for family, pair in specs.items()}
    del qwen, wan, diff, bfl, specs
    with running_comfyui(base) as server:
        yield server, base, files


def _graph(family: str, files: tuple[str, str]) -> dict:
    conds = {
        "flux": ({"class_type": "XDiTE2EConditioning", "inputs": {"seed": 3, "tokens": 32, "pooled": 768}},
                 {"class_type": "XDiTE2EConditioning", "inputs": {"seed": 4, "tokens": 32, "pooled": 768}}),
        "qwen": ({"class_type": "XDiTE2EQwenConditioning", "inputs": {"seed": 1, "tokens": 14, "pad": 0}},
                 {"class_type": "XDiTE2EQwenConditioning", "inputs": {"seed": 2, "tokens": 6, "pad": 0}}),
        "wan": ({"class_type": "XDiTE2EWanConditioning", "inputs": {"seed": 1, "tokens": 13}},
                {"class_type": "XDiTE2EWanConditioning", "inputs": {"seed": 2, "tokens": 5}}),
    }[family]
    latent = ({"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 48, "height": 48, "length": 9,
                                                                   "batch_size": 1}} if family == "wan" else
              {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}})
    cfg = 1.0 if family == "flux" else 3.0
    sampling = {"seed": 99, "steps": 3, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                "positive": ["1", 0], "negative": ["2", 0], "latent_image": ["3", 0]}
    (a, b), strengths = files, (0.8, -0.6)
    return {
        "1": conds[0], "2": conds[1], "3": latent,
        "4": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{family}.safetensors", "weight_dtype": "default"}},
        "5": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0], "lora_name": a,
                                                              "strength_model": strengths[0]}},
        "6": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["5", 0], "lora_name": b,
                                                              "strength_model": strengths[1]}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["6", 0], **sampling}},
        "11": {"class_type": "KSampler", "inputs": {"model": ["4", 0], **sampling}},
        "7": {"class_type": "XDiTConfigureHybridParallel", "inputs": {
            "device": "cpu", "ulysses_degree": 1, "ring_degree": 1, "pipefusion_degree": 1, "cfg_degree": 1,
            "dp_degree": 1, "num_patches": 0, "warmup_steps": 1, "attention": "auto"}},
        "8": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0],
                                                              "checkpoint": f"{family}.safetensors",
                                                              "weight_dtype": "fp32", "family": "auto"}},
        "12": {"class_type": "XDiTParallelLoRA", "inputs": {"model": ["8", 0], "lora_name": a,
                                                            "strength_model": strengths[0]}},
        "13": {"class_type": "XDiTParallelLoRA", "inputs": {"model": ["12", 0], "lora_name": b,
                                                            "strength_model": strengths[1]}},
        "14": {"class_type": "XDiTParallelSampler", "inputs": {"model": ["13", 0], **sampling}},
        "20": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": f"native{family}"}},
        "21": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": f"plain{family}"}},
        "22": {"class_type": "SaveLatent", "inputs": {"samples": ["14", 0], "filename_prefix": f"xdit{family}"}},
    }


@pytest.mark.parametrize("family", ["wan", "qwen", "flux"])
def test_parallel_lora_matches_native_lora_loader(comfy, family):
    from queue_workflow import queue_and_wait

    server, base, files = comfy
    _, entry = queue_and_wait(server, _graph(family, files[family]), timeout=1500, log=lambda line: None)
    assert entry["status"]["status_str"] == "success", entry["status"]
    log = (base / "comfyui.log").read_text(errors="replace")
    assert "lora key not loaded" not in log, log[-3000:]  # ComfyUI used every key of both files
    native, ours, plain = _latent(base, f"native{family}"), _latent(base, f"xdit{family}"), \
        _latent(base, f"plain{family}")
    assert ours.shape == native.shape
    err, effect = rel_l2(ours, native), rel_l2(plain, native)
    print(f"{family}: Parallel LoRA x2 vs LoraLoaderModelOnly x2 rel L2 {err:.2e} (LoRAs vs none {effect:.2e})")
    assert effect > 1e-3
    assert err <= 1e-5, err


def test_a_lora_of_another_family_is_refused_when_queued(comfy):
    """A Wan LoRA on the Flux checkpoint: POST /prompt answers 400 with the line the pool would refuse it with, on
    the Parallel LoRA node, and nothing runs (the native branch, which ComfyUI would run with a warning, is left
    out)."""
    from queue_workflow import Rejected, queue_and_wait

    server, base, files = comfy
    graph = _graph("flux", files["flux"])
    for nid in ("4", "5", "6", "10", "11", "20", "21"):
        del graph[nid]
    graph["22"]["inputs"]["filename_prefix"] = "xditwrongfamily"
    graph["13"]["inputs"]["lora_name"] = files["wan"][1]
    refusal = rf"node 13 \(XDiTParallelLoRA\): .*LoRA {files['wan'][1]}: does not fit a flux model \(Incompatible keys"
    with pytest.raises(Rejected, match=refusal):
        queue_and_wait(server, graph, timeout=600, log=lambda line: None)
    assert not list((base / "output").glob("xditwrongfamily_*"))
