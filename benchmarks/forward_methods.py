"""Parallel DiT Model's per-call cost with each method, at world 2 and 4:
`python benchmarks/forward_methods.py [--model tiny-flux] [--side 256] [--repeats 10] [--worlds 2,4]`.

For each pool size, one CPU/gloo pool (one torch thread per rank, as the pool's ranks run) and the same model in
this process; a CFG-batched forward (latents [2, C, h, w], conditioning cached on the pool after the first call)
with each layout. Prints a Markdown table of medians: the round trip as the node sees it, the pool's own time for
the op (rank 0), their difference (transport, encode/decode, broadcast: the per-call overhead), and the in-process
forward of one process as the baseline measured in the same run. On a machine with fewer cores than ranks the
ranks take turns: compare the overhead column, not the forward's speed-up.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from comfyui_xdit.models import load_model
from comfyui_xdit.parallel.forward import forward_call
from comfyui_xdit_runtime import Pool
from comfyui_xdit_runtime.bench import median_time

LAYOUTS = {2: [{}, {"ulysses": 2}, {"ring": 2}, {"cfg": 2}, {"dp": 2}, {"ulysses": 2, "shard": 2},
               {"cfg": 2, "shard": 2}],
           4: [{}, {"ulysses": 4}, {"ulysses": 2, "ring": 2}, {"ulysses": 2, "cfg": 2}, {"ring": 2, "dp": 2},
               {"ulysses": 2, "cfg": 2, "shard": 2}]}


def describe(parallel: dict) -> str:
    return " x ".join(f"{k} {v}" for k, v in parallel.items()) or "1 rank's work on every rank"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-flux")
    p.add_argument("--side", type=int, default=256, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--worlds", default="2,4")
    args = p.parse_args()
    torch.set_num_threads(1)
    a = load_model(args.model).adapter
    g = torch.Generator().manual_seed(0)
    side = args.side // a.latent.downscale
    x = torch.randn(2, a.latent_channels, *((1,) if a.latent.dims == 3 else ()), side, side, generator=g)
    c = a.random_conditioning(2, 16, g)
    t = torch.tensor([700.0, 700.0])
    conds = {"cond": c.cond, **({"pooled": c.pooled} if c.pooled is not None else {})}
    local = median_time(lambda: forward_call(a, x, t, c), args.repeats)
    print(f"model {args.model}, latent {list(x.shape)}, CFG-batched, {args.repeats} repeats, median ms; "
          f"in-process forward (1 process, 1 thread): {local * 1e3:.1f} ms")
    print("| world | layout | round trip | pool forward | overhead (round trip - pool forward) | round trip / "
          "in-process |")
    print("|---|---|---|---|---|---|")
    for world in map(int, args.worlds.split(",")):
        pool = Pool(world, log_path=Path(tempfile.mkdtemp()) / "pool.log")
        pool.start()
        client = pool.client()
        try:
            key = client.load_model(args.model)
            for parallel in LAYOUTS[world]:
                seconds: list[float] = []

                def call():
                    _, info = client.forward_with_info(key, x, t, conds, parallel=parallel or None)
                    seconds.append(info["seconds"])

                trip = median_time(call, args.repeats)
                inner = sorted(seconds[2:])[len(seconds[2:]) // 2]
                print(f"| {world} | {describe(parallel)} | {trip * 1e3:.1f} | {inner * 1e3:.1f} | "
                      f"{(trip - inner) * 1e3:.1f} | {trip / local:.2f} |")
        finally:
            client.close()
            pool.stop()


if __name__ == "__main__":
    main()
