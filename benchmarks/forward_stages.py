"""Where a forward round trip's time goes: `python benchmarks/forward_stages.py [model] [--repeats 20]`.

A 1-rank pool in this process (gloo, HMAC on; the server's I/O and main threads as in a worker, the client in a
third thread's place: the caller), the stages' methods wrapped to record when they start (>) and end (<), in ms
after the client's send; medians over the calls. A profile of the hand-offs, not a substitute for
benchmarks/forward_overhead.py (separate processes). CPU, one torch thread."""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time

import torch
import torch.distributed as dist

from comfyui_xdit.models import load_model
from comfyui_xdit_runtime.client import PoolClient
from comfyui_xdit_runtime.cond_cache import content_hash
from comfyui_xdit_runtime.executor import Executor
from comfyui_xdit_runtime.fanout import Fanout
from comfyui_xdit_runtime.messages import Outcome
from comfyui_xdit_runtime.server import Rank0Server

SECRET = b"bench-secret"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default="tiny-pixart")
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    store = tempfile.mktemp(prefix="xdit-stages-")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    fanout = Fanout(torch.device("cpu"))
    executor = Executor(fanout, torch.device("cpu"))
    hello = fanout.gather(Outcome(ok=True, rank=0, pid=os.getpid()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    server = Rank0Server(executor, fanout, address, SECRET)
    marks: dict[str, float] = {}

    def wrap(obj, attr: str, name: str) -> None:
        inner = getattr(obj, attr)

        def timed(*a, **k):
            marks.setdefault(name + " >", time.perf_counter())
            out = inner(*a, **k)
            marks.setdefault(name + " <", time.perf_counter())
            return out
        setattr(obj, attr, timed)

    for obj, attr, name in ((server, "_handle", "io: check the message"), (server, "_enqueue", "io: queue the job"),
                            (server, "_reply_now", "io: accepted reply"), (fanout, "send", "main: op broadcast"),
                            (executor, "_forward", "main: forward"), (fanout, "gather", "main: outcome gather"),
                            (server, "_send", "main: encode result, hand to io")):
        wrap(obj, attr, name)
    threading.Thread(target=server.serve, args=(hello,), daemon=True).start()
    client = PoolClient(address, SECRET)
    key = client.load_model(args.model)
    a = load_model(args.model).adapter
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, a.latent_channels, args.side // 8, args.side // 8, generator=g)
    c = a.random_conditioning(2, a.spec.cond.tokens, g)
    conds = {"cond": c.cond, **({"pooled": c.pooled} if c.pooled is not None else {})}
    t = torch.tensor([500.0, 500.0])
    refs = {r: content_hash(v) for r, v in conds.items()}
    client.forward(key, x, t, conds, hashes=refs)  # uploads the conditioning
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        marks.clear()
        t0 = time.perf_counter()
        client.forward(key, x, t, conds, hashes=refs)
        marks["client: result decoded"] = time.perf_counter()
        for name, v in marks.items():
            rows.setdefault(name, []).append((v - t0) * 1e3)
    print(f"| stage ({args.model} {args.side}x{args.side}, batch 2) | ms after the client's send (median) |\n|---|---|")
    for name, v in sorted(rows.items(), key=lambda kv: statistics.median(kv[1])):
        if len(v) == args.repeats:  # a stage of every call (not the previous call's tail)
            print(f"| {name} | {statistics.median(v):.2f} |")
    fw = statistics.median(b - a for a, b in zip(rows["main: forward >"], rows["main: forward <"]))
    print(f"| round trip - pool forward | {statistics.median(rows['client: result decoded']) - fw:.2f} |")
    client.close()
    os._exit(0)  # the server's threads are daemons; the process group goes with the process


if __name__ == "__main__":
    main()
