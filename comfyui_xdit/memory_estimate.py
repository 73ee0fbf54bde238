"""Per-rank device memory of the parallel methods at published sizes, from a meta-device build (no weights
allocated): weights exactly as the build holds them (in the storage dtype), activations analytically.

Weights: Ulysses/Ring (USP) replicate every weight; FSDP over d ranks holds 1/d of them plus two whole blocks (the
block being computed, gathered, and the next one, prefetched); PipeFusion holds one stage's blocks (the split
shard_stage makes) plus the embedders and final layer. fp8 storage keeps every matrix in 1 byte per element
(vectors stay bf16) and upcasts one layer at a time (+ the largest matrix in bf16).
Activations (bf16, one CFG branch at a time, as the engine runs them): per token of this rank's sequence,
6 x hidden (residual, normed input, q, k, v, attention output) + 2 x the widest per-token projection of a block
(the MLP's or a fused projection's output and its activation), for image + text tokens / SP degree; PipeFusion:
the patch's tokens (1/degree of the image), plus a full-sequence K and V per self-attention layer of its stage for
each CFG branch. A rough upper bound of what one block holds at once, not a measurement.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CARDS_GIB = (24, 32, 48, 80)
OVERHEAD_GIB = 2.0  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack: what a card must keep besides


@dataclass(frozen=True)
class MemoryRow:
    method: str          # "usp", "fsdp x usp", "pipefusion"
    degree: int
    weights: int         # bytes per rank
    activations: int     # bytes per rank
    note: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.activations

    def fits(self, card_gib: float) -> bool:
        return self.total / 2**30 + OVERHEAD_GIB <= card_gib


def stored_bytes(module: torch.nn.Module, storage: str) -> int:
    """Parameter bytes of `module` stored in "bf16" (2 bytes) or "fp8" (matrices 1 byte, vectors bf16)."""
    if storage not in ("bf16", "fp8"):
        raise ValueError(f"storage must be bf16 or fp8, not {storage!r}")
    return sum(p.numel() * (1 if storage == "fp8" and p.ndim >= 2 else 2) for p in module.parameters())


def widest_projection(block: torch.nn.Module, hidden: int) -> int:
    """The widest output of a per-token linear layer in a block (e.g. the MLP's hidden width)."""
    from .adapters.base import _FEW_ROW_MARKERS

    return max((m.out_features for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)
                and not any(k in name for k in _FEW_ROW_MARKERS)), default=4 * hidden)


def parse_size(size: int | str | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a side ("1024", 1024) or of ComfyUI's WIDTHxHEIGHT ("832x480")."""
    if isinstance(size, tuple):
        return size
    if isinstance(size, str) and "x" in size:
        width, height = (int(v) for v in size.lower().split("x"))
        return height, width
    return int(size), int(size)


def allows_pipefusion(adapter, height: int, width: int, frames: int, degree: int) -> bool:
    """Whether the engine takes PipeFusion at `degree` for a job of this size (its own check, not a rule here)."""
    from .errors import ConfigError
    from .parallel import ParallelConfig
    from .sampling import SampleRequest

    try:
        adapter.check_request(SampleRequest(height=height, width=width, steps=1, frames=frames),
                              ParallelConfig(pipefusion=degree, num_patches=degree))
    except ConfigError:
        return False
    return True


def largest_matrix(module: torch.nn.Module) -> int:
    return max((p.numel() for p in module.parameters() if p.ndim >= 2), default=0)


def memory_table(adapter, size, frames: int = 1, degrees: tuple[int, ...] = (1, 2, 4, 8),
                 storage: str = "bf16", shard_degrees: tuple[int, ...] | None = None) -> list[MemoryRow]:
    """Rows per degree: USP (Ulysses where it divides the heads, else Ring: the same memory), FSDP (at the degrees
    `shard_degrees`, default every degree > 1) over the same ranks x USP, and PipeFusion (none at a degree it
    refuses)."""
    from .parallel.pipefusion import partition
    from .adapters.base import per_token_bytes

    height, width = parse_size(size)
    image = adapter.image_tokens(height, width, frames)
    text = adapter.spec.cond.tokens
    model = adapter.model
    hidden = adapter.hidden_size
    blocks = [b for bl in adapter.plan.blocks for b in getattr(model, bl.name)]
    wide = max(widest_projection(b, hidden) for b in blocks)
    per_token = (6 * hidden + 2 * wide) * 2
    branches = 2 if adapter.spec.cond.negative else 1
    total = stored_bytes(model, storage)
    upcast = 2 * largest_matrix(model) if storage == "fp8" else 0
    block_max = max(stored_bytes(b, storage) for b in blocks)
    rows = []
    for d in degrees:
        act = -(-(image + text) // d) * per_token + upcast
        rows.append(MemoryRow("usp", d, total, act))
        if d > 1 and d in (shard_degrees if shard_degrees is not None else degrees):
            rows.append(MemoryRow("fsdp x usp", d, -(-total // d) + 2 * block_max, act))
        piped = [b for bl in adapter.plan.blocks if bl.pipelined for b in getattr(model, bl.name)]
        if 1 < d <= len(piped) and allows_pipefusion(adapter, height, width, frames, d):
            sizes = [stored_bytes(b, storage) for b in piped]
            starts = partition([per_token_bytes(b) for b in piped], d, sizes,
                               cap=sum(sizes) / d + max(sizes)) + [len(piped)]
            stage = max(range(d), key=lambda i: sum(sizes[starts[i]:starts[i + 1]]))
            layers = starts[stage + 1] - starts[stage]
            kv = 2 * branches * image * hidden * 2 * layers
            weights = total - sum(sizes) + sum(sizes[starts[stage]:starts[stage + 1]])
            rows.append(MemoryRow("pipefusion", d, weights, (-(-image // d) + text) * per_token + kv + upcast,
                                  f"K/V {kv / 2**30:.1f} GiB"))
    return rows


def format_table(rows: list[MemoryRow], cards: tuple[int, ...] = CARDS_GIB) -> str:
    """A markdown table: per-rank weights, activations, total, and the cards it fits."""
    head = "| method | degree | weights GiB | activations GiB | total GiB | fits |\n|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        fits = ", ".join(str(c) for c in cards if r.fits(c)) or "none"
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.method} | {r.degree} | {r.weights / 2**30:.1f} | {r.activations / 2**30:.1f}{note} | "
                     f"{r.total / 2**30:.1f} | {fits} |")
    return head + "\n".join(lines)
