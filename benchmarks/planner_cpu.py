"""The planner's predicted step time against measured CPU step times, same run, at world 2 and 4.

usage: python benchmarks/planner_cpu.py [--model bench-flux] [--size 256] [--frames 1] [--steps 3] [--rounds 1]
       [--text-tokens 16]

Each layout runs `generate` (cfg 3.0, 1 thread per rank, as benchmarks/cpu_scaling.py does: median step after
the first, best of the rounds); the prediction is comfyui_xdit.planner's with the CPU constants (one core per rank;
ranks beyond the machine's cores take turns). The planner's own pick for 2 and 4 CPU ranks is always measured too.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from cpu_scaling import step_times  # noqa: E402

from comfyui_xdit import planner as P  # noqa: E402
from comfyui_xdit.parallel import ParallelConfig as C  # noqa: E402

LAYOUTS = [C(), C(ulysses=2), C(ring=2), C(cfg=2), C(ulysses=2, cfg=2), C(ring=2, cfg=2), C(ulysses=4),
           C(ulysses=2, ring=2)]


def flags(c: C) -> list[str]:
    out = []
    for name, flag in (("ulysses", "--ulysses-degree"), ("ring", "--ring-degree"), ("dp", "--dp-degree"),
                       ("pipefusion", "--pipefusion-degree"), ("shard", "--shard-degree")):
        if getattr(c, name) > 1:
            out += [flag, str(getattr(c, name))]
    return out + (["--cfg-parallel"] if c.cfg == 2 else [])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bench-flux")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--frames", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--text-tokens", type=int, default=16, help="the CLI's random conditioning's tokens")
    args = p.parse_args()
    facts = P.model_facts(args.model)
    job = P.Job(args.size, args.size, args.frames, 1, 3.0, args.steps, text_tokens=args.text_tokens)
    layouts = list(LAYOUTS)
    picks = {}
    for world in (2, 4):
        choice = P.plan(facts, f"{world}xcpu", job).choice
        picks[world] = choice.config
        if choice.config not in layouts:
            layouts.append(choice.config)
    layouts = [c for c in layouts if P.valid(facts, c, job) is None]
    measured: dict[C, float] = {}
    for r in range(args.rounds):
        for c in layouts[r % len(layouts):] + layouts[:r % len(layouts)]:
            t = statistics.median(step_times(args, flags(c))[1:])
            measured[c] = min(measured.get(c, t), t)
    frames = f", {args.frames} frames" if args.frames != 1 else ""
    print(f"model {args.model}, {args.size}x{args.size}{frames}, cfg 3.0, {args.steps} steps, {args.text_tokens} "
          f"text tokens, 1 thread per rank, best of {args.rounds} rounds")
    print("| world | layout | predicted s | measured s | predicted / measured |")
    print("|---|---|---|---|---|")
    for c in layouts:
        g = P.parse_gpus(f"{c.world_size}xcpu")
        pred = P.step_seconds(facts, c, job, g)[0]
        print(f"| {c.world_size} | {P.describe_config(c)} | {pred:.3f} | {measured[c]:.3f} | "
              f"{pred / measured[c]:.2f} |")
    for world, pick in picks.items():
        same = {c: t for c, t in measured.items() if c.world_size == world}
        best = min(same, key=same.get)
        print(f"world {world}: planner's pick {P.describe_config(pick)} measured {measured[pick]:.3f} s; fastest "
              f"measured {P.describe_config(best)} {same[best]:.3f} s ({measured[pick] / same[best] - 1:+.0%})")


if __name__ == "__main__":
    main()
