"""Shared between the test process and the torchrun workers: the same model and request for a case id."""
from __future__ import annotations

import functools

import torch

from comfyui_xdit.cache import CacheSettings
from comfyui_xdit.models import load_model
from comfyui_xdit.sampling import SampleRequest


@functools.lru_cache(maxsize=None)
def _model(name: str, overrides: tuple):
    return load_model(name, **dict(overrides))


def get_model(case: dict, fresh: bool = False):
    if fresh:
        return load_model(case["model"], **case.get("overrides", {}))
    return _model(case["model"], tuple(sorted(case.get("overrides", {}).items())))


def build_request(loaded, case: dict) -> SampleRequest:
    """Request with conditioning drawn from the case seed (text length may be odd to test uneven shards)."""
    gen = torch.Generator().manual_seed(1000 + case["seed"])
    batch = case.get("batch", 1)
    ad = loaded.adapter
    inputs = {}
    tokens = case.get("text_tokens", 16)
    pos = ad.random_conditioning(batch, tokens, gen)
    neg = ad.random_conditioning(batch, case.get("neg_text_tokens", tokens), gen)  # a negative may be shorter
    inputs["cond"] = pos.cond
    if pos.pooled is not None:
        inputs["pooled"], inputs["neg_pooled"] = pos.pooled, neg.pooled
    if pos.mask is not None:
        inputs["cond_mask"], inputs["neg_cond_mask"] = pos.mask, neg.mask
    inputs["neg_cond"] = neg.cond
    return SampleRequest(height=case["height"], width=case["width"], steps=case.get("steps", 3), seed=case["seed"],
                         batch_size=batch, cfg=case.get("cfg", 1.0), sampler=case.get("sampler", "default"),
                         inputs=inputs, cache=CacheSettings.from_dict(case["cache"]) if "cache" in case else None)
