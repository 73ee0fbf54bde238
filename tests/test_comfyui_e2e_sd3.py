"""SD3 end to end in a real ComfyUI (skipped unless COMFYUI_DIR is set), on the tiny SD3 checkpoint of
tests/test_comfyui_e2e.py (diffusers layout; ComfyUI loads it into its MMDiT names):

- LoRAs in the MMDiT layout, one in kohya's names (`lora_unet_joint_blocks_*`) and one in ComfyUI's
  (`diffusion_model.joint_blocks.*`): native UNETLoader -> LoraLoaderModelOnly -> KSampler against Load Parallel
  DiT -> Parallel LoRA -> Parallel Sampler (one CPU rank; the parallel layouts with a LoRA set are checked against
  serial in tests/test_lora.py), each file alone and both stacked; the latents must agree to 1e-5 and differ from
  the LoRA-free result.
- a negative of another token count than the positive (16 and 7 tokens), which native KSampler runs as two
  forwards: Parallel Sampler at Ulysses 2 and at CFG 2 against native KSampler."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from . import lora_files as lf
from .comfy_server import COMFYUI_DIR, ROOT, make_base, running_comfyui, saved_latent as _latent, config_node as _config
from .conftest import rel_l2

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
sys.path.insert(0, str(ROOT / "scripts"))

CHECKPOINT = "sd3.safetensors"
LORAS = {"kohya": "sd3_kohya.safetensors", "comfy": "sd3_comfy.safetensors"}


def _mmdit_layout(path: Path) -> dict:
    """The checkpoint's shapes in ComfyUI's (the original) MMDiT names, from a meta-device build of its config."""
    from diffusers import SD3Transformer2DModel

    from comfyui_xdit import families

    from .test_weights import sd3_to_mmdit

    cfg = families.get("sd3").infer_config(load_file(str(path)), {})
    with torch.device("meta"):
        model = SD3Transformer2DModel(**cfg)
    return sd3_to_mmdit(model)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    from .test_comfyui_e2e import COND_NODE, _write_tiny_sd3

    base = tmp_path_factory.mktemp("comfy_sd3")
    models = make_base(base, {"xdit_e2e_cond.py": COND_NODE})
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    _write_tiny_sd3(models / CHECKPOINT)
    mmdit = _mmdit_layout(models / CHECKPOINT)
    # kohya: attention (fused qkv, output projections), MLPs, every adaLN (the last block's context one and the final
    # layer's have their scale/shift halves swapped in diffusers' layout); ComfyUI: qkv, projections, the final
    # layer, the embedders
    save_file(lf.kohya(lf.draw_pairs(mmdit, lf.matrices(mmdit, ("attn", "mlp", "adaLN")), 4, 1, 2.0)),
              str(loras / LORAS["kohya"]))
    save_file(lf.comfy(lf.draw_pairs(mmdit, lf.matrices(mmdit, ("qkv", "proj", "final_layer", "embedder")), 4, 2)),
              str(loras / LORAS["comfy"]))
    with running_comfyui(base) as server:
        yield server, base


def _common(neg_tokens: int) -> tuple[dict, dict]:
    """(conditioning, latent and loader nodes, sampling inputs)."""
    nodes = {
        "1": {"class_type": "XDiTE2EConditioning", "inputs": {"seed": 1, "tokens": 16}},
        "2": {"class_type": "XDiTE2EConditioning", "inputs": {"seed": 2, "tokens": neg_tokens}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "4": {"class_type": "UNETLoader", "inputs": {"unet_name": CHECKPOINT, "weight_dtype": "default"}},
    }
    sampling = {"seed": 99, "steps": 3, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                "positive": ["1", 0], "negative": ["2", 0], "latent_image": ["3", 0]}
    return nodes, sampling


def _save(nid: str, source: str, prefix: str) -> dict:
    return {nid: {"class_type": "SaveLatent", "inputs": {"samples": [source, 0], "filename_prefix": prefix}}}


# case -> [(file, strength)]
LORA_CASES = {"kohya": [("kohya", 0.8)], "comfy": [("comfy", -0.6)], "both": [("kohya", 0.8), ("comfy", -0.6)]}


def test_mmdit_layout_loras_match_native_lora_loader(comfy):
    from queue_workflow import queue_and_wait

    server, base = comfy
    graph, sampling = _common(16)
    graph.update(_config("7"))
    graph["8"] = {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0],
                                                                  "checkpoint": CHECKPOINT, "weight_dtype": "fp32",
                                                                  "family": "auto"}}
    graph["10"] = {"class_type": "KSampler", "inputs": {"model": ["4", 0], **sampling}}
    graph.update(_save("11", "10", "sd3plain"))
    for n, (case, files) in enumerate(LORA_CASES.items()):
        native, ours = "4", "8"
        for m, (which, strength) in enumerate(files):
            nid, xid = f"{20 + 10 * n + m}", f"{25 + 10 * n + m}"
            graph[nid] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": [native, 0], "lora_name": LORAS[which], "strength_model": strength}}
            graph[xid] = {"class_type": "XDiTParallelLoRA", "inputs": {
                "model": [ours, 0], "lora_name": LORAS[which], "strength_model": strength}}
            native, ours = nid, xid
        graph[f"{60 + n}"] = {"class_type": "KSampler", "inputs": {"model": [native, 0], **sampling}}
        graph[f"{70 + n}"] = {"class_type": "XDiTParallelSampler", "inputs": {"model": [ours, 0], **sampling}}
        graph.update(_save(f"{80 + n}", f"{60 + n}", f"sd3native{case}"))
        graph.update(_save(f"{90 + n}", f"{70 + n}", f"sd3xdit{case}"))
    _, entry = queue_and_wait(server, graph, timeout=1500, log=lambda line: None)
    assert entry["status"]["status_str"] == "success", entry["status"]
    log = (base / "comfyui.log").read_text(errors="replace")
    assert "lora key not loaded" not in log, log[-3000:]  # ComfyUI used every key of both files
    plain = _latent(base, "sd3plain")
    for case in LORA_CASES:
        native, ours = _latent(base, f"sd3native{case}"), _latent(base, f"sd3xdit{case}")
        assert ours.shape == native.shape == (1, 16, 16, 16)
        err, effect = rel_l2(ours, native), rel_l2(plain, native)
        print(f"sd3 {case}: Parallel LoRA vs LoraLoaderModelOnly rel L2 {err:.2e} (LoRA vs none {effect:.2e})")
        assert effect > 1e-3
        assert err <= 1e-5, (case, err)


def test_negative_of_another_length_matches_native_ksampler(comfy):
    """Positive 16 tokens, negative 7: Ulysses 2 (each branch's 7 text tokens cut 4 + 3 over the ranks) and CFG 2
    (each half runs one branch) against native KSampler, which runs the pair as two forwards."""
    from queue_workflow import queue_and_wait

    server, base = comfy
    graph, sampling = _common(7)
    graph["10"] = {"class_type": "KSampler", "inputs": {"model": ["4", 0], **sampling}}
    graph.update(_save("11", "10", "sd3negnative"))
    for n, (name, degrees) in enumerate((("ulysses2", {"ulysses_degree": 2}), ("cfg2", {"cfg_degree": 2}))):
        graph.update(_config(f"{20 + n}", **degrees))
        graph[f"{30 + n}"] = {"class_type": "XDiTLoadParallelDiT", "inputs": {
            "parallel_config": [f"{20 + n}", 0], "checkpoint": CHECKPOINT, "weight_dtype": "fp32", "family": "auto"}}
        graph[f"{40 + n}"] = {"class_type": "XDiTParallelSampler", "inputs": {"model": [f"{30 + n}", 0], **sampling}}
        graph.update(_save(f"{50 + n}", f"{40 + n}", f"sd3neg{name}"))
    _, entry = queue_and_wait(server, graph, timeout=1500, log=lambda line: None)
    assert entry["status"]["status_str"] == "success", entry["status"]
    native = _latent(base, "sd3negnative")
    assert native.abs().mean() > 0.01
    for name in ("ulysses2", "cfg2"):
        ours = _latent(base, f"sd3neg{name}")
        assert ours.shape == native.shape == (1, 16, 16, 16)
        err = rel_l2(ours, native)
        print(f"sd3 negative 7 tokens vs positive 16, {name}: rel L2 to native KSampler {err:.2e}")
        assert err <= 1e-5, (name, err)
