"""CPU scaling of the exact parallel methods: 2 ranks x 1 thread against 1 rank x 1 thread, same run.

usage: python benchmarks/cpu_scaling.py [--model bench-flux] [--size 384] [--frames 1] [--steps 8] [--rounds 2]
       [--configs "serial,cfg 2,ulysses 2"]
A video model takes --frames (Wan: 4k+1; `--model bench-wan --size 192 --frames 13` is 4 latent frames of 12 x 12
tokens, 576 video tokens).
Each config runs `rounds` times (order rotated between rounds, so machine noise hits all configs alike); a run's
time is the median step time with the first step excluded, and a config's time is its best run. Speedup is
serial's time over the config's. Every config computes the conditioning-only modules once per job (the context
cache) but "serial recompute", which shows what that saves.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

CONFIGS = [("serial", []), ("serial recompute", ["--no-context-cache"]), ("cfg 2", ["--cfg-parallel"]),
           ("ulysses 2", ["--ulysses-degree", "2"]), ("ring 2", ["--ring-degree", "2"]),
           ("pipefusion 2", ["--pipefusion-degree", "2", "--num-patches", "2", "--warmup-steps", "1"])]


def step_times(args: argparse.Namespace, extra: list[str]) -> list[float]:
    """Step times of one `generate` run; a serial run is kept on one core (as each parallel rank has one)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "comfyui_xdit", "generate", "--model", args.model, "--height", str(args.size),
               "--width", str(args.size), "--steps", str(args.steps), "--cfg", "3.0", "--out",
               os.path.join(tmp, "out.safetensors"), *(["--frames", str(args.frames)] if args.frames != 1 else []),
               *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        if all(e == "--no-context-cache" for e in extra) and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *cmd]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return [float(ms) / 1000 for ms in re.findall(r"step \d+/\d+ ([\d.]+) ms", out)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bench-flux")
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--frames", type=int, default=1, help="pixel frames of a video model")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--configs", default=",".join(n for n, _ in CONFIGS), help="comma-separated, from: "
                   + ", ".join(n for n, _ in CONFIGS) + " (serial is always run)")
    args = p.parse_args()
    wanted = {"serial", *(n.strip() for n in args.configs.split(","))}
    configs = [(n, e) for n, e in CONFIGS if n in wanted]
    best: dict[str, float] = {}
    for r in range(args.rounds):
        for name, extra in configs[r % len(configs):] + configs[:r % len(configs)]:
            t = statistics.median(step_times(args, extra)[1:])
            best[name] = min(best.get(name, t), t)
    base = best["serial"]
    frames = f", {args.frames} frames" if args.frames != 1 else ""
    print(f"model {args.model}, {args.size}x{args.size}{frames}, cfg 3.0, {args.steps} steps, 1 thread per rank, "
          f"best of {args.rounds} rounds")
    width = max(12, *(len(n) + 2 for n, _ in configs))
    print(f"{'config':<{width}}{'step s':>10}{'speedup':>10}")
    for name, _ in configs:
        print(f"{name:<{width}}{best[name]:>10.3f}{base / best[name]:>10.2f}")


if __name__ == "__main__":
    main()
