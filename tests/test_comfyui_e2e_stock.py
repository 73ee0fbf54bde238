"""Parallel DiT Model in a real ComfyUI (skipped without COMFYUI_DIR): stock KSampler (and SamplerCustomAdvanced +
CFGGuider, and ModelSamplingSD3) on the parallel MODEL against the same nodes on the native UNETLoader model, for
tiny checkpoints of Flux, SD3, PixArt, Qwen-Image and Wan 2.1 (the writers of the other e2e tests), with samplers
ComfyUI has and the Parallel Sampler does not, three schedulers, and Ulysses 2, Ring 2 and CFG 2 on two CPU ranks.
One ComfyUI server serves every prompt; the killed-rank test runs last."""
from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .comfy_server import COMFYUI_DIR, ROOT, make_base, running_comfyui, saved_latent as _saved, config_node as _config
from .conftest import rel_l2

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
sys.path.insert(0, str(ROOT / "scripts"))

COND_NODE = textwrap.dedent('''
    import torch

    class XDiTE2EStockConditioning:
        """Seeded CONDITIONING of any width; `pad` zeroes the tokens after `tokens` of `length` (Wan's umT5)."""
        CATEGORY = "testing"
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "make"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                                 "tokens": ("INT", {"default": 16, "min": 1, "max": 512}),
                                 "width": ("INT", {"default": 4096, "min": 1, "max": 8192}),
                                 "pooled": ("INT", {"default": 0, "min": 0, "max": 4096}),
                                 "length": ("INT", {"default": 0, "min": 0, "max": 512})}}

        def make(self, seed, tokens, width, pooled, length):
            g = torch.Generator().manual_seed(seed)
            cond = torch.randn(1, max(tokens, length), width, generator=g)
            cond[:, tokens:] = 0
            extras = {"pooled_output": torch.randn(1, pooled, generator=g) if pooled else None}
            return ([[cond, extras]],)

    class XDiTE2EModelPassThrough:
        """A MODEL passed on under another input name, as custom packs do: the queue-time graph check cannot
        follow it, so what comes after it meets the run-time checks."""
        CATEGORY = "testing"
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"m": ("MODEL",)}}

        def run(self, m):
            return (m,)

    class XDiTE2EBlockWrapper:
        """A block replacement that runs the block (as custom packs' patches do): nothing the pool can run."""
        CATEGORY = "testing"
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"m": ("MODEL",)}}

        def run(self, m):
            m = m.clone()
            m.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "double_block", 0)
            return (m,)

    NODE_CLASS_MAPPINGS = {"XDiTE2EStockConditioning": XDiTE2EStockConditioning,
                           "XDiTE2EModelPassThrough": XDiTE2EModelPassThrough,
                           "XDiTE2EBlockWrapper": XDiTE2EBlockWrapper}
''')

U, R, C = {"ulysses_degree": 2}, {"ring_degree": 2}, {"cfg_degree": 2}
US, CS = {**U, "shard_degree": 2}, {**C, "shard_degree": 2}  # FSDP2 shards over the Ulysses / CFG pair
# family: checkpoint, latent node and inputs, conditioning inputs, cfg, cases (sampler, scheduler, degrees)
FAMILIES = {
    "sd3": ("tiny_sd3_e2e.safetensors", ("EmptySD3LatentImage", {"width": 80, "height": 112}),
            {"tokens": 9, "pooled": 2048}, 3.0,
            [("euler_ancestral", "simple", U), ("dpmpp_2m_sde", "karras", R), ("uni_pc", "beta", C),
             ("res_multistep", "karras", C), ("euler", "normal", CS)]),
    "flux": ("tiny_flux_e2e.safetensors", ("EmptySD3LatentImage", {"width": 80, "height": 112}),
             {"tokens": 12, "pooled": 768}, 2.0,
             [("euler_ancestral", "beta", R), ("dpmpp_2m_sde", "simple", C), ("uni_pc", "karras", U),
              ("res_multistep", "simple", R), ("euler", "normal", US)]),
    "pixart": ("tiny_pixart_e2e.safetensors", ("EmptyLatentImage", {"width": 512, "height": 512}),
               {"tokens": 11}, 4.0,
               [("euler_ancestral", "karras", C), ("dpmpp_2m_sde", "beta", U), ("uni_pc", "simple", R),
                ("res_multistep", "beta", U)]),
    # Qwen-Image: even token rows and columns (8 x 6): on odd ones ComfyUI centres the rotary positions otherwise
    # than diffusers (tests/test_comfyui_e2e_qwen.py), which the engine follows
    "qwen": ("tiny_qwen_image_e2e.safetensors", ("EmptySD3LatentImage", {"width": 96, "height": 128}),
             {"tokens": 10, "width": 3584}, 3.0,
             [("euler_ancestral", "simple", U), ("dpmpp_2m_sde", "karras", C), ("uni_pc", "beta", R),
              ("res_multistep", "simple", C)]),
    "wan": ("tiny_wan_t2v_e2e.safetensors", ("EmptyHunyuanLatentVideo", {"width": 48, "height": 48, "length": 5}),
            {"tokens": 13, "length": 512}, 4.0,
            [("euler_ancestral", "beta", U), ("dpmpp_2m_sde", "simple", R), ("uni_pc", "karras", C),
             ("res_multistep", "karras", R)]),
}
STEPS = 3


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    from . import test_comfyui_e2e as e2e
    from .test_comfyui_e2e_qwen import _write_tiny_qwen
    from .test_comfyui_e2e_wan import _write_tiny_wan

    base = tmp_path_factory.mktemp("comfy_stock")
    models = make_base(base, {"xdit_e2e_stock_cond.py": COND_NODE})
    e2e._write_tiny_sd3(models / FAMILIES["sd3"][0])
    e2e._write_tiny_flux(models / FAMILIES["flux"][0])
    e2e._write_tiny_pixart(models / FAMILIES["pixart"][0])
    _write_tiny_qwen(models / FAMILIES["qwen"][0])
    _write_tiny_wan(models / FAMILIES["wan"][0], 1357)
    (base / "models" / "loras").mkdir()  # any LoRA file: ComfyUI's loader on the parallel model is refused
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(4, 1), "lora_unet_x.lora_down.weight": torch.zeros(1, 4)},
              str(base / "models" / "loras" / "xdit_e2e_stock.safetensors"))
    with running_comfyui(base) as server:
        yield server, base


def _base_graph(family: str) -> dict:
    checkpoint, (latent_node, latent_inputs), cond, _, _ = FAMILIES[family]
    return {
        "1": {"class_type": "XDiTE2EStockConditioning", "inputs": {"seed": 1, "width": 4096, "pooled": 0,
                                                                   "length": 0, **cond}},
        "2": {"class_type": "XDiTE2EStockConditioning", "inputs": {"seed": 2, "width": 4096, "pooled": 0,
                                                                   "length": 0, **{**cond, "tokens": 7}}},
        "3": {"class_type": latent_node, "inputs": {**latent_inputs, "batch_size": 1}},
        "4": {"class_type": "UNETLoader", "inputs": {"unet_name": checkpoint, "weight_dtype": "default"}},
    }


def _parallel_model(graph: dict, nid: int, family: str, degrees: dict) -> list:
    graph.update(_config(str(nid), **degrees))
    graph[str(nid + 1)] = {"class_type": "XDiTLoadParallelDiT", "inputs": {
        "parallel_config": [str(nid), 0], "checkpoint": FAMILIES[family][0], "weight_dtype": "fp32",
        "family": "auto"}}
    graph[str(nid + 2)] = {"class_type": "XDiTParallelDiTModel", "inputs": {"model": [str(nid + 1), 0]}}
    return [str(nid + 2), 0]


def _ksampler_pair(graph: dict, nid: int, model: list, sampler: str, scheduler: str, cfg: float, prefix: str,
                   native: list = ["4", 0]) -> None:  # noqa: B006
    common = {"positive": ["1", 0], "negative": ["2", 0], "latent_image": ["3", 0], "seed": 42, "steps": STEPS,
              "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}
    for k, (m, tag) in enumerate(((native, "native"), (model, "xdit"))):
        graph[str(nid + 2 * k)] = {"class_type": "KSampler", "inputs": {"model": m, **common}}
        graph[str(nid + 2 * k + 1)] = {"class_type": "SaveLatent", "inputs": {
            "samples": [str(nid + 2 * k), 0], "filename_prefix": f"{prefix}{tag}"}}


def _run_family(comfy, family: str):
    """One prompt with the family's cases: native and parallel KSampler pairs."""
    from queue_workflow import queue_and_wait

    server, base = comfy
    _, _, _, cfg, cases = FAMILIES[family]
    graph = _base_graph(family)
    for n, (sampler, scheduler, degrees) in enumerate(cases):
        model = _parallel_model(graph, 100 + 10 * n, family, degrees)
        _ksampler_pair(graph, 104 + 10 * n, model, sampler, scheduler, cfg, f"{family}{n}")
    progress = []
    t0 = time.monotonic()
    _, entry = queue_and_wait(server, graph, timeout=1800, log=progress.append)
    return base, entry, progress, time.monotonic() - t0


def test_v3_node_definitions_are_the_stand_ins_and_the_recorded_inputs(comfy):
    """ComfyUI takes every node from the pack's ComfyExtension (comfy_entrypoint); each /object_info entry equals
    the V1 view the stand-in (tests/comfy_io_standin.py) gives, which the workflow checks and test_nodes.py use, and
    has the inputs (names, order, types, defaults, limits, tooltips) the V1 nodes had
    (tests/data/node_inputs_main.json)."""
    import json
    import urllib.request

    from . import comfy_standins as cs
    from .node_views import recorded, view

    server, _ = comfy
    info = json.load(urllib.request.urlopen(server + "/object_info", timeout=30))
    with cs.extension() as ext:
        names = ext.nodes.NODE_DISPLAY_NAME_MAPPINGS
        for name, node in ext.nodes.NODE_CLASS_MAPPINGS.items():
            spec = json.loads(json.dumps(node.INPUT_TYPES()))
            mine = {"input": spec, "output": list(node.RETURN_TYPES), "output_name": list(node.RETURN_NAMES),
                    "category": node.CATEGORY, "description": node.DESCRIPTION, "display_name": names[name],
                    "output_node": node.OUTPUT_NODE, "input_order": {k: list(v) for k, v in spec.items()}}
            # the same but for the lists of this ComfyUI's files and samplers (node_views.DYNAMIC)
            assert view(info[name]) == view(mine), name
            assert {k: info[name][k] for k in ("input_order", "output_name")} == \
                {k: mine[k] for k in ("input_order", "output_name")}, name
            assert info[name]["input"].get("hidden") == spec.get("hidden"), name
            assert info[name]["python_module"].startswith("custom_nodes."), name
    assert {name: view(info[name]) for name in recorded()} == recorded()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ksampler_on_parallel_model_matches_native(comfy, family):
    base, entry, progress, seconds = _run_family(comfy, family)
    print(f"{family}: prompt of {len(FAMILIES[family][4])} native + parallel pairs ran in {seconds:.0f} s")
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert f"node 106: step {STEPS}/{STEPS}" in progress  # ComfyUI's own progress bar, for our model's KSampler
    first = None
    for n, (sampler, scheduler, degrees) in enumerate(FAMILIES[family][4]):
        native, ours = _saved(base, f"{family}{n}native"), _saved(base, f"{family}{n}xdit")
        assert ours.shape == native.shape and native.abs().mean() > 0.01
        err = rel_l2(ours, native)
        print(f"{family} {sampler}/{scheduler} {degrees}: rel L2 to native KSampler {err:.2e}")
        assert err <= 1e-5, (sampler, scheduler, degrees, err)
        if first is None:
            first = native
        else:  # the cases differ from each other: the comparisons can fail
            assert rel_l2(native, first) > 1e-3


def test_sampler_custom_advanced_cfg_guider_shift_and_dp(comfy):
    """SamplerCustomAdvanced with CFGGuider, and ModelSamplingSD3 (shift 5) under KSampler, on SD3, Ulysses 2; and
    a batch of 2 images (4 rows with the uncond ones) over DP 2."""
    from queue_workflow import queue_and_wait

    server, base = comfy
    graph = _base_graph("sd3")
    ours = _parallel_model(graph, 100, "sd3", U)
    for m, tag in ((["4", 0], "native"), (ours, "xdit")):
        k = 200 if tag == "native" else 300
        graph.update({
            str(k): {"class_type": "CFGGuider", "inputs": {"model": m, "positive": ["1", 0], "negative": ["2", 0],
                                                          "cfg": 3.5}},
            str(k + 1): {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m_sde"}},
            str(k + 2): {"class_type": "BasicScheduler", "inputs": {"model": m, "scheduler": "beta", "steps": STEPS,
                                                                   "denoise": 1.0}},
            str(k + 3): {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
            str(k + 4): {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": [str(k + 3), 0], "guider": [str(k), 0], "sampler": [str(k + 1), 0],
                "sigmas": [str(k + 2), 0], "latent_image": ["3", 0]}},
            str(k + 5): {"class_type": "SaveLatent", "inputs": {"samples": [str(k + 4), 0],
                                                               "filename_prefix": f"custom{tag}"}},
            str(k + 6): {"class_type": "ModelSamplingSD3", "inputs": {"model": m, "shift": 5.0}},
        })
    _ksampler_pair(graph, 400, ["306", 0], "euler_ancestral", "simple", 3.0, "shift", native=["206", 0])
    _ksampler_pair(graph, 410, ours, "euler_ancestral", "simple", 3.0, "noshift")
    dp = _parallel_model(graph, 500, "sd3", {"dp_degree": 2})
    graph["520"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 80, "height": 112, "batch_size": 2}}
    _ksampler_pair(graph, 510, dp, "dpmpp_2m_sde", "karras", 3.0, "dp")
    for nid in ("510", "512"):
        graph[nid]["inputs"]["latent_image"] = ["520", 0]
    _, entry = queue_and_wait(server, graph, timeout=1800, log=lambda line: None)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert _saved(base, "dpnative").shape[0] == 2
    for case in ("custom", "shift", "dp"):
        native, mine = _saved(base, case + "native"), _saved(base, case + "xdit")
        err = rel_l2(mine, native)
        print(f"sd3 {case}: rel L2 to native {err:.2e}")
        assert native.abs().mean() > 0.01 and err <= 1e-5, (case, err)
    assert rel_l2(_saved(base, "shiftnative"), _saved(base, "noshiftnative")) > 1e-3  # the shift changes the result


def test_parallel_sampler_runs_comfyuis_other_samplers(comfy):
    """Samplers the pool's loop lacks run as ComfyUI's own over the pool's forwards: Parallel Sampler with heun
    (Flux, Ulysses 2), dpmpp_2m_sde (SD3, CFG 2 x shard 2) and uni_pc (Wan, Ring 2) equals native KSampler."""
    from queue_workflow import queue_and_wait

    server, base = comfy
    for family, sampler, scheduler, degrees in (("flux", "heun", "simple", U), ("sd3", "dpmpp_2m_sde", "karras", CS),
                                                ("wan", "uni_pc", "normal", R)):
        graph = _base_graph(family)
        graph.update(_config("100", **degrees))
        graph["101"] = {"class_type": "XDiTLoadParallelDiT", "inputs": {
            "parallel_config": ["100", 0], "checkpoint": FAMILIES[family][0], "weight_dtype": "fp32",
            "family": "auto"}}
        common = {"positive": ["1", 0], "negative": ["2", 0], "latent_image": ["3", 0], "seed": 42, "steps": STEPS,
                  "cfg": FAMILIES[family][3], "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}
        graph["102"] = {"class_type": "XDiTParallelSampler", "inputs": {"model": ["101", 0], **common}}
        graph["103"] = {"class_type": "KSampler", "inputs": {"model": ["4", 0], **common}}
        for nid, tag in (("102", "xdit"), ("103", "native")):
            graph[str(int(nid) + 10)] = {"class_type": "SaveLatent", "inputs": {
                "samples": [nid, 0], "filename_prefix": f"ps{family}{tag}"}}
        _, entry = queue_and_wait(server, graph, timeout=1800, log=lambda line: None)
        assert entry["status"]["status_str"] == "success", entry["status"]
        native, ours = _saved(base, f"ps{family}native"), _saved(base, f"ps{family}xdit")
        err = rel_l2(ours, native)
        print(f"{family} Parallel Sampler {sampler}/{scheduler} {degrees}: rel L2 to native KSampler {err:.2e}")
        assert ours.shape == native.shape and native.abs().mean() > 0.01 and err <= 1e-5, (family, err)


def _long_run(family: str, steps: int, prefix: str) -> dict:
    graph = _base_graph(family)
    model = _parallel_model(graph, 100, family, U)
    graph["3"]["inputs"].update(width=256, height=256)
    graph["110"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["1", 0], "negative": ["2", 0], "latent_image": ["3", 0], "seed": 1,
        "steps": steps, "cfg": 3.0, "sampler_name": "uni_pc", "scheduler": "simple", "denoise": 1.0}}
    graph["111"] = {"class_type": "SaveLatent", "inputs": {"samples": ["110", 0], "filename_prefix": prefix}}
    return graph


def test_comfyuis_lora_loader_and_pipefusion_refused_on_the_parallel_model(comfy):
    """ComfyUI's LoraLoaderModelOnly after Parallel DiT Model would find none of the pool's weights and sample
    without the LoRA, and so would a LoRA hook on the conditioning: both refused when queued (on the loader, with the
    node named), or, where the graph check cannot see it, when it runs; pipefusion_degree 2 feeding Parallel DiT
    Model is refused when queued."""
    from queue_workflow import Rejected, queue_and_wait

    server, base = comfy

    def refused(graph: dict, user: str, queued: str, run: str) -> None:
        """Refused when queued; then, with the model passed to node `user` under another name, when it runs."""
        with pytest.raises(Rejected, match=queued):
            queue_and_wait(server, graph, timeout=600, log=lambda line: None)
        graph["121"] = {"class_type": "XDiTE2EModelPassThrough", "inputs": {"m": graph[user]["inputs"]["model"]}}
        graph[user]["inputs"]["model"] = ["121", 0]
        with pytest.raises(RuntimeError, match=run):
            queue_and_wait(server, graph, timeout=600, log=lambda line: None)

    graph = _long_run("sd3", 2, "lorarefused")
    graph["120"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": graph["110"]["inputs"]["model"], "lora_name": "xdit_e2e_stock.safetensors", "strength_model": 1.0}}
    graph["110"]["inputs"]["model"] = ["120", 0]
    refused(graph, "120", r"LoraLoaderModelOnly \(node 120\) patches the weights of Parallel DiT Model \(node 102\)",
            r"LoraLoaderModelOnly\) failed: Parallel DiT Model's weights live on the worker pool.*Parallel LoRA")
    hooked = _long_run("sd3", 2, "hookrefused")  # a LoRA hook on the positive conditioning
    hooked["130"] = {"class_type": "CreateHookLoraModelOnly", "inputs": {
        "lora_name": "xdit_e2e_stock.safetensors", "strength_model": 1.0}}
    hooked["131"] = {"class_type": "ConditioningSetProperties", "inputs": {
        "cond_NEW": hooked["110"]["inputs"]["positive"], "hooks": ["130", 0], "strength": 1.0,
        "set_cond_area": "default"}}
    hooked["110"]["inputs"]["positive"] = ["131", 0]
    refused(hooked, "110", r"the LoRA hook of CreateHookLoraModelOnly \(node 130\) reaches the conditioning of "
            r"KSampler \(node 110\)", r"KSampler\) failed: Parallel DiT Model's weights live on the worker pool, "
            r"so a LoRA hook on the conditioning")
    pipefusion = _long_run("sd3", 2, "pfrefused")
    pipefusion["100"]["inputs"].update(pipefusion_degree=2, ulysses_degree=1)
    with pytest.raises(Rejected, match="pipefusion_degree 2 runs in Parallel Sampler only"):
        queue_and_wait(server, pipefusion, timeout=600, log=lambda line: None)
    assert not [p for k in ("lorarefused", "hookrefused", "pfrefused") for p in (base / "output").glob(k + "_*")]


def test_skip_layer_guidance_matches_native_and_other_block_patches_are_refused(comfy):
    """SkipLayerGuidanceDiT on the parallel model (its skip-layer calls skip the blocks on the pool: Ulysses 2 on SD3
    and Wan, CFG 2 on Flux with a double and a single block and on Qwen-Image) against the same node on the native model; a block patch the
    pool cannot run is refused when it runs, in one line naming it, instead of sampling as if it were not there."""
    from queue_workflow import queue_and_wait

    server, base = comfy
    for family, degrees, double, single in (("sd3", U, "0", ""), ("flux", C, "0", "0"), ("wan", U, "0", ""),
                                            ("qwen", C, "0", "")):
        graph = _base_graph(family)
        ours = _parallel_model(graph, 100, family, degrees)
        for m, nid in ((["4", 0], "200"), (ours, "300")):
            graph[nid] = {"class_type": "SkipLayerGuidanceDiT", "inputs": {
                "model": m, "double_layers": double, "single_layers": single, "scale": 3.0, "start_percent": 0.0,
                "end_percent": 1.0, "rescaling_scale": 0.0}}
        _ksampler_pair(graph, 400, ["300", 0], "euler", "simple", FAMILIES[family][3], f"slg{family}",
                       native=["200", 0])
        _ksampler_pair(graph, 410, ["4", 0], "euler", "simple", FAMILIES[family][3], f"noslg{family}")
        _, entry = queue_and_wait(server, graph, timeout=1800, log=lambda line: None)
        assert entry["status"]["status_str"] == "success", entry["status"]
        native, mine = _saved(base, f"slg{family}native"), _saved(base, f"slg{family}xdit")
        err = rel_l2(mine, native)
        print(f"{family} SkipLayerGuidanceDiT {degrees}: rel L2 to native {err:.2e}")
        assert native.abs().mean() > 0.01 and err <= 1e-5, (family, err)
        assert rel_l2(native, _saved(base, f"noslg{family}native")) > 1e-3  # the guidance changes the result
    graph = _long_run("sd3", 2, "wrapperrefused")
    graph["120"] = {"class_type": "XDiTE2EBlockWrapper", "inputs": {"m": graph["110"]["inputs"]["model"]}}
    graph["110"]["inputs"]["model"] = ["120", 0]
    with pytest.raises(RuntimeError, match=r"KSampler\) failed: Parallel DiT Model: ComfyUI model patches reach this "
                                           r"forward \(patches_replace dit: \('double_block', 0\);"):
        queue_and_wait(server, graph, timeout=600, log=lambda line: None)
    assert not list((base / "output").glob("wrapperrefused_*"))


def test_cancel_between_forwards_leaves_the_pool_clean(comfy):
    """ComfyUI's Cancel (POST /interrupt) stops its own loop between forwards; the next prompt runs at once."""
    from queue_workflow import http, queue_and_wait

    server, base = comfy
    stepped = []

    def log(line):
        if line.startswith("node 110: step"):
            stepped.append(line)
            if line == "node 110: step 2/500":
                http(server, "/interrupt", {})

    with pytest.raises(RuntimeError, match="interrupted"):
        queue_and_wait(server, _long_run("sd3", 500, "cancelled"), timeout=600, log=log)
    assert 2 <= len(stepped) <= 4, stepped
    t0 = time.monotonic()
    _, entry = queue_and_wait(server, _long_run("sd3", 2, "aftercancel"), timeout=600, log=lambda line: None)
    assert entry["status"]["status_str"] == "success" and time.monotonic() - t0 < 120
    assert not sorted((base / "output").glob("cancelled_*")) and sorted((base / "output").glob("aftercancel_*"))


def _pool_ranks(base: Path) -> list[int]:
    """Pids of pool ranks started by this test's ComfyUI (an ancestor's command line names its base directory)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            if b"bootstrap.py" not in cmd or b"--torchrun" in cmd.split(b"\0"):
                continue  # a rank (bootstrap.py its script), not its torchrun launcher (bootstrap.py --torchrun)
            pid = int(d.name)
            while pid > 1:
                if str(base).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(d.name))
                    break
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    return pids


def test_killed_rank_is_a_clear_error_and_the_next_run_works(comfy):
    from queue_workflow import queue_and_wait

    server, base = comfy
    graph = _long_run("sd3", 500, "killed")
    killed = []

    def log(line):
        # the first progress line at step 2 or later (a loaded machine may deliver them coalesced)
        step = line.removeprefix("node 110: step ").split("/")[0] if line.startswith("node 110: step ") else ""
        if step.isdigit() and int(step) >= 2 and not killed:
            ranks = sorted(_pool_ranks(base))
            assert len(ranks) == 2, ranks
            os.kill(ranks[-1], 9)
            killed.append(time.monotonic())

    with pytest.raises(RuntimeError, match="Parallel DiT Model: .*(pool|died|stopped)") as info:
        queue_and_wait(server, graph, timeout=600, log=log)
        assert killed, "no progress line of step 2 or later came: the rank was never killed"
    late = time.monotonic() - killed[0]
    assert late < 20, f"the error came {late:.1f} s after the kill"
    print(f"killed rank: error {late:.1f} s after the kill: {info.value}")
    graph["110"]["inputs"]["steps"] = 2
    graph["111"]["inputs"]["filename_prefix"] = "afterkill"
    _, entry = queue_and_wait(server, graph, timeout=600, log=lambda line: None)
    assert entry["status"]["status_str"] == "success"
    assert not sorted((base / "output").glob("killed_*")) and sorted((base / "output").glob("afterkill_*"))


def test_step_cache_on_the_parallel_model_equals_the_parallel_samplers(comfy):
    """KSampler (euler) on Parallel DiT Model with the step cache reuses the steps the Parallel Sampler's cache
    reuses (SD3, CFG 3, Ulysses 2, 8 steps): the two latents agree, and the cache changed the result (both differ
    from native KSampler, which has no cache)."""
    from queue_workflow import queue_and_wait

    server, base = comfy
    graph = _base_graph("sd3")
    graph.update(_config("100", **U))
    graph["101"] = {"class_type": "XDiTLoadParallelDiT", "inputs": {
        "parallel_config": ["100", 0], "checkpoint": FAMILIES["sd3"][0], "weight_dtype": "fp32", "family": "auto"}}
    cache = {"cache": "fbcache", "cache_threshold": 1.0, "cache_warmup": 1, "cache_max_consecutive": 0}
    graph["102"] = {"class_type": "XDiTParallelDiTModel", "inputs": {"model": ["101", 0], **cache}}
    common = {"positive": ["1", 0], "negative": ["2", 0], "latent_image": ["3", 0], "seed": 42, "steps": 8,
              "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    graph["103"] = {"class_type": "KSampler", "inputs": {"model": ["102", 0], **common}}
    graph["104"] = {"class_type": "XDiTParallelSampler", "inputs": {"model": ["101", 0], **common, **cache}}
    graph["105"] = {"class_type": "KSampler", "inputs": {"model": ["4", 0], **common}}
    for nid, tag in (("103", "pdm"), ("104", "ps"), ("105", "native")):
        graph[str(int(nid) + 10)] = {"class_type": "SaveLatent", "inputs": {"samples": [nid, 0],
                                                                          "filename_prefix": f"cache{tag}"}}
    _, entry = queue_and_wait(server, graph, timeout=1800, log=lambda line: None)
    assert entry["status"]["status_str"] == "success", entry["status"]
    pdm, ps, native = (_saved(base, f"cache{tag}") for tag in ("pdm", "ps", "native"))
    print(f"sd3 step cache: KSampler on Parallel DiT Model vs Parallel Sampler {rel_l2(pdm, ps):.2e}, "
          f"vs native without cache {rel_l2(pdm, native):.2e}")
    assert rel_l2(pdm, ps) <= 1e-5
    assert rel_l2(ps, native) > 1e-3  # the cache reused steps
