"""Sequence-parallel attention (USP): Ulysses all-to-all over heads x Ring passing of K/V blocks.

Tensors use SDPA's layout [B, H, S, D]. Each rank holds a contiguous shard of the tokens; shard lengths may
differ between ranks (no padding reaches attention), so every step knows each member's length.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from ..errors import ConfigError
from .comm import Comm


def _flash_attn_lse(q, k, v, scale, mask=None):
    if mask is not None:
        raise NotImplementedError("flash-attn takes no mask")
    from flash_attn import flash_attn_func  # optional accelerator

    out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                                  return_attn_probs=True)
    return out.transpose(1, 2), lse


def _bias(mask, q):
    return None if mask is None else mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], mask.shape[-1])


def _cudnn_lse(q, k, v, scale, mask=None):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, _bias(mask, q), True, 0.0, False, False,
                                                               scale=scale)[:2]


def _flash_lse(q, k, v, scale, mask=None):
    if mask is not None:
        raise NotImplementedError("flash attention takes no mask")
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]


def _efficient_lse(q, k, v, scale, mask=None):
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, _bias(mask, q), True, scale=scale)[:2]


def _cpu_lse(q, k, v, scale, mask=None):
    bias = None if mask is None else mask.to(q.dtype)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                       scale=scale)[:2]


# Fastest first (cuDNN measured fastest on H100 at DiT shapes); a kernel that rejects the inputs is skipped.
_CUDA_LSE_KERNELS = [("flash_attn", _flash_attn_lse), ("cudnn", _cudnn_lse), ("flash", _flash_lse),
                     ("efficient", _efficient_lse)]
_chosen: dict[tuple, str] = {}


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                       mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output [B, H, S, D] and its log-sum-exp [B, H, S] (fp32) from torch's SDPA kernels (or
    flash-attn when installed). `mask`: an additive key bias [B, 1, 1, S_k] (0 or -inf). On CUDA the first kernel
    that accepts the shape, dtype and mask is kept for them."""
    if not q.is_cuda:
        out, lse = _cpu_lse(q, k, v, scale, mask)
        return out, lse.float()
    key = (q.dtype, q.shape[-1], mask is not None)
    kernels = [kv for kv in _CUDA_LSE_KERNELS if _chosen.get(key, kv[0]) == kv[0]]
    for name, fn in kernels:
        try:
            out, lse = fn(q, k, v, scale, mask)
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
                   me: int, comm: Comm, scale: float | None, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Exact attention of local queries over the keys of every ring member; member i holds lengths[i] keys
    (`masks[i]`: the additive key bias of member i's keys, or None).

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
        holder = (me - step) % n  # whose keys kb holds
        acc = merge_partial(acc, *attention_with_lse(q, kb, vb, scale, None if masks is None else masks[holder]))
        if transfer is not None:
            kb, vb = transfer.wait()
    return acc[0].to(q.dtype)


def ulysses_scatter(parts: Sequence[torch.Tensor], lengths: list[int], group: ProcessGroup,
                    comm: Comm) -> torch.Tensor:
    """Sequence shards [..., H, S_me, D] (Q, K and V) -> their head shards of the group's whole sequence, stacked:
    [len(parts), ..., H/U, sum(lengths), D]. All parts travel in one all-to-all: one exchange per layer for all
    three. The send buffer is packed in one copy and the received shards joined in one more."""
    u, n = len(lengths), len(parts)
    *lead, h, s_me, d = parts[0].shape
    hu = h // u
    buf = parts[0].new_empty(u, n, *lead, hu, s_me, d)  # member i's heads of every part, in member order
    for j, p in enumerate(parts):
        buf[:, j].copy_(p.unflatten(-3, (u, hu)).movedim(-4, 0))
    unit = n * math.prod(lead) * hu * d
    got = comm.all_to_all_flat(buf.view(-1), [unit * s_me] * u, [unit * s for s in lengths], group, kind="ulysses")
    if len(set(lengths)) == 1:  # member r's [n, ..., H/U, S, D], one after another
        return got.view(u, n, *lead, hu, s_me, d).movedim(0, -3).reshape(n, *lead, hu, u * s_me, d)
    return torch.cat([g.view(n, *lead, hu, s, d) for g, s in zip(got.split([unit * s for s in lengths]), lengths)],
                     dim=-2)


def ulysses_gather(x: torch.Tensor, lengths: list[int], me: int, group: ProcessGroup, comm: Comm) -> torch.Tensor:
    """Inverse of ulysses_scatter: [B, H/U, sum(lengths), D] -> [B, H, S_me, D] (a view of the received buffer where
    the batch is 1: the caller's own reshape is then the only copy)."""
    b, hu, _, d = x.shape
    u = len(lengths)
    if len(set(lengths)) == 1:
        buf = x.unflatten(2, (u, lengths[0])).movedim(2, 0).contiguous().view(-1)
    else:
        buf = x.new_empty(x.numel())
        start = 0
        for chunk in x.split(lengths, dim=2):
            buf[start:start + chunk.numel()].view(chunk.shape).copy_(chunk)
            start += chunk.numel()
    unit = b * hu * d
    got = comm.all_to_all_flat(buf, [unit * s for s in lengths], [unit * lengths[me]] * u, group, kind="ulysses")
    return got.view(u, b, hu, lengths[me], d).movedim(0, 1).reshape(b, u * hu, lengths[me], d)


def key_padding(mask: torch.Tensor, batch: int, keys: int) -> torch.Tensor:
    """A mask given to SDPA as a key-padding mask [B, S_k] (True: attend); see padding_of."""
    return padding_of(mask, batch, keys)[0]


def padding_of(mask: torch.Tensor, batch: int, keys: int) -> tuple[torch.Tensor, bool]:
    """(the key-padding mask [B, S_k] (True: attend), whether padded queries are masked too) of a mask given to
    SDPA. Bool masks (True: attend) and additive ones (0 or -inf) of any broadcastable shape are taken as long as
    every query sees the same keys, or, in self-attention, as long as the mask is valid_q & valid_k (padded tokens
    hidden as keys and as queries, HunyuanVideo 1.5's processor): SDPA gives such a padded query's row zeros, and
    so does the caller. Anything else (a causal or soft bias) cannot be split across ranks and is refused."""
    if mask.is_floating_point():
        if not bool(((mask == 0) | (mask == float("-inf"))).all()):
            raise ConfigError("sequence-parallel attention takes key-padding masks only (0 or -inf), not a soft bias")
        mask = mask == 0
    mask = mask.bool()
    while mask.ndim < 4:
        mask = mask[None]
    if mask.shape[-1] != keys:
        raise ConfigError(f"attention mask covers {mask.shape[-1]} keys, the sequence has {keys}")
    rows = mask.reshape(mask.shape[0], -1, keys)
    if bool((rows == rows[:, :1]).all()):
        return rows[:, 0].expand(batch, keys), False
    if rows.shape[1] == keys:  # one [S, S] mask per sample: valid_q & valid_k?
        valid = rows.any(dim=1)
        if torch.equal(rows, valid[:, :, None] & valid[:, None, :]):
            return valid.expand(batch, keys), True
    raise ConfigError("sequence-parallel attention takes key-padding masks only (the same keys for every query "
                      "and head, or padded tokens hidden as keys and as queries)")


def zero_padded_queries(out: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Attention output [B, H, S, D] with the rows of padded queries (valid [B, S] False) zero, as SDPA gives a
    query that may attend to no key."""
    return out.masked_fill(~valid[:, None, :, None], 0.0)


def _bias_of(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key mask [B, S] (True: attend) -> additive bias [B, 1, 1, S]."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))[:, None,
                                                                                                       None]


class USPAttention:
    """Callable with SDPA's signature that runs attention over the tokens of every sequence-parallel rank. A
    key-padding mask travels with its keys: the ranks' masks are gathered once per call (in the keys' order), so
    masked keys stay masked on every rank and in every ring step."""

    def __init__(self, pm, lengths: list[int]):
        self.pm = pm
        self.lengths = lengths  # tokens per sp rank for this attention call

    def _masks(self, attn_mask: torch.Tensor, batch: int, keys: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(key bias [B, 1, 1, sum(lengths)] of every sp rank's keys, in sp-rank order; this rank's tokens' mask
        [B, S_me] where padded queries are masked too, else None)."""
        local, queries = padding_of(attn_mask, batch, keys)
        valid = self.pm.comm.all_gather(local.to(torch.uint8).contiguous(), self.lengths, self.pm.group("sp"), dim=1,
                                        kind="mask")
        return _bias_of(valid.bool(), dtype), local if queries else None

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        if is_causal or dropout_p or enable_gqa:
            raise NotImplementedError("sequence-parallel attention supports non-causal attention only")
        pm, cfg = self.pm, self.pm.config
        sp_rank = pm.rank("sp")
        ring_idx, uly_idx = divmod(sp_rank, cfg.ulysses)
        u = cfg.ulysses
        uly_lengths = self.lengths[ring_idx * u:(ring_idx + 1) * u]
        bias, padded_queries = (None, None) if attn_mask is None else self._masks(attn_mask, query.shape[0],
                                                                                 key.shape[2], query.dtype)
        offsets = [sum(self.lengths[:r * u]) for r in range(cfg.ring + 1)]  # where each ring member's keys start
        q, k, v = query, key, value
        if u > 1:
            g = pm.group("ulysses")
            q, k, v = ulysses_scatter((q, k, v), uly_lengths, g, pm.comm).unbind(0)
        if cfg.ring > 1:
            ring_lengths = [sum(self.lengths[r * u:(r + 1) * u]) for r in range(cfg.ring)]
            masks = None if bias is None else [bias[..., offsets[r]:offsets[r + 1]] for r in range(cfg.ring)]
            out = ring_attention(q, k, v, ring_lengths, pm.group("ring"), ring_idx, pm.comm, scale, masks)
        else:
            mask = None if bias is None else bias[..., offsets[ring_idx]:offsets[ring_idx + 1]]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        if u > 1:
            out = ulysses_gather(out, uly_lengths, uly_idx, pm.group("ulysses"), pm.comm)
        return out if padded_queries is None else zero_padded_queries(out, padded_queries)
