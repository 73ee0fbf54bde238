"""What a bare wake round trip costs between two processes, by transport:
`python benchmarks/wake_latency.py [--busy-ms 40,120] [--repeats 30]`.

The server is busy for `busy` ms (a spin, as a rank computing a forward) before it answers each 200-byte request; the
client blocks in its poll meanwhile, as a stock sampler's client does. Printed: the median round trip less the busy
time, for a pyzmq DEALER/ROUTER pair over loopback TCP (the baseline: the pool's direct socket) and over ipc, and
for a pair of eventfds (a kernel wake and nothing else: the floor a doorbell beside the shared buffer would have)."""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import select
import statistics
import tempfile
import time

import zmq


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def _zmq_server(address: str, busy_ms: float, ready) -> None:
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(address)
    ready.set()
    while True:
        identity, body = sock.recv_multipart()
        if body == b"stop":
            return
        _busy(busy_ms)
        sock.send_multipart([identity, b"r" * 200])


def _zmq(address: str, busy_ms: float, repeats: int) -> float:
    ready = mp.Event()
    server = mp.Process(target=_zmq_server, args=(address, busy_ms, ready))
    server.start()
    ready.wait()
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(address)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    out = []
    for _ in range(repeats + 3):  # the first calls connect and warm up
        t0 = time.perf_counter()
        sock.send(b"h" * 200)
        while not poller.poll(100):
            pass
        sock.recv()
        out.append((time.perf_counter() - t0) * 1e3 - busy_ms)
    sock.send(b"stop")
    server.join()
    sock.close(linger=0)
    return statistics.median(out[3:])


def _eventfd_server(request: int, reply: int, busy_ms: float) -> None:
    while True:
        select.select([request], [], [])
        if os.eventfd_read(request) == 2:
            return
        _busy(busy_ms)
        os.eventfd_write(reply, 1)


def _eventfd(busy_ms: float, repeats: int) -> float:
    request, reply = os.eventfd(0), os.eventfd(0)
    server = mp.Process(target=_eventfd_server, args=(request, reply, busy_ms))
    server.start()
    out = []
    for _ in range(repeats + 3):
        t0 = time.perf_counter()
        os.eventfd_write(request, 1)
        while not select.select([reply], [], [], 0.1)[0]:
            pass
        os.eventfd_read(reply)
        out.append((time.perf_counter() - t0) * 1e3 - busy_ms)
    os.eventfd_write(request, 2)
    server.join()
    return statistics.median(out[3:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy-ms", default="40,120")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    mp.set_start_method("fork")
    print("| server busy (ms) | zmq tcp, baseline (ms) | zmq ipc (ms) | eventfd (ms) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for busy in (float(v) for v in args.busy_ms.split(",")):
            tcp = _zmq("tcp://127.0.0.1:%d" % (20000 + os.getpid() % 20000), busy, args.repeats)
            ipc = _zmq(f"ipc://{tmp}/wake.sock", busy, args.repeats)
            efd = _eventfd(busy, args.repeats)
            print(f"| {busy:g} | {tcp:.3f} | {ipc:.3f} | {efd:.3f} |")


if __name__ == "__main__":
    main()
