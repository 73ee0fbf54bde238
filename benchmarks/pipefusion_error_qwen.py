"""PipeFusion's stale-K/V error for Qwen-Image: the study of pipefusion_error.py on tiny-qwen-image, with a padded
text mask and a negative prompt of another length (the PipeFusion K/V buffers carry the key mask).

usage: python benchmarks/pipefusion_error_qwen.py   (2 ranks: pipefusion 2; prints a markdown table)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipefusion_error import rel_error  # noqa: E402
from tests.distributed import run_cases  # noqa: E402

# 15 text tokens with padding in the middle and at the end; a 9-token negative padded at its end
PROMPT_MASKS = {"cond_mask": [[1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]],
                "neg_cond_mask": [[1, 1, 1, 1, 1, 1, 0, 0, 0]]}


def stale_cases() -> list[dict]:
    """pipefusion 2 at 128x128 (8 token rows), cfg 3.0, every (steps, patches, warmup) of the study."""
    return [{"id": f"qwen_s{steps}_m{m}_w{warm}", "model": "tiny-qwen-image", "height": 128, "width": 128,
             "seed": 5, "steps": steps, "cfg": 3.0, "masks": PROMPT_MASKS,
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
        print(f"| qwen-image | {c['steps']} | {p['num_patches']} | {p['warmup_steps']} | {err:.2e} |")


if __name__ == "__main__":
    main()
