"""Every parallel configuration equals serial sampling (CPU, gloo, world sizes 2 and 4)."""
import pytest

from comfyui_xdit.errors import ConfigError
from comfyui_xdit.parallel import ParallelConfig
from comfyui_xdit.parallel.runner import check_model_fit
from comfyui_xdit.sampling import SampleRequest, sample
from tests.cases import build_request, get_model
from tests.conftest import rel_l2
from tests.distributed import assert_exchanged, run_cases

FAMILY_MODELS = {"flux": "tiny-flux", "sd3": "tiny-sd3", "pixart": "tiny-pixart"}
# 112x144 -> 7x9 = 63 image tokens and 15 text tokens: neither divides by 2 or 4.
ODD = dict(height=112, width=144, text_tokens=15)
SQUARE = dict(height=128, width=128)


def _cases(world: int) -> list[dict]:
    if world == 2:
        configs = [("ulysses2", {"ulysses": 2}, ODD, {}), ("ring2", {"ring": 2}, ODD, {}),
                   ("cfg2", {"cfg": 2}, SQUARE, {"cfg": 3.0}), ("dp2", {"dp": 2}, SQUARE, {"batch": 3})]
    else:
        configs = [("ulysses2_ring2", {"ulysses": 2, "ring": 2}, ODD, {"cfg": 2.5}),
                   ("cfg2_ulysses2", {"cfg": 2, "ulysses": 2}, SQUARE, {"cfg": 3.0, "batch": 2}),
                   ("ulysses4", {"ulysses": 4}, ODD, {}), ("ring4", {"ring": 4}, ODD, {})]
    cases = []
    for fam, model in FAMILY_MODELS.items():
        for name, par, size, extra in configs:
            cases.append({"id": f"{fam}_{name}", "model": model, "seed": 11, "steps": 3, "parallel": par,
                          **size, **extra})
    if world == 2:  # even shards for the analytic byte counts
        cases.append({"id": "bytes_ulysses2", "model": "tiny-flux", "seed": 1, "steps": 2,
                      "parallel": {"ulysses": 2}, **SQUARE})
        cases.append({"id": "bytes_ring2", "model": "tiny-sd3", "seed": 1, "steps": 2, "parallel": {"ring": 2},
                      **SQUARE})
    return cases


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_cases(2, _cases(2), tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return run_cases(4, _cases(4), tmp_path_factory.mktemp("world4"))


def _check(results, case):
    info = results[case["id"]]
    assert info["ok"], info.get("error")
    loaded = get_model(case)
    serial = sample(loaded.adapter, build_request(loaded, case), tiny=True)
    assert info["latents"].shape == serial.shape
    assert rel_l2(info["latents"], serial) <= 1e-4
    return info


@pytest.mark.parametrize("case", _cases(2), ids=lambda c: c["id"])
def test_world2_matches_serial(world2, case):
    info = _check(world2, case)
    if case["parallel"] != {"dp": 2}:  # dp exchanges nothing during the steps
        sent = info["rank_comm"][0][0]  # rank 0, first step
        assert sum(sent.values()) > 0  # the ranks really exchanged data


@pytest.mark.parametrize("case", _cases(4), ids=lambda c: c["id"])
def test_world4_matches_serial(world4, case):
    assert_exchanged(_check(world4, case), case["parallel"])


# SD3 with a negative of another token count (15 and 7 text tokens, 63 image tokens): each branch runs on its own
# (ComfyUI's SD3 never batches or pads such a pair), sequence-parallel, cfg-parallel and on a PipeFusion stage
SD3_NEG = [{"id": f"sd3_neg_{name}", "model": "tiny-sd3", "seed": 7, "steps": 3, "parallel": par, **ODD,
            "cfg": 3.0, "neg_text_tokens": 7}
           for name, par in (("ulysses2", {"ulysses": 2}), ("ring2", {"ring": 2}), ("cfg2", {"cfg": 2}),
                             ("pf2", {"pipefusion": 2, "num_patches": 2, "warmup_steps": 3}))]


@pytest.fixture(scope="module")
def sd3_negative(tmp_path_factory):
    return run_cases(2, SD3_NEG, tmp_path_factory.mktemp("sd3_negative"))


@pytest.mark.parametrize("case", SD3_NEG, ids=lambda c: c["id"])
def test_sd3_negative_of_another_length_matches_serial(sd3_negative, case):
    info = sd3_negative[case["id"]]
    assert info["ok"], info.get("error")
    loaded = get_model(case)
    serial = sample(loaded.adapter, build_request(loaded, case), tiny=True)
    same = {**case, "neg_text_tokens": 15}  # the negative's own length counts: a 15-token one samples otherwise
    effect = rel_l2(sample(loaded.adapter, build_request(loaded, same), tiny=True), serial)
    err = rel_l2(info["latents"], serial)
    print(f"{case['id']}: rel L2 to serial {err:.2e} (15-token negative vs 7: {effect:.2e})")
    assert info["latents"].shape == serial.shape and err <= 1e-4 and effect > 1e-3
    assert sum(info["rank_comm"][0][0].values()) > 0  # the ranks really exchanged data


def _tiny_flux_layers():
    m = get_model({"model": "tiny-flux"}).adapter.model
    return len(m.transformer_blocks) + len(m.single_transformer_blocks)


def test_ulysses_bytes_match_analytic(world2):
    # 128x128 flux: 64 image + 16 text tokens -> 40 per rank; 4 heads x 16 dims, fp32, batch 1.
    n, b, h, d, e = 2, 1, 4, 16, 4
    shard = b * h * 40 * d * e
    per_layer = 4 * shard * (n - 1) / n  # Q, K, V in and the output back
    expected = per_layer * _tiny_flux_layers()
    for rank in range(2):
        for step in world2["bytes_ulysses2"]["rank_comm"][rank]:
            assert abs(step["ulysses"] - expected) <= 0.05 * expected
            assert step["gather"] == 32 * 64 * e  # this rank's 32 output tokens x 64 channels to the other rank


def test_ring_bytes_match_analytic(world2):
    # 128x128 sd3 (dual attention in block 0): joint attention 64+16 tokens -> 40 per rank, attn2 image only 32.
    n, b, h, d, e = 2, 1, 4, 16, 4
    m = get_model({"model": "tiny-sd3"}).adapter.model
    joint_layers, image_layers = len(m.transformer_blocks), sum(1 for blk in m.transformer_blocks if blk.attn2)
    block = lambda s: b * h * s * d * e  # noqa: E731
    expected = (n - 1) * 2 * (joint_layers * block(40) + image_layers * block(32))  # K and V, N-1 hops
    for rank in range(2):
        for step in world2["bytes_ring2"]["rank_comm"][rank]:
            assert abs(step["ring"] - expected) <= 0.05 * expected


@pytest.mark.parametrize("config,req,message", [
    (ParallelConfig(ulysses=3), SampleRequest(height=128, width=128, steps=2), "not divisible by the Ulysses"),
    (ParallelConfig(ring=2, ulysses=2), SampleRequest(height=16, width=32, steps=2), "fewer than the sequence"),
    (ParallelConfig(cfg=2), SampleRequest(height=128, width=128, steps=2), "cfg parallel needs"),
    (ParallelConfig(dp=4), SampleRequest(height=128, width=128, steps=2, batch_size=2), "larger than the batch"),
])
def test_model_dependent_checks(config, req, message):
    with pytest.raises(ConfigError, match=message):
        check_model_fit(config, get_model({"model": "tiny-flux"}).adapter, req)


def test_degree_product_must_equal_world():
    with pytest.raises(ConfigError, match="multiply to 4"):
        ParallelConfig(ulysses=2, ring=2).validate(2)
    with pytest.raises(ConfigError, match="must be 1 or 2"):
        ParallelConfig(cfg=3).validate()
