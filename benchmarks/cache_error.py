"""Step cache (first-block residual): reused steps, relative error against uncached sampling and the time ratio,
measured in the same run, per model and threshold.

usage: python benchmarks/cache_error.py [--models tiny-flux,tiny-sd3,tiny-pixart] [--size 256] [--steps 20]
           [--thresholds 0.3,0.5,0.7,0.9] [--cfg 3.0] [--device cpu] [--dtype fp32] [--repeats 3]

`--models` also takes the full-size architectures of `python -m comfyui_xdit bench` (flux, sd3, pixart, ...):
random weights built on the device, e.g. `--models flux --size 1024 --device cuda --dtype bf16 --cfg 1`. With
random weights the first block's step-to-step change is unlike a trained model's, so the thresholds to compare
are those that reuse the same number of steps; the time a reused step saves is real either way.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfyui_xdit.bench import build_random  # noqa: E402
from comfyui_xdit.cache import CacheSettings  # noqa: E402
from comfyui_xdit.models import LoadedModel, parse_dtype  # noqa: E402
from comfyui_xdit.engine import run_job  # noqa: E402
from comfyui_xdit.sampling import SampleRequest  # noqa: E402
from comfyui_xdit.tiny import TINY_TEXT_TOKENS, is_tiny  # noqa: E402


def request(loaded: LoadedModel, size: int, steps: int, cfg: float, cache: CacheSettings | None,
            device: str) -> SampleRequest:
    ad = loaded.adapter
    gen = torch.Generator().manual_seed(11)
    tokens = TINY_TEXT_TOKENS if loaded.tiny else ad.spec.cond.tokens  # the encoder's (CondSpec.tokens)
    inputs = {}
    for prefix in ("", "neg_"):
        c = ad.random_conditioning(1, tokens, gen)
        inputs[prefix + "cond"] = c.cond
        if c.pooled is not None:
            inputs[prefix + "pooled"] = c.pooled
        if c.mask is not None:
            inputs[prefix + "cond_mask"] = c.mask
    return SampleRequest(size, size, steps, seed=3, cfg=cfg, cache=cache,
                         inputs={k: v.to(device) for k, v in inputs.items()})


def timed(loaded: LoadedModel, req: SampleRequest, device: str) -> tuple[torch.Tensor, float, list[int]]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run_job(loaded, req)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result.latents, time.perf_counter() - start, result.reused_steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny-flux,tiny-sd3,tiny-pixart")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--thresholds", default="0.3,0.5,0.7,0.9")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=3, help="median of this many timed runs per row")
    args = p.parse_args(argv)
    dtype = parse_dtype(args.dtype)
    print(f"{args.size}x{args.size}, {args.steps} steps, cfg {args.cfg}, {args.dtype} on {args.device}; "
          f"time: median of {args.repeats}")
    print("| model | threshold | reused steps | rel. L2 vs uncached | time s | time vs uncached |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        adapter = build_random(name, dtype, args.device)
        loaded = LoadedModel(adapter, name, is_tiny(name))
        base = request(loaded, args.size, args.steps, args.cfg, None, args.device)
        timed(loaded, base, args.device)  # warm-up
        runs = [timed(loaded, base, args.device) for _ in range(args.repeats)]
        ref, t_ref = runs[0][0].double(), statistics.median(r[1] for r in runs)
        print(f"| {name} | uncached | 0 | 0 | {t_ref:.3f} | 1.00x |")
        for thr in (float(t) for t in args.thresholds.split(",")):
            req = request(loaded, args.size, args.steps, args.cfg, CacheSettings(threshold=thr), args.device)
            runs = [timed(loaded, req, args.device) for _ in range(args.repeats)]
            out, reused = runs[0][0], runs[0][2]
            err = ((out.double() - ref).norm() / ref.norm()).item()
            t = statistics.median(r[1] for r in runs)
            print(f"| {name} | {thr:g} | {len(reused)}/{args.steps} | {err:.2e} | {t:.3f} | {t_ref / t:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
