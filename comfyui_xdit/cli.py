"""Command line: `python -m comfyui_xdit generate ...` (more subcommands join as they land)."""
from __future__ import annotations

import argparse
import sys
import time

from .errors import XDiTError


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="tiny-flux | tiny-sd3 | tiny-pixart | path to weights")
    p.add_argument("--family", default=None, choices=["flux", "sd3", "pixart"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cfg", type=float, default=1.0, help="true classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance", type=float, default=None, help="Flux distilled guidance (dev)")
    p.add_argument("--sampler", default="default")
    p.add_argument("--denoise", type=float, default=1.0)
    p.add_argument("--inputs", default=None, help="safetensors with noise, cond, pooled, neg_*, latent, sigmas")
    p.add_argument("--out", required=True, help="output safetensors; tensor 'latents' in ComfyUI convention")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])


def read_inputs(path: str | None) -> dict:
    if path is None:
        return {}
    import os

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise XDiTError(f"inputs file not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise XDiTError(f"cannot read inputs file {path}: {e}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from .models import load_model
    from .sampling import SampleRequest, sample

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    inputs = read_inputs(args.inputs)
    t0 = time.perf_counter()
    loaded = load_model(args.model, args.family, args.dtype, device)
    print(f"loaded {args.model} ({loaded.family}, {args.dtype}, {device}) in {time.perf_counter() - t0:.2f}s",
          flush=True)
    req = SampleRequest(height=args.height, width=args.width, steps=args.steps, seed=args.seed,
                        batch_size=args.batch_size, cfg=args.cfg, guidance=args.guidance, sampler=args.sampler,
                        denoise=args.denoise, inputs={k: v.to(device) for k, v in inputs.items()})

    def on_step(info) -> None:
        print(f"step {info.step}/{info.total} {info.seconds * 1000:.1f} ms", flush=True)

    t1 = time.perf_counter()
    latents = sample(loaded.adapter, req, tiny=loaded.tiny, callback=on_step)
    print(f"sampled {tuple(latents.shape)} in {time.perf_counter() - t1:.2f}s -> {args.out}", flush=True)
    save_file({"latents": latents.float().cpu().contiguous()}, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comfyui_xdit", description="Parallel DiT sampling engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="sample latents with a DiT")
    add_generate_args(gen)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except XDiTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
