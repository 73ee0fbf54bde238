"""PipeFusion's stale-K/V rule written as plain hooks on serial sampling: the independent reference the stale phase
of a PipeFusion run is compared with (at 1e-4, as the step cache is compared with its plain-hook reference).

The rule, as PipeFusion defines it: the first `warmup_steps` steps run the whole image and leave every
self-attention layer's image K/V of the step behind; afterwards each step runs its M patches (contiguous token
rows, the last one taking any tail of the image stream) one after another, and a patch attends to the layer's
image K/V as last left behind (patches before it: this step; patches after it: the previous step) with its own
tokens' K/V fresh, and leaves its fresh K/V behind; the other streams (text) are always fresh. Everything but
self-attention works token by token, so a patch's prediction here is a whole-image forward whose self-attention
keys and values are replaced that way, cut to the patch's rows. No pipeline, no stages, no messages: the serial
sampling loop, forward hooks on the attention modules and SDPA caught with a TorchFunctionMode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from comfyui_xdit.cache import model_blocks
from comfyui_xdit.engine import run_job
from comfyui_xdit.families.spec import IMAGE
from comfyui_xdit.parallel.plan import attention_modules
from tests.cases import build_request, get_model


def _patch_rows(rows: int, patches: int) -> list[tuple[int, int]]:
    """Contiguous row ranges, the first ones one row longer when rows do not divide."""
    base, extra = divmod(rows, patches)
    out, start = [], 0
    for m in range(patches):
        size = base + (1 if m < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def stale_reference(case: dict, reused: list[int] | None = None) -> torch.Tensor:
    """Latents of `case` (its parallel settings: num_patches, warmup_steps) sampled serially under the stale rule.

    `reused`: steps on which the step cache (first block computed, the rest reused) reused the other blocks, as
    tests/test_cache.py writes the rule: every block still runs, the last block's main stream is replaced by the
    first block's (joined as the last block's main stream) plus the residual of the last computed step of the same
    (branch, patch) forward; the skipped blocks' attention leaves no K/V behind on such a step."""
    par = case["parallel"]
    patches, warmup = par["num_patches"], par.get("warmup_steps", 1)
    case = {k: v for k, v in case.items() if k != "cache"}  # the cache, if any, is the hooks' rule below
    loaded = get_model(case, fresh=True)  # hooks and a wrapped predict on a model of its own
    ad = loaded.adapter
    layers = attention_modules(ad.model, ad.plan)
    state = {"step": 0, "call": 0, "layer": None, "patch": None, "lengths": None, "sdpa": 0, "forward": 0,
             "first": None}
    reused = set(reused or ())
    residuals: dict[int, torch.Tensor] = {}  # forward of the step -> the span residual at the last computed step
    blocks = model_blocks(ad)
    first_layers = {i for i, (m, _) in enumerate(layers) if any(m is sub for sub in blocks[0].modules())}
    first_list, last_list = ad.block_list(blocks[0]), ad.block_list(blocks[-1])
    kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (branch call, layer) -> image K, V

    def attend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v = query, key, value
        index, streams = state["layer"]
        state["sdpa"] += 1
        if IMAGE not in streams:  # a text-only layer (a text refiner): always fresh
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        lengths = state["lengths"]
        start = sum(lengths[s] for s in streams[:streams.index(IMAGE)])
        n = lengths[IMAGE]
        assert k.shape[2] == sum(lengths[s] for s in streams), (k.shape, streams, lengths)
        slot = (state["call"], index)
        fresh_k, fresh_v = k[:, :, start:start + n], v[:, :, start:start + n]
        if state["patch"] is None:  # warm-up: the whole image fresh
            kv[slot] = (fresh_k.clone(), fresh_v.clone())
        else:
            tokens = state["patch"]
            bk, bv = kv[slot]
            if state["step"] in reused and index not in first_layers:  # a skipped block: nothing left behind
                bk, bv = bk.clone(), bv.clone()
            bk[:, :, tokens] = fresh_k[:, :, tokens]
            bv[:, :, tokens] = fresh_v[:, :, tokens]
            k = torch.cat([k[:, :, :start], bk, k[:, :, start + n:]], dim=2)
            v = torch.cat([v[:, :, :start], bv, v[:, :, start + n:]], dim=2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)

    class CatchSDPA(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention and state["layer"] is not None:
                return attend(*args, **kwargs)
            return func(*args, **kwargs)

    def enter(index, streams):
        def hook(module, args):
            state["layer"], state["sdpa"] = (index, streams), 0
        return hook

    def leave(module, args, out):
        assert state["sdpa"] == 1, f"a self-attention call made {state['sdpa']} SDPA calls"
        state["layer"] = None

    original = ad.predict

    def predict(x, t, c):
        ad_rows = x.flatten(2, -2)  # a video's frames folded into rows, as PipeFusion's patches count them
        p = ad.patch
        rows, cols = ad_rows.shape[2] // p, ad_rows.shape[3] // p
        state["lengths"] = ad.stream_lengths(rows * cols, c.cond.shape[1])
        try:
            with CatchSDPA():
                if state["step"] < warmup:
                    state["patch"] = None
                    return original(x, t, c)
                out = None
                for r0, r1 in _patch_rows(rows, patches):
                    end = state["lengths"][IMAGE] if r1 == rows else r1 * cols
                    state["patch"] = slice(r0 * cols, end)
                    o = original(x, t, c)
                    flat = o.flatten(2, -2)
                    if out is None:
                        out = torch.zeros_like(flat)
                    out[:, :, r0 * p:r1 * p] = flat[:, :, r0 * p:r1 * p]
                return out.view(o.shape)
        finally:
            state["call"] += 1

    def step_end(i):
        state["step"], state["call"], state["forward"] = i + 1, 0, 0

    def first_hook(module, args, out):
        main, second = ad.block_streams(out, first_list)
        streams = dict(zip(first_list.inputs[0][1], main.split([state["lengths"][s] for s in first_list.inputs[0][1]],
                                                               dim=1)))
        if second is not None:
            streams[first_list.inputs[1][1][0]] = second
        state["first"] = torch.cat([streams[s] for s in last_list.inputs[0][1]], dim=1)

    def last_hook(module, args, out):
        forward = state["forward"]
        state["forward"] += 1
        main, _ = ad.block_streams(out, last_list)
        if state["step"] not in reused:
            residuals[forward] = main - state["first"]
            return None
        new = state["first"] + residuals[forward]
        if not isinstance(out, tuple):
            return new
        out = list(out)
        out[last_list.outputs.index(0)] = new
        return tuple(out)

    handles = []
    if reused:
        handles += [blocks[0].register_forward_hook(first_hook), blocks[-1].register_forward_hook(last_hook)]
    for index, (module, streams) in enumerate(layers):
        handles.append(module.register_forward_pre_hook(enter(index, streams)))
        handles.append(module.register_forward_hook(leave))
    ad.predict = predict
    try:
        return run_job(loaded, build_request(loaded, case), step_end=step_end).latents
    finally:
        del ad.predict
        for h in handles:
            h.remove()
