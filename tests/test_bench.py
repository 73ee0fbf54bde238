"""The single-device benchmark: full-size architectures from the shipped configs, FLOP counting, backend order."""
import pytest
import torch
from torch.nn.attention import SDPBackend

from comfyui_xdit.attention_backend import cuda_backend_order, preferred_attention
from comfyui_xdit.bench import build_random, pipeline_step, run, step_inputs

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
    # ours (the adapter's call) against the model called as PixArtSigmaPipeline calls it
    assert facts["rel_l2_ours_vs_diffusers"] <= 1e-6 and facts["ceiling_tflops"] > 0
    _, facts2 = run("tiny-pixart", 64, "cpu", torch.float32, compile=False, repeats=1, batch=2)
    assert facts2["flops"] == 2 * facts["flops"] > 0


# every built-in tiny model but the bench-size ones: (size, frames)
TINY = {"tiny-flux": (64, 1), "tiny-sd3": (64, 1), "tiny-pixart": (64, 1), "tiny-flux2": (64, 1),
        "tiny-qwen-image": (64, 1), "tiny-z-image": (64, 1), "tiny-wan": ((48, 80), 9),
        "tiny-wan-a14b": ((48, 80), 9), "tiny-wan-ti2v": ((64, 64), 9)}


@pytest.mark.parametrize("arch", list(TINY))
def test_ours_is_the_model_called_as_its_pipeline_calls_it(arch):
    """bench's "diffusers eager" row calls the model with the inputs the family's diffusers pipeline builds (its own
    packing, position ids and timestep scaling); the adapter's predict, which sampling uses, must give the same
    output at batch 2, at a high-noise and a low-noise timestep (Wan 2.2 A14B: each expert)."""
    adapter = build_random(arch, torch.float32, "cpu")
    size, frames = TINY[arch]
    x, _, c = step_inputs(adapter, size, 2, "cpu", frames)
    with torch.no_grad():
        for t in (torch.tensor([950.0]), torch.tensor([300.0])):
            ref = pipeline_step(adapter, x, t, c).float()
            ours = adapter.predict(x, t, c).float()
            assert ours.shape == ref.shape == x.shape
            assert ((ours - ref).norm() / ref.norm()) <= 1e-6, arch


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
