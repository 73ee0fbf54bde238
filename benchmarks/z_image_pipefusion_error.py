"""PipeFusion's stale-K/V error for Z-Image: relative L2 of final latents against serial sampling, tiny-z-image,
CPU/gloo, the same study as pipefusion_error.py (pipefusion 2, 128x128, cfg 3.0; steps x patches x warm-up).

usage: python benchmarks/z_image_pipefusion_error.py   (2 ranks; prints a markdown table)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipefusion_error import rel_error  # noqa: E402
from tests.distributed import run_cases  # noqa: E402


def stale_cases() -> list[dict]:
    """Every (steps, patches, warmup) of the study; the negative prompt is shorter than the positive (15 and 40
    text tokens: 32 and 64 inside the transformer)."""
    return [{"id": f"z-image_s{steps}_m{m}_w{warm}", "model": "tiny-z-image", "height": 128, "width": 128,
             "seed": 5, "steps": steps, "cfg": 3.0, "text_tokens": 40, "neg_text_tokens": 15,
             "parallel": {"pipefusion": 2, "num_patches": m, "warmup_steps": warm}}
            for steps in (8, 20) for m in (2, 4) for warm in (1, 2)]


def main() -> None:
    cases = stale_cases()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_cases(2, cases, Path(tmp))
    print("| family | steps | patches M | warmup | rel. L2 vs serial |")
    print("|---|---|---|---|---|")
    for c in cases:
        err = rel_error(c, results[c["id"]]["latents"])
        p = c["parallel"]
        print(f"| z-image | {c['steps']} | {p['num_patches']} | {p['warmup_steps']} | {err:.2e} |")


if __name__ == "__main__":
    main()
