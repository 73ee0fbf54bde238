"""A short probe of the planner's constants on the ranks of a running process group: matmul rate (and how it falls
with fewer rows), all-to-all and all-gather latency and bandwidth between the ranks. Every rank returns the same
DeviceKind (the slowest rank's figures, agreed by an all-reduce). Where no probe can run, the planner uses its
stated table (planner.KINDS).

    kind = probe(torch.device("cuda", local_rank), torch.bfloat16)   # inside an initialised process group
    plan(model, GPUs(world, kind, memory_gib, "probe"), job)
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.distributed as dist

from .planner import KINDS, DeviceKind, kind_for_memory


def _seconds(fn, device: torch.device, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def _fit(x1: float, t1: float, x2: float, t2: float) -> tuple[float, float]:
    """(intercept, slope) of t = a + b x through two points (slope >= a tiny positive)."""
    b = max((t2 - t1) / (x2 - x1), 1e-15)
    return max(t1 - b * x1, 0.0), b


def probe(device: torch.device, dtype: torch.dtype, group=None, repeats: int = 3) -> DeviceKind:
    """The constants measured here (a second or two on a GPU): the base kind's (by name or memory) attention/matmul
    ratio and HBM bandwidth are kept."""
    gpu = device.type == "cuda"
    if gpu:
        props = torch.cuda.get_device_properties(device)
        base = next((k for n, k in KINDS.items() if n != "CPU" and n in props.name.upper()),
                    kind_for_memory(props.total_memory / 2**30))
    else:
        base = KINDS["CPU"]
    k = 4096 if gpu else 512
    w = torch.randn(k, k, device=device, dtype=dtype)
    rates = []
    for rows in ((512, 8192) if gpu else (64, 512)):
        x = torch.randn(rows, k, device=device, dtype=dtype)
        rates.append((rows, 2 * rows * k * k / _seconds(lambda: x @ w, device, repeats)))
    (r1, f1), (r2, f2) = rates
    # rate(rows) = R rows / (rows + h)  <=>  1/rate = 1/R + (h/R) / rows
    inv_r, h_over_r = _fit(1 / r2, 1 / f2, 1 / r1, 1 / f1)
    peak = 1 / inv_r if inv_r > 0 else f2
    half = int(h_over_r * peak)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    latency, bw, gather_bw = base.latency_s, base.fast_link or base.pcie_link, base.fast_link or base.pcie_link
    if world > 1:
        sizes = (1 << 16, 1 << 22) if not gpu else (1 << 16, 1 << 26)  # bytes each rank sends
        a2a, ag = [], []
        for n in sizes:
            send = torch.zeros(n // 2, device=device, dtype=torch.bfloat16)
            recv = torch.empty_like(send)
            a2a.append(_seconds(lambda: dist.all_to_all_single(recv, send, group=group), device, repeats))
            piece = torch.zeros(n // 2 // world, device=device, dtype=torch.bfloat16)
            whole = torch.empty(piece.numel() * world, device=device, dtype=torch.bfloat16)
            ag.append(_seconds(lambda: dist.all_gather_into_tensor(whole, piece, group=group), device, repeats))
        sent = [n * (world - 1) / world for n in sizes]
        latency, per_byte = _fit(sent[0], a2a[0], sent[1], a2a[1])
        bw = 1 / per_byte
        gather_bw = 1 / _fit(sent[0], ag[0], sent[1], ag[1])[1]
    # the slowest rank sets every figure: max of times = min of rates
    t = torch.tensor([1 / peak, float(half), latency, 1 / bw, 1 / gather_bw], dtype=torch.float64,
                     device=device if gpu else "cpu")
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    inv_peak, half_f, latency, inv_bw, inv_gather = t.tolist()
    peak = 1 / inv_peak
    link = min(1 / inv_bw, 1 / inv_gather)
    return replace(base, name=f"{base.name} (probed)", matmul_flops=peak,
                   attention_flops=peak * base.attention_flops / base.matmul_flops, half_rows=max(1, int(half_f)),
                   fast_link=link, pcie_link=link, latency_s=latency,
                   source=f"probe on {world} rank(s): matmul {peak / 1e12:.3g} TFLOP/s (half at {int(half_f)} rows), "
                          f"all-to-all {1 / inv_bw / 1e9:.3g} GB/s + {latency * 1e6:.0f} us, all-gather "
                          f"{1 / inv_gather / 1e9:.3g} GB/s")
