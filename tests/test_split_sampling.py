"""Sampling over given noise levels that stop above 0 (the first stage of a two-sampler graph, ComfyUI's
KSamplerAdvanced with leftover noise), then continuing from that latent with zero noise: with Euler (no state
carried between steps) the two stages must give the full run's latents. Flow models need ComfyUI's inverse noise
scaling at the end of the first stage (x / (1 - sigma)); epsilon models pass x through unchanged."""
from __future__ import annotations

import pytest
import torch

from comfyui_xdit.sampling import SampleRequest, final_sigma, prepare, sample

from .conftest import rel_l2

STEPS, SPLIT = 6, 3


def _sigmas(flow: bool) -> torch.Tensor:
    if flow:  # SD3's shifted "simple" levels
        t = torch.linspace(1, 0, STEPS + 1, dtype=torch.float64)
        return (3 * t / (1 + 2 * t)).float()
    ramp = torch.linspace(0, 1, STEPS, dtype=torch.float64)  # Karras 14.6 .. 0.03, then 0
    s = (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def _run(m, sigmas, noise, latent, seed=5):
    cfg = 3.0 if m.adapter.spec.cond.negative else 1.0  # Flux: no negative prompt
    req = SampleRequest(height=128, width=128, steps=len(sigmas) - 1, seed=seed, cfg=cfg, sampler="euler",
                        inputs={"sigmas": sigmas, "noise": noise, "latent": latent})
    return sample(m.adapter, req, tiny=True)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux", "tiny-pixart"])
def test_two_stages_equal_one_run(tiny_models, name):
    m = tiny_models[name]
    sigmas = _sigmas(name != "tiny-pixart")
    shape = (1, m.adapter.latent_channels, 16, 16)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    zero = torch.zeros(shape)
    full = _run(m, sigmas, noise, zero)
    first = _run(m, sigmas[:SPLIT + 1], noise, zero)
    second = _run(m, sigmas[SPLIT:], torch.zeros(shape), first)
    assert rel_l2(second, full) <= 1e-5, rel_l2(second, full)
    assert rel_l2(first, full) > 1e-2  # the first stage left noise: the comparison can fail


def test_flow_first_stage_is_inverse_noise_scaled(tiny_models):
    """The leftover latent of a flow model is x / (1 - sigma_last), not x: started again at that sigma with zero
    noise it gives x back; without the scaling the second stage would start from (1 - sigma) x."""
    m = tiny_models["tiny-sd3"]
    sigmas = _sigmas(True)[:SPLIT + 1]
    shape = (1, m.adapter.latent_channels, 16, 16)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    req = SampleRequest(height=128, width=128, steps=SPLIT, seed=5, cfg=3.0, sampler="euler",
                        inputs={"sigmas": sigmas, "noise": noise, "latent": torch.zeros(shape)})
    job = prepare(m.adapter, req, tiny=True)
    s = final_sigma(job.schedule)
    assert s == pytest.approx(float(sigmas[-1])) and s > 0.1
    steps = []
    out = sample(m.adapter, req, tiny=True, callback=steps.append)
    x_end = steps[-1].latents  # the model-space x the loop ended with, as the sampler itself held it
    # the returned latent is that x scaled by 1 / (1 - sigma): a flow model's noisy x is (1 - s) x0 + s noise
    assert rel_l2(m.adapter.to_model_space(out), x_end / (1 - s)) <= 1e-6
    assert rel_l2(m.adapter.to_model_space(out), x_end) > 0.1  # the scaling is there to see
    restart = prepare(m.adapter, SampleRequest(height=128, width=128, steps=1, seed=5, cfg=3.0, sampler="euler",
                                               inputs={"sigmas": torch.tensor([s, 0.0]), "noise": torch.zeros(shape),
                                                       "latent": out}), tiny=True)
    assert rel_l2(restart.x, x_end) <= 1e-6  # started again at s with zero noise: the same x


def test_empty_latent_is_not_shifted(tiny_models):
    """An all-zero latent stays zero in model space (ComfyUI does not shift the empty latent image), so a flow
    model's img2img start from it is sigma * noise."""
    m = tiny_models["tiny-sd3"]
    assert m.adapter.latent.shift != 0 or m.adapter.latent.mean is not None
    shape = (1, m.adapter.latent_channels, 16, 16)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    sigmas = torch.tensor([0.6, 0.3, 0.0])
    job = prepare(m.adapter, SampleRequest(height=128, width=128, steps=2, seed=5, sampler="euler",
                                           inputs={"sigmas": sigmas, "noise": noise,
                                                   "latent": torch.zeros(shape)}), tiny=True)
    assert torch.allclose(job.x, 0.6 * noise, atol=1e-6)
