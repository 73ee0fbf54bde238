"""One-device step benchmark of full-size architectures with random weights.

    python -m comfyui_xdit bench --arch flux --size 1024 --device cuda --dtype bf16 [--compile]

One transformer forward is one sampling step (per guidance branch). The table compares, in one run:
diffusers eager (the model's forward called with the inputs its diffusers pipeline builds, default attention
selection; `pipeline_step`), ours eager (the engine's adapter call under its attention-backend choice), ours
compiled (regional torch.compile of the repeated blocks), with achieved TFLOP/s from torch's FLOP counter and the
share of a matmul ceiling measured in the same run.
Random weights change nothing about the time of a step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from . import families
from .adapters import make_adapter
from .adapters.base import Conditioning, FamilyAdapter
from .attention_backend import preferred_attention
from .memory_estimate import allows_pipefusion, parse_size
from .models import parse_dtype
from .tiny import build_tiny, is_tiny

CONFIG_DIR = Path(__file__).with_name("configs")


def arch_names() -> list[str]:
    """What --arch takes: a family (its first published variant), a variant or its short name, or a built-in tiny
    model."""
    aliases = [a for f in families.families().values() for a in f.aliases]
    return [*families.names(), *families.variants(), *aliases, *families.tiny_models()]


def build_random(arch: str, dtype: torch.dtype, device: str) -> FamilyAdapter:
    """A full-size architecture from the shipped configs (or a built-in tiny model), random weights, on device."""
    if is_tiny(arch):
        family, model = build_tiny(arch, dtype)
        return make_adapter(family, model.to(device))
    try:
        fam, variant = families.parse(arch)
    except KeyError:
        fam = variant = None
    if fam is None:
        raise SystemExit(f"error: unknown arch {arch!r}: one of {', '.join(arch_names())}")
    variant = variant or fam.default_variant
    import diffusers

    config = json.loads((CONFIG_DIR / variant.config).read_text())
    cls = getattr(diffusers, fam.diffusers_class)
    config.pop("_class_name", None)
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # initialise in the target dtype, on the device: no full-size fp32 copy
    try:
        with torch.device(device):
            model = fam.build(config, variant.name) if fam.build is not None else cls.from_config(config)
    finally:
        torch.set_default_dtype(default)
    return make_adapter(fam.name, model.eval().requires_grad_(False), variant.name)


def step_inputs(adapter: FamilyAdapter, size, batch: int, device: str, frames: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(0)
    tokens = adapter.spec.cond.tokens if adapter.block_count > 4 else 16  # the encoder's; a tiny model gets 16
    c = adapter.random_conditioning(batch, tokens, g)
    c = Conditioning(*(None if t is None else t.to(device) for t in (c.cond, c.pooled, c.mask)))
    c = adapter.expand(c, batch)
    height, width = parse_size(size)
    down = adapter.latent.downscale
    time = (adapter.latent_frames(frames),) if adapter.latent.dims == 3 else ()
    x = torch.randn(batch, adapter.latent_channels, *time, height // down, width // down, generator=g).to(device)
    return x, torch.tensor([500.0], device=device), c


def memory_rows(adapter: FamilyAdapter, size, frames: int = 1, degrees: tuple[int, ...] = (1, 2, 4, 8),
                branches: int = 2) -> list[tuple[str, int, int, int, int]]:
    """Per-rank memory from the model as built (meta tensors will do): (method, degree, parameter bytes, video or
    image tokens, PipeFusion's K/V buffer bytes). Ulysses and Ring keep every weight and 1/d of the tokens;
    PipeFusion keeps one stage's blocks (the split shard_stage makes) plus the rest of the model, and a full-sequence
    K and V per self-attention layer of its stage for each CFG branch. Ulysses degrees must divide the heads."""
    from .adapters.base import per_token_bytes
    from .parallel.pipefusion import partition

    def nbytes(module: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    height, width = parse_size(size)
    tokens = adapter.image_tokens(height, width, frames)
    model = adapter.model
    total = nbytes(model)
    blocks = [b for bl in adapter.plan.blocks if bl.pipelined for b in getattr(model, bl.name)]
    other = total - sum(nbytes(b) for b in blocks)
    element = next(model.parameters()).element_size()
    rows = []
    for d in degrees:
        if adapter.num_heads % d == 0:
            rows.append(("ulysses", d, total, -(-tokens // d), 0))
        rows.append(("ring", d, total, -(-tokens // d), 0))
        if 1 < d <= len(blocks) and allows_pipefusion(adapter, height, width, frames, d):
            sizes = [nbytes(b) for b in blocks]
            starts = partition([per_token_bytes(b) for b in blocks], d, sizes,
                               cap=sum(sizes) / d + max(sizes)) + [len(blocks)]
            stage = max(range(d), key=lambda i: sum(sizes[starts[i]:starts[i + 1]]))
            layers = starts[stage + 1] - starts[stage]
            kv = 2 * branches * tokens * adapter.hidden_size * element * layers
            rows.append(("pipefusion", d, other + sum(sizes[starts[stage]:starts[stage + 1]]), tokens, kv))
    return rows


def median_seconds(fn: Callable[[], object], device: str, repeats: int, warmup: int = 2) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_ceiling(device: str, dtype: torch.dtype, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul in this dtype on this device (8192 on GPUs, 1024 on CPU)."""
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, device, repeats)


def pipeline_step(adapter: FamilyAdapter, x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
    """One transformer forward as the family's diffusers pipeline makes it: the model's forward called with the
    inputs the pipeline's denoising loop builds (its own packing, position ids, timestep scaling and guidance, from
    the pipeline classes' helpers), the output turned back into the model-space layout of x with the pipeline's own
    unpacking. Independent of the adapter's `predict`: a wrong input mapping there makes the two differ."""
    fam, model, b = adapter.family, adapter.model, x.shape[0]
    dtype = adapter.dtype
    timestep = t.reshape(-1)[:1].expand(b).to(x.device)
    if fam == "flux":  # FluxPipeline.__call__
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline as Pipe

        _, ch, h, w = x.shape
        latents = Pipe._pack_latents(x.to(dtype), b, ch, h, w)
        guidance = None
        if model.config.guidance_embeds:
            scale = adapter.spec.cond.guidance if c.guidance is None else c.guidance
            guidance = torch.full([1], scale, device=x.device, dtype=torch.float32).expand(b)
        out = model(hidden_states=latents, timestep=timestep.to(latents.dtype) / 1000, guidance=guidance,
                    pooled_projections=c.pooled, encoder_hidden_states=c.cond,
                    txt_ids=torch.zeros(c.cond.shape[1], 3, device=x.device, dtype=dtype),
                    img_ids=Pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype),
                    return_dict=False)[0]
        return Pipe._unpack_latents(out, h * 8, w * 8, 8)
    if fam == "flux2":  # Flux2Pipeline.__call__: patchified, packed latents with 4-D position ids
        from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline as Pipe

        patches = Pipe._patchify_latents(x)
        latent_ids = Pipe._prepare_latent_ids(patches).to(x.device)
        latents = Pipe._pack_latents(patches)
        scale = adapter.spec.cond.guidance if c.guidance is None else c.guidance
        guidance = torch.full([1], scale, device=x.device, dtype=torch.float32).expand(b)
        out = model(hidden_states=latents.to(dtype), timestep=timestep.to(latents.dtype) / 1000, guidance=guidance,
                    encoder_hidden_states=c.cond, txt_ids=Pipe._prepare_text_ids(c.cond).to(x.device),
                    img_ids=latent_ids, return_dict=False)[0]
        out = out[:, :latents.size(1)]
        return Pipe._unpatchify_latents(Pipe._unpack_latents_with_ids(out, latent_ids))
    if fam == "qwen-image":  # QwenImagePipeline.__call__ (text to image: no reference latents)
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline as Pipe

        _, ch, h, w = x.shape
        latents = Pipe._pack_latents(x, b, ch, h, w)
        out = model(hidden_states=latents.to(dtype), timestep=timestep.to(latents.dtype) / 1000, guidance=None,
                    encoder_hidden_states_mask=c.mask, encoder_hidden_states=c.cond,
                    img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return Pipe._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]
    if fam == "z-image":  # ZImagePipeline.__call__: lists of one-frame latents, t reversed, the output negated
        latents = list(x.to(dtype).unsqueeze(2).unbind(dim=0))
        out = model(latents, (1000 - timestep.float()) / 1000, list(c.cond), return_dict=False)[0]
        return -torch.stack([o.float() for o in out], dim=0).squeeze(2)
    if fam == "wan":  # WanPipeline / WanImageToVideoPipeline.__call__
        current = model
        if getattr(model, "transformer_2", None) is not None:  # the experts: the boundary picks one
            boundary = model.boundary_ratio * model.num_train_timesteps
            current = model.transformer if float(t.reshape(-1)[0]) >= boundary else model.transformer_2
        kwargs = {}
        latents = x.to(dtype)
        if adapter.variant == "wan2.2-ti2v-5b":  # expand_timesteps: one timestep per token
            mask = torch.ones(x.shape, dtype=torch.float32, device=x.device)
            timestep = (mask[0][0][:, ::2, ::2] * t.reshape(-1)[0]).flatten().unsqueeze(0).expand(b, -1)
        if "image_cond" in c.extra:
            latents = torch.cat([latents, c.extra["image_cond"].to(dtype)], dim=1)
        if "image_embeds" in c.extra:
            kwargs["encoder_hidden_states_image"] = c.extra["image_embeds"]
        return current(hidden_states=latents, timestep=timestep, encoder_hidden_states=c.cond, return_dict=False,
                       **kwargs)[0]
    if fam == "sd3":  # StableDiffusion3Pipeline.__call__
        return model(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=c.cond,
                     pooled_projections=c.pooled, return_dict=False)[0]
    if fam == "pixart":  # PixArtSigmaPipeline.__call__, learned sigma split off
        out = model(x.to(dtype), encoder_hidden_states=c.cond, encoder_attention_mask=c.mask, timestep=timestep,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        if model.config.out_channels // 2 == adapter.latent_channels:
            out = out.chunk(2, dim=1)[0]
        return out
    raise SystemExit(f"error: bench knows no diffusers pipeline call for {fam}")


@torch.no_grad()
def run(arch: str, size, device: str, dtype: torch.dtype, compile: bool, repeats: int,
        batch: int = 1, frames: int = 1) -> tuple[list[tuple[str, float, float, str]], dict]:
    """Rows (name, seconds per step, TFLOP/s, note) and facts (flops, ceiling, max difference ours vs diffusers)."""
    adapter = build_random(arch, dtype, device)
    x, t, c = step_inputs(adapter, size, batch, device, frames)

    def diffusers_step() -> torch.Tensor:
        return pipeline_step(adapter, x, t, c)

    def ours_step() -> torch.Tensor:
        with preferred_attention(x.device):
            return adapter.predict(x, t, c)

    flops = count_flops(diffusers_step)
    ceiling = matmul_ceiling(device, dtype)
    reference, ours = diffusers_step().float(), ours_step().float()
    facts = {"flops": flops, "ceiling_tflops": ceiling / 1e12,
             "rel_l2_ours_vs_diffusers": float((ours - reference).norm() / reference.norm())}
    rows = []
    base = median_seconds(diffusers_step, device, repeats)
    rows.append(("diffusers eager", base, flops / base / 1e12, "1.00x"))
    eager = median_seconds(ours_step, device, repeats)
    rows.append(("ours eager", eager, flops / eager / 1e12, f"{eager / base:.2f}x"))
    if compile:
        from .compile import compiled_blocks

        with compiled_blocks(adapter):  # the engine's regional compilation, as a job with compile on runs it
            start = time.perf_counter()
            compiled_out = ours_step().float()  # compiles
            facts["compile_seconds"] = time.perf_counter() - start
            facts["rel_l2_compiled_vs_diffusers"] = float((compiled_out - reference).norm() / reference.norm())
            comp = median_seconds(ours_step, device, repeats)
        rows.append(("ours compiled", comp, flops / comp / 1e12, f"{comp / base:.2f}x"))
    return rows, facts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m comfyui_xdit bench", description=__doc__.split("\n\n")[0])
    add_bench_args(p)
    return cmd_bench(p.parse_args(argv))


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="flux", help="a family or variant (e.g. flux, sd3.5-large), or a built-in tiny "
                   "model (CPU checks)")
    p.add_argument("--size", default="1024", help="image side in pixels, or WIDTHxHEIGHT (e.g. 832x480)")
    p.add_argument("--frames", type=int, default=1, help="pixel frames of a video model (4k+1 for Wan)")
    p.add_argument("--memory", action="store_true", help="only print per-rank memory at each parallel degree, "
                   "from a meta-device build (no weights allocated, nothing timed)")
    p.add_argument("--weight-storage", default="bf16", choices=["bf16", "fp8"],
                   help="--memory: the weights' storage in the weights + activations table (fp8: analytic)")
    p.add_argument("--shard-degree", default="2,4,8",
                   help="--memory: FSDP degrees (comma list) of that table's 'fsdp x usp' rows (analytic)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="also time regional torch.compile")
    p.add_argument("--repeats", type=int, default=10)


def cmd_bench(args: argparse.Namespace) -> int:
    dtype = parse_dtype(args.dtype)
    height, width = parse_size(args.size)
    what = f"{args.arch} {width}x{height}" + (f" {args.frames} frames" if args.frames != 1 else "")
    if args.memory:
        adapter = build_random(args.arch, dtype, "meta")
        print(f"{what} {args.dtype}: {adapter.image_tokens(height, width, args.frames)} tokens; per-rank memory "
              "(meta-device build; activations other than PipeFusion's K/V buffers not counted)")
        print(f"{'method':<12}{'degree':>7}{'params GiB':>12}{'tokens/rank':>13}{'K/V GiB':>10}")
        for method, d, params, tokens, kv in memory_rows(adapter, (height, width), args.frames):
            print(f"{method:<12}{d:>7}{params / 2**30:>12.2f}{tokens:>13}{f'{kv / 2**30:.2f}' if kv else '-':>10}")
        from .memory_estimate import CARDS_GIB, OVERHEAD_GIB, format_table, memory_table

        shard = tuple(int(v) for v in args.shard_degree.split(",") if v.strip())
        print(f"\nper-rank weights ({args.weight_storage} storage) + activations (analytic, bf16, one branch); fits: "
              f"total + {OVERHEAD_GIB:g} GiB within a card of {'/'.join(map(str, CARDS_GIB))} GiB")
        print(format_table(memory_table(adapter, (height, width), args.frames, storage=args.weight_storage,
                                        shard_degrees=shard)))
        return 0
    rows, facts = run(args.arch, (height, width), args.device, dtype, args.compile, args.repeats, args.batch,
                      args.frames)
    ceiling = facts["ceiling_tflops"]
    print(f"{what} batch {args.batch} {args.dtype} on {_device_name(args.device)}; "
          f"{facts['flops'] / 1e12:.4g} TFLOP per step; matmul ceiling {ceiling:.1f} TFLOP/s")
    print(f"{'path':<16}{'step s':>10}{'TFLOP/s':>10}{'of ceiling':>12}{'vs diffusers':>14}")
    for name, seconds, tflops, ratio in rows:
        print(f"{name:<16}{seconds:>10.4f}{tflops:>10.3g}{tflops / ceiling:>12.0%}{ratio:>14}")
    print("rel. L2 vs diffusers: " + ", ".join(f"{k[7:].split('_vs')[0]} {v:.1e}"
                                              for k, v in facts.items() if k.startswith("rel_l2")))
    if "compile_seconds" in facts:
        print(f"compiling (the first compiled step): {facts['compile_seconds']:.1f} s")
    return 0


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "CPU"


if __name__ == "__main__":
    raise SystemExit(main())
