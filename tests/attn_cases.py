"""Shared by tests/test_attention_backends.py and its torchrun workers: diffusers attention backends to set on a
model, and attention processors that compute attention without F.scaled_dot_product_attention."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# diffusers 0.42 backends whose kernels run on CPU tensors here (test_which_backends_run_on_cpu checks the list)
CPU_BACKENDS = ["native", "_native_math", "_native_flash", "flex"]
# reach SDPA but have no CPU kernel ("No viable backend"): parallel paths still work, being routed to native
NO_CPU_KERNEL_BACKENDS = ["_native_efficient", "_native_cudnn"]


def _by_hand(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, N, heads*d] projections; returns [B, N, heads*d]."""
    b, n, _ = q.shape
    q, k, v = (t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2) for t in (q, k, v))
    w = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, n, -1)


class HandAttnProcessor:
    """PixArt self-attention (what AttnProcessor2_0 computes there) with the attention written out by hand:
    right serially, never reaches SDPA."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = _by_hand(attn, attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx))
        return attn.to_out[1](attn.to_out[0](out))


class ShortcutAttnProcessor(HandAttnProcessor):
    """SDPA for short sequences (so it passes the check on dummy tokens), by hand from 8 tokens on: only the
    count of rerouted calls in the real forward catches it."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if hidden_states.shape[1] >= 8:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)
        b = hidden_states.shape[0]
        q, k, v = (p(hidden_states).view(b, -1, attn.heads, p.out_features // attn.heads).transpose(1, 2)
                   for p in (attn.to_q, attn.to_k, attn.to_v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


PROCESSORS = {"hand": HandAttnProcessor, "shortcut": ShortcutAttnProcessor}


def install_processor(model: torch.nn.Module, kind: str, blocks: list[int] | None = None) -> list[str]:
    """Give the self-attention (attn1) of the chosen transformer blocks (default all) a PROCESSORS[kind]; returns
    the modules' names."""
    names = []
    for i, block in enumerate(model.transformer_blocks):
        if blocks is None or i in blocks:
            block.attn1.set_processor(PROCESSORS[kind]())
            names.append(f"transformer_blocks.{i}.attn1")
    return names


@contextlib.contextmanager
def configured(loaded, case: dict):
    """The case's attention backend (`set_attention_backend`) and processors on `loaded`; diffusers' active
    backend (which set_attention_backend also changes) restored afterwards. Use a fresh model: its processors
    keep what was set."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    try:
        if "attention_backend" in case:
            loaded.adapter.model.set_attention_backend(case["attention_backend"])
        if "processor" in case:
            install_processor(loaded.adapter.model, case["processor"], case.get("processor_blocks"))
        yield
    finally:
        _AttentionBackendRegistry._active_backend = active


def analysis_requests(loaded, case: dict) -> list:
    """One request per prompt (seeds case seed + p), batch 1, no cache: what the analyser accepts."""
    from tests.cases import build_request

    return [build_request(loaded, {**case, "seed": case["seed"] + p}) for p in range(case.get("prompts", 1))]


def profile_tensors(profile) -> dict[str, torch.Tensor]:
    """A Profile's arrays as tensors named like profile.npz (kind_abs, kind_rel)."""
    return {f"{kind}_{stat}": torch.from_numpy(getattr(profile, stat)[kind]).contiguous()
            for kind in profile.kinds for stat in ("abs", "rel")}


def run_attention_case(loaded, req, config, case: dict) -> tuple[torch.Tensor, dict | None]:
    """A worker case with "attention_backend", "processor" or "analyze": (latents, None) of the job, or for
    "analyze" (its residual_rel, every profile array) of the analyser over the case's prompts."""
    from comfyui_xdit.analysis import analyze
    from comfyui_xdit.engine import run_job

    with configured(loaded, case):
        if not case.get("analyze"):
            return run_job(loaded, req, config).latents, None
        tensors = profile_tensors(analyze(loaded, analysis_requests(loaded, case), config))
        return tensors["residual_rel"].clone(), tensors
