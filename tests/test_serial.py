"""Serial sampling equals the diffusers pipelines (FluxPipeline, StableDiffusion3Pipeline, PixArtSigmaPipeline)."""
import pytest
import torch

from comfyui_xdit.errors import XDiTError
from comfyui_xdit.sampling import SampleRequest, latent_shape, prepare, run_loop, sample, seed_noise
from tests.conftest import FAMILIES, rel_l2
from tests.reference import pipeline_latents

CASES = [  # cfg, batch, height, width
    (1.0, 1, 256, 256),
    (4.0, 2, 192, 256),
]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("cfg,batch,height,width", CASES)
def test_matches_diffusers_pipeline(tiny_models, name, cfg, batch, height, width):
    m = tiny_models[name]
    req = SampleRequest(height=height, width=width, steps=6, seed=7, batch_size=batch, cfg=cfg, guidance=4.0)
    ours = sample(m.adapter, req, tiny=True)
    job = prepare(m.adapter, req, tiny=True)
    ref = pipeline_latents(m.adapter, seed_noise(req.seed, latent_shape(m.adapter, req)), job.positive, job.negative, cfg, 6, height, width, guidance=4.0)
    assert ours.shape == (batch, m.adapter.latent_channels, height // 8, width // 8)
    assert torch.isfinite(ours).all() and ours.std() > 0
    assert rel_l2(ours, ref) <= 1e-4


def test_pixart_euler_matches_pipeline(tiny_models):
    m = tiny_models["tiny-pixart"]
    req = SampleRequest(height=128, width=192, steps=5, seed=2, cfg=3.0, sampler="euler")
    ours = sample(m.adapter, req, tiny=True)
    job = prepare(m.adapter, req, tiny=True)
    ref = pipeline_latents(m.adapter, seed_noise(req.seed, latent_shape(m.adapter, req)), job.positive, job.negative, 3.0, 5, 128, 192, sampler="euler")
    assert rel_l2(ours, ref) <= 1e-4


def test_seed_noise_is_comfyui_noise(tiny_models):
    m = tiny_models["tiny-sd3"]
    job = prepare(m.adapter, SampleRequest(height=128, width=128, steps=2, seed=42, batch_size=2), tiny=True)
    torch.manual_seed(42)
    expected = torch.randn((2, 16, 16, 16), dtype=torch.float32, device="cpu")
    assert torch.equal(job.x, expected)  # flow models start from the noise itself


def test_given_inputs_are_used(tiny_models):
    m = tiny_models["tiny-flux"]
    req = SampleRequest(height=128, width=128, steps=3, seed=0)
    job = prepare(m.adapter, req, tiny=True)
    given = dict(noise=torch.randn(1, 16, 16, 16), cond=job.positive.cond, pooled=job.positive.pooled)
    a = sample(m.adapter, SampleRequest(height=128, width=128, steps=3, seed=0, inputs=given), tiny=True)
    b = sample(m.adapter, SampleRequest(height=128, width=128, steps=3, seed=99, inputs=given), tiny=True)
    c = sample(m.adapter, req, tiny=True)
    assert torch.equal(a, b) and rel_l2(a, c) > 1e-2


def full_run_with_midpoint(m, req, k):
    """Final latents of a full run and the model-space latents after step k."""
    seen = {}

    def keep(info):
        if info.step == k:
            seen["x"] = info.latents.clone()

    job = prepare(m.adapter, req, tiny=True)
    final = run_loop(job, lambda x, t: m.adapter.predict(x, t, job.positive).float(), keep)
    return job, m.adapter.from_model_space(final), seen["x"]


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_explicit_sigmas_continue_a_run(tiny_models, name):
    """Resuming from step k with the remaining sigmas (as ComfyUI hands them) reproduces the full run."""
    m = tiny_models[name]
    req = SampleRequest(height=128, width=128, steps=6, seed=5)
    job, full, mid = full_run_with_midpoint(m, req, 2)
    rest = job.schedule.scheduler.sigmas[2:]
    s0 = float(rest[0])
    inputs = dict(sigmas=rest, noise=torch.zeros_like(mid), latent=m.adapter.from_model_space(mid / (1 - s0)),
                  cond=job.positive.cond, pooled=job.positive.pooled)
    resumed = sample(m.adapter, SampleRequest(height=128, width=128, steps=4, inputs=inputs), tiny=True)
    assert rel_l2(resumed, full) <= 1e-4


def test_denoise_equals_truncated_sigmas(tiny_models):
    m = tiny_models["tiny-sd3"]
    latent = torch.randn(1, 16, 16, 16)
    noise = torch.randn(1, 16, 16, 16)
    base = dict(latent=latent, noise=noise)
    img2img = sample(m.adapter, SampleRequest(height=128, width=128, steps=8, seed=1, denoise=0.5, inputs=base),
                     tiny=True)
    full = prepare(m.adapter, SampleRequest(height=128, width=128, steps=8, seed=1), tiny=True)
    sig = full.schedule.scheduler.sigmas[4:]
    explicit = sample(m.adapter, SampleRequest(height=128, width=128, steps=4, seed=1,
                                               inputs={**base, "sigmas": sig}), tiny=True)
    assert rel_l2(img2img, explicit) <= 1e-5
    assert rel_l2(img2img, latent) < rel_l2(explicit * 0 + noise, latent)  # kept closer to the source latent


def test_pixart_dpm_explicit_sigmas_match_default(tiny_models):
    m = tiny_models["tiny-pixart"]
    req = SampleRequest(height=128, width=128, steps=6, seed=3)
    job = prepare(m.adapter, req, tiny=True)
    default = sample(m.adapter, req, tiny=True)
    sig = job.schedule.scheduler.sigmas
    # given sigmas run in sigma (variance-exploding) space from latent + sigma_0 * noise, as ComfyUI's samplers do;
    # diffusers' DPM-Solver++ runs in variance-preserving space from pure noise, i.e. sqrt(1 + sigma_0^2) * noise
    s0 = float(sig[0])
    noise = seed_noise(3, (1, 4, 16, 16)) * (1 + s0 * s0) ** 0.5 / s0
    explicit = sample(m.adapter, SampleRequest(height=128, width=128, steps=6, seed=3,
                                               inputs={"sigmas": sig, "noise": noise}), tiny=True)
    assert rel_l2(explicit, default) <= 1e-4


@pytest.mark.parametrize("kwargs,inputs,message", [
    (dict(height=120, width=128), {}, "multiples of 16"),
    (dict(), {"cond": torch.zeros(1, 16, 768)}, "expected cond of shape"),
    (dict(), {"cond": torch.zeros(1, 16, 4096), "pooled": torch.zeros(1, 64)}, "expected pooled"),
    (dict(), {"noise": torch.zeros(1, 4, 16, 16)}, "noise has shape"),
    (dict(sampler="heun"), {}, "not available for flux"),
    (dict(denoise=1.5), {}, "denoise must be"),
    (dict(), {"bogus": torch.zeros(1)}, "unknown inputs"),
])
def test_bad_input_is_a_clear_error(tiny_models, kwargs, inputs, message):
    m = tiny_models["tiny-flux"]
    req = SampleRequest(**{**dict(height=128, width=128, steps=2), **kwargs}, inputs=inputs)
    with pytest.raises(XDiTError, match=message):
        sample(m.adapter, req, tiny=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_tensor_of_a_job_lives_on_the_model_device(name):
    """On the meta device nothing is computed, but any op that mixes a CPU tensor (noise drawn from the seed,
    conditioning, timesteps) with the model's raises: the guard for CUDA runs on this CPU-only CI."""
    from comfyui_xdit.models import load_model

    m = load_model(name, device="meta")
    base = dict(height=128, width=160, steps=3, seed=1)
    requests = [SampleRequest(**base, cfg=3.0, sampler=s) for s in ("default", "euler", "dpmpp_2m")]
    requests.append(SampleRequest(**base, denoise=0.5, inputs={"latent": torch.zeros(1, m.adapter.latent_channels,
                                                                                      16, 20)}))
    requests.append(SampleRequest(**base, inputs={"sigmas": torch.tensor([1.0, 0.6, 0.3, 0.0])}))
    for req in requests:
        out = sample(m.adapter, req, tiny=True)
        assert out.device.type == "meta" and out.shape == (1, m.adapter.latent_channels, 16, 20)


def test_seed_range(tiny_models):
    """Every seed the pool's schema takes samples; one past it is a clear error, not an overflow."""
    m = tiny_models["tiny-flux"]
    top = (1 << 63) - 1
    assert torch.isfinite(sample(m.adapter, SampleRequest(height=64, width=64, steps=1, seed=top), tiny=True)).all()
    for bad in (top + 1, -1):
        with pytest.raises(XDiTError, match="seed must be between 0 and"):
            prepare(m.adapter, SampleRequest(height=64, width=64, steps=1, seed=bad), tiny=True)
