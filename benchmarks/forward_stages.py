"""Where a forward round trip's time goes: `python benchmarks/forward_stages.py [model] [--repeats 30] [--secret]`.

A 1-rank pool's rank 0 (gloo, its server's threads as in a worker) in a second process, the client in this one, as
ComfyUI and the pool run. Forwards go to the pool's direct socket (the main thread receives, checks, runs and answers
them). Both processes wrap the stages' functions to record when each starts (>) and ends (<); the pool sends its
marks back after each forward. Marks are time.perf_counter, which is CLOCK_MONOTONIC on Linux: one clock for both
processes. Prints the median of each mark in ms after the client's call began, and the round trip less the pool's
forward. The client pauses `--gap` ms between calls (the sampler's own work in ComfyUI). A profile of the stages,
next to benchmarks/forward_overhead.py's totals. CPU, one torch thread per process."""
from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import tempfile
import time

import torch

SECRET = b"bench-secret"
POOL_STAGES = (("server", "_checked", "pool: check the message"), ("executor", "_forward", "pool: forward"),
               ("protocol", "encode", "pool: encode the result"), ("server", "_send", "pool: encode and send"))
CLIENT_STAGES = (("client", "_send", "client: encode and send"), ("client", "_receive", "client: receive"),
                 ("protocol", "decode_reply", "client: decode the result"))


def _wrap(owner, attr: str, name: str, marks: dict) -> None:
    inner = getattr(owner, attr)

    def timed(*a, **k):
        marks.setdefault(name + " >", time.perf_counter())
        out = inner(*a, **k)
        marks.setdefault(name + " <", time.perf_counter())
        return out
    setattr(owner, attr, timed)


def _pool(marks_out, address_out, secret: bytes | None) -> None:
    """Rank 0 of a 1-rank pool, its forward marks put on `marks_out` after each forward's reply is sent."""
    import torch.distributed as dist

    from comfyui_xdit_runtime import protocol
    from comfyui_xdit_runtime.executor import Executor
    from comfyui_xdit_runtime.fanout import Fanout
    from comfyui_xdit_runtime.messages import Outcome
    from comfyui_xdit_runtime.server import Rank0Server

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp(prefix='xdit-stages-')}", rank=0,
                            world_size=1)
    fanout = Fanout(torch.device("cpu"))
    executor = Executor(fanout, torch.device("cpu"))
    hello = fanout.gather(Outcome(ok=True, rank=0, pid=os.getpid()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    server = Rank0Server(executor, fanout, address, secret)
    marks: dict[str, float] = {}
    owners = {"server": server, "executor": executor, "protocol": protocol}
    for owner, attr, name in POOL_STAGES:
        _wrap(owners[owner], attr, name, marks)
    send = server._send

    def send_and_report(job, *a, **k):
        send(job, *a, **k)
        if job.kind == "forward":
            marks_out.put(dict(marks))
        marks.clear()
    server._send = send_and_report
    address_out.put(address)
    server.serve(hello)


def main() -> None:
    from comfyui_xdit.models import load_model
    from comfyui_xdit_runtime import client as client_mod
    from comfyui_xdit_runtime.client import PoolClient
    from comfyui_xdit_runtime.cond_cache import content_hash

    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default="tiny-pixart")
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--gap", type=float, default=0.5, help="ms between calls")
    p.add_argument("--secret", action="store_true", help="HMAC on every message")
    args = p.parse_args()
    secret = SECRET if args.secret else None
    ctx = multiprocessing.get_context("spawn")
    marks_in, address_in = ctx.Queue(), ctx.Queue()
    ctx.Process(target=_pool, args=(marks_in, address_in, secret), daemon=True).start()
    client = PoolClient(address_in.get(timeout=120), secret)
    key = client.load_model(args.model)
    torch.set_num_threads(1)
    a = load_model(args.model).adapter
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, a.latent_channels, args.side // 8, args.side // 8, generator=g)
    c = a.random_conditioning(2, a.spec.cond.tokens, g)
    conds = {"cond": c.cond, **({"pooled": c.pooled} if c.pooled is not None else {})}
    t = torch.tensor([500.0, 500.0])
    refs = {r: content_hash(v) for r, v in conds.items()}
    marks: dict[str, float] = {}
    owners = {"client": client, "protocol": client_mod.protocol}
    for owner, attr, name in CLIENT_STAGES:
        _wrap(owners[owner], attr, name, marks)
    client.forward(key, x, t, conds, hashes=refs)  # uploads the conditioning
    marks_in.get(timeout=60)
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        marks.clear()
        t0 = time.perf_counter()
        client.forward(key, x, t, conds, hashes=refs)
        marks["client: result returned <"] = time.perf_counter()
        for name, v in {**marks, **marks_in.get(timeout=60)}.items():
            rows.setdefault(name, []).append((v - t0) * 1e3)
        time.sleep(args.gap / 1e3)
    mac = "HMAC" if secret else "no secret"
    print(f"| stage ({args.model} {args.side}x{args.side}, batch 2, {mac}) | ms after the call began (median) |\n"
          "|---|---|")
    for name, v in sorted(rows.items(), key=lambda kv: statistics.median(kv[1])):
        if len(v) == args.repeats:
            print(f"| {name} | {statistics.median(v):.3f} |")
    fw = statistics.median(b - a for a, b in zip(rows["pool: forward >"], rows["pool: forward <"]))
    print(f"| round trip - pool forward | {statistics.median(rows['client: result returned <']) - fw:.3f} |")
    client.close()
    os._exit(0)  # the pool's process is a daemon: it goes with this one


if __name__ == "__main__":
    main()
