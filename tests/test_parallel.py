"""Parallel sampling of Flux.1, SD3 and PixArt beyond the family matrix (tests/test_family_matrix.py): SD3's negative
of another length, the analytic byte counts of Ulysses and Ring, the configuration checks."""
import pytest

from comfyui_xdit.errors import ConfigError
from comfyui_xdit.parallel import ParallelConfig
from comfyui_xdit.parallel.runner import check_model_fit
from comfyui_xdit.sampling import SampleRequest, sample
from tests.cases import build_request, get_model
from tests.conftest import rel_l2
from tests.family_matrix import CASES

# Every family's parallel methods against serial sampling at world 2 and 4: tests/test_family_matrix.py (the Flux.1,
# SD3 and PixArt rows of tests/family_matrix.py). Here: what is specific to these families.
# SD3 with a negative of another token count (15 and 7 text tokens, 63 image tokens): each branch runs on its own
# (ComfyUI's SD3 never batches or pads such a pair), sequence-parallel, cfg-parallel and on a PipeFusion stage; the
# runs are the sd3 row's "neg_*" cases in tests/family_matrix.py
SD3_NEG = [c for c in CASES.values() if c["id"].startswith("sd3.neg_")]


@pytest.mark.families("sd3")
@pytest.mark.parametrize("case", SD3_NEG, ids=lambda c: c["id"])
def test_sd3_negative_of_another_length_matches_serial(matrix, case):
    info = matrix.result(case["id"])
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


@pytest.mark.families("flux")
def test_ulysses_bytes_match_analytic(matrix):
    # 128x128 flux: 64 image + 16 text tokens -> 40 per rank; 4 heads x 16 dims, fp32, batch 1.
    n, b, h, d, e = 2, 1, 4, 16, 4
    shard = b * h * 40 * d * e
    per_layer = 4 * shard * (n - 1) / n  # Q, K, V in and the output back
    expected = per_layer * _tiny_flux_layers()
    for rank in range(2):
        for step in matrix.result("flux.bytes_ulysses2")["rank_comm"][rank]:
            assert abs(step["ulysses"] - expected) <= 0.05 * expected
            assert step["gather"] == 32 * 64 * e  # this rank's 32 output tokens x 64 channels to the other rank


@pytest.mark.families("sd3")
def test_ring_bytes_match_analytic(matrix):
    # 128x128 sd3 (dual attention in block 0): joint attention 64+16 tokens -> 40 per rank, attn2 image only 32.
    n, b, h, d, e = 2, 1, 4, 16, 4
    m = get_model({"model": "tiny-sd3"}).adapter.model
    joint_layers, image_layers = len(m.transformer_blocks), sum(1 for blk in m.transformer_blocks if blk.attn2)
    block = lambda s: b * h * s * d * e  # noqa: E731
    expected = (n - 1) * 2 * (joint_layers * block(40) + image_layers * block(32))  # K and V, N-1 hops
    for rank in range(2):
        for step in matrix.result("sd3.bytes_ring2")["rank_comm"][rank]:
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
