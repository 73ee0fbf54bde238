"""Ulysses 2, side by side in one run: diffusers' own context parallelism against the engine's, eager and compiled.

    python benchmarks/compile_cp.py [--device cpu|cuda] [--models bench-flux,bench-wan] [--size 256] [--runs 3]

Starts two ranks (torchrun; gloo on the CPU, nccl on CUDA: one GPU per rank). Each rank builds the model twice
with the same weights. The baseline is diffusers 0.42's context parallelism: `enable_parallelism` with
`ContextParallelConfig(ulysses_degree=2)` (the model's `_cp_plan` hooks split and gather the tokens), called as
its pipeline calls it (bench.pipeline_step), compiled with its own `compile_repeated_blocks`. Ours: the engine's
sequence parallelism (the family's token plan, USP attention) around the adapter's call, compiled with the
engine's compiled blocks (comfyui_xdit/compile.py). Both outputs are compared once (relative L2), then each of
the four is timed: median of `--runs` forwards after warm-up (which includes compiling). Prints a Markdown table:
seconds per forward and the ratio ours / diffusers.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _launch(argv: list[str]) -> int:
    from tests.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(Path(__file__).resolve()), *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, env=env).returncode


@contextlib.contextmanager
def _cpu_device_count():
    """diffusers 0.42 picks each rank's device as rank % torch.accelerator.device_count(), which is 0 without an
    accelerator: count one while it sets up (the mesh is given, so the device it records is not used here)."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    real = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = real


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


@torch.no_grad()
def _worker(args) -> None:
    import torch.distributed as dist
    from diffusers.models._modeling_parallel import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    from comfyui_xdit.bench import build_random, median_seconds, pipeline_step, step_inputs
    from comfyui_xdit.compile import compiled_blocks
    from comfyui_xdit.models import parse_dtype
    from comfyui_xdit.parallel import ParallelConfig
    from comfyui_xdit.parallel.mesh import get_mesh, release_process_groups
    from comfyui_xdit.parallel.sequence import sequence_parallel

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(args.threads)
    device = f"cuda:{rank}" if cuda else "cpu"
    dtype = parse_dtype(args.dtype)
    say = print if rank == 0 else (lambda *a, **k: None)
    pm = get_mesh(ParallelConfig(ulysses=2), "cuda" if cuda else "cpu")
    cp_mesh = init_device_mesh("cuda" if cuda else "cpu", (1, 2), mesh_dim_names=("ring", "ulysses"))
    rows = []
    for arch in args.models.split(","):
        ours, theirs = build_random(arch, dtype, device), build_random(arch, dtype, device)  # the same weights
        frames = args.frames if ours.latent.dims == 3 else 1
        x, t, c = step_inputs(ours, args.size, 1, device, frames)
        with _cpu_device_count():
            theirs.model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2, mesh=cp_mesh))

        def diffusers_step():
            return pipeline_step(theirs, x, t, c)

        def ours_step():
            return ours.predict(x, t, c)

        with sequence_parallel(ours, pm):  # installed once, as for a job
            reference, mine = diffusers_step().float(), ours_step().float()
            rel = float((mine - reference).norm() / reference.norm())
            times = {}
            dist.barrier()
            times["diffusers", "eager"] = median_seconds(diffusers_step, device, args.runs, warmup=1)
            dist.barrier()
            times["ours", "eager"] = median_seconds(ours_step, device, args.runs, warmup=1)
            breaks = _graph_breaks()
            theirs.model.compile_repeated_blocks()  # diffusers' own regional compilation (graph breaks allowed)
            dist.barrier()
            times["diffusers", "compiled"] = median_seconds(diffusers_step, device, args.runs, warmup=2)
            their_breaks, breaks = _graph_breaks() - breaks, _graph_breaks()
            with compiled_blocks(ours):
                dist.barrier()
                times["ours", "compiled"] = median_seconds(ours_step, device, args.runs, warmup=2)
                compiled_rel = float((ours_step().float() - reference).norm() / reference.norm())
            our_breaks = _graph_breaks() - breaks
        tokens = ours.image_tokens(args.size, args.size, frames)
        for mode in ("eager", "compiled"):
            d, o = times["diffusers", mode], times["ours", mode]
            rows.append((arch, tokens, mode, d, o, o / d))
            say(f"{arch} {mode}: diffusers {d:.3f} s, ours {o:.3f} s, ours / diffusers {o / d:.2f}", flush=True)
        say(f"{arch}: ours vs diffusers rel L2 {rel:.1e} eager, {compiled_rel:.1e} compiled; graph breaks while "
            f"compiling: diffusers {their_breaks}, ours {our_breaks}", flush=True)
        del ours, theirs
    say(f"\nUlysses 2, {args.device} ({'nccl' if cuda else f'gloo, {args.threads} thread(s) per rank'}), "
        f"{args.dtype}, {args.size}x{args.size}, median of {args.runs} forwards, seconds per forward (rank 0)")
    say("| model | image tokens | mode | diffusers CP | ours | ours / diffusers |")
    say("|---|---|---|---|---|---|")
    for arch, tokens, mode, d, o, ratio in rows:
        say(f"| {arch} | {tokens} | {mode} | {d:.3f} | {o:.3f} | {ratio:.2f} |")
    release_process_groups()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", default="bench-flux,bench-wan", help="built-in tiny models or full-size families")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--frames", type=int, default=5, help="pixel frames of a video model")
    p.add_argument("--dtype", default=None, help="default: fp32 on the CPU, bf16 on CUDA")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on the CPU")
    args = p.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if "RANK" not in os.environ:
        return _launch(sys.argv[1:])
    _worker(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
