"""Regional torch.compile of the repeated blocks (comfyui_xdit/compile.py) under every method, CPU/gloo, world 2.

Each method runs the same job eagerly and compiled (inductor) on two ranks; the two must agree to 1e-5 (relative
L2, fp32). Every compiled job must show no graph break on any rank, and the same job again must compile nothing
(the compiled blocks are kept by the process, as a pool keeps them). One torchrun runs every case, so graphs of one
shape and layout are compiled once for the run (Ulysses and Ring share theirs: the distributed attention is one
opaque op in the graph).
"""
import inspect
import os

import pytest
import torch
import torch.nn.functional as F

from comfyui_xdit.compile import compiled_blocks, repeated_blocks
from comfyui_xdit.models import load_model
from tests.conftest import rel_l2
from tests.distributed import run_cases

TOL = 1e-5
# XDIT_COMPILE_TEST_DEVICE=cuda (scripts/gpu_compile_checks.sh): the same cases with CUDA tensors, two ranks sharing
# one GPU over gloo (Ring's point-to-point staged through host memory by the comm layer)
DEVICE = os.environ.get("XDIT_COMPILE_TEST_DEVICE", "cpu")
BASE = {"model": "tiny-flux", "seed": 3, "steps": 3, "height": 128, "width": 160, "overrides": {"device": DEVICE}}
METHODS = {  # name: (parallel, extra case settings)
    "ulysses2": ({"ulysses": 2}, {}),
    "ring2": ({"ring": 2}, {}),
    "cfg2": ({"cfg": 2}, {"cfg": 3.0}),
    "pipefusion2": ({"pipefusion": 2, "num_patches": 2, "warmup_steps": 1}, {}),
    "shard2": ({"shard": 2}, {}),
    "ulysses2_cache": ({"ulysses": 2}, {"cache": {"mask": [True, False, True]}}),
}
if os.environ.get("XDIT_COMPILE_TEST_METHODS"):  # a subset (the GPU script runs FSDP shard on its own)
    METHODS = {k: v for k, v in METHODS.items() if k in os.environ["XDIT_COMPILE_TEST_METHODS"].split(",")}


def cases() -> list[dict]:
    out = []
    for name, (parallel, extra) in METHODS.items():
        for compiled in (False, True):
            out.append({**BASE, **extra, "parallel": parallel, "compile": compiled,
                        "id": f"{name}_{'compiled' if compiled else 'eager'}"})
    if "ulysses2" in METHODS:  # the first compiled job again: the same shapes and layout, nothing new to compile
        out.append({**out[1], "id": "ulysses2_compiled_again"})
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_cases(2, cases(), tmp_path_factory.mktemp("compile"))


@pytest.mark.parametrize("method", METHODS)
def test_compiled_matches_eager(results, method):
    eager, compiled = results[f"{method}_eager"], results[f"{method}_compiled"]
    assert eager["ok"], eager.get("error")
    assert compiled["ok"], compiled.get("error")
    assert rel_l2(compiled["latents"], eager["latents"]) <= TOL
    if method == "ulysses2_cache":
        assert all(r == [1] for r in compiled["rank_reused"]), compiled["rank_reused"]
    counts = compiled["compiled"]
    assert all(c["breaks"] == 0 for c in counts), counts
    assert all(c["calls"] > 0 for c in counts), counts  # the compiled forwards really ran


@pytest.mark.skipif("ulysses2" not in METHODS, reason="runs with the ulysses2 cases")
def test_second_job_compiles_nothing(results):
    first, again = results["ulysses2_compiled"], results["ulysses2_compiled_again"]
    assert again["ok"], again.get("error")
    assert torch.equal(first["latents"], again["latents"])
    assert all(c["graphs"] > 0 for c in first["compiled"]), first["compiled"]
    assert all(c["graphs"] == 0 for c in again["compiled"]), again["compiled"]


def _block_inputs(adapter, block) -> dict:
    """The keyword inputs one eager forward of the model passes to `block`."""
    from comfyui_xdit.bench import step_inputs

    seen = {}

    def grab(module, args, kwargs):
        names = list(inspect.signature(type(module).forward).parameters)[1:]
        seen.update(dict(zip(names, args)), **kwargs)

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.predict(*step_inputs(adapter, 64, 1, "cpu"))
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-wan"])
def test_no_graph_break_inside_a_block_with_the_parallel_wrappers(model):
    """Every repeated block class, traced with the engine's attention wrappers in place (their replacement here is
    local SDPA, so no other rank is needed): one graph, no break, and the attention is the opaque op."""
    from comfyui_xdit.parallel import plan as plan_mod
    from comfyui_xdit.parallel.sequence import wrap_attention

    adapter = load_model(model).adapter
    restore = wrap_attention(plan_mod.attention_modules(adapter.model, adapter.plan),
                             lambda module, streams: (lambda: F.scaled_dot_product_attention), root=adapter.model)
    try:
        by_class = {}
        for block in repeated_blocks(adapter):
            by_class.setdefault(type(block), block)
        assert by_class
        for cls, block in by_class.items():
            inputs = _block_inputs(adapter, block)
            with torch.no_grad():
                explained = torch._dynamo.explain(cls.forward)(block, **inputs)
            assert explained.graph_break_count == 0, (cls.__name__, explained.break_reasons)
            assert explained.graph_count == 1
            ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
            assert any("rerouted_attention" in op for op in ops), (cls.__name__, ops)
    finally:
        restore()


def test_compiled_blocks_restores_the_forwards():
    adapter = load_model("tiny-pixart").adapter
    blocks = repeated_blocks(adapter)
    with compiled_blocks(adapter):
        assert all("forward" in b.__dict__ for b in blocks)
    assert not any("forward" in b.__dict__ for b in blocks)
    with compiled_blocks(adapter, enabled=False):
        assert not any("forward" in b.__dict__ for b in blocks)


@pytest.mark.spawns  # inductor runs the C++ compiler as a subprocess
def test_serial_compiled_matches_eager_with_context_modules_in_the_blocks():
    """World 1, PixArt: its cross-attention K/V projections (inside the blocks) are context-cache modules; a
    compiled block computes them itself, and the result equals eager sampling."""
    from comfyui_xdit.engine import run_job
    from comfyui_xdit.sampling import SampleRequest

    loaded = load_model("tiny-pixart")
    req = dict(height=64, width=64, steps=2, seed=1, cfg=3.0)
    eager = run_job(loaded, SampleRequest(**req)).latents
    compiled = run_job(loaded, SampleRequest(**req, compile=True)).latents
    assert rel_l2(compiled, eager) <= TOL


def test_a_processor_the_traced_path_cannot_route_is_refused_in_one_line():
    """A processor whose code reaches SDPA through `torch.nn.functional...` (neither `F` nor dispatch_attention_fn):
    eager parallel attention still reroutes it, a compiled block refuses it with one line, before tracing."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from comfyui_xdit.errors import ConfigError
    from comfyui_xdit.parallel import plan as plan_mod
    from comfyui_xdit.parallel.sequence import _traced_function, wrap_attention

    class TorchPath(FluxAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            k = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            v = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            return (out, encoder_hidden_states) if encoder_hidden_states is not None else out

    assert _traced_function(FluxAttnProcessor) is not None and _traced_function(TorchPath) is None
    adapter = load_model("tiny-flux").adapter
    for m, _ in plan_mod.attention_modules(adapter.model, adapter.plan):
        m.processor = TorchPath()
    restore = wrap_attention(plan_mod.attention_modules(adapter.model, adapter.plan),
                             lambda module, streams: (lambda: F.scaled_dot_product_attention), root=adapter.model)
    try:
        from comfyui_xdit.bench import step_inputs

        with compiled_blocks(adapter), pytest.raises(ConfigError, match=r"^torch.compile: attention processor "
                                                                          r"TorchPath of \w+ reaches attention "
                                                                          r"neither [^\n]*turn compile off$"):
            adapter.predict(*step_inputs(adapter, 64, 1, "cpu"))
    finally:
        restore()
