"""Launch tests/dist_worker.py under torchrun on CPU/gloo and collect its results."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cases(world: int, cases: list[dict], out_dir: Path, timeout: float = 900,
              env: dict[str, str] | None = None) -> dict[str, dict]:
    """Run the cases on `world` ranks (extra environment variables `env`); per case id its result, with the
    rank-0 latents and, in "tensors", every tensor the worker saved."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = out_dir / "cases.json"
    spec.write_text(json.dumps(cases))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    logs = out_dir / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "--redirects=3", f"--log-dir={logs}",
           str(ROOT / "tests" / "dist_worker.py"), str(spec), str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        ranks = "".join(f"\n--- {p.relative_to(logs)}:\n{p.read_text()[-3000:]}"
                        for p in sorted(logs.rglob("*.log")) if p.stat().st_size)
        raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-2000:]}\nrank output:{ranks}")
    results = {}
    for case in cases:
        info = json.loads((out_dir / f"{case['id']}.json").read_text())
        if info["ok"]:
            info["tensors"] = load_file(out_dir / f"{case['id']}.safetensors")
            info["latents"] = info["tensors"]["latents"]
        info["rank_comm"] = [json.loads((out_dir / f"{case['id']}.rank{r}.comm.json").read_text())
                             for r in range(world)]
        if "processor" in case:
            info["rank_errors"] = [json.loads((out_dir / f"{case['id']}.rank{r}.error.json").read_text())
                                   for r in range(world)]
        if "cache" in case:
            info["rank_reused"] = [json.loads((out_dir / f"{case['id']}.rank{r}.reused.json").read_text())
                                   for r in range(world)]
        results[case["id"]] = info
    return results



def assert_exchanged(info: dict, parallel: dict[str, int]) -> None:
    """Every rank of a run really exchanged data over its steps: bytes of each Ulysses, Ring or cfg degree above 1
    (under PipeFusion, Ring gathers the stale K/V instead, and only the last stage's ranks join the branches), and
    something whenever a degree other than dp exceeds 1 (dp exchanges nothing during the steps)."""
    pipefusion = parallel.get("pipefusion", 1) > 1
    kinds = {"ulysses": "ulysses", "ring": "pipefusion_kv" if pipefusion else "ring", "cfg": "cfg"}
    totals = []
    for steps in info["rank_comm"]:
        total: dict[str, int] = {}
        for step in steps:
            for kind, n in step.items():
                total[kind] = total.get(kind, 0) + n
        totals.append(total)
    for degree, kind in kinds.items():
        if parallel.get(degree, 1) > 1:
            senders = [r for r, total in enumerate(totals) if total.get(kind, 0) > 0]
            wanted = range(len(totals)) if not (pipefusion and degree == "cfg") else senders[:1]
            assert senders and all(r in senders for r in wanted), f"{kind} bytes sent by ranks {senders}: {totals}"
    if any(v > 1 for k, v in parallel.items() if k not in ("dp", "num_patches", "warmup_steps")):
        assert all(sum(total.values()) > 0 for total in totals), f"a rank sent nothing: {totals}"
