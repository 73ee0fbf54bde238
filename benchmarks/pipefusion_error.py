"""PipeFusion's stale-K/V error: relative L2 of final latents against serial sampling, tiny families, CPU/gloo.

usage: python benchmarks/pipefusion_error.py   (2 ranks: pipefusion 2; prints a markdown table)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfyui_xdit.sampling import sample  # noqa: E402
from tests.cases import build_request, get_model  # noqa: E402
from tests.distributed import run_cases  # noqa: E402

FAMILIES = {"flux": "tiny-flux", "sd3": "tiny-sd3", "pixart": "tiny-pixart"}


def stale_cases() -> list[dict]:
    """pipefusion 2 at 128x128 (8 token rows), cfg 3.0, every (steps, patches, warmup) of the study."""
    return [{"id": f"{fam}_s{steps}_m{m}_w{warm}", "model": model, "height": 128, "width": 128, "seed": 5,
             "steps": steps, "cfg": 3.0, "parallel": {"pipefusion": 2, "num_patches": m, "warmup_steps": warm}}
            for fam, model in FAMILIES.items() for steps in (8, 20) for m in (2, 4) for warm in (1, 2)]


def rel_error(case: dict, latents) -> float:
    loaded = get_model(case)
    serial = sample(loaded.adapter, build_request(loaded, case), tiny=True)
    return ((latents.double() - serial.double()).norm() / serial.double().norm()).item()


def main() -> None:
    cases = stale_cases()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_cases(2, cases, Path(tmp))
    print("| family | steps | patches M | warmup | rel. L2 vs serial |")
    print("|---|---|---|---|---|")
    for c in cases:
        err = rel_error(c, results[c["id"]]["latents"])
        p = c["parallel"]
        print(f"| {c['id'].split('_')[0]} | {c['steps']} | {p['num_patches']} | {p['warmup_steps']} | {err:.2e} |")


if __name__ == "__main__":
    main()
