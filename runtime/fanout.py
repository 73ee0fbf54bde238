"""Rank 0 -> every rank: one operation (a JSON header, then its tensors) by torch.distributed broadcasts.
Every rank -> every rank: a small fixed-size JSON outcome per rank by all_gather. Raw bytes only, no pickle."""
from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

from .protocol import DTYPE_NAMES, DTYPES

OUTCOME_BYTES = 4096
_MESSAGE_ROOM = 3000  # longest error text kept in an outcome


class Fanout:
    """Collective transport on the default process group; `device` is where collectives run (cpu for gloo)."""

    def __init__(self, device: torch.device):
        self.device = device

    def _bcast_bytes(self, data: torch.Tensor) -> None:
        if data.numel():
            dist.broadcast(data, src=0)

    def send(self, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Rank 0: broadcast an operation."""
        tensors = tensors or {}
        header = {**header, "tensors": [{"name": k, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
                                        for k, t in tensors.items()]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        dist.broadcast(torch.tensor([len(raw)], dtype=torch.int64, device=self.device), src=0)
        self._bcast_bytes(torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.device))
        for t in tensors.values():
            self._bcast_bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).to(self.device))

    def receive(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Other ranks: wait for the next operation."""
        n = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.broadcast(n, src=0)
        raw = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
        self._bcast_bytes(raw)
        header = json.loads(raw.cpu().numpy().tobytes())
        tensors = {}
        for spec in header.pop("tensors"):
            t = torch.empty(spec["shape"], dtype=DTYPES[spec["dtype"]], device=self.device)
            if t.numel():
                flat = t.reshape(-1).view(torch.uint8)
                dist.broadcast(flat, src=0)
            tensors[spec["name"]] = t
        return header, tensors

    def gather(self, outcome: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank contributes its outcome; every rank gets all of them, in rank order."""
        raw = json.dumps(outcome, separators=(",", ":")).encode()
        if len(raw) > OUTCOME_BYTES:
            outcome = {**outcome, "message": str(outcome.get("message", ""))[:_MESSAGE_ROOM] + "..."}
            raw = json.dumps(outcome, separators=(",", ":")).encode()[:OUTCOME_BYTES]
        buf = torch.full((OUTCOME_BYTES,), ord(" "), dtype=torch.uint8)
        buf[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        buf = buf.to(self.device)
        parts = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, buf)
        return [json.loads(p.cpu().numpy().tobytes()) for p in parts]
