"""Schedulers and timesteps, computed the way the diffusers pipelines compute them by default (each family's
scheduler configs and timestep rule are declared in its family file)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import families
from .errors import XDiTError
from .ksampling import METHODS, SigmaSampler

@dataclass
class Schedule:
    scheduler: object          # a diffusers scheduler, ready to step
    timesteps: torch.Tensor    # the timesteps to run, in order
    flow: bool                 # flow matching (x = (1-s) x0 + s noise) or epsilon/VP


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


def _family(name: str):
    try:
        return families.get(name)
    except KeyError as e:
        raise XDiTError(str(e.args[0])) from None


def default_sampler(family: str) -> str:
    return _family(family).samplers[0]


def scheduler_config(family: str, variant: str) -> dict:
    """The scheduler config the variant's checkpoints ship (the family's first variant's when unknown)."""
    fam = _family(family)
    try:
        return fam.variant(variant).scheduler
    except KeyError:
        return fam.default_variant.scheduler


def with_shift(cfg: dict, family: str, shift: float | None) -> dict:
    """The scheduler config with its static flow shift replaced by `shift` (UniPC's `flow_shift`, flow-matching
    Euler's `shift`); a one-line error where the pipeline's shift is not one static number."""
    if shift is None:
        return cfg
    if not shift > 0:
        raise XDiTError(f"shift must be > 0, got {shift}")
    if cfg.get("use_dynamic_shifting"):
        raise XDiTError(f"shift cannot be set for {family}: its pipeline shifts by the image size (dynamic shifting)")
    key = "flow_shift" if "flow_shift" in cfg else "shift" if "shift" in cfg else None
    if key is None:
        raise XDiTError(f"shift cannot be set for {family}: its scheduler has no flow shift")
    return {**cfg, key: float(shift)}


def make_schedule(family: str, variant: str, sampler: str, steps: int, image_tokens: int,
                  sigmas: list[float] | None = None, denoise: float = 1.0, shift: float | None = None) -> Schedule:
    """Scheduler and timesteps for `steps` steps; with `sigmas` the given noise levels are used as they are
    (already shifted, ending at 0 or at the last level to reach); denoise < 1 keeps the last steps (img2img).
    `shift` replaces the scheduler config's static flow shift (the published folder's by default)."""
    from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler)

    fam = _family(family)
    sampler = fam.samplers[0] if sampler in ("default", "", None) else sampler
    if sampler not in fam.samplers:
        raise XDiTError(f"sampler {sampler!r} is not available for {family}: choose from {', '.join(fam.samplers)}")
    if not 0.0 < denoise <= 1.0:
        raise XDiTError(f"denoise must be in (0, 1], got {denoise}")
    if sigmas is None and steps < 1:
        raise XDiTError(f"steps must be >= 1, got {steps}")
    cfg = scheduler_config(family, variant)
    flow = fam.flow
    if shift is not None and sigmas is not None:
        raise XDiTError("shift applies to the pipeline's schedule, not to explicit sigmas (already shifted)")
    cfg = with_shift(cfg, family, shift)

    if sigmas is not None:
        s = [float(v) for v in sigmas]
        if len(s) < 2 or any(b > a for a, b in zip(s, s[1:])):
            raise XDiTError("sigmas must be a decreasing list of at least two noise levels")
        if sampler not in METHODS:
            raise XDiTError(f"sampler {sampler!r} cannot run over explicit sigmas: choose {' or '.join(METHODS)}")
        if flow and sampler == "euler":
            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
            sched.set_timesteps(sigmas=s[:-1])
            sched.sigmas[-1] = s[-1]
        else:  # ComfyUI's samplers in sigma space (epsilon models: nearest training timestep, as ComfyUI)
            sched = SigmaSampler(s, sampler, flow, None if flow else discrete_sigmas(cfg))
        sched.set_begin_index(0)
        return Schedule(sched, sched.timesteps, flow)

    # the config's scheduler class (flow models without one: flow-matching Euler); a sampler other than the
    # family's first over a scheduler of another kind runs as ComfyUI's sampler over that scheduler's noise levels
    import diffusers

    cls = getattr(diffusers, cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler"))
    cfg = {k: v for k, v in cfg.items() if k != "_class_name"}
    if flow:
        sched = cls.from_config(cfg)
        if fam.set_timesteps is not None:  # the family's pipeline (e.g. linear sigmas and a resolution shift)
            sched.set_timesteps(**fam.set_timesteps(steps, image_tokens, cfg))
        else:
            sched.set_timesteps(steps)
    elif sampler == "euler":
        sched = EulerDiscreteScheduler.from_config(cfg)
        sched.set_timesteps(steps)
    else:
        sched = DPMSolverMultistepScheduler.from_config(cfg)
        sched.set_timesteps(steps)

    other = sampler != fam.samplers[0] and cls is not FlowMatchEulerDiscreteScheduler
    if flow and (sampler == "dpmpp_2m" or other):  # ComfyUI's sampler over the pipeline's default noise levels
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
