"""Node contract without ComfyUI: stand-ins for comfy.*, folder_paths and latent_preview (tests/comfy_standins.py),
the repository imported as an extension package the way ComfyUI's loader does."""
from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from . import comfy_standins as cs

ROOT = cs.ROOT


def _node(ext, name):
    return ext.nodes.NODE_CLASS_MAPPINGS[name]


CONFIG_DEFAULTS = dict(device="cpu", ulysses_degree=1, ring_degree=1, pipefusion_degree=1, cfg_degree=1,
                       dp_degree=1, num_patches=0, warmup_steps=1, attention="auto", gpus="", pool_address="")


# ------------------------------------------------------------------------------------------------ registration
def test_mappings_and_node_definitions(ext):
    """Every node is a V3 node (comfy_api.latest), offered by the one ComfyExtension of comfy_entrypoint; the
    package exports no NODE_CLASS_MAPPINGS (ComfyUI 0.3.64's loader would take those instead of the extension)."""
    import asyncio

    from .node_views import recorded

    mappings = ext.nodes.NODE_CLASS_MAPPINGS
    assert set(mappings) == set(recorded()) == {
        "XDiTConfigureHybridParallel", "XDiTLoadParallelDiT", "XDiTParallelSampler", "XDiTParallelSamplerAdvanced",
        "XDiTParallelDiTModel", "XDiTParallelLoRA", "XDiTTinyConditioning", "XDiTSetupCheck"}
    assert not hasattr(ext, "NODE_CLASS_MAPPINGS") and ext.__all__ == ["comfy_entrypoint"]
    extension = asyncio.run(ext.comfy_entrypoint())
    assert isinstance(extension, cs.comfy_io_standin.ComfyExtension)
    assert asyncio.run(extension.get_node_list()) == list(mappings.values())
    returns = {"XDiTConfigureHybridParallel": ("XDIT_PARALLEL_CONFIG",), "XDiTLoadParallelDiT": ("XDIT_MODEL",),
               "XDiTParallelSampler": ("LATENT",), "XDiTParallelSamplerAdvanced": ("LATENT",),
               "XDiTParallelDiTModel": ("MODEL",), "XDiTParallelLoRA": ("XDIT_MODEL",),
               "XDiTTinyConditioning": ("CONDITIONING", "CONDITIONING"), "XDiTSetupCheck": ()}
    validated = ext.nodes.schemas.VALIDATED
    for name, cls in mappings.items():
        assert issubclass(cls, cs.comfy_io_standin.ComfyNode)
        schema = cls.define_schema()
        assert schema.node_id == name and schema.display_name == ext.nodes.NODE_DISPLAY_NAME_MAPPINGS[name]
        assert cls.CATEGORY == ("xDiT/testing" if name in ("XDiTTinyConditioning", "XDiTSetupCheck") else "xDiT")
        assert tuple(cls.RETURN_TYPES) == returns[name]
        assert cls.OUTPUT_NODE == (name == "XDiTSetupCheck")
        spec = cls.INPUT_TYPES()
        params = inspect.signature(cls.execute).parameters  # ComfyUI's wrapper calls execute with the inputs
        assert list(params) == [*spec["required"], *spec.get("optional", {})], name  # the inputs, in order
        for section in ("required", "optional"):
            for inp, conf in spec.get(section, {}).items():
                assert (params[inp].default is inspect.Parameter.empty) == (section == "required"), (name, inp)
                assert isinstance(conf, tuple) and conf and isinstance(conf[0], str)
        checked = cls.validate_inputs.__func__ is not cs.comfy_io_standin.ComfyNode.validate_inputs.__func__
        assert checked == (name in validated)
        if checked:  # one argument, a required input every prompt of the node has; the node id is hidden
            assert list(inspect.signature(cls.validate_inputs).parameters) == [validated[name]]
            assert validated[name] in spec["required"] and spec["hidden"] == {"unique_id": ("UNIQUE_ID",)}
        json.dumps(spec)  # /object_info serialises it
    sampler = ext.nodes.NODE_CLASS_MAPPINGS["XDiTParallelSampler"].INPUT_TYPES()["required"]
    assert sampler["positive"][0] == sampler["negative"][0] == "CONDITIONING"
    assert sampler["latent_image"][0] == "LATENT" and sampler["model"][0] == "XDIT_MODEL"
    assert {"euler", "dpmpp_2m"} <= set(sampler["sampler_name"][1]["options"])
    assert sampler["scheduler"][1]["options"] == cs.SCHEDULER_NAMES  # every scheduler ComfyUI has, in its order
    assert {"exponential", "ddim_uniform", "linear_quadratic", "kl_optimal"} <= set(sampler["scheduler"][1]["options"])


def test_inputs_as_recorded_from_the_v1_nodes(ext):
    """Every node's inputs (names, order, types, defaults, limits, tooltips), outputs, category, display name and
    description as the V1 nodes had them (tests/data/node_inputs_main.json): saved and API-format workflows address
    widgets by name and order."""
    from .node_views import class_info, recorded, view

    names = ext.nodes.NODE_DISPLAY_NAME_MAPPINGS
    got = {name: view(class_info(cls, names[name])) for name, cls in ext.nodes.NODE_CLASS_MAPPINGS.items()}
    assert got == recorded()


def test_schedulers_are_comfyuis(ext):
    """The stand-in's list is the recorded KSampler's (ComfyUI 0.3.64); without ComfyUI the nodes offer the same."""
    core = json.loads((ROOT / "tests" / "data" / "comfyui_core_nodes.json").read_text())["nodes"]
    assert cs.SCHEDULER_NAMES == core["KSampler"]["input"]["required"]["scheduler"][0]
    assert list(ext.nodes.families.SCHEDULERS) == cs.SCHEDULER_NAMES
    for name in cs.SCHEDULER_NAMES:  # each goes to ComfyUI's own calculate_sigmas
        ext.nodes.convert.sigmas_for("pixart-sigma", "euler", name, 4, 1.0)


def test_own_nodes_package_only_as_subpackage(ext):
    assert sys.modules["nodes"].COMFY_OWN_NODES_MODULE  # ComfyUI's top-level `nodes` untouched
    assert ext.nodes.__name__ == f"{cs.EXTENSION_NAME}.nodes"
    for path in [ROOT / "__init__.py", *sorted((ROOT / "nodes").glob("*.py"))]:
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+nodes\b", text, re.M), path
        assert not re.search(r"^\s*(from|import)\s+runtime\b", text, re.M), path


def test_no_import_circle_between_node_modules():
    """The node modules' imports (at the top and inside functions) form no circle: the schemas and the queue-time
    checks import no module that defines a node class, so the node classes may import the checks."""
    import ast

    graph = {}
    for path in sorted((ROOT / "nodes").glob("*.py")):
        deps = set()
        for stmt in ast.walk(ast.parse(path.read_text())):
            if isinstance(stmt, ast.ImportFrom) and stmt.level == 1:
                deps |= {stmt.module} if stmt.module else {a.name for a in stmt.names}
        graph[path.stem] = deps & {p.stem for p in (ROOT / "nodes").glob("*.py")}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        return seen

    circles = sorted(m for m in graph if m in reach(m))
    assert not circles, {m: sorted(graph[m]) for m in circles}
    node_modules = {"xdit_nodes", "lora_nodes", "setup_check", "stock_model"}
    for checks in ("schemas", "queue_check", "auto_layout", "prompt_graph"):
        assert not reach(checks) & node_modules, checks


def test_import_is_light_and_works_without_gpu():
    """A fresh interpreter: importing the extension loads neither diffusers nor ZeroMQ nor torch.distributed
    internals of the engine."""
    code = (
        "import sys; sys.path.insert(0, %r); from tests import comfy_standins as cs;"
        "rec = cs.Recorder(); sys.modules.update(cs.install(rec)); m = cs.load_extension();"
        "heavy = [k for k in ('diffusers', 'zmq', 'transformers', 'comfyui_xdit.engine', 'flash_attn') if k in sys.modules];"
        "print(len(m.nodes.NODE_CLASS_MAPPINGS), heavy)" % str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "8 []"


# ------------------------------------------------------------------------------------------------ configure
def _queue(ext, rec, prompt: dict) -> dict[str, list[str]]:
    """POST /prompt as ComfyUI handles it: the on-prompt handlers, then each node's validate_inputs, in one request
    task (a context of its own). {node id: the error details ComfyUI would list for the node}."""
    import contextvars

    def run():
        rec.server.trigger_on_prompt({"prompt": prompt, "client_id": "t"})
        out = {}
        for nid, node in prompt.items():
            cls = ext.nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
            if cls is not None and hasattr(cls, "validate_inputs"):
                msgs = cs.validation_messages(cls, node["inputs"], nid)
                if msgs:
                    out[nid] = msgs
        return out

    return contextvars.copy_context().run(run)


def _graph(config=None, checkpoint="tiny-flux", cfg=1.0, width=256, height=256, batch=1, latent="EmptySD3LatentImage"):
    return {
        "5": {"class_type": "XDiTConfigureHybridParallel", "inputs": dict(CONFIG_DEFAULTS, **(config or {}))},
        "6": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["5", 0], "checkpoint": checkpoint,
                                                              "weight_dtype": "fp32", "family": "auto"}},
        "7": {"class_type": latent, "inputs": {"width": width, "height": height, "batch_size": batch}},
        "8": {"class_type": "XDiTParallelSampler", "inputs": {
            "model": ["6", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["7", 0], "seed": 1,
            "steps": 4, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
    }


def test_configure_valid_and_degrees(ext, rec):
    node = _node(ext, "XDiTConfigureHybridParallel")
    kw = dict(CONFIG_DEFAULTS, ulysses_degree=2, ring_degree=2, pipefusion_degree=2, cfg_degree=2, num_patches=4)
    assert _queue(ext, rec, _graph(kw, cfg=3.0)) == {}
    (s,) = node.execute(**kw)
    assert s.world_size == 16
    assert s.degrees() == {"dp": 1, "cfg": 2, "pipefusion": 2, "ring": 2, "ulysses": 2, "num_patches": 4,
                           "warmup_steps": 1}
    (sharded,) = node.execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2, shard_degree=2, shard_keep=True))
    assert sharded.world_size == 2 and sharded.degrees()["shard"] == 2 and sharded.degrees()["shard_keep"] == 1
    (pooled,) = node.execute(**dict(CONFIG_DEFAULTS, shard_degree=2))
    assert pooled.world_size == 2  # shard alone: two ranks computing the same step
    (s1,) = node.execute(**dict(CONFIG_DEFAULTS, pipefusion_degree=3))
    assert s1.degrees()["num_patches"] == 3  # 0 = one patch per stage


@pytest.mark.parametrize("change, reason", [
    (dict(pipefusion_degree=4, num_patches=2), "num_patches (2) must be at least the pipefusion degree (4)"),
    (dict(num_patches=3), "num_patches applies to PipeFusion only"),
    (dict(pipefusion_degree=2, warmup_steps=0), "pipefusion needs warmup_steps >= 1"),
    (dict(gpus="0,1"), "gpus applies to device cuda only"),
    (dict(device="cuda", gpus="x"), None),
    (dict(pool_address="localhost:5555"), "pool address must look like tcp://HOST:PORT"),
    (dict(ulysses_degree=2, shard_degree=4), "shard degree 4 must be 1 or a product of the innermost degrees"),
    (dict(pipefusion_degree=2, shard_degree=2), "shard cannot combine with pipefusion"),
])
def test_configure_rejects_at_queue_time_once(ext, rec, change, reason):
    """One line for the node, not one per input (ComfyUI repeats a message once per VALIDATE_INPUTS argument)."""
    errors = _queue(ext, rec, _graph(change))
    assert list(errors) == ["5"] and len(errors["5"]) == 1, errors
    msg = errors["5"][0]
    assert "\n" not in msg and (reason is None or reason in msg)
    node = _node(ext, "XDiTConfigureHybridParallel")
    with pytest.raises(ext.nodes.xdit_nodes.XDiTNodeError, match=re.escape(msg.split(" - ", 1)[1][:30])):
        node.execute(**dict(CONFIG_DEFAULTS, **change))


@pytest.mark.parametrize("change, reason", [
    (dict(cfg_degree=3), "cfg parallel degree must be 1 or 2"),
    (dict(ring_degree=0), "ring degree must be >= 1"),
    (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
])
def test_out_of_range_widgets_left_to_comfyui(ext, rec, change, reason):
    """Numbers outside a widget's declared range: ComfyUI's own check (the schema's min and max, in the V1 view it
    validates) names the input; ours adds nothing, and running still refuses."""
    node = _node(ext, "XDiTConfigureHybridParallel")
    assert _queue(ext, rec, _graph(change)) == {}
    with pytest.raises(ext.nodes.xdit_nodes.XDiTNodeError, match=reason):
        node.execute(**dict(CONFIG_DEFAULTS, **change))


def test_range_of_the_validated_input_checked_here(ext, rec):
    """ComfyUI skips its min/max check for an input validate_inputs takes (0.3.64 and newer): for that one input
    (ulysses_degree on Configure Hybrid Parallel) the queue-time check says what ComfyUI would have."""
    assert ext.nodes.schemas.VALIDATED["XDiTConfigureHybridParallel"] == "ulysses_degree"
    for value in (0, 65):
        assert _queue(ext, rec, _graph(dict(ulysses_degree=value))) == {
            "5": [f"ulysses_degree - ulysses_degree {value} is outside its range 1..64"]}


@pytest.mark.parametrize("node, change, line", [
    ("5", dict(device="tpu"), "ulysses_degree - 'tpu' is not among device's choices (auto, cuda, cpu)"),
    ("5", dict(attention="fast"), "'fast' is not among attention's choices (auto, cudnn, flash, efficient, math)"),
    ("6", dict(weight_dtype="int4"), "checkpoint - 'int4' is not among weight_dtype's choices (bf16, fp16, fp32, "),
    ("6", dict(checkpoint="missing.safetensors"), "'missing.safetensors' is not among checkpoint's choices (tiny-"),
    ("8", dict(scheduler="nope"), "model - 'nope' is not among scheduler's choices (simple, "),
])
def test_choices_checked_at_queue_time(ext, rec, node, change, line):
    """A constant not among a choice widget's options: ComfyUI 0.3.64 validates the choices of V1 nodes only (a V3
    combo's list sits in its options), so the queue-time check names the input, from the schema's options."""
    graph = _graph()
    graph[node]["inputs"].update(change)
    errors = _queue(ext, rec, graph)
    assert list(errors) == [node] and len(errors[node]) == 1 and line in errors[node][0], errors
    if node == "5":
        with pytest.raises(ext.nodes.xdit_nodes.XDiTNodeError):
            _node(ext, "XDiTConfigureHybridParallel").execute(**dict(CONFIG_DEFAULTS, **change))


@pytest.mark.parametrize("config, graph, node, reason", [
    (dict(ulysses_degree=3), {}, "5", "ulysses_degree 3 does not divide the 4 attention heads of tiny-flux"),
    (dict(pipefusion_degree=3), dict(checkpoint="tiny-sd3"), "5",
     "pipefusion_degree 3 is larger than the 2 transformer blocks of tiny-sd3 (Load Parallel DiT node 6)"),
    (dict(cfg_degree=2), dict(cfg=1.0), "8", "cfg_degree 2 runs the negative branch"),
    (dict(dp_degree=2), dict(batch=1), "8", "dp_degree 2 is larger than the batch size 1"),
    (dict(ulysses_degree=2, ring_degree=4), dict(width=32, height=32), "8",
     "32x32 has 4 image tokens, fewer than ring x ulysses (8)"),
    ({}, dict(width=264, latent="EmptyLatentImage", checkpoint="tiny-pixart"), "8", "264x256 is not a multiple of 16"),
    ({}, dict(width=2048, checkpoint="tiny-sd3"), "8", "larger than this model allows (1536 px a side)"),
    (dict(pipefusion_degree=2, num_patches=20), dict(height=256), "8",
     "num_patches 20 is larger than the latent height in tokens (16)"),
])
def test_graph_combinations_refused_at_queue_time(ext, rec, config, graph, node, reason):
    """What only the whole graph tells (the checkpoint's heads and blocks, the sampler's cfg, the latent's size and
    batch) is refused on POST /prompt, once, on the node where it shows, before any pool starts."""
    errors = _queue(ext, rec, _graph(config, **graph))
    assert list(errors) == [node] and len(errors[node]) == 1, errors
    assert reason in errors[node][0]
    assert MANAGER_KEY(ext) is None


@pytest.mark.parametrize("config, via_lora, reason", [
    (dict(pipefusion_degree=2), False, "pipefusion_degree 2 runs in Parallel Sampler only"),
    (dict(pipefusion_degree=2), True, "pipefusion_degree 2 runs in Parallel Sampler only"),
])
def test_stock_model_degrees_refused_at_queue_time(ext, rec, config, via_lora, reason):
    """A loader whose model reaches Parallel DiT Model (through a Parallel LoRA or not) with degrees it cannot run is
    refused on POST /prompt, on the loader, before anything loads; the same degrees feeding a sampler pass, and so
    do weight sharding degrees feeding Parallel DiT Model."""
    g = _graph(dict(ulysses_degree=2, shard_degree=2))
    g["10"] = {"class_type": "XDiTParallelDiTModel", "inputs": {"model": ["6", 0]}}
    assert _queue(ext, rec, g) == {}
    g = _graph(config)
    assert _queue(ext, rec, g) == {}
    g["9"] = {"class_type": "XDiTParallelLoRA", "inputs": {"model": ["6", 0], "lora_name": "x.safetensors",
                                                          "strength_model": 1.0}}
    g["10"] = {"class_type": "XDiTParallelDiTModel", "inputs": {"model": ["9" if via_lora else "6", 0]}}

    def problems():  # without the LoRA node's own line (its file is in no loras folder here)
        return {k: v for k, v in _queue(ext, rec, g).items() if k != "9"}

    errors = problems()
    assert list(errors) == ["6"] and len(errors["6"]) == 1, errors
    assert reason in errors["6"][0] and "Parallel DiT Model (node 10)" in errors["6"][0]
    assert MANAGER_KEY(ext) is None
    g["10"]["inputs"]["model"] = ["9" if not via_lora else "6", 0]  # the other path reaches it too
    assert list(problems()) == ["6"]
    del g["10"]
    assert problems() == {}


@pytest.mark.parametrize("patcher, via", [("LoraLoaderModelOnly", "model"), ("LoraLoader", "model"),
                                           ("ModelMergeSimple", "model2")])
def test_weight_patches_after_stock_model_refused_at_queue_time(ext, rec, patcher, via):
    """ComfyUI's LoRA loaders and merges after Parallel DiT Model (through a shift node or not) would find none of
    the pool's weights and sample without them: refused on POST /prompt, on the loader; the same nodes on a native
    model in the same graph pass."""
    g = _graph()
    g["10"] = {"class_type": "XDiTParallelDiTModel", "inputs": {"model": ["6", 0]}}
    g["11"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["10", 0], "shift": 3.0}}
    g["12"] = {"class_type": patcher, "inputs": {via: ["11", 0], "lora_name": "x.safetensors", "strength_model": 1.0}}
    g["13"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "native.safetensors"}}
    errors = _queue(ext, rec, g)
    assert list(errors) == ["6"] and len(errors["6"]) == 1, errors
    assert f"{patcher} (node 12) patches the weights of Parallel DiT Model (node 10)" in errors["6"][0]
    g["12"]["inputs"][via] = ["13", 0]  # on the native model
    assert _queue(ext, rec, g) == {}
    g["12"]["inputs"][via] = ["10", 0]  # right after it
    assert list(_queue(ext, rec, g)) == ["6"]


@pytest.mark.parametrize("maker", ["CreateHookLoraModelOnly", "CreateHookLora", "CreateHookModelAsLora"])
def test_lora_hooks_on_stock_model_conditioning_refused_at_queue_time(ext, rec, maker):
    """A weight hook (ComfyUI's hook LoRAs) reaching the conditioning that a guider or sampler of Parallel DiT Model
    samples with would patch none of the pool's weights: refused on POST /prompt, on the loader. The same hook on a
    native sampler's conditioning, a hook of model strength 0, SetClipHooks without apply_to_conds, and a latent
    from a hooked native branch pass."""
    g = _graph()
    g["10"] = {"class_type": "XDiTParallelDiTModel", "inputs": {"model": ["6", 0]}}
    g["11"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["10", 0], "shift": 3.0}}
    g["20"] = {"class_type": maker, "inputs": {"lora_name": "x.safetensors", "ckpt_name": "y.safetensors",
                                               "strength_model": 1.0, "strength_clip": 1.0}}
    g["21"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5.safetensors", "type": "sd3"}}
    g["22"] = {"class_type": "SetClipHooks", "inputs": {"clip": ["21", 0], "apply_to_conds": True,
                                                        "schedule_clip": False, "hooks": ["20", 0]}}
    g["23"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["22", 0], "text": "a cat"}}
    g["24"] = {"class_type": "CFGGuider", "inputs": {"model": ["11", 0], "positive": ["23", 0],
                                                     "negative": ["23", 0], "cfg": 3.0}}
    errors = _queue(ext, rec, g)
    assert list(errors) == ["6"] and len(errors["6"]) == 1, errors
    assert (f"the LoRA hook of {maker} (node 20) reaches the conditioning of CFGGuider (node 24), which samples "
            "Parallel DiT Model (node 10)") in errors["6"][0]
    g["22"]["inputs"]["apply_to_conds"] = False  # the LoRA on the text encoder only
    assert _queue(ext, rec, g) == {}
    g["22"]["inputs"]["apply_to_conds"] = True
    g["20"]["inputs"]["strength_model"] = 0.0
    assert _queue(ext, rec, g) == {}
    g["20"]["inputs"]["strength_model"] = 0.5
    g["25"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "native.safetensors"}}
    g["24"]["inputs"]["model"] = ["25", 0]  # a native guider
    assert _queue(ext, rec, g) == {}
    g["26"] = {"class_type": "KSampler", "inputs": {  # the hooked native branch's latent refined in parallel
        "model": ["25", 0], "positive": ["23", 0], "negative": ["23", 0], "latent_image": ["7", 0]}}
    g["27"] = {"class_type": "KSampler", "inputs": {"model": ["11", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                    "latent_image": ["26", 0]}}
    assert _queue(ext, rec, g) == {}
    g["28"] = {"class_type": "ConditioningSetProperties", "inputs": {"cond_NEW": ["2", 0], "hooks": ["20", 0],
                                                                     "strength": 1.0, "set_cond_area": "default"}}
    g["27"]["inputs"]["negative"] = ["28", 0]
    errors = _queue(ext, rec, g)
    assert list(errors) == ["6"] and "reaches the conditioning of KSampler (node 27)" in errors["6"][0], errors


def MANAGER_KEY(ext):
    return ext.nodes.xdit_nodes.MANAGER.key


def test_queue_check_leaves_unknowns_to_sampling(ext, rec):
    """A linked widget or a latent that is not an empty-latent node is known only when the graph runs."""
    g = _graph(dict(dp_degree=2), batch=1)
    g["7"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["9", 0]}}
    assert _queue(ext, rec, g) == {}
    g = _graph(dict(cfg_degree=2))
    g["8"]["inputs"]["cfg"] = ["12", 0]
    assert _queue(ext, rec, g) == {}
    g = _graph(dict(ulysses_degree=3))
    g["5"]["inputs"]["ulysses_degree"] = ["13", 0]
    assert _queue(ext, rec, g) == {}
    # a checkpoint not in the list: that line only (test_choices_checked_at_queue_time), no geometry check
    assert list(_queue(ext, rec, _graph(dict(ulysses_degree=3), checkpoint="missing.safetensors"))) == ["6"]
    assert _queue(ext, rec, _graph(dict(ulysses_degree=2, cfg_degree=2), cfg=4.0)) == {}


def test_queue_check_is_registered_once_and_never_breaks_a_prompt(ext, rec, monkeypatch):
    handlers = rec.server.on_prompt_handlers
    assert len(handlers) == 1 and getattr(handlers[0], "xdit_queue_check", False)
    ext.nodes.queue_check.register()
    assert len(rec.server.on_prompt_handlers) == 1
    body = {"prompt": {"1": "not a node", "2": {"class_type": "XDiTParallelSampler"}}}
    assert handlers[0](body) is body
    monkeypatch.setattr(ext.nodes.queue_check, "graph_problems", lambda p: 1 / 0)
    assert _queue(ext, rec, _graph(dict(ulysses_degree=3))) == {}  # a failing check lets the prompt through


def test_gpu_count_checks(ext):
    pool = ext.nodes.pool
    s = pool.ParallelSettings(device="cuda", ulysses=4)
    assert "need 4 GPUs" in pool.validation_error(s, cuda_count=lambda: 2)
    assert pool.validation_error(s, cuda_count=lambda: 4) is None
    assert pool.validation_error(s, cuda_count=lambda: 2).endswith(
        "only 2 are available: lower ulysses_degree to 2 (or set layout auto)")
    assert "only 2 are available" in pool.validation_error(
        pool.ParallelSettings(device="cuda", ulysses=4, gpus="0,1"), cuda_count=lambda: 8)
    for settings, advice in ((dict(ulysses=2, cfg=2), "lower ulysses_degree to 1"),
                             (dict(ring=2, cfg=2, dp=2), "lower ring_degree to 1 and dp_degree to 1 (or"),
                             (dict(cfg=2, dp=4), "lower dp_degree to 1"), (dict(shard=4), "lower shard_degree to 2")):
        assert advice in pool.validation_error(pool.ParallelSettings(device="cuda", **settings), cuda_count=lambda: 2)
    assert "does not exist" in pool.validation_error(pool.ParallelSettings(device="cuda", gpus="0,9"),
                                                     cuda_count=lambda: 8)
    assert "no CUDA GPU" in pool.validation_error(pool.ParallelSettings(device="cuda"), cuda_count=lambda: 0)
    assert pool.ParallelSettings(device="auto").resolved_device(lambda: 0) == "cpu"
    assert pool.ParallelSettings(device="auto").resolved_device(lambda: 2) == "cuda"


# ------------------------------------------------------------------------------------------------ pool manager
class FakePool:
    started: list = []

    def __init__(self, nproc=1, address=None, secret=None, *, device="cpu", env=None, attached=False,
                 die_with_parent=False):
        self.die_with_parent = die_with_parent
        self.nproc, self.device, self.env, self.address, self.attached = nproc, device, env, address, attached
        self.alive = False
        self.stopped = False

    @classmethod
    def attach(cls, address, secret=None):
        return cls(address=address, attached=True)

    def start(self):
        self.alive = True
        FakePool.started.append(self)

    def stop(self):
        self.stopped, self.alive = True, False

    def is_alive(self):
        return self.alive

    def client(self):
        return SimpleNamespace(pool=self, close=lambda: None)


def test_pool_manager_reuses_restarts_and_never_stops_foreign_pools(ext, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    pool = ext.nodes.pool
    FakePool.started = []
    mgr = pool.PoolManager(FakePool, FakePool.attach)
    a = pool.ParallelSettings(device="cpu", ulysses=2)
    c1 = mgr.client_for(a)
    assert c1.pool.nproc == 2 and c1.pool.device == "cpu" and c1.pool.env["XDIT_ATTENTION"] == "auto"
    assert c1.pool.die_with_parent  # a killed ComfyUI leaves no pool behind
    assert mgr.client_for(pool.ParallelSettings(device="cpu", cfg=2)) is c1  # same rank count: same pool
    c2 = mgr.client_for(pool.ParallelSettings(device="cpu", ulysses=4))
    assert c1.pool.stopped and c2 is not c1 and c2.pool.nproc == 4
    c2.pool.alive = False  # died: restarted on next use
    c3 = mgr.client_for(pool.ParallelSettings(device="cpu", ulysses=4))
    assert c3 is not c2 and c3.pool.alive
    c4 = mgr.client_for(pool.ParallelSettings(address="tcp://127.0.0.1:5999"))
    assert c4.pool.attached and c3.pool.stopped
    mgr.stop()
    assert not c4.pool.stopped  # started elsewhere: left running
    assert len(FakePool.started) == 4


def test_pool_log_path_in_comfyui_log(ext, caplog):
    pool = ext.nodes.pool

    class LoggingPool(FakePool):
        log_path = "/tmp/xdit-pool-test.log"

    mgr = pool.PoolManager(LoggingPool, LoggingPool.attach)
    with caplog.at_level("INFO", logger="comfyui_xdit.nodes"):
        mgr.client_for(pool.ParallelSettings(device="cpu", ulysses=2))
        mgr.client_for(pool.ParallelSettings(address="tcp://127.0.0.1:5999"))
    lines = [r.getMessage() for r in caplog.records if "starting worker pool" in r.getMessage()]
    assert len(lines) == 2 and lines[0].endswith("its log: /tmp/xdit-pool-test.log")
    assert "its log" not in lines[1]  # a pool started elsewhere logs there
    mgr.stop()


def test_launcher_scrubs_cuda_allocator_setting():
    from comfyui_xdit_runtime import launcher

    assert "PYTORCH_CUDA_ALLOC_CONF" in launcher.SCRUBBED_ENV


# ------------------------------------------------------------------------------------------------ conversions
def _cond(tokens=8, dim=4096, batch=1, **extras):
    return [[torch.randn(batch, tokens, dim), extras]]


def test_conditioning_flux_pooled_and_guidance(ext):
    cv = ext.nodes.convert
    pooled = torch.randn(1, 768)
    tensors, guidance = cv.conditioning_tensors(_cond(pooled_output=pooled, guidance=2.5),
                                                _cond(pooled_output=pooled), "flux", use_cfg=False)
    assert set(tensors) == {"cond", "pooled"} and guidance == 2.5  # negative unused without CFG
    assert torch.equal(tensors["pooled"], pooled) and tensors["cond"].dtype == torch.float32
    _, guidance = cv.conditioning_tensors(_cond(pooled_output=pooled), None, "flux", use_cfg=False)
    assert guidance == 3.5  # ComfyUI's default for Flux without FluxGuidance
    tensors, guidance = cv.conditioning_tensors(_cond(pooled_output=torch.randn(1, 2048)),
                                                _cond(pooled_output=torch.randn(1, 2048), start_percent=0.0),
                                                "sd3", use_cfg=True)
    assert set(tensors) == {"cond", "pooled", "neg_cond", "neg_pooled"} and guidance is None


def test_conditioning_pixart_mask(ext):
    cv = ext.nodes.convert
    mask = torch.tensor([[1, 1, 1, 0]])
    tensors, _ = cv.conditioning_tensors(_cond(4, attention_mask=mask), _cond(4), "pixart", use_cfg=True)
    assert set(tensors) == {"cond", "cond_mask", "neg_cond"}
    assert tensors["cond_mask"].tolist() == [[1, 1, 1, 0]]


@pytest.mark.parametrize("positive, family, match", [
    (_cond(pooled_output=torch.zeros(1, 768), area=(64, 64, 0, 0)), "flux", "uses area"),
    (_cond(pooled_output=torch.zeros(1, 768), mask=torch.ones(1, 8, 8), control=object()), "flux",
     "uses control, mask"),
    (_cond(pooled_output=torch.zeros(1, 768), end_percent=0.5), "flux", "uses end_percent"),
    (_cond() + _cond(), "pixart", "has 2 entries"),
    (_cond(), "sd3", "no pooled_output"),
    ([], "pixart", "empty"),
    ([[torch.zeros(8, 4096), {}]], "pixart", "expected \\[batch, tokens, dim\\]"),
])
def test_conditioning_rejections(ext, positive, family, match):
    cv = ext.nodes.convert
    with pytest.raises(cv.ConversionError, match=match):
        cv.conditioning_tensors(positive, None, family, use_cfg=False)


def test_latent_widening_checks_and_output(ext):
    cv = ext.nodes.convert
    empty = {"samples": torch.zeros(2, 4, 16, 24)}  # EmptyLatentImage
    lat = cv.latent_input(empty, "flux-dev")
    assert lat["samples"].shape == (2, 16, 16, 24) and not lat["samples"].any()
    assert cv.latent_input(empty, "pixart-sigma")["samples"].shape == (2, 4, 16, 24)
    with pytest.raises(cv.ConversionError, match="has 4 channels but sd3-medium uses 16"):
        cv.latent_input({"samples": torch.ones(1, 4, 8, 8)}, "sd3-medium")
    with pytest.raises(cv.ConversionError, match="noise_mask"):
        cv.latent_input({"samples": torch.zeros(1, 16, 8, 8), "noise_mask": torch.ones(1, 1, 8, 8)}, "sd3-medium")
    with pytest.raises(cv.ConversionError, match="not a LATENT"):
        cv.latent_input(torch.zeros(1, 16, 8, 8), "sd3-medium")
    fields = cv.request_fields(lat["samples"], 7, 42, 4.5, None, "euler")
    assert fields == {"height": 128, "width": 192, "steps": 7, "seed": 42, "batch_size": 2, "cfg": 4.5,
                      "sampler": "euler", "denoise": 1.0}
    out = cv.output_latent({"samples": empty["samples"], "batch_index": [3, 4]}, torch.ones(2, 16, 16, 24))
    assert out["batch_index"] == [3, 4] and out["samples"].shape == (2, 16, 16, 24)
    noise = cv.noise_for(lat["samples"], 5)
    assert torch.equal(noise, torch.randn(2, 16, 16, 24, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("variant, model_type, settings", [
    ("flux-dev", "FLUX", {}), ("flux-schnell", "FLOW", {"multiplier": 1.0, "shift": 1.0}),
    ("sd3.5-large", "FLOW", {"shift": 3.0}), ("pixart-sigma", "EPS", {"beta_schedule": "sqrt_linear",
                                                                       "linear_start": 0.0001, "linear_end": 0.02,
                                                                       "timesteps": 1000}),
])
def test_sigmas_use_comfy_model_sampling_for_the_variant(ext, rec, variant, model_type, settings):
    cv = ext.nodes.convert
    sig = cv.sigmas_for(variant, "euler", "karras", 6, 1.0)
    ms, scheduler, steps = rec.sigma_calls[-1]
    assert (ms.model_type.name, ms.settings, scheduler, steps) == (model_type, settings, "karras", 6)
    assert sig.shape == (7,) and sig.dtype == torch.float32


def test_sigmas_denoise_as_ksampler(ext, rec):
    cv = ext.nodes.convert
    full = cv.sigmas_for("sd3-medium", "euler", "simple", 10, 1.0)
    part = cv.sigmas_for("sd3-medium", "euler", "simple", 4, 0.45)
    assert rec.sigma_calls[-1][2] == 8  # int(4 / 0.45)
    assert len(part) == 5 and part[-1] == 0 and part[0] < full[0]
    with pytest.raises(ValueError, match="invalid scheduler"):
        cv.sigmas_for("sd3-medium", "euler", "exponential_typo", 4, 1.0)


def test_epsilon_start_noise_as_comfy(ext):
    cv, fam = ext.nodes.convert, ext.nodes.families
    noise = torch.ones(1, 4, 2, 2)
    ms_eps = SimpleNamespace(sigma_max=14.6)
    full = torch.tensor([14.6, 3.0, 0.0])
    scaled = cv.engine_noise(noise, full, "pixart-sigma", ms_eps)
    assert torch.allclose(scaled * 14.6, torch.full_like(noise, (1 + 14.6 ** 2) ** 0.5))
    assert torch.equal(cv.engine_noise(noise, torch.tensor([3.0, 0.0]), "pixart-sigma", ms_eps), noise)  # denoise<1
    assert torch.equal(cv.engine_noise(noise, torch.tensor([1.0, 0.0]), "sd3-medium", SimpleNamespace(sigma_max=1.0)),
                       noise)  # flow models: unchanged
    assert fam.spec("pixart-alpha").model_type == "EPS"


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_listing_resolve_and_variant(ext, rec, tmp_path):
    ck = ext.nodes.checkpoints
    dev = tmp_path / "diffusion_models" / "flux-dev-mini.safetensors"
    schnell = tmp_path / "unet" / "flux-schnell-mini.safetensors"
    full = tmp_path / "checkpoints" / "sd3-all-in-one.safetensors"
    for p in (dev, schnell, full):
        p.parent.mkdir(parents=True, exist_ok=True)
    def t():
        return torch.zeros(1)

    save_file({"double_blocks.0.img_attn.qkv.weight": t(), "guidance_in.in_layer.weight": t()}, str(dev))
    save_file({"double_blocks.0.img_attn.qkv.weight": t(), "single_blocks.0.linear1.weight": t()}, str(schnell))
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": t()}, str(full))
    folder = tmp_path / "diffusion_models" / "pixart-diffusers"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel", "sample_size": 128}))
    (tmp_path / "diffusion_models" / "notes.txt").write_text("x")
    rec.folders = {"diffusion_models": [str(dev), str(schnell), str(tmp_path / "diffusion_models" / "notes.txt")],
                   "checkpoints": [str(full)]}
    names = ck.list_checkpoints()
    assert names == ["flux-dev-mini.safetensors", "flux-schnell-mini.safetensors", "pixart-diffusers/",
                     "sd3-all-in-one.safetensors", "tiny-flux", "tiny-sd3", "tiny-pixart", "tiny-qwen-image", "tiny-z-image", "tiny-flux2",
                     "tiny-wan", "tiny-wan-a14b", "tiny-wan-ti2v"]
    assert ck.resolve("flux-dev-mini.safetensors") == str(dev)
    assert ck.resolve("pixart-diffusers/") == str(folder)
    assert ck.detect_variant(str(dev)) == "flux-dev"
    assert ck.detect_variant(str(schnell)) == "flux-schnell"
    assert ck.detect_variant(str(full)) == "sd3-medium"
    assert ck.detect_variant(str(full), "sd3.5-large") == "sd3.5-large"
    assert ck.detect_variant(str(folder)) == "pixart-alpha"
    assert ck.detect_variant("tiny-pixart") == "pixart-sigma"
    with pytest.raises(ValueError, match="looks like a sd3 model, not flux"):
        ck.detect_variant(str(full), "flux")
    with pytest.raises(FileNotFoundError, match="not in ComfyUI's"):
        ck.resolve("missing.safetensors")
    loader = _node(ext, "XDiTLoadParallelDiT")
    assert loader.INPUT_TYPES()["required"]["checkpoint"][1]["options"] == names
    with pytest.raises(ext.nodes.xdit_nodes.XDiTNodeError, match="^Load Parallel DiT: checkpoint 'missing"):
        loader.execute(None, "missing.safetensors", "bf16", "auto")


# ------------------------------------------------------------------------------------------------ advanced sampler
# KSamplerAdvanced's inputs in ComfyUI 0.3.64's order (nodes.py), with their defaults
KSAMPLER_ADVANCED = ["model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                     "negative", "latent_image", "start_at_step", "end_at_step", "return_with_leftover_noise"]


def _handle(ext, variant="sd3-medium", family="sd3"):
    settings = ext.nodes.pool.settings_from_widgets(**CONFIG_DEFAULTS)
    return ext.nodes.pool.ModelHandle(settings, "tiny-sd3", "fp32", family, variant, "key")


def test_advanced_sampler_has_ksampler_advanceds_inputs(ext):
    adv = _node(ext, "XDiTParallelSamplerAdvanced").INPUT_TYPES()
    plain = _node(ext, "XDiTParallelSampler").INPUT_TYPES()
    req = adv["required"]
    assert list(req) == KSAMPLER_ADVANCED
    assert req["add_noise"][1]["options"] == ["enable", "disable"]  # first entry: the default
    assert req["return_with_leftover_noise"][1]["options"] == ["disable", "enable"]
    assert (req["start_at_step"][1]["default"], req["end_at_step"][1]["default"]) == (0, 10000)
    assert req["end_at_step"][1]["max"] == 10000 and req["cfg"][1]["default"] == 8.0
    assert req["noise_seed"][1]["max"] == 0xFFFFFFFFFFFFFFFF and req["noise_seed"][1]["control_after_generate"]
    for name in ("scheduler", "sampler_name", "steps", "positive", "latent_image"):
        assert req[name] == plain["required"][name], name
    assert adv["optional"] == plain["optional"] and adv["hidden"] == plain["hidden"]


def test_step_range_as_ksampler_advanced(ext):
    """comfy.samplers.KSampler.sample's cut: levels up to end_at_step (its last set to 0 only when fully denoising
    and the cut ends early), then from start_at_step."""
    cut = ext.nodes.convert.step_range
    sig = torch.linspace(1.0, 0.1, 10).tolist() + [0.0]  # 10 steps
    t = torch.tensor(sig)
    assert cut(t, 0, 10000, True).tolist() == sig
    assert cut(t, 0, 10, True).tolist() == sig  # ends where the schedule ends: nothing changed
    assert cut(t, 0, 4, False).tolist() == sig[:5] and sig[4] > 0  # leftover noise: stops at level 4
    assert cut(t, 0, 4, True).tolist() == sig[:4] + [0.0]  # fully denoised there
    assert cut(t, 4, 10000, True).tolist() == sig[4:]
    assert cut(t, 4, 7, False).tolist() == sig[4:8]
    assert t.tolist() == sig  # the schedule itself is not changed
    for start, last in ((4, 4), (5, 3), (10, 10000), (0, 0)):
        with pytest.raises(ValueError, match="leaves no step"):
            cut(t, start, last, True)


def test_advanced_sampler_nothing_to_run_returns_the_latent(ext):
    """start_at_step >= end_at_step or >= steps: ComfyUI returns the input (an empty latent widened); no pool."""
    node = _node(ext, "XDiTParallelSamplerAdvanced")()
    model = _handle(ext)
    lat = {"samples": torch.randn(1, 16, 8, 8), "batch_index": [3]}
    for start, end in ((4, 4), (6, 2), (8, 10000), (9, 20)):
        (out,) = node.execute(model, "disable", 1, 8, 4.0, "euler", "simple", _cond(), _cond(), lat, start, end,
                             "enable")
        assert out["samples"] is lat["samples"] and out["batch_index"] == [3]
    (out,) = node.execute(model, "enable", 1, 8, 4.0, "euler", "simple", _cond(), _cond(),
                         {"samples": torch.zeros(1, 4, 8, 8)}, 3, 3, "disable")
    assert out["samples"].shape == (1, 16, 8, 8) and not out["samples"].any()
    assert MANAGER_KEY(ext) is None  # no pool was started


@pytest.mark.parametrize("args, match", [
    (dict(add_noise="yes"), "add_noise must be enable or disable, got 'yes'"),
    (dict(return_with_leftover_noise=True), "return_with_leftover_noise must be enable or disable, got True"),
    (dict(start_at_step=-1), "start_at_step must be a whole number >= 0, got -1"),
    (dict(end_at_step=2.5), "end_at_step must be a whole number >= 0, got 2.5"),
    (dict(model=object()), "model must come from Load Parallel DiT"),
    (dict(latent_image={"samples": torch.zeros(1, 16, 8, 8), "noise_mask": torch.ones(1, 8, 8)}),
     "noise_mask (inpainting)"),
    (dict(latent_image={"samples": torch.ones(1, 4, 8, 8)}), "4 channels but sd3-medium uses 16"),
    (dict(positive=_cond(dim=4096, area=(8, 8, 0, 0))), "uses area"),
    (dict(scheduler="simple_typo"), "invalid scheduler"),
])
def test_advanced_sampler_bad_inputs_one_line(ext, args, match):
    node = _node(ext, "XDiTParallelSamplerAdvanced")()
    kw = dict(model=_handle(ext), add_noise="enable", noise_seed=1, steps=4, cfg=4.0, sampler_name="euler",
              scheduler="simple", positive=_cond(pooled_output=torch.zeros(1, 2048)),
              negative=_cond(pooled_output=torch.zeros(1, 2048)), latent_image={"samples": torch.zeros(1, 16, 8, 8)},
              start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable")
    kw.update(args)
    with pytest.raises(ext.nodes.xdit_nodes.XDiTNodeError) as e:
        node.execute(**kw)
    msg = str(e.value)
    assert msg.startswith("Parallel Sampler (Advanced): ") and "\n" not in msg and match in msg, msg
    assert MANAGER_KEY(ext) is None


def test_advanced_sampler_checked_at_queue_time(ext, rec):
    """The graph checks of Parallel Sampler apply to the advanced node too, once, on the node."""
    g = _graph(dict(dp_degree=2), batch=1)
    plain = g["8"]["inputs"]
    g["8"] = {"class_type": "XDiTParallelSamplerAdvanced", "inputs": {
        "model": plain["model"], "add_noise": "enable", "noise_seed": 1, "steps": 4, "cfg": 1.0,
        "sampler_name": "euler", "scheduler": "simple", "positive": plain["positive"], "negative": plain["negative"],
        "latent_image": plain["latent_image"], "start_at_step": 0, "end_at_step": 2,
        "return_with_leftover_noise": "enable"}}
    errors = _queue(ext, rec, g)
    assert list(errors) == ["8"] and len(errors["8"]) == 1, errors
    assert "dp_degree 2 is larger than the batch size 1" in errors["8"][0]
    assert _queue(ext, rec, _graph(batch=1) | {"8": g["8"]}) == {}
    assert MANAGER_KEY(ext) is None


def test_sampler_rejects_foreign_model_and_skips_zero_denoise(ext, monkeypatch):
    node = _node(ext, "XDiTParallelSampler")()
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(ext.nodes.xdit_nodes.XDiTNodeError, match="must come from Load Parallel DiT"):
        node.execute(object(), _cond(), _cond(), lat, 0, 4, 1.0, "euler", "simple", 1.0)
    # denoise 0: native KSampler samples over no noise levels and returns the latent as it came; no pool job
    jobs = []
    monkeypatch.setattr(ext.nodes.xdit_nodes, "_run", lambda *a, **k: jobs.append(a) or pytest.fail("sampled"))
    given = {"samples": torch.randn(1, 16, 8, 8), "batch_index": [3]}
    (out,) = node.execute(_handle(ext), _cond(pooled_output=torch.zeros(1, 2048)),
                         _cond(pooled_output=torch.zeros(1, 2048)), given, 0, 4, 4.0, "euler", "simple", 0.0)
    assert out is not given and out["samples"] is given["samples"] and out["batch_index"] == [3] and not jobs
    with pytest.raises(pytest.fail.Exception, match="sampled"):  # the same call at denoise 0.5 does sample
        node.execute(_handle(ext), _cond(pooled_output=torch.zeros(1, 2048)),
                    _cond(pooled_output=torch.zeros(1, 2048)), given, 0, 4, 4.0, "euler", "simple", 0.5)


def test_other_samplers_run_through_comfyuis_sampler_and_refuse_the_loop_only_features(ext, rec, monkeypatch):
    """A sampler the pool's loop lacks (heun) goes to ComfyUI's own sampler over Parallel DiT Model's MODEL, never to
    a pool job; with the step cache or PipeFusion, which only the pool's loop has, it is one line naming the
    samplers that have them. (The sampling itself: tests/test_comfyui_e2e_stock.py, against native KSampler.)"""
    xn = ext.nodes.xdit_nodes
    node = _node(ext, "XDiTParallelSampler")()
    monkeypatch.setattr(xn, "_run", lambda *a, **k: pytest.fail("the pool's loop ran heun"))
    cond = _cond(pooled_output=torch.zeros(1, 2048))
    lat = {"samples": torch.randn(1, 16, 8, 8)}
    with pytest.raises(xn.XDiTNodeError, match=r"^Parallel Sampler: heun runs as ComfyUI's own sampler over the "
                                              r"pool's forwards, without the step cache: use euler or dpmpp_2m for "
                                              r"the step cache$"):
        node.execute(_handle(ext), cond, cond, lat, 0, 4, 4.0, "heun", "simple", 1.0, cache="fbcache")
    import dataclasses

    pf = _handle(ext)
    pf = dataclasses.replace(pf, settings=dataclasses.replace(pf.settings, pipefusion=2, num_patches=2))
    with pytest.raises(xn.XDiTNodeError, match=r"without PipeFusion: use euler or dpmpp_2m for PipeFusion$"):
        node.execute(pf, cond, cond, lat, 0, 4, 4.0, "heun", "simple", 1.0)
    for config, inputs, what in ((dict(pipefusion_degree=2), {}, "PipeFusion"),
                                 ({}, {"cache": "fbcache"}, "the step cache")):  # refused when queued too
        g = _graph(config)
        g["8"]["inputs"].update(sampler_name="heun", **inputs)
        errors = _queue(ext, rec, g)
        assert list(errors) == ["8"] and f"heun runs as ComfyUI's own sampler over the pool's forwards, without " \
            f"{what}" in errors["8"][0], errors
        g["8"]["inputs"]["sampler_name"] = "euler"
        assert _queue(ext, rec, g) == {}
    routed = []
    monkeypatch.setattr(xn, "_sample_in_comfyui", lambda *a: routed.append(a[8]) or ("done",))
    assert node.execute(_handle(ext), cond, cond, lat, 0, 4, 4.0, "heun", "simple", 1.0) == ("done",)
    assert routed == ["heun"]
    with pytest.raises(pytest.fail.Exception, match="the pool's loop ran"):  # euler: the pool's own loop
        node.execute(_handle(ext), cond, cond, lat, 0, 4, 4.0, "euler", "simple", 1.0)


def test_damaged_checkpoint_named_at_queue_time_and_load(ext, rec, tmp_path):
    path = tmp_path / "diffusion_models" / "flux-broken.safetensors"
    path.parent.mkdir()
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(64, 16), "img_in.weight": torch.zeros(16, 64)},
              str(path))
    path.write_bytes(path.read_bytes()[:-100])
    rec.folders = {"diffusion_models": [str(path)]}
    errors = _queue(ext, rec, _graph(checkpoint="flux-broken.safetensors"))
    assert list(errors) == ["6"] and len(errors["6"]) == 1
    assert "checkpoint flux-broken.safetensors is damaged or truncated" in errors["6"][0]
    loader = _node(ext, "XDiTLoadParallelDiT")
    with pytest.raises(ext.nodes.xdit_nodes.XDiTNodeError,
                       match=r"^Load Parallel DiT: checkpoint flux-broken\.safetensors is damaged or truncated: the "
                             r"header describes \d+ bytes, the file has \d+ \(.*flux-broken\.safetensors\)$"):
        loader.execute(None, "flux-broken.safetensors", "bf16", "auto")


def test_checkpoint_geometry_from_header_at_queue_time(ext, rec, tmp_path):
    """A checkpoint on disk (not a built-in): heads from its header's shapes, without loading it."""
    from diffusers import FluxTransformer2DModel

    from tests.test_weights import flux_to_bfl

    path = tmp_path / "diffusion_models" / "flux-24-heads.safetensors"
    path.parent.mkdir()
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=24, joint_attention_dim=64,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    save_file({k: v.contiguous() for k, v in flux_to_bfl(model).items()}, str(path))  # the original BFL layout
    rec.folders = {"diffusion_models": [str(path)]}
    errors = _queue(ext, rec, _graph(dict(ulysses_degree=5), checkpoint="flux-24-heads.safetensors"))
    assert errors == {"5": ["ulysses_degree - ulysses_degree 5 does not divide the 24 attention heads of "
                            "flux-24-heads.safetensors (Ulysses degrees that work: 1, 2, 3, 4, 6, 8 or 12; the ring "
                            "degree takes any other split) (Load Parallel DiT node 6)"]}
    assert _queue(ext, rec, _graph(dict(ulysses_degree=8), checkpoint="flux-24-heads.safetensors")) == {}


def test_sampler_compile_switch_reaches_the_job_and_is_refused_for_comfyuis_samplers(ext, monkeypatch):
    """Parallel Sampler's compile input (off by default) sets the job's `compile` field; with a sampler that runs as
    ComfyUI's own (heun) it is one line."""
    xn = ext.nodes.xdit_nodes
    node = _node(ext, "XDiTParallelSampler")
    spec = node.INPUT_TYPES()["optional"]["compile"]
    assert spec[0] == "BOOLEAN" and spec[1]["default"] is False and spec[1]["tooltip"]
    sent = []

    def run(model, fields, *rest):
        sent.append(fields)
        raise RuntimeError("stop")

    monkeypatch.setattr(xn, "_run", run)
    cond = _cond(pooled_output=torch.zeros(1, 2048))
    lat = {"samples": torch.randn(1, 16, 8, 8)}
    for compile in (False, True):
        with pytest.raises(RuntimeError, match="stop"):
            node.execute(_handle(ext), cond, cond, lat, 0, 4, 4.0, "euler", "simple", 1.0, compile=compile)
    assert "compile" not in sent[0] and sent[1]["compile"] is True
    with pytest.raises(xn.XDiTNodeError, match=r"^Parallel Sampler: heun runs as ComfyUI's own sampler over the "
                                              r"pool's forwards, without compile: use euler or dpmpp_2m to "
                                              r"compile$"):
        node.execute(_handle(ext), cond, cond, lat, 0, 4, 4.0, "heun", "simple", 1.0, compile=True)
