"""PipeFusion's stale-K/V error on FLUX.2 (tiny-flux2, random weights, CPU/gloo): relative L2 of the final latents
against serial sampling, for stage boundaries inside the double blocks, at the double/single switch and inside the
single blocks (pipefusion 2 on 4+2, 2+2 and 1+3 blocks), and pipefusion 4 (one block per stage: all three).

usage: python benchmarks/pipefusion_error_flux2.py   (2 and 4 ranks; prints a markdown table)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipefusion_error import rel_error  # noqa: E402
from tests.distributed import run_cases  # noqa: E402

BOUNDARY = {"double": {"num_layers": 4, "num_single_layers": 2}, "switch": {},
            "single": {"num_layers": 1, "num_single_layers": 3}}


def cases(world: int) -> list[dict]:
    """128x128 (8 token rows), seed 3, guidance 4.0 (FLUX.2 has no true CFG), every (steps, patches, warmup)."""
    where = BOUNDARY if world == 2 else {"all": {}}
    return [{"id": f"pf{world}_{w}_s{steps}_m{m}_w{warm}", "model": "tiny-flux2", "height": 128, "width": 128,
             "seed": 3, "steps": steps, "overrides": ov,
             "parallel": {"pipefusion": world, "num_patches": m, "warmup_steps": warm}}
            for w, ov in where.items() for steps in (8, 20) for m in (2, 4) if m >= world for warm in (1, 2)]


def main() -> None:
    print("| degree | boundary | steps | patches M | warmup | rel. L2 vs serial |")
    print("|---|---|---|---|---|---|")
    for world in (2, 4):
        cs = cases(world)
        with tempfile.TemporaryDirectory() as tmp:
            results = run_cases(world, cs, Path(tmp))
        for c in cs:
            err = rel_error(c, results[c["id"]]["latents"])
            p, w = c["parallel"], c["id"].split("_")[1]
            print(f"| {world} | {w} | {c['steps']} | {p['num_patches']} | {p['warmup_steps']} | {err:.2e} |",
                  flush=True)


if __name__ == "__main__":
    main()
