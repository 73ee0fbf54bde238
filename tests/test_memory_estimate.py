"""The analytic memory table (comfyui_xdit/memory_estimate.py) on meta-device builds of published sizes: weights
are the build's parameter bytes, FSDP's share is 1/d plus two blocks, fp8 halves every matrix, PipeFusion's row is
shard_stage's split, and the fit column follows the stated overhead."""
import pytest
import torch

from comfyui_xdit.bench import build_random, main
from comfyui_xdit.memory_estimate import MemoryRow, memory_table, stored_bytes


@pytest.fixture(scope="module")
def qwen():
    return build_random("qwen-image", torch.bfloat16, "meta")


def test_weights_per_method_and_storage(qwen):
    params = sum(p.numel() for p in qwen.model.parameters())
    matrices = sum(p.numel() for p in qwen.model.parameters() if p.ndim >= 2)
    assert params == pytest.approx(20.43e9, rel=1e-3)
    rows = {(r.method, r.degree): r for r in memory_table(qwen, "1328")}
    fp8 = {(r.method, r.degree): r for r in memory_table(qwen, "1328", storage="fp8")}
    block = max(stored_bytes(b, "bf16") for b in qwen.model.transformer_blocks)
    for d in (1, 2, 4, 8):
        assert rows[("usp", d)].weights == 2 * params
        assert fp8[("usp", d)].weights == 2 * params - matrices  # matrices in 1 byte, vectors in 2
    for d in (2, 4, 8):
        assert rows[("fsdp x usp", d)].weights == -(-2 * params // d) + 2 * block
        assert rows[("usp", d)].activations < rows[("usp", 1)].activations  # 1/d of the tokens
        stage = rows[("pipefusion", d)]
        assert 2 * params / d < stage.weights < 2 * params / d + block + 2 * params * 0.05
    assert ("fsdp x usp", 1) not in rows


def test_fits_and_the_bench_flags(qwen, capsys):
    assert MemoryRow("usp", 1, 22 << 30, 0).fits(24)  # 22 + 2 GiB of overhead: just fits
    assert not MemoryRow("usp", 1, (22 << 30) + 1, 0).fits(24) and MemoryRow("usp", 1, (22 << 30) + 1, 0).fits(32)
    assert {r.degree for r in memory_table(qwen, "1328", shard_degrees=(4,)) if r.method == "fsdp x usp"} == {4}
    assert main(["--arch", "qwen-image", "--size", "1328", "--memory", "--weight-storage", "fp8",
                 "--shard-degree", "2"]) == 0
    out = capsys.readouterr().out
    assert "(fp8 storage)" in out and "| fsdp x usp | 2 |" in out and "| fsdp x usp | 4 |" not in out
    experts = build_random("wan2.2-t2v-a14b", torch.bfloat16, "meta")
    assert {r.method for r in memory_table(experts, "1280x720", 81)} == {"usp", "fsdp x usp"}  # PipeFusion refused
