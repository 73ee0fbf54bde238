"""PipeFusion: exact where the method is exact, the stale phase equal to an independent plain-hook reference, hybrids at
world 4, communication independent of depth, weights sharded per stage."""
import sys
from pathlib import Path

import pytest

from comfyui_xdit.errors import ConfigError
from comfyui_xdit.parallel import ParallelConfig
from comfyui_xdit.parallel.pipefusion import check_pipefusion, partition
from tests.cases import get_model, serial_of
from tests.conftest import rel_l2
from tests.distributed import run_cases
from tests.pipefusion_reference import stale_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from pipefusion_error import stale_cases  # noqa: E402

FAMILIES = {"flux": "tiny-flux", "sd3": "tiny-sd3", "pixart": "tiny-pixart"}
SIZE = dict(height=128, width=128)  # 8 token rows

def exact_cases() -> list[dict]:
    cases = []
    for fam, model in FAMILIES.items():
        base = {"model": model, "seed": 3, "steps": 4, "cfg": 3.0, **SIZE}
        cases.append({**base, "id": f"{fam}_m1", "parallel": {"pipefusion": 2, "num_patches": 1}})
        cases.append({**base, "id": f"{fam}_allwarm", "parallel": {"pipefusion": 2, "num_patches": 2,
                                                                     "warmup_steps": 4}})
    return cases


def depth_cases() -> list[dict]:
    base = {"seed": 3, "steps": 3, **SIZE, "parallel": {"pipefusion": 2, "num_patches": 2, "warmup_steps": 1}}
    return [{**base, "id": "depth1", "model": "tiny-flux"},
            {**base, "id": "depth2", "model": "tiny-flux", "overrides": {"num_layers": 4, "num_single_layers": 4}}]


HYBRIDS = {"pf2_ulysses2": {"ulysses": 2}, "pf2_cfg2": {"cfg": 2}, "pf2_ring2": {"ring": 2}}


def hybrid_cases() -> list[dict]:
    cases = []
    for fam, model in FAMILIES.items():
        for name, extra in HYBRIDS.items():
            base = {"model": model, "seed": 4, "steps": 4, "cfg": 3.0, "height": 128, "width": 160}
            cases.append({**base, "id": f"{fam}_{name}_exact",
                          "parallel": {"pipefusion": 2, "num_patches": 2, "warmup_steps": 4, **extra}})
            cases.append({**base, "id": f"{fam}_{name}_stale",
                          "parallel": {"pipefusion": 2, "num_patches": 2, "warmup_steps": 1, **extra}})
    return cases


def stale_reference_cases() -> list[dict]:
    """Plain pipefusion 2 twins of the hybrids' stale cases (same patches, same warm-up)."""
    return [{**c, "id": c["id"].replace("_stale", "_twin"), "parallel": {"pipefusion": 2, "num_patches": 2,
                                                                          "warmup_steps": 1}}
            for c in hybrid_cases() if c["id"].endswith("_stale") and "cfg2" in c["id"]] + \
           [{**c, "id": c["id"].replace("_stale", "_twin"), "parallel": {"pipefusion": 2, "num_patches": 2,
                                                                          "warmup_steps": 1}}
            for c in hybrid_cases() if c["id"].endswith("_stale") and "cfg2" not in c["id"]]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    cases = exact_cases() + stale_cases() + depth_cases() + stale_reference_cases()
    return run_cases(2, cases, tmp_path_factory.mktemp("pf2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return run_cases(4, hybrid_cases(), tmp_path_factory.mktemp("pf4"))


@pytest.mark.parametrize("case", exact_cases(), ids=lambda c: c["id"])
def test_exact_when_nothing_is_stale(world2, case):
    info = world2[case["id"]]
    assert info["ok"], info.get("error")
    assert rel_l2(info["latents"], serial_of(case)) <= 1e-4


@pytest.mark.parametrize("case", stale_cases() + stale_reference_cases(), ids=lambda c: c["id"])
def test_stale_phase_is_the_stale_rule(world2, case):
    """The stale phase against the rule written independently with plain hooks on serial sampling
    (tests/pipefusion_reference.py), at 1e-4; and stale K/V really used (not serial)."""
    info = world2[case["id"]]
    assert info["ok"], info.get("error")
    assert rel_l2(info["latents"], stale_reference(case)) <= 1e-4
    assert rel_l2(info["latents"], serial_of(case)) > 1e-6


@pytest.mark.parametrize("case", hybrid_cases(), ids=lambda c: c["id"])
def test_hybrids_world4(world2, world4, case):
    info = world4[case["id"]]
    assert info["ok"], info.get("error")
    if case["id"].endswith("_exact"):
        assert rel_l2(info["latents"], serial_of(case)) <= 1e-4
    else:  # the same approximation as plain pipefusion 2 with the same patches and warm-up
        twin = world2[case["id"].replace("_stale", "_twin")]["latents"]
        assert rel_l2(info["latents"], twin) <= 1e-4
        assert rel_l2(info["latents"], serial_of(case)) > 1e-6


def test_bytes_per_step_do_not_grow_with_depth(world2):
    one, two = world2["depth1"]["rank_comm"], world2["depth2"]["rank_comm"]
    assert one == two
    # analytic, stage 0 -> 1 per step: image activations of every patch (64 tokens x 64 hidden x fp32) plus the
    # 16 text tokens with each patch pass (1 pass in the warm-up step, M = 2 after); stage 1 -> 0: the latent
    # rows (16 x 16 x 16 fp32) after every step but the last.
    img, txt, latent = 64 * 64 * 4, 16 * 64 * 4, 16 * 16 * 16 * 4
    assert [s["pipefusion"] for s in one[0]] == [img + txt, img + 2 * txt, img + 2 * txt]
    assert [s.get("pipefusion_latent", 0) for s in one[1]] == [latent, latent, 0]


def test_each_rank_holds_its_share_of_the_blocks(world2):
    for name in ("depth1", "depth2"):
        case = [c for c in depth_cases() if c["id"] == name][0]
        full = get_model(case).adapter.model
        blocks = list(full.transformer_blocks) + list(full.single_transformer_blocks)
        sizes = [sum(p.numel() * 4 for p in b.parameters()) for b in blocks]
        total_other = sum(p.numel() * 4 for p in full.parameters()) - sum(sizes)
        reports = world2[name]["params"]
        assert sum(r["blocks"] for r in reports) == sum(sizes)
        for r in reports:
            assert r["blocks"] <= sum(sizes) / 2 + max(sizes)
            assert r["other"] == total_other


def test_partition_balances_cost():
    assert partition([1, 1, 1, 1], 2) == [0, 2]
    assert partition([4, 1, 1, 1, 1], 2) == [0, 1]
    costs = [2, 2, 1, 1, 1, 1, 1, 1]
    starts = partition(costs, 3) + [len(costs)]
    assert max(sum(costs[a:b]) for a, b in zip(starts, starts[1:])) == 4  # the best possible for these costs
    # a cap on the weight (parameter bytes) per group overrides the cost balance
    assert partition([1, 1, 1, 1], 2, weights=[3, 3, 1, 1], cap=5) == [0, 1]
    with pytest.raises(ConfigError, match="no split into 2 stages"):
        partition([1, 1, 1], 2, weights=[4, 4, 4], cap=5)


def test_stages_balance_compute_per_token():
    """A Flux double block holds twice a single block's parameters but does about the same work per image
    token (its text stream runs on few tokens): 1 double + 5 single blocks split 3 | 3."""
    from comfyui_xdit.adapters.base import per_token_bytes

    model = get_model({"model": "tiny-flux"}).adapter.model
    double, single = model.transformer_blocks[0], model.single_transformer_blocks[0]
    params = [sum(p.numel() for p in b.parameters()) for b in (double, single)]
    assert params[0] > 1.5 * params[1]
    assert abs(per_token_bytes(double) / per_token_bytes(single) - 1) < 0.1
    costs = [per_token_bytes(double)] + [per_token_bytes(single)] * 5
    sizes = [params[0]] + [params[1]] * 5
    assert partition(costs, 2, sizes, sum(sizes) / 2 + max(sizes)) == [0, 3]
    assert partition(sizes, 2) == [0, 2]  # balancing parameter bytes instead would give 2 | 4 blocks


@pytest.mark.parametrize("config,height,message", [
    (ParallelConfig(pipefusion=2, num_patches=9), 128, "larger than the latent height"),
    (ParallelConfig(pipefusion=8, num_patches=2), 128, "larger than the model's 4 transformer blocks"),
    (ParallelConfig(pipefusion=2, num_patches=2, warmup_steps=0), 128, "warmup_steps >= 1"),
])
def test_clear_errors(config, height, message):
    with pytest.raises(ConfigError, match=message):
        check_pipefusion(config, get_model({"model": "tiny-flux"}).adapter, height, 128)


def test_cancel_stops_every_rank_and_the_group_stays_usable(tmp_path):
    base = {"model": "tiny-sd3", "seed": 2, "steps": 6, "cfg": 3.0, **SIZE}
    cases = [
        {**base, "id": "pf_cancel", "cancel_after": 3, "parallel": {"pipefusion": 2, "num_patches": 2}},
        {**base, "id": "usp_cancel", "cancel_after": 2, "parallel": {"ulysses": 2}},
        {**base, "id": "after", "parallel": {"pipefusion": 2, "num_patches": 1}},
    ]
    results = run_cases(2, cases, tmp_path)
    assert "before step 4" in results["pf_cancel"]["cancelled"]
    assert "after step 2" in results["usp_cancel"]["cancelled"]
    assert results["after"]["ok"] and rel_l2(results["after"]["latents"], serial_of(cases[2])) <= 1e-4
