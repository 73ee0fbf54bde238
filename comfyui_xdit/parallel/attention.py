"""Sequence-parallel attention (USP): Ulysses all-to-all over heads x Ring passing of K/V blocks.

Tensors use SDPA's layout [B, H, S, D]. Each rank holds a contiguous shard of the tokens; shard lengths may
differ between ranks (no padding reaches attention), so every step knows each member's length.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from .comm import Comm


def _flash_attn_lse(q, k, v, scale):
    from flash_attn import flash_attn_func  # optional accelerator

    out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                                  return_attn_probs=True)
    return out.transpose(1, 2), lse


def _cudnn_lse(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                               scale=scale)[:2]


def _flash_lse(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]


def _efficient_lse(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]


def _cpu_lse(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]


# Fastest first (cuDNN measured fastest on H100 at DiT shapes); a kernel that rejects the inputs is skipped.
_CUDA_LSE_KERNELS = [("flash_attn", _flash_attn_lse), ("cudnn", _cudnn_lse), ("flash", _flash_lse),
                     ("efficient", _efficient_lse)]
_chosen: dict[tuple, str] = {}


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output [B, H, S, D] and its log-sum-exp [B, H, S] (fp32) from torch's SDPA kernels (or
    flash-attn when installed). On CUDA the first kernel that accepts the shape and dtype is kept for it."""
    if not q.is_cuda:
        out, lse = _cpu_lse(q, k, v, scale)
        return out, lse.float()
    key = (q.dtype, q.shape[-1])
    kernels = [kv for kv in _CUDA_LSE_KERNELS if _chosen.get(key, kv[0]) == kv[0]]
    for name, fn in kernels:
        try:
            out, lse = fn(q, k, v, scale)
        except (ImportError, RuntimeError, NotImplementedError):
            continue
        _chosen[key] = name
        return out, lse[..., : q.shape[2]].float()
    raise RuntimeError(f"no attention kernel with log-sum-exp accepts {q.dtype} head dim {q.shape[-1]}")


def merge_partial(acc: tuple[torch.Tensor, torch.Tensor] | None, out: torch.Tensor,
                  lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets: weights exp(lse_i - logaddexp(lse_1, lse_2)), fp32."""
    if acc is None:
        return out.float(), lse
    acc_out, acc_lse = acc
    new_lse = torch.logaddexp(acc_lse, lse)
    merged = acc_out * torch.exp(acc_lse - new_lse).unsqueeze(-1) + out.float() * torch.exp(lse - new_lse).unsqueeze(-1)
    return merged, new_lse


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], group: ProcessGroup,
                   me: int, comm: Comm, scale: float | None) -> torch.Tensor:
    """Exact attention of local queries over the keys of every ring member; member i holds lengths[i] keys.

    The K/V block in hand is sent on while the next one arrives, so transfer overlaps the block's compute.
    """
    n = len(lengths)
    acc = None
    kb, vb = k, v
    for step in range(n):
        transfer = None
        if step < n - 1:
            src = (me - step - 1) % n
            shape = (*k.shape[:2], lengths[src], k.shape[3])
            transfer = comm.ring_shift([kb, vb], [shape, shape], group, kind="ring")
        acc = merge_partial(acc, *attention_with_lse(q, kb, vb, scale))
        if transfer is not None:
            kb, vb = transfer.wait()
    return acc[0].to(q.dtype)


def ulysses_scatter(x: torch.Tensor, lengths: list[int], group: ProcessGroup, comm: Comm) -> torch.Tensor:
    """[..., H, S_me, D] sequence shard -> [..., H/U, sum(lengths), D] head shard of the group's whole sequence.

    Leading dims (Q, K and V stacked, batch) travel in the same all-to-all: one exchange per layer for all three.
    """
    u = len(lengths)
    *lead, h, _, d = x.shape
    chunks = list(x.chunk(u, dim=-3))
    unit = math.prod(lead) * (h // u) * d
    got = comm.all_to_all(chunks, [unit * s for s in lengths], group, kind="ulysses")
    return torch.cat([g.view(*lead, h // u, s, d) for g, s in zip(got, lengths)], dim=-2)


def ulysses_gather(x: torch.Tensor, lengths: list[int], me: int, group: ProcessGroup, comm: Comm) -> torch.Tensor:
    """Inverse of ulysses_scatter: [B, H/U, sum(lengths), D] -> [B, H, S_me, D]."""
    b, hu, _, d = x.shape
    chunks = list(x.split(lengths, dim=2))
    got = comm.all_to_all(chunks, [b * hu * lengths[me] * d] * len(lengths), group, kind="ulysses")
    return torch.cat([g.view(b, hu, lengths[me], d) for g in got], dim=1)


class USPAttention:
    """Callable with SDPA's signature that runs attention over the tokens of every sequence-parallel rank."""

    def __init__(self, pm, lengths: list[int]):
        self.pm = pm
        self.lengths = lengths  # tokens per sp rank for this attention call

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        if attn_mask is not None or is_causal or dropout_p or enable_gqa:
            raise NotImplementedError("sequence-parallel attention supports unmasked, non-causal attention only")
        pm, cfg = self.pm, self.pm.config
        sp_rank = pm.rank("sp")
        ring_idx, uly_idx = divmod(sp_rank, cfg.ulysses)
        u = cfg.ulysses
        uly_lengths = self.lengths[ring_idx * u:(ring_idx + 1) * u]
        q, k, v = query, key, value
        if u > 1:
            g = pm.group("ulysses")
            q, k, v = ulysses_scatter(torch.stack([q, k, v]), uly_lengths, g, pm.comm).unbind(0)
        if cfg.ring > 1:
            ring_lengths = [sum(self.lengths[r * u:(r + 1) * u]) for r in range(cfg.ring)]
            out = ring_attention(q, k, v, ring_lengths, pm.group("ring"), ring_idx, pm.comm, scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        if u > 1:
            out = ulysses_gather(out, uly_lengths, uly_idx, pm.group("ulysses"), pm.comm)
        return out
