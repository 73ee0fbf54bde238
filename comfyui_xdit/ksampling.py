"""ComfyUI's samplers over an explicit list of noise levels, behind the scheduler interface the loop uses.

ComfyUI (k-diffusion) samples in sigma space: the model gives a denoised estimate D = x - sigma * out (out is the
flow velocity for flow models, the noise for epsilon models, whose x lives in the variance-exploding space
x0 + sigma * noise and enters the model divided by sqrt(1 + sigma^2)). DPM-Solver++(2M), with t = -log(sigma),
h = t_next - t and r = h_prev / h:
    x_next = (sigma_next / sigma) * x - expm1(-h) * D'   with D' = D on the first and the last step (sigma_next = 0)
                                                          and D' = (1 + 1/(2r)) D - 1/(2r) D_prev otherwise.
Epsilon models see the nearest of the 1000 training timesteps in log sigma, computed as ComfyUI's discrete model
sampling does: the training log sigmas are the float64 levels' logs stored in float32, the step's sigma and the
distances are float32, and the first minimum wins. A level half-way between two training steps (even sgm_uniform
step counts) goes whichever way that float32 arithmetic takes it.
The engine uses this class for dpmpp_2m wherever it is asked for and for epsilon Euler with given sigmas.
"""
from __future__ import annotations

import torch

METHODS = ("euler", "dpmpp_2m")


def nearest_timesteps(sigmas: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """For each sigma, the index of the nearest training level in log space, one sigma at a time as ComfyUI asks
    (float32, the first minimum). Give `train_sigmas` in float64 for ComfyUI's float32 table of float64 logs."""
    log_train = train_sigmas.log().to(torch.float32)[:, None]
    out = [(torch.tensor([float(s)], dtype=torch.float32).log() - log_train).abs().argmin(dim=0)
           for s in sigmas.tolist()]
    return torch.cat(out).to(torch.float32) if out else torch.zeros(0)


class SigmaSampler:
    order = 1

    def __init__(self, sigmas: list[float], method: str, flow: bool, train_sigmas: torch.Tensor | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}")
        self.method, self.flow = method, flow
        self.sigmas = torch.tensor(sigmas, dtype=torch.float32)
        if flow:
            self.timesteps = self.sigmas[:-1] * 1000
        else:
            self.timesteps = nearest_timesteps(self.sigmas[:-1], train_sigmas)
        self._step_index: int | None = None
        self._begin_index = 0
        self._previous: torch.Tensor | None = None  # D of the previous step (dpmpp_2m)

    # --- the diffusers scheduler interface the sampling loop and PipeFusion use ---
    @property
    def init_noise_sigma(self) -> float:
        return float(self.sigmas[0])

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep) -> int:
        hits = (self.timesteps == torch.as_tensor(timestep, dtype=torch.float32)).nonzero()
        return int(hits[0]) if len(hits) else self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        if self.flow:
            return sample
        sigma = self.sigmas[self._index(timestep)]
        return sample / (sigma**2 + 1) ** 0.5

    def scale_noise(self, x0: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Flow img2img start: sigma * noise + (1 - sigma) * x0."""
        sigma = self.sigmas[0]
        return sigma * noise + (1 - sigma) * x0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Epsilon img2img start: x0 + sigma * noise."""
        return x0 + self.sigmas[0] * noise

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = False):
        i = self._index(timestep)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = sample.float()
        denoised = x - sigma * model_output.float()
        if self.method == "euler":
            out = x + (x - denoised) / sigma * (sigma_next - sigma)
        else:
            h = sigma.log() - sigma_next.log() if sigma_next > 0 else None
            if h is None:
                out = denoised
            else:
                d = denoised
                if self._previous is not None:
                    r = (self.sigmas[i - 1].log() - sigma.log()) / h
                    d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * self._previous
                out = (sigma_next / sigma) * x - torch.expm1(-h) * d
            self._previous = denoised
        self._step_index = i + 1
        return (out,)

    def _index(self, timestep) -> int:
        if self._step_index is None:
            self._step_index = self._begin_index
        idx = (self.timesteps == torch.as_tensor(timestep, dtype=torch.float32)).nonzero()
        # repeated discrete timesteps are possible: trust the running index when it points at this timestep
        if self._step_index < len(self.timesteps) and self.timesteps[self._step_index] == timestep:
            return self._step_index
        return int(idx[0]) if len(idx) else self._step_index
