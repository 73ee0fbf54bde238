"""The step-invariant context cache: the conditioning-only modules (Wan's and PixArt's text embedders and
cross-attention K/V) compute once per branch and job, results unchanged: bit-equal in one process, and a parallel
job with the cache equals serial without it; entries are checked by object, place and version."""
from __future__ import annotations

import pytest
import torch

from comfyui_xdit.context_cache import context_cache, context_modules
from comfyui_xdit.sampling import SampleRequest, sample
from tests.cases import build_request, get_model
from tests.conftest import rel_l2
from tests.distributed import run_cases

I2V = {"in_channels": 36, "image_dim": 32, "added_kv_proj_dim": 64}
CASES = {
    "wan": {"model": "tiny-wan", "height": 48, "width": 80, "frames": 9, "text_tokens": 15, "cfg": 4.0,
            "neg_text_tokens": 7},
    "wan-experts": {"model": "tiny-wan-a14b", "height": 48, "width": 80, "frames": 9, "steps": 4, "cfg": 4.0},
    "wan-i2v": {"model": "tiny-wan", "overrides": I2V, "height": 48, "width": 80, "frames": 9, "text_tokens": 512,
                "neg_text_tokens": 512, "cfg": 4.0,
                "random_inputs": {"image_cond": [1, 20, 3, 6, 10], "image_embeds": [1, 257, 32]}},
    "pixart": {"model": "tiny-pixart", "height": 64, "width": 48, "text_tokens": 9, "cfg": 4.5},
}


def _count_linear_calls(monkeypatch, names: set[str], model: torch.nn.Module) -> dict[str, int]:
    """Counts of the Linear computations (not cache answers) of the named modules."""
    ids = {id(m): n for n, m in model.named_modules() if n in names}
    counts = {n: 0 for n in names}
    plain = torch.nn.Linear.forward

    def counting(self, x):
        if id(self) in ids:
            counts[ids[id(self)]] += 1
        return plain(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting)
    return counts


@pytest.mark.parametrize("name", sorted(CASES))
def test_serial_bit_equal_and_computed_once_per_branch(name, monkeypatch):
    case = {"seed": 3, "steps": 3, **CASES[name]}
    loaded = get_model(case)
    ad = loaded.adapter
    req = build_request(loaded, case)
    off = sample(ad, SampleRequest(**{**req.__dict__, "context_cache": False}))
    kv = {n for n in context_modules(ad.model, ad.spec.context_modules) if n.endswith(("attn2.to_k", "attn2.to_v"))}
    assert kv, f"{name}: no cross-attention K/V declared"
    counts = _count_linear_calls(monkeypatch, kv, ad.model)
    on = sample(ad, req)
    assert torch.equal(on, off)
    calls = max(counts.values())
    branches = 2  # positive and negative
    if name == "wan-i2v":  # the context is a new concatenation each call: K/V recomputed, the embedders reused
        assert calls == branches * case["steps"]
    elif name == "wan-experts":  # each expert's own K/V: once per branch in the steps it runs
        assert 1 <= calls <= branches
    else:
        assert calls == branches, counts
    assert not any("forward" in m.__dict__ for m in ad.model.modules()), "hooks left installed"


def test_hits_need_the_same_unchanged_tensor():
    """A hit needs the same base tensor at the same place, unchanged: an equal copy, another slice or an in-place
    write is computed again; the entries go when the context ends."""
    lin = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x = torch.randn(2, 5, 4)
    with torch.no_grad(), context_cache(lin, ("0",)) as cc:
        a = lin(x)
        assert lin(x) is a and (cc.hits, cc.misses) == (1, 1)
        assert lin(x.clone()) is not a
        view = lin(x[:, 1:])
        assert lin(x[:, 1:]) is view  # a view of the same storage at the same place
        assert lin(x[:, 2:]) is not view
        x.mul_(2)  # the version counter moves
        b = lin(x)
        assert b is not a and torch.allclose(b, torch.nn.functional.linear(x, lin[0].weight, lin[0].bias))
        assert cc.bytes > 0
    assert cc.entries == {} and "forward" not in lin[0].__dict__
    with torch.no_grad(), context_cache(lin, ("0",), enabled=False) as cc:
        lin(x), lin(x)
    assert cc.modules == 0 and cc.hits == 0


def test_entries_stay_within_the_budget():
    """Outputs that would take the entries past max_bytes are returned uncached (and computed again next time); the
    first modules' outputs stay cached; results are the same either way."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(4)))
    x = torch.randn(3, 8)
    one = 3 * 8 * 4  # bytes of one output
    with torch.no_grad():
        plain = [net(x) for _ in range(2)]
        with context_cache(net, ("*",), max_bytes=2 * one) as cc:
            got = [net(x) for _ in range(2)]
            assert cc.bytes <= 2 * one and {n for n, e in cc.entries.items() if e} == {"0", "1"}
            assert (cc.hits, cc.misses, cc.over_budget) == (2, 6, 4)  # layers 0-1 hit on the second call
    assert all(torch.equal(a, b) for a, b in zip(plain, got))


def test_parallel_with_cache_equals_serial_without(tmp_path):
    """Ulysses 2, CFG 2 and synchronous PipeFusion 2 on Wan with the cache (the default) against serial without it,
    on 45 video tokens (odd)."""
    base = {"seed": 7, "steps": 3, **CASES["wan"]}
    cases = [{**base, "id": "u2", "parallel": {"ulysses": 2}},
             {**base, "id": "cfg2", "parallel": {"cfg": 2}},
             {**base, "id": "pf2", "parallel": {"pipefusion": 2, "num_patches": 2, "warmup_steps": 3}},
             {**CASES["pixart"], "seed": 7, "steps": 3, "id": "pixart_u2", "parallel": {"ulysses": 2}}]
    results = run_cases(2, cases, tmp_path)
    for case in cases:
        loaded = get_model(case)
        req = build_request(loaded, case)
        serial = sample(loaded.adapter, SampleRequest(**{**req.__dict__, "context_cache": False}))
        assert results[case["id"]]["ok"], results[case["id"]]
        assert rel_l2(results[case["id"]]["latents"], serial) <= 1e-5, case["id"]
