"""The constants probe (comfyui_xdit/probe.py) on two CPU ranks over gloo: every rank gets the same figures, all of
them positive and finite, and the planner takes the probed kind."""
import math
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, init: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        from comfyui_xdit.probe import probe

        k = probe(torch.device("cpu"), torch.float32, repeats=2)
        torch.save({"kind": (k.matmul_flops, k.half_rows, k.pcie_link, k.latency_s, k.attention_flops),
                    "source": k.source, "name": k.name}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_probe_two_cpu_ranks(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "kind")
    mp.spawn(_rank, args=(2, init, out), nprocs=2, join=True)
    a, b = (torch.load(f"{out}.{r}") for r in (0, 1))
    assert a["kind"] == b["kind"]  # the slowest rank's figures, on both
    flops, half, bw, latency, attention = a["kind"]
    assert all(math.isfinite(v) and v > 0 for v in (flops, bw, latency, attention)) and half >= 1
    assert 1e8 < flops < 1e13 and a["name"] == "CPU (probed)" and "probe on 2 rank(s)" in a["source"]
    from comfyui_xdit import planner as P
    from dataclasses import replace

    kind = replace(P.KINDS["CPU"], matmul_flops=flops, half_rows=half, pcie_link=bw, latency_s=latency,
                   attention_flops=attention)
    p = P.plan(P.model_facts("tiny-flux"), P.GPUs(2, kind, 64, "gloo"), P.Job(256, 256, cfg=3.0))
    assert p.choice is not None and p.choice.config.world_size == 2
