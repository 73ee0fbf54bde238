"""The single-device benchmark: full-size architectures from the shipped configs, FLOP counting, backend order."""
import pytest
import torch
from torch.nn.attention import SDPBackend

from comfyui_xdit.attention_backend import cuda_backend_order, preferred_attention
from comfyui_xdit.bench import build_random, run

# Published transformer sizes: Flux.1-dev 11.9B, SD3-medium 2.03B, SD3.5-large 8.06B, PixArt-Sigma 0.61B.
@pytest.mark.parametrize("arch,params", [("flux", 11.90e9), ("sd3", 2.028e9), ("sd3.5-large", 8.06e9),
                                         ("pixart", 0.611e9)])
def test_full_size_architectures(arch, params):
    adapter = build_random(arch, torch.bfloat16, "meta")
    count = sum(p.numel() for p in adapter.model.parameters())
    assert abs(count / params - 1) < 0.005, count
    assert next(adapter.model.parameters()).dtype == torch.bfloat16


def test_run_counts_flops_and_matches_diffusers():
    rows, facts = run("tiny-pixart", 64, "cpu", torch.float32, compile=False, repeats=1)
    assert [r[0] for r in rows] == ["diffusers eager", "ours eager"]
    assert facts["rel_l2_ours_vs_diffusers"] == 0.0 and facts["ceiling_tflops"] > 0
    _, facts2 = run("tiny-pixart", 64, "cpu", torch.float32, compile=False, repeats=1, batch=2)
    assert facts2["flops"] == 2 * facts["flops"] > 0


def test_backend_order():
    assert cuda_backend_order()[0] == SDPBackend.CUDNN_ATTENTION
    order = cuda_backend_order("flash")
    assert order[0] == SDPBackend.FLASH_ATTENTION and len(set(order)) == 4
    with pytest.raises(ValueError, match="unknown attention backend"):
        cuda_backend_order("xformers")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_preferred_attention_on_gpu():
    q, k, v = (torch.randn(1, 24, 4608, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with preferred_attention("cuda"):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
