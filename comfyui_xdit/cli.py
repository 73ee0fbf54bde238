"""Command line: `python -m comfyui_xdit generate|demo|serve|bench|analyze|plan ...`."""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

from .errors import XDiTError

POOL_PROBE_S = 10.0  # how long `generate --pool` waits for the pool's first answer


def add_generate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--weight-dtype", default="default", choices=["default", "fp8_e4m3fn", "fp8_e5m2"],
                   help="fp8: Linear weights stored in fp8, upcast to --dtype per layer")
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--frames", type=int, default=1, help="pixel frames of a video model (4k+1 for Wan; images: 1)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cfg", type=float, default=1.0, help="true classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance", type=float, default=None, help="Flux distilled guidance (dev)")
    p.add_argument("--sampler", default="default")
    p.add_argument("--denoise", type=float, default=1.0)
    p.add_argument("--shift", type=float, default=None, help="the scheduler's flow shift (default: what the "
                   "model's published pipeline folder ships, e.g. Wan 2.1 / 2.2 A14B T2V 3.0, TI2V 5B 5.0)")
    p.add_argument("--no-context-cache", action="store_true", help="recompute the conditioning-only modules (text "
                   "embedder, cross-attention K/V) every step instead of once per job (a local run; the results are "
                   "the same)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the repeated transformer "
                   "blocks (each block class compiled once per shape and layout; a pool keeps them across jobs)")
    p.add_argument("--inputs", default=None, help="safetensors with noise, cond, pooled, neg_*, latent, sigmas")
    p.add_argument("--out", required=True, help="output safetensors; tensor 'latents' in ComfyUI convention")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--pool", default=None, help="run on a worker pool started with `serve` at this address (the "
                   "degrees' product must be the pool's rank count, or 1)")
    add_secret_args(p, "the pool's shared secret")
    add_parallel_args(p)
    add_cache_args(p)


def add_model_args(p: argparse.ArgumentParser) -> None:
    from . import families

    tiny = " | ".join(n for n in families.tiny_models() if n.startswith("tiny-"))
    p.add_argument("--model", required=True, help=f"{tiny} | a diffusers folder or single-file checkpoint")
    p.add_argument("--model-2", default=None, help="the second expert's single file, with --model the first: "
                   "Wan 2.2 A14B's low-noise file (--model: the high-noise one)")
    p.add_argument("--family", default=None, choices=[*families.names(), *families.variants()],
                   help="the model's family or variant (default: detected from the weights)")


def add_secret_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--secret-file", default=None, help=f"{what}, from the first line of this file (or env "
                   "XDIT_POOL_SECRET)")
    p.add_argument("--secret", default=None, help="the same, on the command line (visible in the process list)")


def add_cache_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("step cache (first-block residual; works with every parallel method)")
    g.add_argument("--cache", default="none", choices=["none", "fbcache"])
    g.add_argument("--cache-threshold", type=float, default=0.1,
                   help="reuse the other blocks while the first block's residual changed less than this (relative)")
    g.add_argument("--cache-warmup", type=int, default=1, help="first steps always computed")
    g.add_argument("--cache-max-consecutive", type=int, default=0, help="most reuses in a row (0: no limit)")
    g.add_argument("--cache-first-blocks", type=int, default=1, help="blocks always computed")
    g.add_argument("--cache-mask", default=None, help="static per-step mask, e.g. 1,1,0,1 (1: compute)")
    g.add_argument("--cache-profile", default=None,
                   help="analyser profile.json: static mask from its per-step curve and --cache-threshold")


def cache_settings(args: argparse.Namespace):
    """CacheSettings from the --cache flags (None: no cache)."""
    from .cache import CacheSettings, mask_from_profile, parse_mask

    if args.cache == "none":
        if args.cache_mask or args.cache_profile:
            raise XDiTError("--cache-mask and --cache-profile need --cache fbcache")
        return None
    mask = None
    if args.cache_mask:
        mask = parse_mask(args.cache_mask)
    elif args.cache_profile:
        mask = mask_from_profile(args.cache_profile, args.cache_threshold, args.steps, args.cache_warmup,
                                 args.cache_max_consecutive)
    return CacheSettings(threshold=args.cache_threshold, warmup=args.cache_warmup,
                         max_consecutive=args.cache_max_consecutive, first_blocks=args.cache_first_blocks, mask=mask)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallel (the command launches the ranks itself)")
    g.add_argument("--ulysses-degree", type=int, default=1)
    g.add_argument("--ring-degree", type=int, default=1)
    g.add_argument("--cfg-parallel", action="store_true", help="cond/uncond branches on two halves of the ranks")
    g.add_argument("--dp-degree", type=int, default=1)
    g.add_argument("--pipefusion-degree", type=int, default=1, help="pipeline stages (blocks split across ranks)")
    g.add_argument("--num-patches", type=int, default=None, help="PipeFusion patches M (default: the degree)")
    g.add_argument("--warmup-steps", type=int, default=1, help="PipeFusion synchronous full-image steps")
    g.add_argument("--shard-degree", type=int, default=1,
                   help="FSDP2: split every block's weights over the innermost N ranks (alone: N ranks)")
    g.add_argument("--shard-keep", action="store_true", help="keep gathered weights for the whole job")
    g.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="default: nccl on cuda, else gloo")
    g.add_argument("--report-comm", action="store_true", help="print bytes sent per collective kind per step")


def parallel_config(args: argparse.Namespace):
    from .parallel import ParallelConfig

    config = ParallelConfig(dp=args.dp_degree, cfg=2 if args.cfg_parallel else 1, ring=args.ring_degree,
                            ulysses=args.ulysses_degree, pipefusion=args.pipefusion_degree,
                            num_patches=args.num_patches or args.pipefusion_degree, warmup_steps=args.warmup_steps,
                            shard=args.shard_degree, shard_keep=int(args.shard_keep))
    config.validate()
    return config


def relaunch_under_torchrun(world: int, argv: list[str]) -> int:
    """Run this same command on `world` local ranks with torchrun's environment variables; if a rank fails,
    stop the others (no rank is left waiting in a collective) and return its exit code."""
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    procs = [subprocess.Popen([sys.executable, "-m", "comfyui_xdit", *argv],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    code = 0
    try:
        while procs:
            for p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove(p)
                if rc != 0 and code == 0:
                    code = rc
                    for other in procs:
                        other.terminate()
            time.sleep(0.05)
    finally:
        for p in procs:
            p.kill()
    return code


def _report_stage_memory(loaded, config, rank: int) -> None:
    """Shard the blocks for this rank's stage now and print the parameter bytes each rank holds."""
    import torch.distributed as dist

    from .parallel.mesh import get_mesh
    from .parallel.pipefusion import parameter_report, shard_stage

    pm = get_mesh(config, next(loaded.adapter.model.parameters()).device.type)
    shard_stage(loaded.adapter, pm.rank("pipefusion"), config.pipefusion)
    mine = parameter_report(loaded.adapter)
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (rank, pm.rank("pipefusion"), mine))
    if rank == 0:
        for r, stage, rep in reports:
            print(f"rank {r} stage {stage}: block parameters {rep['blocks']} bytes, other {rep['other']} bytes",
                  flush=True)


def load_line(rank: int, report: dict) -> str:
    """One line of a rank's load report (comfyui_xdit.frugal.LoadReport as a dict)."""
    mib = 1 << 20
    peak = report.get("peak_rss_bytes", 0) - report.get("rss_before_bytes", 0)
    line = (f"rank {rank} load: read {report['read_bytes'] / mib:.1f} of {report['checkpoint_bytes'] / mib:.1f} MiB "
            f"({report['layout']}{'' if report['frugal'] else ', whole'}), keeps {report['kept_bytes'] / mib:.1f} MiB")
    if report.get("peak_rss_bytes"):
        line += f", peak host RSS +{peak / mib:.1f} MiB"
    if report.get("device_peak_bytes"):
        line += f", device peak {report['device_peak_bytes'] / mib:.1f} MiB"
    return line


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


@contextlib.contextmanager
def _ranks(args: argparse.Namespace, config):
    """Yield (device, rank) inside the default process group when config has world size > 1 (torchrun env)."""
    import os

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank = 0
    if config.world_size > 1:
        import torch.distributed as dist

        dist.init_process_group(args.backend or ("nccl" if device == "cuda" else "gloo"))
        rank = dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device == "cuda":
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        elif hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= config.world_size:
            cores = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cores[local_rank % len(cores)]})
    try:
        yield device, rank
    finally:
        if config.world_size > 1:
            import torch.distributed as dist

            from .parallel.mesh import release_process_groups

            dist.barrier()
            release_process_groups()


def cmd_generate(args: argparse.Namespace) -> int:
    import os

    config = parallel_config(args)
    if args.pool:
        if args.no_context_cache:
            raise XDiTError("--no-context-cache applies to a local run: a pool always computes the conditioning-only "
                            "modules once per job")
        return _generate_on_pool(args, config)
    if config.world_size > 1 and "RANK" not in os.environ:
        return relaunch_under_torchrun(config.world_size, args.argv)
    with _ranks(args, config) as (device, rank):
        return _generate_on_rank(args, config, device, rank)


def _generate_on_pool(args: argparse.Namespace, config) -> int:
    """The same job on a running worker pool (`serve`): the path the ComfyUI nodes take."""

    from safetensors.torch import save_file

    from comfyui_xdit_runtime import PoolClient  # lazy: the engine never needs ZeroMQ
    from comfyui_xdit_runtime.errors import PoolDied, PoolError, PoolTimeout

    settings = cache_settings(args)
    fields = {"height": args.height, "width": args.width, "steps": args.steps, "seed": args.seed,
              "batch_size": args.batch_size, "cfg": args.cfg, "guidance": args.guidance, "sampler": args.sampler,
              "denoise": args.denoise, "cache": None if settings is None else settings.to_dict()}
    if args.frames != 1:  # a video model's frames (image jobs send the fields they always did)
        fields["frames"] = args.frames
    if args.shift is not None:
        fields["shift"] = args.shift
    if args.compile:
        fields["compile"] = True
    client = PoolClient(args.pool, _pool_secret(args))
    try:
        try:  # a short request first: a wrong secret gets no reply at all (the pool drops unsigned messages)
            client.status(timeout=POOL_PROBE_S)
        except (PoolTimeout, PoolDied):
            raise XDiTError(f"no answer from a pool at {args.pool} within {POOL_PROBE_S:g}s: is `serve` running "
                            "there, and is the secret the pool's?") from None
        t0 = time.perf_counter()
        fp8 = args.weight_dtype != "default"  # the pool's fp8 choices compute in bf16
        loaded = client.load(args.model, args.family, args.weight_dtype if fp8 else args.dtype,
                             parallel=config.to_dict() if config.pipefusion > 1 else None)
        key = loaded["key"]
        print(f"loaded {args.model} on the pool at {args.pool} in {time.perf_counter() - t0:.2f}s", flush=True)
        for r in loaded.get("ranks", []):
            if r.get("layout"):
                print(load_line(r["rank"], r), flush=True)

        def on_progress(p) -> None:
            print(f"step {p.step}/{p.total} {p.step_seconds * 1000:.1f} ms", flush=True)

        t1 = time.perf_counter()
        latents, info = client.sample_with_info(key, fields, read_inputs(args.inputs), config.to_dict(), on_progress)
    except PoolError as e:
        raise XDiTError(str(e)) from None
    finally:
        client.close()
    print(f"sampled {tuple(latents.shape)} in {time.perf_counter() - t1:.2f}s -> {args.out}", flush=True)
    if "reused_steps" in info:
        steps = [s + 1 for s in info["reused_steps"]]
        print(f"cache: reused {len(steps)} of {args.steps} steps {steps}", flush=True)
    from . import families

    family = families.families().get(loaded.get("family", ""))
    if family is not None and family.latent.frame_axis and latents.ndim == 4:  # ComfyUI's layout for the family
        latents = latents.unsqueeze(2)
    save_file({"latents": latents.float().cpu().contiguous()}, args.out)
    return 0


def _generate_on_rank(args: argparse.Namespace, config, device: str, rank: int) -> int:
    from safetensors.torch import save_file

    from .engine import run_job
    from .models import load_model
    from .sampling import SampleRequest, comfy_latents

    say = print if rank == 0 else (lambda *a, **k: None)
    inputs = read_inputs(args.inputs)
    t0 = time.perf_counter()
    loaded = load_model(args.model, args.family, args.dtype, device, layout=config, rank=rank,
                        weight_dtype=args.weight_dtype)
    say(f"loaded {args.model} ({loaded.family}, {args.dtype}, {device}) in {time.perf_counter() - t0:.2f}s"
        + (f"; {config.world_size} ranks {config.to_dict()}" if config.world_size > 1 else ""), flush=True)
    if loaded.report is not None:
        print(load_line(rank, loaded.report.to_dict()), flush=True)
    req = SampleRequest(height=args.height, width=args.width, steps=args.steps, seed=args.seed,
                        batch_size=args.batch_size, cfg=args.cfg, guidance=args.guidance, sampler=args.sampler,
                        denoise=args.denoise, inputs={k: v.to(device) for k, v in inputs.items()},
                        cache=cache_settings(args), frames=args.frames, context_cache=not args.no_context_cache,
                        shift=args.shift, compile=args.compile)

    if config.pipefusion > 1:
        _report_stage_memory(loaded, config, rank)

    def on_step(info) -> None:
        print(f"step {info.step}/{info.total} {info.seconds * 1000:.1f} ms" + (" (reused)" if info.reused else ""),
              flush=True)

    t1 = time.perf_counter()
    result = run_job(loaded, req, config, callback=on_step)
    latents = comfy_latents(loaded.adapter, result.latents)
    if args.report_comm and config.world_size > 1:
        for i, sent in enumerate(result.comm):
            print(f"rank {rank} step {i + 1} bytes sent: " + ", ".join(f"{k} {v}" for k, v in sorted(sent.items())),
                  flush=True)
    if rank == 0:
        print(f"sampled {tuple(latents.shape)} in {time.perf_counter() - t1:.2f}s -> {args.out}", flush=True)
        if req.cache is not None:
            steps = [s + 1 for s in result.reused_steps]
            print(f"cache: reused {len(steps)} of {args.steps} steps {steps}", flush=True)
        save_file({"latents": latents.float().cpu().contiguous()}, args.out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a CPU worker pool and sample the built-in tiny models through it (see runtime/demo.py)."""
    from comfyui_xdit_runtime.demo import run_demo  # lazy: the engine never needs ZeroMQ

    return run_demo(nproc=2, steps=args.steps, size=args.size)


def _pool_secret(args: argparse.Namespace) -> bytes | None:
    """The shared secret: --secret-file, else --secret (visible to every local user in the process list), else
    XDIT_POOL_SECRET."""
    from comfyui_xdit_runtime.errors import PoolError
    from comfyui_xdit_runtime.security import read_secret

    if args.secret:
        print("warning: --secret is visible in the process list; prefer --secret-file or XDIT_POOL_SECRET",
              file=sys.stderr)
    try:
        return read_secret(args.secret, args.secret_file)
    except PoolError as e:
        raise XDiTError(str(e)) from None


def _stop_on_sigterm() -> None:
    """SIGTERM ends `serve` as Ctrl-C does: the pool is shut down, its processes with it."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run a worker pool in the foreground, restarting it when a rank dies, until SIGINT/SIGTERM (then shut it down)."""
    import os

    from comfyui_xdit_runtime import Pool  # lazy: the engine never needs ZeroMQ
    from comfyui_xdit_runtime.errors import PoolError
    from comfyui_xdit_runtime.security import ADMIN_ENV

    _stop_on_sigterm()
    try:
        pool = Pool(args.nproc, args.address, _pool_secret(args), device=args.device, backend=args.backend,
                    log_path=args.log, max_message_bytes=args.max_message_bytes, die_with_parent=True,
                    admin_secret=os.environ.get(ADMIN_ENV), nnodes=args.nnodes, node_rank=args.node_rank,
                    rdzv_endpoint=args.rdzv_endpoint, pg_timeout=args.pg_timeout)
    except PoolError as e:
        raise XDiTError(str(e)) from None

    def restarted(message: str, log_tail: str) -> None:
        print(f"{message}; log tail:\n{log_tail}", file=sys.stderr, flush=True)

    try:
        try:
            pool.start()
        except PoolError as e:
            raise XDiTError(str(e)) from None
        if args.node_rank > 0:
            print(f"node {args.node_rank} of {args.nnodes}: {args.nproc} ranks joining the rendezvous at "
                  f"{args.rdzv_endpoint} (log: {pool.log_path}); Ctrl-C or SIGTERM stops them", flush=True)
        else:
            print(f"pool of {args.nproc * args.nnodes} ranks ready at {pool.address} (log: {pool.log_path}); Ctrl-C "
                  "or SIGTERM stops it", flush=True)
        code = pool.supervise(on_restart=restarted)
        if code:
            print(f"the pool could not be restarted (code {code}); log tail:\n{pool.log_tail(20)}", file=sys.stderr)
        return 1 if code else 0
    except KeyboardInterrupt:
        return 0
    finally:
        pool.stop()


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1, help="ranks on this node (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1, help="machines in the pool (each runs serve with its --node-rank)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0..nnodes-1 (0 serves clients)")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of node 0's torchrun rendezvous (needed with "
                   "--nnodes > 1; off loopback it needs --secret)")
    p.add_argument("--address", default=None,
                   help="where rank 0 listens: tcp://HOST:PORT or ipc://PATH (default tcp://127.0.0.1:<free>); "
                        "a non-loopback address needs --secret")
    add_secret_args(p, "shared secret: every message is HMAC-SHA256 signed and replays are refused")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="default: nccl on cuda, else gloo")
    p.add_argument("--log", default=None, help="pool log file (default: a temporary file)")
    p.add_argument("--max-message-bytes", type=int, default=1 << 30)
    p.add_argument("--pg-timeout", type=float, default=120.0,
                   help="seconds a collective waits for a frozen rank before the job fails (a dead rank is found at "
                        "once)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comfyui_xdit", description="Parallel DiT sampling engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="sample latents with a DiT")
    add_generate_args(gen)
    gen.set_defaults(func=cmd_generate)
    demo = sub.add_parser("demo", help="start a CPU pool, sample the tiny models through it, print step times")
    demo.add_argument("--steps", type=int, default=8)
    demo.add_argument("--size", type=int, default=256)
    demo.set_defaults(func=cmd_demo)
    serve = sub.add_parser("serve", help="run a persistent worker pool in the foreground (ComfyUI can attach)")
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    from .bench import add_bench_args, cmd_bench

    bench = sub.add_parser("bench", help="time one step of a full-size architecture (random weights) on one device")
    add_bench_args(bench)
    bench.set_defaults(func=cmd_bench)
    analyze = sub.add_parser("analyze", help="profile step-to-step change of attention K/V/outputs and block "
                                             "residuals (random conditionings: no text encoders)")
    add_analyze_args(analyze)
    analyze.set_defaults(func=cmd_analyze)
    from .planner import add_plan_args, cmd_plan

    plan = sub.add_parser("plan", help="rank the parallel layouts for GPUs, a model and a job (predicted seconds per "
                                       "step, memory per rank) and say which one auto picks")
    add_plan_args(plan)
    plan.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "model_2", None):  # two expert files: one source (weights.pair_source)
        from .weights import pair_source

        args.model = pair_source(args.model, args.model_2)
    try:
        return args.func(args)
    except XDiTError as e:
        import os

        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2


def add_analyze_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--prompts", type=int, default=4,
                   help="number of 'prompts': random conditionings drawn from --seed + p (there are no text "
                        "encoders here, so prompts are stand-in embeddings, not text)")
    p.add_argument("--text-tokens", type=int, default=16, help="text tokens of each random conditioning")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--height", type=int, default=None, help="default 128 for the tiny models, else 1024")
    p.add_argument("--width", type=int, default=None, help="default 128 for the tiny models, else 1024")
    p.add_argument("--seed", type=int, default=0, help="prompt p uses seed + p for its noise and conditioning")
    p.add_argument("--cfg", type=float, default=1.0, help="true classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance", type=float, default=None, help="Flux distilled guidance (dev)")
    p.add_argument("--sampler", default="default")
    p.add_argument("--out", default=None, help="output folder (default ./analysis-<model>)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    add_parallel_args(p)


def cmd_analyze(args: argparse.Namespace) -> int:
    """Profile how much attention K/V/outputs and block residuals change between steps (see analysis.py)."""
    import os

    config = parallel_config(args)
    if config.world_size > 1 and "RANK" not in os.environ:
        return relaunch_under_torchrun(config.world_size, args.argv)
    if args.prompts < 1:
        raise XDiTError(f"--prompts must be >= 1, got {args.prompts}")
    if args.steps < 2:
        raise XDiTError(f"--steps must be >= 2 to compare steps, got {args.steps}")
    with _ranks(args, config) as (device, rank):
        return _analyze_on_rank(args, config, device, rank)


def _analyze_on_rank(args: argparse.Namespace, config, device: str, rank: int) -> int:
    import torch

    from .analysis import analyze, format_table, save_profile
    from .models import load_model
    from .sampling import SampleRequest

    say = print if rank == 0 else (lambda *a, **k: None)
    loaded = load_model(args.model, args.family, args.dtype, device)
    default_size = 128 if loaded.tiny else 1024
    height, width = args.height or default_size, args.width or default_size
    ad = loaded.adapter
    requests = []
    for p in range(args.prompts):
        gen = torch.Generator().manual_seed(args.seed + p)
        pos = ad.random_conditioning(1, args.text_tokens, gen)
        inputs = {"cond": pos.cond}
        if pos.pooled is not None:
            inputs["pooled"] = pos.pooled
        if pos.mask is not None:
            inputs["cond_mask"] = pos.mask
        if args.cfg != 1.0:
            neg = ad.random_conditioning(1, args.text_tokens, gen)
            inputs["neg_cond"] = neg.cond
            if neg.pooled is not None:
                inputs["neg_pooled"] = neg.pooled
            if neg.mask is not None:
                inputs["neg_cond_mask"] = neg.mask
        requests.append(SampleRequest(height=height, width=width, steps=args.steps, seed=args.seed + p,
                                      cfg=args.cfg, guidance=args.guidance, sampler=args.sampler,
                                      inputs={k: v.to(device) for k, v in inputs.items()}))
    say(f"analysing {args.model} ({loaded.family}, {args.dtype}, {device}): {args.prompts} random-conditioning "
        f"prompts, {args.steps} steps, {height}x{width}"
        + (f"; {config.world_size} ranks {config.to_dict()}" if config.world_size > 1 else ""), flush=True)
    t0 = time.perf_counter()
    profile = analyze(loaded, requests, config)
    if rank == 0:
        import os

        name = os.path.basename(os.path.normpath(args.model)) or "model"
        out = args.out or f"analysis-{name}"
        paths = save_profile(profile, out)
        print(f"profiled in {time.perf_counter() - t0:.2f}s -> {', '.join(paths)}", flush=True)
        print(format_table(profile), flush=True)
    return 0
