"""ComfyUI's samplers in sigma space against exact solutions of the probability-flow ODE.

For data x0 ~ N(0, s^2) the ideal denoiser is linear and the ODE solution is known in closed form:
flow models (x = (1 - sigma) x0 + sigma n): D = (1 - sigma) s^2 / ((1 - sigma)^2 s^2 + sigma^2) x and
x(sigma) = sqrt((1 - sigma)^2 s^2 + sigma^2) z; variance-exploding (x = x0 + sigma n): D = s^2 / (s^2 + sigma^2) x
and x(sigma) = sqrt(s^2 + sigma^2) z.
"""
import pytest
import torch

from comfyui_xdit.ksampling import SigmaSampler

S = 0.5


def denoiser(x, sigma, flow):
    if flow:
        return (1 - sigma) * S**2 / ((1 - sigma) ** 2 * S**2 + sigma**2) * x
    return S**2 / (S**2 + sigma**2) * x


def exact(z, sigma, flow):
    return ((1 - sigma) ** 2 * S**2 + sigma**2) ** 0.5 * z if flow else (S**2 + sigma**2) ** 0.5 * z


def levels(n, flow):
    if flow:  # SD3's shifted schedule
        t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
        return (3 * t / (1 + 2 * t)).tolist()
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)  # Karras, sigma 14.6 .. 0.03, then 0
    s = (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    return s.tolist() + [0.0]


def solve(method, n, flow):
    sig = levels(n, flow)
    sampler = SigmaSampler(sig, method, flow, torch.linspace(0.03, 14.6, 1000) if not flow else None)
    z = torch.linspace(-2, 2, 101)
    x = exact(z, sig[0], flow)
    for t, sigma in zip(sampler.timesteps, sig[:-1]):
        out = (x - denoiser(x, sigma, flow)) / sigma  # flow velocity, or the noise for epsilon models
        x = sampler.step(out, t, x)[0]
    target = exact(z, sig[-1], flow)
    return float((x - target).norm() / target.norm())


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "epsilon"])
def test_dpmpp_2m_is_second_order_and_euler_first(flow):
    dpm = [solve("dpmpp_2m", n, flow) for n in (10, 20)]
    euler = [solve("euler", n, flow) for n in (10, 20)]
    assert dpm[1] < euler[1] / 3
    assert dpm[0] / dpm[1] > 3.0     # halving the step size divides the error by about 4
    assert 1.6 < euler[0] / euler[1] < 2.6


def test_epsilon_timesteps_are_the_nearest_training_steps():
    train = torch.linspace(0.03, 14.6, 1000)
    sampler = SigmaSampler([14.6, 1.0, 0.0302, 0.0], "euler", False, train)
    assert sampler.timesteps.tolist() == [999, int((train.log() - torch.tensor(1.0).log()).abs().argmin()), 0]
    assert sampler.init_noise_sigma == pytest.approx(14.6)


def test_pixart_timesteps_match_comfyui_for_every_scheduler():
    """The training timestep each of ComfyUI's noise levels maps to, as recorded from ComfyUI 0.3.64. Even
    sgm_uniform step counts land half-way between two training steps, where the float32 arithmetic decides."""
    import json
    from pathlib import Path

    from comfyui_xdit.schedules import make_schedule

    data = json.loads((Path(__file__).parent / "data" / "comfyui_pixart_timesteps.json").read_text())
    wrong = []
    for case in data["cases"]:
        sched = make_schedule("pixart", "pixart-sigma", "euler", case["steps"], 0, sigmas=case["sigmas"])
        got = [int(t) for t in sched.timesteps]
        if got != case["timesteps"]:
            wrong.append((case["scheduler"], case["steps"], got, case["timesteps"]))
    assert not wrong, wrong[:3]
    assert {c["scheduler"] for c in data["cases"]} >= {"sgm_uniform", "kl_optimal", "linear_quadratic"}


def test_discrete_sigmas_are_float64_levels():
    from comfyui_xdit.families.pixart import PIXART_DPM
    from comfyui_xdit.schedules import discrete_sigmas

    s = discrete_sigmas(PIXART_DPM)
    assert s.dtype == torch.float64 and s.shape == (1000,)
    betas = [0.0001 + (0.02 - 0.0001) * i / 999 for i in range(1000)]
    prod = 1.0
    for b in betas[:500]:
        prod *= 1 - b
    assert float(s[499]) == pytest.approx(((1 - prod) / prod) ** 0.5, rel=1e-12)
    with pytest.raises(Exception, match="beta_schedule"):
        discrete_sigmas({**PIXART_DPM, "beta_schedule": "squaredcos_cap_v2"})
