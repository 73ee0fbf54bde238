"""Rank 0 -> every rank: one operation (a msgpack-encoded Op, then its tensors) by torch.distributed broadcasts.
Every rank -> every rank: a small fixed-size msgpack Outcome per rank by all_gather. Raw bytes only, no pickle."""
from __future__ import annotations

import msgspec
import torch
import torch.distributed as dist

from . import messages
from .messages import Op, Outcome, TensorSpec
from .protocol import DTYPE_NAMES, DTYPES

OUTCOME_BYTES = 4096


class Fanout:
    """Collective transport on the default process group; `device` is where collectives run (cpu for gloo)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.alone = dist.get_world_size() == 1  # one rank: nothing to send, its own outcome is all there is

    def _bcast_bytes(self, data: torch.Tensor) -> None:
        if data.numel():
            dist.broadcast(data, src=0)

    def send(self, op: Op, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Rank 0: broadcast an operation."""
        if self.alone:
            return
        tensors = tensors or {}
        specs = [TensorSpec(k, DTYPE_NAMES[t.dtype], list(t.shape)) for k, t in tensors.items()]
        raw = messages.msgpack_encoder.encode((op, specs))
        dist.broadcast(torch.tensor([len(raw)], dtype=torch.int64, device=self.device), src=0)
        self._bcast_bytes(torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.device))
        for t in tensors.values():
            self._bcast_bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).to(self.device))

    def receive(self) -> tuple[Op, dict[str, torch.Tensor]]:
        """Other ranks: wait for the next operation."""
        n = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.broadcast(n, src=0)
        raw = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
        self._bcast_bytes(raw)
        op, specs = _op_decoder.decode(raw.cpu().numpy().tobytes())
        tensors = {}
        for spec in specs:
            t = torch.empty(spec.shape, dtype=DTYPES[spec.dtype], device=self.device)
            if t.numel():
                dist.broadcast(t.reshape(-1).view(torch.uint8), src=0)
            tensors[spec.name] = t
        return op, tensors

    def gather(self, outcome: Outcome) -> list[Outcome]:
        """Every rank contributes its outcome; every rank gets all of them, in rank order."""
        raw = fit_outcome(outcome)
        if self.alone:
            return [_read_outcome(len(raw).to_bytes(4, "little") + raw, 0)]
        buf = torch.zeros(OUTCOME_BYTES + 4, dtype=torch.uint8)
        buf[:4] = torch.tensor(list(len(raw).to_bytes(4, "little")), dtype=torch.uint8)
        buf[4:4 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        buf = buf.to(self.device)
        parts = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, buf)
        return [_read_outcome(p.cpu().numpy().tobytes(), r) for r, p in enumerate(parts)]


_op_decoder = msgspec.msgpack.Decoder(tuple[Op, list[TensorSpec]])


def fit_outcome(outcome: Outcome, limit: int = OUTCOME_BYTES) -> bytes:
    """The encoded outcome, its message shortened (by characters, before encoding) until it fits in `limit`."""
    raw = messages.msgpack_encoder.encode(outcome)
    if len(raw) <= limit:
        return raw
    text = outcome.message
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix of the message that fits
        mid = (lo + hi + 1) // 2
        if len(messages.msgpack_encoder.encode(msgspec.structs.replace(outcome, message=text[:mid] + "..."))) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return messages.msgpack_encoder.encode(msgspec.structs.replace(outcome, message=text[:lo] + "..."))


def _read_outcome(data: bytes, rank: int) -> Outcome:
    n = int.from_bytes(data[:4], "little")
    try:
        return messages.outcome_decoder.decode(data[4:4 + n])
    except (msgspec.DecodeError, msgspec.ValidationError) as e:  # never expected: say so rather than stop the pool
        return Outcome(ok=False, rank=rank, pid=0, kind="internal", message=f"unreadable outcome from rank {rank}: {e}")
