"""First-block residual cache: exact when nothing is reused, the reuse rule against a plain-hook reference,
decisions identical on every rank under ulysses 2, cfg 2, pipefusion 2 (and data parallel)."""
import pytest
import torch

from comfyui_xdit.cache import CacheSettings, mask_from_curve, model_blocks, parse_mask
from comfyui_xdit.engine import run_job
from comfyui_xdit.errors import XDiTError
from tests.cases import build_request, get_model
from tests.conftest import rel_l2
from tests.distributed import run_cases
from tests.pipefusion_reference import stale_reference

FAMILIES = ["tiny-flux", "tiny-sd3", "tiny-pixart"]
BASE = {"seed": 5, "steps": 8, "cfg": 3.0, "height": 128, "width": 128}


def _sample(model: str, cache: dict | None = None, **kw):
    loaded = get_model({"model": model})
    case = {**BASE, "model": model, **kw}
    if cache is not None:
        case["cache"] = cache
    reused = []
    result = run_job(loaded, build_request(loaded, case), callback=lambda info: reused.append(info.reused))
    assert result.reused_steps == [i for i, r in enumerate(reused) if r]
    return result.latents, result.reused_steps


@pytest.mark.parametrize("model", FAMILIES)
def test_threshold_zero_is_exactly_uncached(model):
    ref, _ = _sample(model)
    out, reused = _sample(model, {"threshold": 0.0})
    assert reused == []
    assert torch.equal(out, ref)


def _hook_reference(model: str, mask: list[bool], case: dict | None = None):
    """The reuse rule written with plain forward hooks: every block still runs, but on a reused step the last
    block's image output is replaced by (first block's image output + the span residual of the last computed
    step of the same branch call). `case`: the request (default BASE)."""
    case = {**BASE, "model": model} if case is None else {k: v for k, v in case.items() if k != "cache"}
    loaded = get_model(case)
    ad = loaded.adapter
    blocks = model_blocks(ad)
    last_list = ad.block_list(blocks[-1])
    state = {"step": 0, "call": 0, "first": None, "res": {}}

    def first_hook(module, args, out):
        state["first"] = ad.block_streams(out)[0]

    def last_hook(module, args, out):
        image, text = ad.block_streams(out)
        call = state["call"]
        state["call"] += 1
        if mask[state["step"]]:
            state["res"][call] = image - state["first"]
            return None
        new = state["first"] + state["res"][call]
        if not isinstance(out, tuple):
            return new
        out = list(out)
        out[last_list.outputs.index(0)] = new  # the main stream's place in the block's output
        return tuple(out)

    def step_end(i):
        state["step"], state["call"] = i + 1, 0

    handles = [blocks[0].register_forward_hook(first_hook), blocks[-1].register_forward_hook(last_hook)]
    try:
        return run_job(loaded, build_request(loaded, case), step_end=step_end).latents
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("model", FAMILIES)
def test_reuse_matches_plain_hook_reference(model):
    mask = [True, True, False, False, True, False, True, False]
    ref = _hook_reference(model, mask)
    out, reused = _sample(model, {"mask": mask})
    assert reused == [2, 3, 5, 7]
    uncached, _ = _sample(model)
    assert rel_l2(out, uncached) > 1e-4  # reuse changed the result ...
    assert rel_l2(out, ref) < 1e-6       # ... exactly as the reference rule says


def test_reused_steps_skip_the_blocks():
    loaded = get_model({"model": "tiny-flux"})
    calls = []
    later = model_blocks(loaded.adapter)[1:]
    handles = [b.attn.register_forward_pre_hook(lambda m, a: calls.append(1)) for b in later]
    try:
        _, reused = _sample("tiny-flux", {"mask": [True, True, False, True, False, False, True, True]})
    finally:
        for h in handles:
            h.remove()
    computed = 8 - len(reused)
    assert reused == [2, 4, 5]
    assert len(calls) == computed * 2 * len(later)  # two CFG branches per computed step


def test_threshold_reuses_and_rules():
    ref, _ = _sample("tiny-flux")
    out, reused = _sample("tiny-flux", {"threshold": 0.7})
    assert 0 < len(reused) < 7 and 0 not in reused
    assert rel_l2(out, ref) > 1e-4
    # the steps the threshold reused, reused exactly as the plain-hook rule says
    assert rel_l2(out, _hook_reference("tiny-flux", [i not in reused for i in range(8)])) < 1e-6
    _, all_reused = _sample("tiny-flux", {"threshold": 100.0, "warmup": 2})
    assert all_reused == list(range(2, 8))
    _, capped = _sample("tiny-flux", {"threshold": 100.0, "max_consecutive": 2})
    assert capped == [1, 2, 4, 5, 7]


def test_mask_helpers_and_bad_settings():
    assert parse_mask("1,1,0,1") == [True, True, False, True]
    assert mask_from_curve([float("nan"), 0.1, 0.1, 0.1, 0.5, 0.1], threshold=0.25) == \
        [True, False, False, True, True, False]
    assert mask_from_curve([0, 0.1, 0.1, 0.1], threshold=1.0, max_consecutive=2) == [True, False, False, True]
    loaded = get_model({"model": "tiny-flux"})
    for bad, msg in [({"threshold": -1}, "threshold"), ({"warmup": 0}, "warmup"), ({"mask": [True] * 3}, "mask"),
                     ({"first_blocks": 4}, "first_blocks")]:
        with pytest.raises(XDiTError, match=msg):
            run_job(loaded, build_request(loaded, {**BASE, "model": "tiny-flux", "cache": bad}))
    with pytest.raises(XDiTError, match="unknown cache settings"):
        CacheSettings.from_dict({"treshold": 1})


CACHE = {"threshold": 0.7}
PARALLEL = {"ulysses2": {"ulysses": 2}, "cfg2": {"cfg": 2}, "dp2": {"dp": 2},
            "pipefusion2": {"pipefusion": 2, "num_patches": 2, "warmup_steps": 1}}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    cases = [{**BASE, "model": "tiny-flux", "id": name, "parallel": par, "cache": CACHE,
              **({"batch": 2} if "dp" in par else {})} for name, par in PARALLEL.items()]
    return run_cases(2, cases, tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("name", ["ulysses2", "cfg2", "dp2"])
def test_exact_methods_reuse_the_serial_steps(world2, name):
    res = world2[name]
    assert res["ok"], res
    batch = 2 if name == "dp2" else 1
    serial, reused = _sample("tiny-flux", CACHE, batch=batch)
    assert reused  # the threshold does reuse steps here
    assert res["rank_reused"] == [reused, reused]  # same decisions on every rank, and the serial ones
    assert rel_l2(res["latents"], serial) < 1e-5


def test_pipefusion_decisions_agree(world2):
    res = world2["pipefusion2"]
    assert res["ok"], res
    first, second = res["rank_reused"]
    assert first == second and first  # decided on stage 0, followed by stage 1
    assert min(first) >= 2  # warm-up step and the first patch step always compute
    # the stale rule with the cache rule on the steps stage 0 reused (tests/pipefusion_reference.py)
    case = {**BASE, "model": "tiny-flux", "parallel": PARALLEL["pipefusion2"]}
    assert rel_l2(res["latents"], stale_reference(case, first)) <= 1e-4
    assert rel_l2(res["latents"], stale_reference(case)) > 1e-4  # the reuse changed the result
