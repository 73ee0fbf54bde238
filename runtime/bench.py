"""Runtime overheads: `python -m comfyui_xdit_runtime.bench [--nproc 2] [--repeats 50]`.

Prints a Markdown table, each figure a median over repeats:
  - status round trip (rank 0 answers from its I/O thread) and refreshed status (a collective on every rank);
  - 64 MB tensor: wire round trip over loopback TCP with the pool's own encode/decode (no pool), and upload
    into the pool (client -> rank 0 -> broadcast to every rank, job then rejected by the engine);
  - progress messages: time rank 0 spends sending them (with previews) over the job's sampling time, and the
    end-to-end difference of a job with and without progress.
"""
from __future__ import annotations

import argparse
import secrets
import statistics
import threading
import time

import torch
import zmq

from . import messages, protocol
from .launcher import Pool

MB = 1 << 20


def paired_medians(a, b, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median times of `a` and `b`, called alternately so that drift on a noisy machine hits both alike."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine_ceilings(nbytes: int, repeats: int) -> list[tuple[str, str, str]]:
    """What this machine allows at best: a fresh-tensor copy, and one raw ZeroMQ frame one way (no protocol)."""
    x = torch.randn(nbytes // 4)
    t = median_time(x.clone, repeats)
    rows = [("64 MB clone into a fresh tensor (memory ceiling)", f"{t * 1e3:.1f} ms", f"{nbytes / t / 1e9:.2f} GB/s")]
    ctx = zmq.Context.instance()
    for kind in ("tcp", "ipc"):
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        if kind == "tcp":
            addr = f"tcp://127.0.0.1:{a.bind_to_random_port('tcp://127.0.0.1')}"
        else:
            addr = f"ipc:///tmp/xdit-bench-{id(a)}.sock"
            a.bind(addr)
        b.connect(addr)
        view = memoryview(x.numpy())
        t = median_time(lambda: (a.send(view, copy=False), b.recv(copy=False)), repeats)
        rows.append((f"64 MB raw ZeroMQ frame one way, {kind} (socket ceiling)", f"{t * 1e3:.1f} ms",
                     f"{nbytes / t / 1e9:.2f} GB/s"))
        a.close(0)
        b.close(0)
    return rows


def wire_round_trip(nbytes: int, repeats: int, secret: bytes | None, transport: str = "tcp") -> float:
    """Median seconds for a tensor to go DEALER -> ROUTER -> back, encoded and decoded each way."""
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    if transport == "tcp":
        addr = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    else:
        addr = f"ipc:///tmp/xdit-bench-rt-{id(router)}.sock"
        router.bind(addr)
    dealer.connect(addr)
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            if router.poll(100):
                ident, *frames = router.recv_multipart(copy=False)
                msg = protocol.decode(frames, secret, 2 * nbytes)
                router.send_multipart([ident, *protocol.encode(protocol.result(msg.id), msg.tensors, secret)],
                                      copy=False)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    x = torch.randn(nbytes // 4)

    def once() -> None:
        request = messages.Ping(id="b", ts=time.time(), nonce=secrets.token_hex(16))
        dealer.send_multipart(protocol.encode(request, {"x": x}, secret), copy=False)
        protocol.decode_reply(dealer.recv_multipart(copy=False), secret, 2 * nbytes)

    try:
        return median_time(once, repeats)
    finally:
        stop.set()
        thread.join()
        router.close(0)
        dealer.close(0)


def run(nproc: int, repeats: int) -> list[tuple[str, str, str]]:
    size = 64 * MB
    few = max(5, repeats // 5)
    rows = machine_ceilings(size, few)
    for transport, secret in (("tcp", None), ("ipc", None), ("tcp", b"bench-secret")):
        rtt = wire_round_trip(size, few, secret, transport)
        rows.append((f"64 MB protocol round trip (encode, send, decode, back), {transport}"
                     f"{' + HMAC' if secret else ''}", f"{rtt * 1e3:.1f} ms",
                     f"{2 * size / rtt / 1e9:.2f} GB/s (bytes moved both ways / time)"))

    with Pool(nproc) as pool:
        client = pool.client()
        rows.append(("status round trip (rank 0)", f"{median_time(client.status, repeats * 4) * 1e3:.2f} ms", ""))
        t = median_time(lambda: client.status(refresh=True), repeats)
        rows.append((f"status refresh round trip (collective on {nproc} ranks)", f"{t * 1e3:.2f} ms", ""))

        key = client.load_model("tiny-flux")
        big = torch.randn(size // 4)  # wrong shape for noise: every rank receives it, then the engine rejects it

        def upload() -> None:
            try:
                client.sample(key, {"height": 128, "width": 128, "steps": 1}, {"noise": big})
            except Exception as e:  # noqa: BLE001 - the expected engine rejection
                assert "noise has shape" in str(e), e

        t = median_time(upload, max(5, repeats // 5))
        rows.append((f"64 MB upload into the pool (to rank 0, broadcast to {nproc} ranks)", f"{t * 1e3:.1f} ms",
                     f"{size / t / 1e9:.2f} GB/s"))

        req = {"height": 128, "width": 128, "steps": 8}
        for preview, what in ((False, "progress"), (True, "progress + preview")):
            fractions = []
            for _ in range(max(5, repeats // 5)):
                _, info = client.sample_with_info(key, req, on_progress=lambda p: None, preview=preview)
                fractions.append(info["progress_seconds"] / (info["seconds"] - info["progress_seconds"]))
            plain, with_progress = paired_medians(
                lambda: client.sample(key, req),
                lambda: client.sample(key, req, on_progress=lambda p: None, preview=preview), repeats)
            rows.append((f"{what} per step, rank 0 send time / step time (tiny-flux 128x128)",
                         f"{statistics.median(fractions) * 100:.2f} %", f"step {plain / 8 * 1e3:.1f} ms"))
            rows.append((f"{what}, end-to-end job time difference (8 steps, alternating runs)",
                         f"{(with_progress / plain - 1) * 100:+.1f} %",
                         f"{plain * 1e3:.1f} ms vs {with_progress * 1e3:.1f} ms"))
        client.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m comfyui_xdit_runtime.bench")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    rows = run(args.nproc, args.repeats)
    print("| measurement | median | note |\n|---|---|---|")
    for name, value, note in rows:
        print(f"| {name} | {value} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
