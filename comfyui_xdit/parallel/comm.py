"""The one communication layer: collectives and ring point-to-point over gloo or nccl, with byte counters.

Collectives go through torch's functional collectives. gloo accepts CUDA tensors in collectives but not in
send/recv, so point-to-point on CUDA tensors under gloo (several ranks on one GPU) is staged through host memory.
Counters hold the bytes this rank sends to other ranks, per collective kind, since the last `reset()`.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed import ProcessGroup


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    def __init__(self) -> None:
        self.sent: dict[str, int] = defaultdict(int)

    def reset(self) -> dict[str, int]:
        """Return the counters and start new ones."""
        out, self.sent = dict(self.sent), defaultdict(int)
        return out

    def all_to_all(self, chunks: list[torch.Tensor], recv_numels: list[int], group: ProcessGroup,
                   kind: str = "all_to_all") -> list[torch.Tensor]:
        """Send chunks[i] to member i of `group`; return the flat tensors received from each member."""
        flat = torch.cat([c.reshape(-1) for c in chunks])
        return list(self.all_to_all_flat(flat, [c.numel() for c in chunks], recv_numels, group, kind)
                    .split(recv_numels))

    def all_to_all_flat(self, flat: torch.Tensor, send_numels: list[int], recv_numels: list[int],
                        group: ProcessGroup, kind: str = "all_to_all") -> torch.Tensor:
        """`flat` holds member i's part (send_numels[i] elements) after member i-1's; returns, likewise, what each
        member sent here, one after another."""
        me = dist.get_rank(group)
        self.sent[kind] += sum(n for i, n in enumerate(send_numels) if i != me) * flat.element_size()
        return funcol.wait_tensor(funcol.all_to_all_single(flat, recv_numels, send_numels, group))

    def all_gather(self, t: torch.Tensor, sizes: list[int], group: ProcessGroup, dim: int = 0,
                   kind: str = "all_gather") -> torch.Tensor:
        """Concatenate along `dim` every member's tensor; member i's has length sizes[i] there."""
        n = len(sizes)
        self.sent[kind] += _nbytes(t) * (n - 1)
        longest = max(sizes)
        t = t.movedim(dim, 0).contiguous()
        if t.shape[0] < longest:  # pad to a common length for the collective; the padding is cut off below
            t = torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])])
        out = funcol.wait_tensor(funcol.all_gather_tensor(t, 0, group))
        parts = [p[:s] for p, s in zip(out.split(longest), sizes)]
        return torch.cat(parts).movedim(0, dim)

    def all_reduce_max(self, t: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
        """Control traffic (flags); not counted."""
        group = group or dist.group.WORLD
        return funcol.wait_tensor(funcol.all_reduce(t, "max", group))

    def all_reduce_sum(self, t: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
        """Control traffic (the step cache's measurement); not counted."""
        group = group or dist.group.WORLD
        return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))

    def send(self, tensors: list[torch.Tensor], peer: int, group: ProcessGroup, kind: str) -> list:
        """Start sending tensors to member `peer` of `group`; wait on the returned works before reusing them."""
        stage = tensors[0].is_cuda and dist.get_backend(group) == "gloo"
        dst = dist.get_global_rank(group, peer)
        out = [t.cpu() if stage else t.contiguous() for t in tensors]
        self.sent[kind] += sum(_nbytes(t) for t in out)
        return [(dist.isend(t, dst, group), t) for t in out]

    def post_recv(self, like: list[tuple[tuple, torch.dtype]], peer: int, group: ProcessGroup,
                  device: torch.device) -> "RingTransfer":
        """Post receives of tensors of the given (shape, dtype) from member `peer` of `group`."""
        stage = device.type == "cuda" and dist.get_backend(group) == "gloo"
        src = dist.get_global_rank(group, peer)
        bufs = [torch.empty(shape, dtype=dtype, device="cpu" if stage else device) for shape, dtype in like]
        return RingTransfer([dist.irecv(b, src, group) for b in bufs], bufs, device if stage else None, None)

    def recv(self, like: list[tuple[tuple, torch.dtype]], peer: int, group: ProcessGroup,
             device: torch.device) -> list[torch.Tensor]:
        return self.post_recv(like, peer, group, device).wait()

    def broadcast(self, t: torch.Tensor, src: int, group: ProcessGroup, kind: str = "broadcast") -> torch.Tensor:
        """Broadcast from member `src` of `group` (in place on the others)."""
        if dist.get_rank(group) == src:
            self.sent[kind] += _nbytes(t) * (dist.get_world_size(group) - 1)
        t = t.contiguous()
        dist.broadcast(t, dist.get_global_rank(group, src), group)
        return t

    def ring_shift(self, tensors: list[torch.Tensor], recv_shapes: list[torch.Size], group: ProcessGroup,
                   kind: str = "ring") -> "RingTransfer":
        """Start sending `tensors` to the next member of `group` and receiving from the previous one."""
        n, me = dist.get_world_size(group), dist.get_rank(group)
        nxt, prv = dist.get_global_rank(group, (me + 1) % n), dist.get_global_rank(group, (me - 1) % n)
        stage = tensors[0].is_cuda and dist.get_backend(group) == "gloo"
        device = tensors[0].device
        send = [t.cpu() if stage else t.contiguous() for t in tensors]
        recv = [torch.empty(s, dtype=t.dtype, device="cpu" if stage else device) for s, t in zip(recv_shapes, tensors)]
        ops = [dist.P2POp(dist.isend, t, nxt, group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, prv, group) for t in recv]
        self.sent[kind] += sum(_nbytes(t) for t in send)
        return RingTransfer(dist.batch_isend_irecv(ops), recv, device if stage else None, send)


class RingTransfer:
    def __init__(self, works, recv: list[torch.Tensor], to_device, keep_alive) -> None:
        self.works, self.recv, self.to_device, self._keep = works, recv, to_device, keep_alive

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        if self.to_device is not None:
            return [t.to(self.to_device) for t in self.recv]
        return self.recv
