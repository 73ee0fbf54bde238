"""The memory table of docs/benchmarks.md: per-rank weights + activations of FLUX.2-dev, Qwen-Image, Wan 2.2
A14B (both experts) and HunyuanVideo 1.5 720p at degrees 1/2/4/8 for USP, FSDP x USP and PipeFusion, bf16 and fp8 storage, and the cards
each fits (comfyui_xdit/memory_estimate.py; meta-device builds, nothing allocated).

    python benchmarks/memory_table.py
"""
from __future__ import annotations

import torch

from comfyui_xdit.bench import build_random
from comfyui_xdit.memory_estimate import CARDS_GIB, OVERHEAD_GIB, memory_table

MODELS = (("FLUX.2-dev", "flux2-dev", "1024", 1), ("Qwen-Image", "qwen-image", "1328", 1),
          ("Wan 2.2 T2V A14B (both experts)", "wan2.2-t2v-a14b", "1280x720", 81),
          ("HunyuanVideo 1.5 720p T2V", "hunyuanvideo-1.5-720p-t2v", "1280x720", 121))


def fits(row) -> str:
    return "/".join(str(c) for c in CARDS_GIB if row.fits(c)) or "none"


def main() -> None:
    print(f"fits: per-rank total + {OVERHEAD_GIB:g} GiB within a card of that many GiB")
    for title, arch, size, frames in MODELS:
        adapter = build_random(arch, torch.bfloat16, "meta")
        tables = {s: memory_table(adapter, size, frames, storage=s) for s in ("bf16", "fp8")}
        tokens = adapter.image_tokens(*reversed([int(v) for v in size.split("x")]) if "x" in size
                                      else (int(size), int(size)), frames)
        print(f"\n{title}, {size}{f' {frames} frames' if frames > 1 else ''} ({tokens} image + "
              f"{adapter.spec.cond.tokens} text tokens)\n")
        print("| method | degree | bf16: weights + act. = total GiB | fits | fp8: weights + act. = total GiB | fits |")
        print("|---|---|---|---|---|---|")
        for b, f in zip(tables["bf16"], tables["fp8"]):
            cell = lambda r: f"{r.weights / 2**30:.1f} + {r.activations / 2**30:.1f} = {r.total / 2**30:.1f}"
            print(f"| {b.method} | {b.degree} | {cell(b)} | {fits(b)} | {cell(f)} | {fits(f)} |")


if __name__ == "__main__":
    main()
