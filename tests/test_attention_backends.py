"""Whatever attention backend diffusers is set to (DIFFUSERS_ATTN_BACKEND, set_attention_backend), every parallel
path (Ulysses, Ring, PipeFusion, the analyser's taps) routes attention through the engine's distributed attention
and matches serial sampling; a processor whose attention does not reach SDPA is refused with one clear error on
every rank (CPU, gloo, world size 2)."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from comfyui_xdit.errors import ConfigError
from comfyui_xdit.models import load_model
from comfyui_xdit.sampling import sample
from tests.attn_cases import (CPU_BACKENDS, NO_CPU_KERNEL_BACKENDS, analysis_requests, configured,
                              install_processor, profile_tensors)
from tests.cases import build_request
from tests.conftest import rel_l2
from tests.distributed import run_cases

FAMILIES = {"flux": "tiny-flux", "sd3": "tiny-sd3", "pixart": "tiny-pixart"}
ODD = dict(height=112, width=144, text_tokens=15)  # 63 image + 15 text tokens: uneven shards
PF = {"pipefusion": 2, "num_patches": 2}
# name: (parallel config, size, extra case fields). pf2 warms up every step: exact, compared to serial (but its
# attention sees every token without any rerouting: sp 1, no stale K/V); pf2_stale attends to one-step-stale
# K/V after step 1, through the rerouted attention only: compared to the same job with the default backend.
PATHS = {
    "ulysses2": ({"ulysses": 2}, ODD, {}),
    "ring2": ({"ring": 2}, ODD, {}),
    "pf2": ({**PF, "warmup_steps": 3}, dict(height=128, width=128), {"cfg": 3.0}),
    "pf2_stale": ({**PF, "warmup_steps": 1}, dict(height=128, width=128), {"cfg": 3.0}),
    "analyze_ulysses2": ({"ulysses": 2}, dict(height=64, width=64), {"analyze": True}),
}
# set_attention_backend: every backend, family and path. The env var (one torchrun launch per backend; native is
# the default every other test runs with): every path on flux, whose diffusers processor is the only one that
# goes through the dispatcher (sd3's and pixart's call SDPA themselves), Ulysses on the others.
SET_BACKENDS = CPU_BACKENDS + NO_CPU_KERNEL_BACKENDS
ENV_BACKENDS = [b for b in CPU_BACKENDS if b != "native"]
TOL = 1e-4


def _case(cid: str, family: str, path: str, **extra) -> dict:
    par, size, more = PATHS[path]
    return {"id": cid, "model": FAMILIES[family], "seed": 5, "steps": 3, "parallel": par, **size, **more, **extra,
            "path": path, "family": family}


def set_cases() -> list[dict]:
    return [_case(f"set_{b}_{fam}_{path}", fam, path, attention_backend=b)
            for b in SET_BACKENDS for fam in FAMILIES for path in PATHS]


def twin_cases() -> list[dict]:
    """pf2_stale with the default backend: the reference of the pf2_stale cases."""
    return [_case(f"twin_{fam}_pf2_stale", fam, "pf2_stale") for fam in FAMILIES]


def env_cases(backend: str) -> list[dict]:
    return [_case(f"env{backend}_flux_{path}", "flux", path, env_backend=backend) for path in PATHS] + \
        [_case(f"env{backend}_{fam}_ulysses2", fam, "ulysses2", env_backend=backend) for fam in ("sd3", "pixart")]


# Processors that bypass SDPA (tests/attn_cases.py), on tiny-pixart's self-attention; a plain case after them
# shows that the ranks went on (none was left in a collective).
REFUSED = {
    "hand_ulysses2": ("ulysses2", "hand", None, "transformer_blocks.0.attn1"),
    "hand_ring2": ("ring2", "hand", None, "transformer_blocks.0.attn1"),
    # on stage 1 only, whose model holds block 1 alone; reported by rank 0 (stage 0) all the same
    "hand_pf2_last_block": ("pf2_stale", "hand", [1], "transformer_blocks.0.attn1 (pipefusion stage 1 of 2)"),
    "shortcut_ulysses2": ("ulysses2", "shortcut", None, "transformer_blocks.0.attn1"),  # caught in the forward
}


def refused_cases() -> list[dict]:
    cases = [_case(cid, "pixart", path, processor=kind, **({"processor_blocks": blocks} if blocks else {}))
             for cid, (path, kind, blocks, _) in REFUSED.items()]
    return cases + [_case("after_refused", "pixart", "ulysses2")]


@pytest.fixture(scope="module")
def set_results(tmp_path_factory):
    return run_cases(2, set_cases() + twin_cases() + refused_cases(), tmp_path_factory.mktemp("attn_set"))


@pytest.fixture(scope="module")
def env_results(tmp_path_factory):
    @functools.cache
    def launch(backend: str) -> dict:
        return run_cases(2, env_cases(backend), tmp_path_factory.mktemp(f"attn_env{backend}"),
                         env={"DIFFUSERS_ATTN_BACKEND": backend})
    return launch


_references: dict[str, object] = {}


def _reference(case: dict):
    """Serial sampling with the native backend (a model of its own): the latents, or the analyser's profile."""
    from comfyui_xdit.analysis import analyze

    key = repr({k: v for k, v in case.items() if k not in ("id", "parallel", "attention_backend", "env_backend",
                                                            "path")})
    if key not in _references:
        loaded = load_model(case["model"])
        _references[key] = profile_tensors(analyze(loaded, analysis_requests(loaded, case))) if case.get("analyze") \
            else sample(loaded.adapter, build_request(loaded, case), tiny=True)
    return _references[key]


def _check_profile(got: dict, ref: dict) -> None:
    assert sorted(k for k in got if k != "latents") == sorted(ref)
    for k, r in ref.items():
        g = got[k]
        assert torch.equal(torch.isnan(g), torch.isnan(r)), k
        finite = ~torch.isnan(r)
        assert finite.any() and rel_l2(g[finite], r[finite]) <= TOL, k


def _check(info: dict, case: dict, set_results: dict) -> None:
    assert info["ok"], info.get("error")
    if case["path"] == "pf2_stale":
        twin = set_results[f"twin_{case['family']}_pf2_stale"]
        assert twin["ok"], twin.get("error")
        assert rel_l2(info["latents"], twin["latents"]) <= TOL
        return
    ref = _reference(case)
    if case.get("analyze"):
        _check_profile(info["tensors"], ref)
    else:
        assert info["latents"].shape == ref.shape
        assert rel_l2(info["latents"], ref) <= TOL


@pytest.mark.parametrize("case", set_cases(), ids=lambda c: c["id"])
def test_set_attention_backend_matches_serial(set_results, case):
    _check(set_results[case["id"]], case, set_results)


@pytest.mark.parametrize("case", [c for b in ENV_BACKENDS for c in env_cases(b)], ids=lambda c: c["id"])
def test_env_backend_matches_serial(env_results, set_results, case):
    _check(env_results(case["env_backend"])[case["id"]], case, set_results)


@pytest.mark.parametrize("cid", list(REFUSED))
def test_processor_bypassing_sdpa_is_refused_on_every_rank(set_results, cid):
    path, kind, _, module = REFUSED[cid]
    info = set_results[cid]
    assert not info["ok"]
    cls = {"hand": "HandAttnProcessor", "shortcut": "ShortcutAttnProcessor"}[kind]
    assert info["error"].startswith(f"attention processor {cls} of {module} computed attention without "
                                    "F.scaled_dot_product_attention")
    assert "\n" not in info["error"]
    assert info["rank_errors"] == [info["error"]] * 2  # the same error on both ranks
    after = set_results["after_refused"]  # every rank went on to the next case
    _check(after, refused_cases()[-1], set_results)


def test_which_backends_run_on_cpu():
    """The backend lists the tests use: CPU_BACKENDS compute attention on CPU tensors, NO_CPU_KERNEL_BACKENDS
    reach SDPA but find no CPU kernel."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, 16, generator=gen) for _ in range(3))  # [B, S, H, D], as diffusers has it
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    for backend in CPU_BACKENDS:
        assert rel_l2(dispatch_attention_fn(q, k, v, backend=backend), ref) <= 1e-6, backend
    for backend in NO_CPU_KERNEL_BACKENDS:
        with pytest.raises(RuntimeError, match="No viable backend"):
            dispatch_attention_fn(q, k, v, backend=backend)


def _flux_attention_counts(backend: str) -> tuple[int, int]:
    """SDPA calls one Flux attention makes with `backend` set: seen by a bare SDPA override (the original
    wrapper), and by the wrapped processor."""
    from comfyui_xdit.parallel.sequence import _SDPAOverride, wrap_attention

    loaded = load_model("tiny-flux")
    attn = loaded.adapter.model.transformer_blocks[0].attn
    x, ctx = torch.randn(1, 6, attn.query_dim), torch.randn(1, 3, attn.added_kv_proj_dim)
    seen = []
    with configured(loaded, {"attention_backend": backend}), torch.no_grad():
        bare = _SDPAOverride(F.scaled_dot_product_attention)
        with bare:
            attn(x, ctx)
        restore = wrap_attention([(attn, True)], lambda m, j: (lambda: (
            lambda *a, **kw: seen.append(1) or F.scaled_dot_product_attention(*a, **kw))))
        try:
            attn(x, ctx)
        finally:
            restore()
    return bare.calls, len(seen)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_flux_attention_reaches_the_override_whatever_the_backend(backend):
    """Why the original wrapper failed: with flex, diffusers' Flux processor never calls SDPA, so an SDPA
    override alone sees nothing (each rank attended to its own shard); wrapped, every backend is rerouted once
    per call (the probe on dummy tokens does not go through the replacement)."""
    bare, wrapped = _flux_attention_counts(backend)
    assert bare == (0 if backend == "flex" else 1)
    assert wrapped == 1


def test_hand_processor_is_right_serially():
    """The refused processor is correct attention on one process: refusing it is about distribution only."""
    case = _case("x", "pixart", "ulysses2")
    loaded = load_model("tiny-pixart")
    ref = sample(loaded.adapter, build_request(loaded, case), tiny=True)
    install_processor(loaded.adapter.model, "hand")
    assert rel_l2(sample(loaded.adapter, build_request(loaded, case), tiny=True), ref) <= 1e-5


def _attention_state(model) -> list:
    return [(name, type(m.processor), hasattr(m, "_xdit_tap"), len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in model.named_modules() if hasattr(m, "processor")] + \
        [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()]


@pytest.mark.parametrize("kind, message", [
    ("hand", "attention processor HandAttnProcessor of transformer_blocks.1.attn1 computed attention without"),
    ("shortcut", "attention processor ShortcutAttnProcessor of transformer_blocks.1.attn1 computed attention")])
def test_analyser_refuses_processor_bypassing_sdpa(kind, message):
    """Serial analysis: its taps would see nothing. `hand` is refused by the check before sampling, `shortcut`
    (SDPA on the check's dummy tokens) by the count in the first forward; the model is left as it was."""
    from comfyui_xdit.analysis import analyze

    loaded = load_model("tiny-pixart")
    install_processor(loaded.adapter.model, kind, [1])
    before = _attention_state(loaded.adapter.model)
    case = _case("x", "pixart", "analyze_ulysses2")
    with pytest.raises(ConfigError, match=message):
        analyze(loaded, analysis_requests(loaded, case))
    assert _attention_state(loaded.adapter.model) == before


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_serial_analyser_taps_whatever_the_backend(backend):
    """The analyser taps attention through the same wrapper on one process: every backend gives the native
    profile (with flex its taps saw nothing before)."""
    from comfyui_xdit.analysis import analyze

    case = _case("x", "flux", "analyze_ulysses2")
    loaded = load_model("tiny-flux")
    with configured(loaded, {"attention_backend": backend}):
        got = profile_tensors(analyze(loaded, analysis_requests(loaded, case)))
    _check_profile(got, _reference(case))


@pytest.mark.parametrize("model", list(FAMILIES.values()))
def test_every_diffusers_processor_passes_the_check(model):
    """All attention modules of each family (joint, single-stream, SD3.5 dual attn2, PixArt cross-attention)
    pass the dummy-token check, and are restored."""
    from comfyui_xdit.analysis import _layout
    from comfyui_xdit.parallel.sequence import wrap_attention

    loaded = load_model(model)
    modules = [(m, j) for _, m, j, _ in _layout(loaded.adapter).attention]
    before = [type(m.processor) for m, _ in modules]
    wrap_attention(modules, lambda m, j: (lambda: F.scaled_dot_product_attention), root=loaded.adapter.model)()
    assert [type(m.processor) for m, _ in modules] == before
