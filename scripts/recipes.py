"""The recipes table: the layout auto picks for each model's typical job on 2, 4 and 8 GPUs of 24, 48 and 80 GB.

usage: python scripts/recipes.py [--compact | --readme]

Cards: 24 GB = RTX 4090 constants over PCIe (no P2P), 48 GB = L40 over PCIe, 80 GB = H100 over NVLink
(comfyui_xdit/planner.py, KINDS). Every model is built on the meta device (no weights); it prints markdown.
"""
from __future__ import annotations

import argparse

from comfyui_xdit import planner as P

RECIPES = [  # (label, model, job)
    ("Flux.1-dev 1024px, 28 steps", "flux-dev", P.Job(1024, 1024, steps=28)),
    ("Qwen-Image 1328px, 50 steps, CFG 4", "qwen-image", P.Job(1328, 1328, cfg=4.0, steps=50)),
    ("FLUX.2-dev 1024px, 50 steps", "flux2-dev", P.Job(1024, 1024, steps=50)),
    ("Z-Image Turbo 1024px, 9 steps", "z-image-turbo", P.Job(1024, 1024, steps=9)),
    ("Wan 2.2 A14B T2V 832x480, 81 frames, 40 steps, CFG 5", "wan2.2-t2v-a14b",
     P.Job(480, 832, frames=81, cfg=5.0, steps=40)),
    ("Wan 2.2 A14B T2V 1280x720, 81 frames, 40 steps, CFG 5", "wan2.2-t2v-a14b",
     P.Job(720, 1280, frames=81, cfg=5.0, steps=40)),
]
CARDS = [("24 GB", "{n}x24GB,pcie"), ("48 GB", "{n}x48GB,pcie"), ("80 GB", "{n}xH100,nvlink")]
COUNTS = (2, 4, 8)


def cell(p: P.Plan, compact: bool) -> str:
    c = p.choice
    if c is None:
        return "does not fit" if compact else "does not fit: " + p.reason().split("; ", 1)[-1]
    text = f"{c.layout()}, {c.memory / 2**30:.0f} GiB"
    return text if compact else f"{text}, {c.seconds:.3g} s/step"


def table(counts=COUNTS, compact: bool = False) -> str:
    cols = [(n, label, spec.format(n=n)) for n in counts for label, spec in CARDS]
    head = "| model, job | " + " | ".join(f"{n} x {label}" for n, label, _ in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for label, model, job in RECIPES:
        facts = P.model_facts(model)
        cells = [cell(P.plan(facts, spec, job), compact) for _, _, spec in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_table(counts=COUNTS) -> str:
    """The README's table: a row per model and GPU count, a column per card size, layout and GiB per rank
    (tests/test_docs.py checks the README holds exactly this)."""
    lines = ["| model, job | GPUs | " + " | ".join(f"{label} each" for label, _ in CARDS) + " |",
             "|" + "---|" * (len(CARDS) + 2)]
    for label, model, job in RECIPES:
        facts = P.model_facts(model)
        for i, n in enumerate(counts):
            cells = [cell(P.plan(facts, spec.format(n=n), job), True) for _, spec in CARDS]
            lines.append(f"| {label if i == 0 else ''} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compact", action="store_true", help="layout and memory only, 4 GPUs")
    ap.add_argument("--readme", action="store_true", help="the README's table: layout and memory, a row per model "
                    "and GPU count")
    args = ap.parse_args()
    print(readme_table() if args.readme else table((4,), True) if args.compact else table())


if __name__ == "__main__":
    main()
