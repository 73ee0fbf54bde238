"""Why a forward's wire work costs more than its hot-loop time: `python benchmarks/cold_decode.py [--repeats 30]`.

Times protocol.decode_reply of one forward's reply (a [2, 8, 64, 64] float32 `out`, 256 KiB, no secret) in a tight
loop and right after other work: 8 fp32 1024x1024 matmuls, one pass over 64 MiB, a 40 ms sleep. Prints a Markdown
table of medians. Device: CPU, one torch thread."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from comfyui_xdit_runtime import protocol


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    frames = [bytes(f) for f in protocol.encode(protocol.result("b", seconds=0.1), {"out": torch.randn(2, 8, 64, 64)})]
    a, b, big = torch.randn(1024, 1024), torch.randn(1024, 1024), torch.randn(16 << 20)
    before = {"nothing (tight loop)": lambda: None, "8 matmuls 1024x1024": lambda: [a @ b for _ in range(8)],
              "a pass over 64 MiB": lambda: big.mul_(1.0), "a 40 ms sleep": lambda: time.sleep(0.04)}
    print("| decode_reply right after | median (ms) |\n|---|---|")
    for name, work in before.items():
        times = []
        for _ in range(args.repeats):
            work()
            t0 = time.perf_counter()
            protocol.decode_reply(frames)
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {statistics.median(times) * 1e3:.3f} |")


if __name__ == "__main__":
    main()
