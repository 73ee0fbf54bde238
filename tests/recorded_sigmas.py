"""ComfyUI's noise-level tables as the real ComfyUI 0.3.64 computes them, for the stand-ins of tests/comfy_standins.py:
`comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps)` and model_sampling's sigma range, keyed by the
model type and sampling settings the nodes build (tests/data/comfyui_sigmas.json; test_comfyui_e2e.py checks every
entry against the real ComfyUI).

A key the table lacks fails the test that asked for it. To add keys: run the stand-in tests with
XDIT_RECORD_SIGMAS=keys.jsonl (missing keys are written there and get a placeholder schedule), then, with a real
ComfyUI, `cd $COMFYUI_DIR && $COMFYUI_PYTHON <repo>/tests/recorded_sigmas.py keys.jsonl` merges them into the table.
"""
from __future__ import annotations

import json
import os
import sys
from functools import lru_cache
from pathlib import Path

TABLE = Path(__file__).resolve().parent / "data" / "comfyui_sigmas.json"
RECORD_ENV = "XDIT_RECORD_SIGMAS"
# comfy.samplers.SCHEDULER_NAMES of ComfyUI 0.3.64; every one is recorded at GRID_STEPS for each model sampling
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
              "kl_optimal"]
GRID_STEPS = (4, 8, 20)


def sampling_key(model_type: str, settings: dict) -> str:
    return f"{model_type} {json.dumps(settings, sort_keys=True)}"


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(TABLE.read_text()) if TABLE.exists() else {"model_sampling": {}, "sigmas": {}}


def _missing(what: str, entry: dict) -> None:
    out = os.environ.get(RECORD_ENV)
    if not out:
        raise KeyError(f"tests/data/comfyui_sigmas.json has no {what} {entry}: record it from the real ComfyUI "
                       "(tests/recorded_sigmas.py says how)")
    with open(out, "a") as f:
        f.write(json.dumps(entry) + "\n")


def sigma_range(model_type: str, settings: dict) -> tuple[float, float]:
    """(sigma_min, sigma_max) of ComfyUI's model_sampling for these settings."""
    got = _table()["model_sampling"].get(sampling_key(model_type, settings))
    if got is None:
        _missing("model sampling", {"model_type": model_type, "settings": settings})
        return (0.03, 14.6) if model_type == "EPS" else (0.0, 1.0)
    return got["sigma_min"], got["sigma_max"]


def sigmas(model_type: str, settings: dict, scheduler: str, steps: int):
    """calculate_sigmas' float32 tensor of steps + 1 levels."""
    import torch

    got = _table()["sigmas"].get(f"{sampling_key(model_type, settings)} {scheduler} {steps}")
    if got is None:
        _missing("schedule", {"model_type": model_type, "settings": settings, "scheduler": scheduler,
                              "steps": steps})
        lo, hi = sigma_range(model_type, settings)
        return torch.cat([torch.linspace(hi, max(lo, 1e-3), steps), torch.zeros(1)])
    return torch.tensor(got, dtype=torch.float32)


def compute(entries: list[dict]) -> dict:
    """The table for these keys (and the scheduler grid of each model sampling), from the ComfyUI on sys.path."""
    from types import SimpleNamespace

    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_base
    import comfy.samplers

    samplings = {sampling_key(e["model_type"], e["settings"]): e for e in entries}
    table: dict = {"comfyui": "0.3.64", "model_sampling": {}, "sigmas": {}}
    for key, e in sorted(samplings.items()):
        ms = comfy.model_base.model_sampling(SimpleNamespace(sampling_settings=e["settings"]),
                                             getattr(comfy.model_base.ModelType, e["model_type"]))
        table["model_sampling"][key] = {"sigma_min": float(ms.sigma_min), "sigma_max": float(ms.sigma_max)}
        wanted = {(s, n) for s in SCHEDULERS for n in GRID_STEPS}
        wanted |= {(x["scheduler"], x["steps"]) for x in entries
                   if "scheduler" in x and sampling_key(x["model_type"], x["settings"]) == key}
        for scheduler, steps in sorted(wanted):
            table["sigmas"][f"{key} {scheduler} {steps}"] = \
                comfy.samplers.calculate_sigmas(ms, scheduler, steps).float().tolist()
    return table


def table_entries(table: dict) -> list[dict]:
    """The keys of a table, as compute() takes them."""
    out = []
    for key in table["model_sampling"]:
        model_type, settings = key.split(" ", 1)
        out.append({"model_type": model_type, "settings": json.loads(settings)})
    for key in table["sigmas"]:
        head, scheduler, steps = key.rsplit(" ", 2)
        model_type, settings = head.split(" ", 1)
        out.append({"model_type": model_type, "settings": json.loads(settings), "scheduler": scheduler,
                    "steps": int(steps)})
    return out


if __name__ == "__main__":  # run by a real ComfyUI's interpreter in its folder: merge keys.jsonl into the table
    sys.path.insert(0, os.getcwd())
    new = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    old = table_entries(json.loads(TABLE.read_text())) if TABLE.exists() else []
    TABLE.write_text(json.dumps(compute(old + new), indent=0, sort_keys=True) + "\n")
    print(f"{TABLE}: {len(old)} + {len(new)} keys recorded")
