"""PipeFusion's stale-K/V error: relative L2 of final latents against serial sampling, tiny families, CPU/gloo.

One study per family group: pipefusion 2 (FLUX.2: also 4) at 128x128 (8 token rows), every (steps, patches,
warmup) of 8/20 steps, 2/4 patches, 1/2 warm-up steps.
  tiny        Flux.1, SD3 and PixArt, cfg 3.0
  qwen-image  with a padded text mask and a negative prompt of another length (the K/V buffers carry the key mask)
  z-image     40 and 15 text tokens (64 and 32 inside the transformer), cfg 3.0
  flux2       stage boundaries inside the double blocks, at the double/single switch and inside the single blocks
              (pipefusion 2 on 4+2, 2+2 and 1+3 blocks), and pipefusion 4 (one block per stage); guidance 4.0

usage: python benchmarks/pipefusion_error.py [STUDY ...]   (default: tiny; prints a markdown table)
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
# 15 text tokens with padding in the middle and at the end; a 9-token negative padded at its end
QWEN_MASKS = {"cond_mask": [[1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]],
              "neg_cond_mask": [[1, 1, 1, 1, 1, 1, 0, 0, 0]]}
FLUX2_BOUNDARY = {"double": {"num_layers": 4, "num_single_layers": 2}, "switch": {},
                  "single": {"num_layers": 1, "num_single_layers": 3}}


def grid(prefix: str, model: str, world: int = 2, **fields) -> list[dict]:
    """The study's cases for one model: pipefusion `world` at 128x128, seed 5 unless `fields` say otherwise."""
    return [{"id": f"{prefix}_s{steps}_m{m}_w{warm}", "model": model, "height": 128, "width": 128, "seed": 5,
             "steps": steps, **fields, "parallel": {"pipefusion": world, "num_patches": m, "warmup_steps": warm}}
            for steps in (8, 20) for m in (2, 4) if m >= world for warm in (1, 2)]


def stale_cases(study: str = "tiny") -> list[dict]:
    if study == "tiny":
        return [c for fam, model in FAMILIES.items() for c in grid(fam, model, cfg=3.0)]
    if study == "qwen-image":
        return grid("qwen", "tiny-qwen-image", cfg=3.0, masks=QWEN_MASKS)
    if study == "z-image":
        return grid("z-image", "tiny-z-image", cfg=3.0, text_tokens=40, neg_text_tokens=15)
    if study == "flux2":
        return ([c for w, ov in FLUX2_BOUNDARY.items() for c in grid(f"pf2_{w}", "tiny-flux2", seed=3, overrides=ov)]
                + grid("pf4_all", "tiny-flux2", world=4, seed=3, overrides={}))
    raise SystemExit(f"unknown study {study!r}: expected tiny, qwen-image, z-image or flux2")


def rel_error(case: dict, latents) -> float:
    loaded = get_model(case)
    serial = sample(loaded.adapter, build_request(loaded, case), tiny=True)
    return ((latents.double() - serial.double()).norm() / serial.double().norm()).item()


def main(studies: list[str]) -> None:
    every = [stale_cases(study) for study in studies]
    print("| case | degree | steps | patches M | warmup | rel. L2 vs serial |")
    print("|---|---|---|---|---|---|")
    for cases in every:
        for world in sorted({c["parallel"]["pipefusion"] for c in cases}):
            cs = [c for c in cases if c["parallel"]["pipefusion"] == world]
            with tempfile.TemporaryDirectory() as tmp:
                results = run_cases(world, cs, Path(tmp))
            for c in cs:
                err = rel_error(c, results[c["id"]]["latents"])
                p = c["parallel"]
                print(f"| {c['id'].rsplit('_s', 1)[0]} | {world} | {c['steps']} | {p['num_patches']} | "
                      f"{p['warmup_steps']} | {err:.2e} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["tiny"])
