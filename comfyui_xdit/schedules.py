"""Schedulers and timesteps, computed the way the diffusers pipelines compute them by default."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import XDiTError
from .ksampling import SigmaSampler

# Scheduler configs as the published checkpoints ship them (scheduler/scheduler_config.json).
FLOW_DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)
FLOW_SCHNELL = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
FLOW_SD3 = dict(num_train_timesteps=1000, shift=3.0)
PIXART_DPM = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                  lower_order_final=True, timestep_spacing="linspace", steps_offset=0)

SAMPLERS = {"flux": ("euler", "dpmpp_2m"), "sd3": ("euler", "dpmpp_2m"), "pixart": ("dpmpp_2m", "euler")}


@dataclass
class Schedule:
    scheduler: object          # a diffusers scheduler, ready to step
    timesteps: torch.Tensor    # the timesteps to run, in order
    flow: bool                 # flow matching (x = (1-s) x0 + s noise) or epsilon/VP


def resolution_shift(image_tokens: int, cfg: dict) -> float:
    """Flux's mu: linear in the image token count, from base_shift at base_image_seq_len to max_shift at
    max_image_seq_len (the pipeline's formula; importing it would pull in transformers)."""
    x0, x1 = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    y0, y1 = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (y1 - y0) / (x1 - x0)
    return image_tokens * m + (y0 - m * x0)


def discrete_sigmas(cfg: dict) -> torch.Tensor:
    """The training noise levels of an epsilon model's discrete schedule, in float64 as ComfyUI's discrete model
    sampling builds them (diffusers works in float32): betas, alphas_cumprod = cumprod(1 - betas),
    sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod). diffusers' "linear" is ComfyUI's "sqrt_linear"
    (betas linear), its "scaled_linear" is ComfyUI's "linear" (sqrt(betas) linear)."""
    n, start, end = int(cfg["num_train_timesteps"]), float(cfg["beta_start"]), float(cfg["beta_end"])
    kind = cfg.get("beta_schedule", "linear")
    if kind == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    else:
        raise XDiTError(f"beta_schedule {kind!r} is not supported with explicit sigmas (linear, scaled_linear)")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def default_sampler(family: str) -> str:
    return SAMPLERS[family][0]


def scheduler_config(family: str, variant: str) -> dict:
    if family == "flux":
        return FLOW_SCHNELL if variant == "flux-schnell" else FLOW_DEV
    if family == "sd3":
        return FLOW_SD3
    return PIXART_DPM


def make_schedule(family: str, variant: str, sampler: str, steps: int, image_tokens: int,
                  sigmas: list[float] | None = None, denoise: float = 1.0) -> Schedule:
    """Scheduler and timesteps for `steps` steps; with `sigmas` the given noise levels are used as they are
    (already shifted, ending at 0 or at the last level to reach); denoise < 1 keeps the last steps (img2img)."""
    from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler)

    sampler = default_sampler(family) if sampler in ("default", "", None) else sampler
    if sampler not in SAMPLERS[family]:
        raise XDiTError(f"sampler {sampler!r} is not available for {family}: choose from {', '.join(SAMPLERS[family])}")
    if not 0.0 < denoise <= 1.0:
        raise XDiTError(f"denoise must be in (0, 1], got {denoise}")
    if sigmas is None and steps < 1:
        raise XDiTError(f"steps must be >= 1, got {steps}")
    cfg = scheduler_config(family, variant)
    flow = family in ("flux", "sd3")

    if sigmas is not None:
        s = [float(v) for v in sigmas]
        if len(s) < 2 or any(b > a for a, b in zip(s, s[1:])):
            raise XDiTError("sigmas must be a decreasing list of at least two noise levels")
        if flow and sampler == "euler":
            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
            sched.set_timesteps(sigmas=s[:-1])
            sched.sigmas[-1] = s[-1]
        else:  # ComfyUI's samplers in sigma space (epsilon models: nearest training timestep, as ComfyUI)
            sched = SigmaSampler(s, sampler, flow, None if flow else discrete_sigmas(cfg))
        sched.set_begin_index(0)
        return Schedule(sched, sched.timesteps, flow)

    if flow:
        sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        kwargs = {}
        if family == "flux":  # FluxPipeline: linear sigmas and a resolution-dependent shift mu
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
            kwargs["mu"] = resolution_shift(image_tokens, cfg)
            sched.set_timesteps(**kwargs)
        else:
            sched.set_timesteps(steps)
    elif sampler == "euler":
        sched = EulerDiscreteScheduler.from_config(cfg)
        sched.set_timesteps(steps)
    else:
        sched = DPMSolverMultistepScheduler.from_config(cfg)
        sched.set_timesteps(steps)

    if flow and sampler == "dpmpp_2m":  # ComfyUI's DPM-Solver++(2M) over the pipeline's default noise levels
        start = int(max(steps - min(int(steps * denoise), steps), 0))
        levels = sched.sigmas.tolist()[start:]
        if len(levels) < 2:
            raise XDiTError(f"denoise {denoise} with {steps} steps leaves no step to run")
        sched = SigmaSampler(levels, sampler, True)
        sched.set_begin_index(0)
        return Schedule(sched, sched.timesteps, flow)

    timesteps = sched.timesteps
    start = 0
    if denoise < 1.0:  # as the diffusers img2img pipelines do with `strength`
        start = int(max(steps - min(int(steps * denoise), steps), 0)) * sched.order
        timesteps = timesteps[start:]
        if len(timesteps) == 0:
            raise XDiTError(f"denoise {denoise} with {steps} steps leaves no step to run")
    sched.set_begin_index(start)
    return Schedule(sched, timesteps, flow)


def initial_latents(schedule: Schedule, noise: torch.Tensor, x0: torch.Tensor | None) -> torch.Tensor:
    """Model-space starting point: pure noise, or x0 noised to the first timestep (img2img)."""
    sched, t0 = schedule.scheduler, schedule.timesteps[:1]
    if x0 is None:
        return noise * getattr(sched, "init_noise_sigma", 1.0)
    if schedule.flow:
        return sched.scale_noise(x0, t0, noise)
    return sched.add_noise(x0, noise, t0)
