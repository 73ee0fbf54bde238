"""How the worker pool behaves under faults: `python benchmarks/pool_faults.py [--nproc 2]`.

Each row injects one fault into a 2-rank CPU pool running tiny-flux and measures what a client sees, how long
until it knows, and how long until the pool serves again. Prints a Markdown table (docs/pool.md).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import zmq

from comfyui_xdit_runtime import Pool, PoolClient, PoolError
from comfyui_xdit_runtime.launcher import _pid_alive

REQ = {"height": 128, "width": 128, "steps": 3}
LONG = {"height": 128, "width": 128, "steps": 10000}
FROZEN_PG_TIMEOUT = 30.0  # a frozen rank is found by the process group's timeout (default 120 s)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"


def _until(fn, limit: float = 180.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            if fn():
                return time.monotonic() - start
        except PoolError:
            pass
        time.sleep(0.1)
    return float("nan")


def killed_rank(pool: Pool, rank: int, sig: int = signal.SIGKILL) -> tuple[str, float, float]:
    client = pool.client()
    key = client.load_model("tiny-flux")
    pids = pool.rank_pids
    t = [0.0]

    def kill(p):
        if p.step == 2:
            t[0] = time.monotonic()
            os.kill(pids[rank], sig)

    try:
        client.sample(key, LONG, on_progress=kill)
        seen = "no error"
    except PoolError as e:
        seen = _first_line(e)
    detect = time.monotonic() - t[0]
    client.sample(key, REQ)  # restarts the pool and loads the model again
    return seen, detect, time.monotonic() - t[0]


def _forward_case():
    import torch

    from comfyui_xdit.models import load_model

    adapter = load_model("tiny-flux").adapter
    g = torch.Generator().manual_seed(0)
    c = adapter.random_conditioning(1, 7, g)
    return torch.randn(1, adapter.latent_channels, 16, 16, generator=g), torch.tensor([500.0]), \
        {"cond": c.cond, "pooled": c.pooled}


def serve_rank_killed(tmp: str, rank: int, forwards: bool = False) -> tuple[str, float, float]:
    """`serve` and an attached client (ComfyUI's way): rank `rank` SIGKILLed during a long sample, or (`forwards`)
    while the client sends forwards back to back (as a stock sampler does); then the restarted pool must serve the
    client's next forward at once."""
    address = f"ipc://{tmp}/serve{rank}{int(forwards)}.sock"
    proc = subprocess.Popen([sys.executable, "-m", "comfyui_xdit", "serve", "--nproc", "2", "--address", address,
                             "--log", f"{tmp}/serve.log"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        proc.stdout.readline()
        client = PoolClient(address)
        key = client.load_model("tiny-flux")
        pids = {r["pid"] for r in client.status()["ranks"]}
        pid = client.status()["ranks"][rank]["pid"]
        x, ts, conds = _forward_case()
        t = [0.0]

        def kill(p=None):
            if p is None or p.step == 2:
                t[0] = time.monotonic()
                os.kill(pid, signal.SIGKILL)

        try:
            if forwards:
                client.forward(key, x, ts, conds)
                threading.Timer(0.5, kill).start()
                while True:
                    client.forward(key, x, ts, conds)
            else:
                client.sample(key, LONG, on_progress=kill)
            seen = "no error"
        except PoolError as e:
            seen = _first_line(e)
        detect = time.monotonic() - t[0]

        def restarted() -> bool:  # (a failed pool still answers status for a moment: healthy false)
            status = client.status(timeout=1.0)
            return status["healthy"] and pids.isdisjoint(r["pid"] for r in status["ranks"])

        _until(restarted)
        back = time.monotonic() - t[0]  # from the kill until the restarted pool answers
        try:
            client.forward(key, x, ts, conds)
        except PoolError as e:
            seen += f"; then the next forward failed: {_first_line(e)}"
        client.close()
        return seen, detect, back
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def serve_sigterm(tmp: str) -> tuple[str, float, float]:
    address = f"ipc://{tmp}/term.sock"
    proc = subprocess.Popen([sys.executable, "-m", "comfyui_xdit", "serve", "--nproc", "2", "--address", address,
                             "--log", f"{tmp}/term.log"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc.stdout.readline()
    client = PoolClient(address)
    pids = [r["pid"] for r in client.status()["ranks"]]
    client.close()
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    gone = _until(lambda: not any(_pid_alive(p) for p in pids))
    return f"serve exits {proc.returncode}, every rank gone after {gone + (time.monotonic() - start):.1f} s", \
        time.monotonic() - start, None


def frozen_forward(pool: Pool, deadline: float = 5.0) -> tuple[str, float, float]:
    """rank 1 stopped (SIGSTOP) before a forward with a deadline (Parallel DiT Model's XDIT_FORWARD_TIMEOUT)."""
    client = pool.client()
    key = client.load_model("tiny-flux")
    x, ts, conds = _forward_case()
    pid = pool.rank_pids[1]
    start = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        client.forward(key, x, ts, conds, timeout=deadline)
        seen = "no error"
    except PoolError as e:
        seen = _first_line(e)
    detect = time.monotonic() - start
    os.kill(pid, signal.SIGCONT)
    client.forward(key, x, ts, conds)
    return seen, detect, time.monotonic() - start


def vanished_client(pool: Pool) -> tuple[str, float, float]:
    from comfyui_xdit_runtime import messages, protocol

    client = pool.client()
    key = client.load_model("tiny-flux")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(pool.address)
    header = messages.Sample(id="vanish", key=key, request=messages.SampleFields(**LONG), client="v" * 32)
    sock.send_multipart(protocol.encode(header))
    sock.recv_multipart()  # accepted
    sock.close(linger=0)
    start = time.monotonic()
    _until(lambda: client.status()["running"] == "vanish", 30)
    _until(lambda: client.status()["running"] is None)
    return "(nothing: the pool cancels its job)", time.monotonic() - start, None


def hostile(pool: Pool) -> tuple[str, float, float]:
    client = pool.client()
    try:
        client.load_model("/" + "é" * 700)
        seen = "no error"
    except PoolError as e:
        seen = _first_line(e)
    client.status(refresh=True)  # every rank still there
    return seen, None, None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pool = Pool(args.nproc, log_path=f"{tmp}/pool.log")
        pool.start()
        try:
            rows.append(("error text far over the outcome size (load `/é...`)", *hostile(pool)))
            rows.append(("rank 1 killed mid-job (in-process pool)", *killed_rank(pool, 1)))
            rows.append(("rank 0 killed mid-job (in-process pool)", *killed_rank(pool, 0)))
            rows.append(("client vanishes mid-job (default timeout)", *vanished_client(pool)))
            rows.append(("rank 1 frozen (SIGSTOP) before a forward with a 5 s deadline", *frozen_forward(pool)))
        finally:
            pool.stop()
        frozen = Pool(args.nproc, log_path=f"{tmp}/frozen.log", pg_timeout=FROZEN_PG_TIMEOUT)
        frozen.start()
        try:
            rows.append((f"rank 1 frozen (SIGSTOP) mid-job, `--pg-timeout {FROZEN_PG_TIMEOUT:g}`",
                         *killed_rank(frozen, 1, signal.SIGSTOP)))
        finally:
            frozen.stop()
        rows.append(("rank 0 killed mid-job (`serve`, attached client)", *serve_rank_killed(tmp, 0)))
        rows.append(("rank 1 killed mid-job (`serve`, attached client)", *serve_rank_killed(tmp, 1)))
        rows.append(("rank 1 killed during back-to-back forwards (`serve`, attached client)",
                     *serve_rank_killed(tmp, 1, forwards=True)))
        rows.append(("SIGTERM to `serve`", *serve_sigterm(tmp)))
    print("| fault | what the client sees | time to detect (s) | back to serving (s) |")
    print("|---|---|---|---|")
    for name, seen, detect, back in rows:
        cells = ["-" if v is None else f"{v:.1f}" for v in (detect, back)]
        print(f"| {name} | {seen} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
