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


def serial_of(case: dict) -> torch.Tensor:
    """The case sampled in this process: the reference each parallel layout of it is compared with."""
    from comfyui_xdit.sampling import sample

    loaded = get_model(case)
    return sample(loaded.adapter, build_request(loaded, case), tiny=True)


def case_ok(results: dict, case_id: str) -> dict:
    """A distributed run's result for one case, which must have succeeded."""
    info = results[case_id]
    assert info["ok"], info.get("error")
    return info


def build_request(loaded, case: dict) -> SampleRequest:
    """Request with conditioning drawn from the case seed (text length may be odd to test uneven shards).
    `masks` (optional): {"cond_mask": rows, "neg_cond_mask": rows} of 0/1 per text token and batch row; their
    lengths set each branch's text length (a padded prompt, and a negative of another length)."""
    gen = torch.Generator().manual_seed(1000 + case["seed"])
    batch = case.get("batch", 1)
    ad = loaded.adapter
    inputs = {}
    tokens = case.get("text_tokens", 16)
    masks = {k: torch.tensor(v, dtype=torch.long) for k, v in case.get("masks", {}).items()}
    neg_tokens = case.get("neg_text_tokens", tokens)  # a negative may be shorter
    pos = ad.random_conditioning(batch, masks["cond_mask"].shape[1] if "cond_mask" in masks else tokens, gen)
    neg = ad.random_conditioning(batch, masks["neg_cond_mask"].shape[1] if "neg_cond_mask" in masks else neg_tokens,
                                 gen)
    pos.mask, neg.mask = masks.get("cond_mask", pos.mask), masks.get("neg_cond_mask", neg.mask)
    inputs["cond"] = pos.cond
    if pos.pooled is not None:
        inputs["pooled"], inputs["neg_pooled"] = pos.pooled, neg.pooled
    if pos.mask is not None:
        inputs["cond_mask"], inputs["neg_cond_mask"] = pos.mask, neg.mask
    inputs["neg_cond"] = neg.cond
    for name, shape in case.get("random_inputs", {}).items():  # a family's extra inputs (e.g. image conditioning)
        inputs[name] = torch.randn(shape, generator=gen)
    return SampleRequest(height=case["height"], width=case["width"], steps=case.get("steps", 3), seed=case["seed"],
                         batch_size=batch, cfg=case.get("cfg", 1.0), sampler=case.get("sampler", "default"),
                         frames=case.get("frames", 1), context_cache=case.get("context_cache", True),
                         inputs=inputs, cache=CacheSettings.from_dict(case["cache"]) if "cache" in case else None,
                         compile=case.get("compile", False))
