"""CPU step time of FSDP2 weight sharding against serial and Ulysses 2, same run, 1 thread per rank.

usage: python benchmarks/shard_cpu.py [--model bench-flux] [--size 384] [--steps 6] [--rounds 2]
Same method as cpu_scaling.py (rotated order, median step time without the first step, best run per config).
"shard 2" alone runs the whole step on both ranks (memory pooling only), so it shows the gathers' cost on top
of serial; "shard 2 x ulysses 2" splits the work and the weights over the same 2 ranks. "serial fp8" stores the
Linear weights in fp8 and upcasts them to fp32 per call (the cast's cost).
"""
from __future__ import annotations

import argparse
import statistics

from cpu_scaling import step_times

CONFIGS = [("serial", [], True), ("serial fp8", ["--weight-dtype", "fp8_e4m3fn"], True),
           ("ulysses 2", ["--ulysses-degree", "2"], False), ("shard 2", ["--shard-degree", "2"], False),
           ("shard 2 x ulysses 2", ["--shard-degree", "2", "--ulysses-degree", "2"], False),
           ("... keep gathered", ["--shard-degree", "2", "--ulysses-degree", "2", "--shard-keep"], False)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bench-flux")
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    best: dict[str, float] = {}
    for r in range(args.rounds):
        for name, extra, pin in CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]:
            t = statistics.median(step_times(args, extra, pin)[1:])
            best[name] = min(best.get(name, t), t)
    base = best["serial"]
    print(f"model {args.model}, {args.size}x{args.size}, cfg 3.0, {args.steps} steps, 1 thread per rank, "
          f"best of {args.rounds} rounds")
    print(f"{'config':<22}{'step s':>10}{'speedup':>10}")
    for name, _, _ in CONFIGS:
        print(f"{name:<22}{best[name]:>10.3f}{base / best[name]:>10.2f}")


if __name__ == "__main__":
    main()
