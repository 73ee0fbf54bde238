"""The set-up check without downloads (workflows/setup-check.json): Tiny Conditioning makes CONDITIONING of the shape
each family's text encoders make (the built-in tiny models take the real widths), which the sampler reads back;
Setup Check passes equal latents and fails, with the numbers, on different ones. The shipped API workflow itself
runs on a 2-rank CPU pool over the ComfyUI stand-ins and passes; with the reference's conditioning changed it fails."""
from __future__ import annotations

import json
import re
import time

import pytest
import torch

from . import comfy_standins as cs

# The text encoders' widths as the models' papers and configs give them, written out here (not read from CondSpec):
# T5-XXL 4096 (Flux, SD3, PixArt, Wan's umT5), Qwen2.5-VL-7B 3584, Qwen3-4B 2560, Mistral Small 3 three layers 15360;
# the CLIP pooled vectors: CLIP-L 768 (Flux), CLIP-L + CLIP-G 2048 (SD3).
WIDTH = {"flux": 4096, "sd3": 4096, "pixart": 4096, "wan": 4096, "qwen-image": 3584, "z-image": 2560,
         "flux2": 15360}
POOLED = {"flux": 768, "sd3": 2048}
GUIDANCE = {"flux": 3.5, "flux2": 4.0}


def _handle(ext, tiny: str):
    variant = ext.nodes.families.TINY_VARIANT[tiny]
    family = ext.nodes.families.VARIANTS[variant].family
    settings = ext.nodes.pool.settings_from_inputs(device="cpu", ulysses=1, ring=1, pipefusion=1, cfg=1, dp=1,
                                                   num_patches=0, warmup_steps=1, attention="auto", gpus="",
                                                   address="", shard=1, shard_keep=False)
    return ext.nodes.pool.ModelHandle(settings, tiny, "fp32", family, variant, "key")


def test_registered_in_testing_category(ext):
    m, names = ext.nodes.NODE_CLASS_MAPPINGS, ext.nodes.NODE_DISPLAY_NAME_MAPPINGS
    assert names["XDiTTinyConditioning"] == "Tiny Conditioning (xDiT)"
    assert names["XDiTSetupCheck"] == "Setup Check (xDiT)"
    assert m["XDiTTinyConditioning"].CATEGORY == m["XDiTSetupCheck"].CATEGORY == "xDiT/testing"
    assert m["XDiTSetupCheck"].OUTPUT_NODE and m["XDiTSetupCheck"].RETURN_TYPES == ()
    spec = m["XDiTTinyConditioning"].INPUT_TYPES()["required"]
    assert spec["model"][0] == "XDIT_MODEL" and spec["tokens"][1]["default"] == 8 and spec["seed"][0] == "INT"
    assert m["XDiTSetupCheck"].INPUT_TYPES()["required"]["tolerance"][1]["default"] == 1e-4


@pytest.mark.parametrize("tiny", ["tiny-flux", "tiny-sd3", "tiny-pixart", "tiny-qwen-image", "tiny-z-image",
                                  "tiny-flux2", "tiny-wan"])
def test_tiny_conditioning_shapes_per_family(ext, tiny):
    model = _handle(ext, tiny)
    pos, neg = ext.nodes.NODE_CLASS_MAPPINGS["XDiTTinyConditioning"].execute(model, 5, 11)
    for side in (pos, neg):
        assert len(side) == 1 and len(side[0]) == 2
        cond, extras = side[0]
        assert cond.shape == (1, 11, WIDTH[model.family]) and cond.dtype == torch.float32
        if model.family in POOLED:
            assert extras["pooled_output"].shape == (1, POOLED[model.family])
        else:
            assert "pooled_output" not in extras
        assert extras.get("guidance") == GUIDANCE.get(model.family)
    # what the sampler reads back from it (both sides, as with cfg > 1)
    tensors, guidance = ext.nodes.convert.conditioning_tensors(pos, neg, model.family, True, model.variant)
    assert tensors["cond"].shape == tensors["neg_cond"].shape == (1, 11, WIDTH[model.family])
    assert ("pooled" in tensors) == (model.family in POOLED)
    assert guidance == GUIDANCE.get(model.family)


def test_tiny_conditioning_is_seeded(ext):
    make = ext.nodes.NODE_CLASS_MAPPINGS["XDiTTinyConditioning"].execute
    model = _handle(ext, "tiny-flux")
    a, b, c = make(model, 1, 8), make(model, 1, 8), make(model, 2, 8)
    assert torch.equal(a[0][0][0], b[0][0][0]) and torch.equal(a[1][0][1]["pooled_output"], b[1][0][1]["pooled_output"])
    assert not torch.equal(a[0][0][0], c[0][0][0])
    assert not torch.equal(a[0][0][0], a[1][0][0])  # positive and negative differ
    assert 0.9 < a[0][0][0].std().item() < 1.1
    with pytest.raises(ext.nodes.xdit_nodes.XDiTNodeError, match="Tiny Conditioning: model must come from Load"):
        make("tiny-flux", 1, 8)


def test_setup_check_pass_and_fail(ext):
    check = ext.nodes.NODE_CLASS_MAPPINGS["XDiTSetupCheck"].execute
    err = ext.nodes.xdit_nodes.XDiTNodeError
    x = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    near = x + 1e-6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    out = check({"samples": near}, {"samples": x}, 1e-4)
    assert out.args == ()
    (line,) = out.ui["text"]
    m = re.match(r"PASS: parallel equals one GPU's result \(rel\. L2 (\S+) <= 0\.0001, latent \[1, 16, 32, 32\]\)$",
                 line)
    assert m and 0.9e-6 < float(m.group(1)) < 1.1e-6, line

    far = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with pytest.raises(err, match=r"^Setup check FAILED: .*rel\. L2 0\.0(1|099\d) \(tolerance 0\.0001; "
                                  r"latent \[1, 16, 32, 32\], \|max diff\| 0\.0\d"):
        check({"samples": far}, {"samples": x}, 1e-4)
    check({"samples": far}, {"samples": x}, 0.02)  # within a looser tolerance
    with pytest.raises(err, match=r"Setup check FAILED: the parallel latent is \[1, 16, 32, 16\], one GPU's is"):
        check({"samples": x[..., :16]}, {"samples": x}, 1e-4)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(err, match="Setup check FAILED: the parallel latent has NaN"):
        check({"samples": nan}, {"samples": x}, 1.0)  # NaN is no pass, whatever the tolerance
    with pytest.raises(err, match="rel. L2 inf"):
        check({"samples": x}, {"samples": torch.zeros_like(x)}, 1.0)
    with pytest.raises(err, match="reference is not a LATENT"):
        check({"samples": x}, x, 1e-4)


def _run_api(ext, graph: dict) -> dict:
    """Execute an API-format graph with the extension's nodes (ComfyUI's EmptySD3LatentImage stood in): node id ->
    its result."""
    done: dict = {}

    def run(nid):
        if nid in done:
            return done[nid]
        node = graph[nid]
        args = {k: run(v[0])[v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        if node["class_type"] == "EmptySD3LatentImage":
            out = ({"samples": torch.zeros(args["batch_size"], 16, args["height"] // 8, args["width"] // 8)},)
        else:
            cls = cs.with_id(ext.nodes.NODE_CLASS_MAPPINGS[node["class_type"]], nid)  # as ComfyUI calls it
            out = getattr(cls, cls.FUNCTION)(**args)  # a NodeOutput: the outputs by index, the ui
        done[nid] = out
        return out

    for nid in graph:
        run(nid)
    return done


@pytest.mark.spawns  # the workflow file's Load Parallel DiT starts a pool (tests/conftest.py)
def test_shipped_workflow_passes_on_a_cpu_pool_and_can_fail(ext):
    graph = json.loads((cs.ROOT / "workflows" / "api" / "setup-check.json").read_text())
    # the KSampler on Parallel DiT Model row needs ComfyUI's own KSampler and model classes: the real-ComfyUI test
    # (test_comfyui_e2e_setup_check.py) runs it; here the Parallel Sampler row
    stock = {n for n, node in graph.items() if node["class_type"] in ("KSampler", "XDiTParallelDiTModel")}
    graph = {n: node for n, node in graph.items() if n not in stock and not (
        node["class_type"] == "XDiTSetupCheck" and node["inputs"]["parallel"][0] in stock)}
    check = next(n for n, node in graph.items() if node["class_type"] == "XDiTSetupCheck")
    start = time.monotonic()
    try:
        out = _run_api(ext, graph)
        (line,) = out[check].ui["text"]
        print(f"{line} in {time.monotonic() - start:.1f} s")
        assert line.startswith("PASS: parallel equals one GPU's result")
        parallel, reference = (out[graph[check]["inputs"][k][0]][0]["samples"] for k in ("parallel", "reference"))
        assert parallel.shape == (1, 16, 32, 32) and not torch.equal(parallel, reference)  # two runs, not one
        # the reference sampled from other conditioning: the check fails and says by how much
        cond = next(n for n, node in graph.items() if node["class_type"] == "XDiTTinyConditioning")
        graph["99"] = {"class_type": "XDiTTinyConditioning", "inputs": {**graph[cond]["inputs"], "seed": 1}}
        ref_sampler = graph[check]["inputs"]["reference"][0]
        graph[ref_sampler]["inputs"].update(positive=["99", 0], negative=["99", 1])
        with pytest.raises(ext.nodes.xdit_nodes.XDiTNodeError, match=r"^Setup check FAILED: .* rel\. L2 "):
            _run_api(ext, graph)
    finally:
        ext.nodes.xdit_nodes.MANAGER.stop()
