"""The family matrix: every model family through the same checks, its cases and bounds from its row in
tests/family_matrix.py. Parallel sampling equals serial for every exact method at world sizes 2 and 4 (with the
bytes each degree exchanged), PipeFusion's stale phase equals the plain-hook stale reference and its world-4 hybrids
plain PipeFusion 2, the step cache on ranks takes the serial decisions, the analyser under Ulysses gives the serial
profile, bench at full size and tiny. One torchrun launch per world size for all families (tests/conftest.py's
`matrix`); what is specific to one family stays in its own file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.cases import build_request, get_model, serial_of
from tests.conftest import rel_l2
from tests.distributed import assert_exchanged
from tests.family_matrix import FAMILIES, STALE_FLOOR, case_id, cases
from tests.pipefusion_reference import stale_reference

EXACT = 1e-4       # an exact method against serial sampling; a stale run against the stale reference
CACHE_RANKS = 1e-5  # the step cache on ranks against the serial cached run


@pytest.mark.parametrize("case", cases("exact"), ids=case_id)
def test_exact_method_matches_serial(matrix, case):
    info = matrix.result(case["id"])
    serial = serial_of(case)
    assert info["latents"].shape == serial.shape
    assert rel_l2(info["latents"], serial) <= EXACT
    if case["world"] == 2 and case["parallel"] != {"dp": 2}:  # dp exchanges nothing during the steps
        assert sum(info["rank_comm"][0][0].values()) > 0  # rank 0 sent data in the first step
    assert_exchanged(info, case["parallel"])  # every rank sent bytes of each of its degrees


@pytest.mark.parametrize("case", cases("stale"), ids=case_id)
def test_pipefusion_stale_phase_is_the_stale_rule(matrix, case):
    """Against the rule written independently with plain hooks on serial sampling (tests/pipefusion_reference.py);
    and stale K/V really used (not serial)."""
    out = matrix.result(case["id"])["latents"]
    assert rel_l2(out, stale_reference(case)) <= EXACT
    assert rel_l2(out, serial_of(case)) > STALE_FLOOR


@pytest.mark.parametrize("case", cases("hybrid"), ids=case_id)
def test_pipefusion_stale_hybrid_is_plain_pipefusion(matrix, case):
    """With Ulysses, Ring or cfg parallel inside the stages: the same approximation as plain pipefusion 2 with the
    same patches and warm-up (its twin, a world-2 case)."""
    out = matrix.result(case["id"])["latents"]
    assert rel_l2(out, matrix.result(case["twin"])["latents"]) <= EXACT
    assert rel_l2(out, serial_of(case)) > STALE_FLOOR


def _serial_cached(case: dict):
    from comfyui_xdit.engine import run_job

    loaded = get_model(case)
    job = run_job(loaded, build_request(loaded, case))
    return job.latents, job.reused_steps


@pytest.mark.parametrize("case", cases("cache"), ids=case_id)
def test_step_cache_on_ranks(matrix, case):
    """Ulysses: every rank takes the serial run's reuse decisions and samples its result. PipeFusion: every stage
    the same decisions ("expect": stage 0's, at least one and none in the 2 first steps; "serial": the serial
    run's; "none": none), the result the stale rule with the reuse rule on those steps."""
    info = matrix.result(case["id"])
    serial, reused = _serial_cached(case)
    uncached = serial_of({k: v for k, v in case.items() if k != "cache"})
    ranks = info["rank_reused"]
    if case["parallel"].get("pipefusion", 1) == 1:
        assert reused and ranks == [reused] * case["world"]
        assert rel_l2(serial, uncached) > 1e-4  # the reuse changes the result
        assert rel_l2(info["latents"], serial) < CACHE_RANKS
        return
    first = ranks[0]
    assert all(r == first for r in ranks)  # decided on stage 0, followed by the others
    expect = case["expect"]
    if expect == "stage0":
        assert first and min(first) >= 2
    elif expect == "serial":
        assert first == reused and first
    else:
        assert first == []
    assert torch.isfinite(info["latents"]).all()
    pf = {k: v for k, v in case.items() if k != "cache"}
    assert rel_l2(info["latents"], stale_reference(pf, first)) <= EXACT  # tests/pipefusion_reference.py
    if first:
        assert rel_l2(info["latents"], stale_reference(pf)) > 1e-4  # the reuse changed the result
    if "twin" in case:  # the same run without the cache
        assert rel_l2(info["latents"], matrix.result(case["twin"])["latents"]) <= 1e-6


@pytest.mark.parametrize("case", cases("analyse"), ids=case_id)
def test_analyser_under_ulysses_is_the_serial_profile(matrix, case):
    from comfyui_xdit.analysis import analyze
    from tests.attn_cases import analysis_requests, profile_tensors

    info = matrix.result(case["id"])
    loaded = get_model(case)
    profile = analyze(loaded, analysis_requests(loaded, case))
    serial = profile_tensors(profile)
    assert set(info["tensors"]) - {"latents"} == set(serial) and len(serial) == 2 * len(profile.kinds)
    every = FAMILIES[case["family"]].analyse_finite == "all"
    for key, value in serial.items():
        if every or key.startswith("residual"):
            assert torch.isfinite(value[:, :, 1:]).all(), key
        np.testing.assert_allclose(info["tensors"][key].numpy(), value.numpy(), rtol=1e-4, atol=1e-7,
                                   equal_nan=True, err_msg=key)


@pytest.mark.parametrize("family", [f for f, row in FAMILIES.items() if row.bench])
def test_bench_full_size_and_tiny_run(family):
    """The published model's size on the meta device; the tiny model's step against the model called as its
    diffusers pipeline calls it (bench.pipeline_step)."""
    from comfyui_xdit.bench import build_random, run

    row = FAMILIES[family]
    b = row.bench
    adapter = build_random(b.arch, torch.bfloat16, "meta")
    assert sum(p.numel() for p in adapter.model.parameters()) == pytest.approx(b.params, rel=b.rel)
    assert {k: getattr(adapter, k) for k in b.facts} == b.facts
    rows, facts = run(row.model, b.size, "cpu", torch.float32, compile=False, repeats=1, frames=b.frames)
    assert [r[0] for r in rows] == ["diffusers eager", "ours eager"]
    assert facts["rel_l2_ours_vs_diffusers"] <= 1e-6 and facts["flops"] > 0
