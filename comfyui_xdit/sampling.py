"""The denoising loop: one function for every family, sampler and parallel configuration."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapters import Conditioning, FamilyAdapter
from .cache import CacheSettings, job_cache
from .context_cache import context_cache
from .errors import XDiTError
from .schedules import Schedule, initial_latents, make_schedule
from .tiny import TINY_TEXT_TOKENS

MAX_SEED = (1 << 63) - 1  # largest seed (torch generators take up to 2**64 - 1; the conditioning one uses seed + 1)
INPUT_NAMES = ("noise", "cond", "pooled", "neg_cond", "neg_pooled", "cond_mask", "neg_cond_mask", "latent", "sigmas")


@dataclass
class SampleRequest:
    """One sampling job. Tensors in `inputs` follow the CLI's --inputs names; absent ones are drawn from the seed."""

    height: int
    width: int
    steps: int
    seed: int = 0
    batch_size: int = 1
    cfg: float = 1.0
    guidance: float | None = None
    sampler: str = "default"
    denoise: float = 1.0
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    cache: CacheSettings | None = None  # first-block residual cache (None: every step computes every block)
    frames: int = 1                      # pixel frames of a video model (an image model: 1)
    context_cache: bool = True           # compute the family's conditioning-only modules once per job
    shift: float | None = None           # the scheduler's static flow shift (None: what the published folder ships)
    compile: bool = False                # regional torch.compile of the repeated blocks (compile.py)


@dataclass
class StepInfo:
    step: int            # 1-based index of the finished step
    total: int
    seconds: float       # wall time of this step
    latents: torch.Tensor  # current model-space latents (local batch)
    reused: bool = False   # the step cache reused the blocks' residual instead of running them


StepCallback = Callable[[StepInfo], None]


def plain_cfg(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance as ComfyUI and most pipelines combine the branches."""
    return neg + scale * (pos - neg)


@dataclass
class PreparedJob:
    """Everything the loop needs, resolved and validated."""

    x: torch.Tensor                 # model-space starting latents [B, C, h, w], float32
    schedule: Schedule
    positive: Conditioning
    negative: Conditioning | None   # None: no classifier-free guidance
    cfg: float
    cache: CacheSettings | None = None
    combine: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = plain_cfg  # (pos, neg, cfg) -> guided

    def guide(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        return self.combine(pos, neg, self.cfg)


def latent_shape(adapter: FamilyAdapter, req: SampleRequest) -> tuple[int, ...]:
    """[B, C, h, w], or [B, C, T, h, w] for a video model (T latent frames)."""
    down = adapter.latent.downscale
    frames = (adapter.latent_frames(req.frames),) if adapter.latent.dims == 3 else ()
    return (req.batch_size, adapter.latent_channels, *frames, req.height // down, req.width // down)


def seed_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise as ComfyUI makes it: float32 randn on CPU from torch.manual_seed(seed)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _one_frame(adapter: FamilyAdapter, t: torch.Tensor) -> torch.Tensor:
    """A latent in ComfyUI's layout of a family with a frame axis ([B, C, 1, h, w]) as the engine samples it."""
    return t[:, :, 0] if adapter.latent.frame_axis and t.ndim == 5 and t.shape[2] == 1 else t


def comfy_latents(adapter: FamilyAdapter, latents: torch.Tensor) -> torch.Tensor:
    """Sampled [B, C, h, w] latents in ComfyUI's LATENT layout of the family (with its frame axis, if any)."""
    return latents.unsqueeze(2) if adapter.latent.frame_axis and latents.ndim == 4 else latents


def prepare(adapter: FamilyAdapter, req: SampleRequest, tiny: bool) -> PreparedJob:
    """Validate the request against the model and resolve every input (drawing what is absent from the seed)."""
    names = (*INPUT_NAMES, *adapter.spec.cond.extra_inputs)
    unknown = set(req.inputs) - set(names)
    if unknown:
        raise XDiTError(f"unknown inputs {sorted(unknown)}: expected some of {', '.join(names)}")
    if req.batch_size < 1:
        raise XDiTError(f"batch size must be >= 1, got {req.batch_size}")
    if not 0 <= req.seed <= MAX_SEED:
        raise XDiTError(f"seed must be between 0 and {MAX_SEED}, got {req.seed}")
    adapter.check_size(req.height, req.width)
    adapter.latent_frames(req.frames)
    adapter.check_request(req)
    inp = {k: _one_frame(adapter, v) if k in ("noise", "latent") else v for k, v in req.inputs.items()}
    shape = latent_shape(adapter, req)

    noise = inp.get("noise")
    if noise is None:
        noise = seed_noise(req.seed, shape)
    elif tuple(noise.shape) != shape:
        raise XDiTError(f"noise has shape {list(noise.shape)}, expected {list(shape)}")
    latent = inp.get("latent")
    if latent is not None:
        if latent.shape[0] == 1 and req.batch_size > 1:
            latent = latent.expand(shape)
        if tuple(latent.shape) != shape:
            raise XDiTError(f"latent has shape {list(latent.shape)}, expected {list(shape)}")

    use_cfg = req.cfg != 1.0
    if use_cfg and not adapter.spec.cond.negative:
        raise XDiTError(f"{adapter.family} takes no negative prompt (its pipeline has no true classifier-free "
                        f"guidance): cfg must be 1, got {req.cfg}")
    gen = torch.Generator().manual_seed(req.seed + 1)

    def branch(prefix: str, what: str) -> Conditioning:
        cond = inp.get(prefix + "cond")
        if cond is None:
            if not tiny:
                raise XDiTError(f"{what} conditioning ({prefix}cond) is required for this model")
            c = adapter.random_conditioning(1, TINY_TEXT_TOKENS, gen)
        else:
            c = Conditioning(cond, inp.get(prefix + "pooled"), inp.get(prefix + "cond_mask"))
        c.guidance = req.guidance
        c.extra = {k: inp[k] for k in adapter.spec.cond.extra_inputs if k in inp}
        adapter.check_conditioning(c, req.batch_size, what)
        return adapter.expand(c, req.batch_size)

    positive = branch("", "positive")
    negative = branch("neg_", "negative") if use_cfg else None
    if (negative is not None and negative.cond.shape[1] != positive.cond.shape[1]
            and not adapter.spec.cond.negative_length_may_differ):
        raise XDiTError(f"negative conditioning has {negative.cond.shape[1]} tokens, positive has "
                        f"{positive.cond.shape[1]}: they must match")

    sigmas = inp.get("sigmas")
    schedule = make_schedule(adapter.family, adapter.variant, req.sampler, req.steps,
                             adapter.image_tokens(req.height, req.width, req.frames),
                             None if sigmas is None else sigmas.flatten().tolist(), req.denoise, req.shift)
    device = adapter.device  # the seed's noise is drawn on the CPU (as ComfyUI draws it), then moved there
    x0 = None if latent is None else start_latent(adapter, latent.float().to(device))
    x = initial_latents(schedule, noise.float().to(device), x0 if (req.denoise < 1.0 or sigmas is not None) else None)
    if req.cache is not None:
        req.cache.check(len(schedule.timesteps), adapter.block_count)
    # the family pipeline's own CFG rule goes with its schedule; explicit sigmas (ComfyUI's) get ComfyUI's rule
    combine = adapter.spec.cfg_combine if sigmas is None and adapter.spec.cfg_combine is not None else plain_cfg
    return PreparedJob(x.float(), schedule, positive, negative, req.cfg, req.cache, combine)


def start_latent(adapter: FamilyAdapter, latent: torch.Tensor) -> torch.Tensor:
    """A given latent in model space. An all-zero latent (an empty one) stays zero, as ComfyUI leaves it (it does not
    shift the empty latent image into the model's space). A meta tensor has no values to look at."""
    if latent.device.type != "meta" and not bool(latent.any()):
        return torch.zeros_like(latent)
    return adapter.to_model_space(latent)


def final_sigma(schedule: Schedule) -> float:
    """The noise level the schedule ends at: 0 unless given sigmas stop early (a first stage of a split)."""
    sigmas = getattr(schedule.scheduler, "sigmas", None)
    return 0.0 if sigmas is None or len(sigmas) == 0 else float(sigmas[-1])


def finish(adapter: FamilyAdapter, schedule: Schedule, x: torch.Tensor, c: Conditioning | None = None
           ) -> torch.Tensor:
    """Model-space latents after the last step, in ComfyUI's LATENT convention. A flow schedule that ends at a
    sigma s > 0 gives x / (1 - s), as ComfyUI's inverse noise scaling for flow models does, so that the next stage
    started there with zero noise, (1 - s) * latent + s * 0, continues from x exactly. Epsilon models' x is already
    latent + s * noise: unchanged."""
    if c is not None:
        x = adapter.finish_latents(x, c)
    s = final_sigma(schedule)
    if schedule.flow and s > 0.0:
        x = x / (1.0 - s)
    return adapter.from_model_space(x)


def guided(adapter: FamilyAdapter, x: torch.Tensor, t: torch.Tensor, job: PreparedJob) -> torch.Tensor:
    """Classifier-free-guided prediction, both branches on this process."""
    pred = adapter.predict(x, t, job.positive).float()
    if job.negative is None:
        return pred
    neg = adapter.predict(x, t, job.negative).float()
    return job.guide(pred, neg)


Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def run_loop(job: PreparedJob, predict: Predictor, callback: StepCallback | None = None, cache=None) -> torch.Tensor:
    """Step the scheduler over the job's timesteps; `predict(x, t)` returns the guided model output. `cache`: the
    job's BlockCache, told where steps end."""
    sched = job.schedule.scheduler
    x = job.x
    total = len(job.schedule.timesteps)
    for i, t in enumerate(job.schedule.timesteps):
        start = time.perf_counter()
        x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        pred = predict(x_in, t)
        x = sched.step(pred, t, x, return_dict=False)[0].float()
        reused = cache is not None and cache.reuse
        if cache is not None:
            cache.end_step()
        if callback is not None:
            callback(StepInfo(i + 1, total, time.perf_counter() - start, x, reused))
    return x


def sample(adapter: FamilyAdapter, req: SampleRequest, tiny: bool = False,
           callback: StepCallback | None = None) -> torch.Tensor:
    """Serial sampling; returns latents in ComfyUI's convention [B, C, H/8, W/8], float32."""
    job = prepare(adapter, req, tiny)
    with context_cache(adapter.model, adapter.spec.context_modules, req.context_cache), \
            job_cache(adapter, job.cache) as cache:
        x = run_loop(job, lambda x, t: guided(adapter, x, t, job), callback, cache)
    return finish(adapter, job.schedule, x, job.positive)
