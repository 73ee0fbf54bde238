"""Loading straight into FSDP2 shards (comfyui_xdit/sharded_load.py): on 2 ranks (CPU, gloo) a model loaded for
shard 2 x ulysses 2 and for shard 2 alone samples as the same file loaded whole and sampled serially in this process
(rel. L2 <= 1e-4, fp32; an odd text length and a token count not divisible by 2), also with fp8 weight
storage (against the same file loaded whole with fp8 storage); each rank read only its rows;
peak host RSS per rank during the sharded load of a bench-size file (about 390 MB) stays within half the checkpoint
plus one block (+ 8 MiB), which a whole load exceeds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from comfyui_xdit.engine import run_job  # noqa: E402
from comfyui_xdit.models import load_model  # noqa: E402
from comfyui_xdit.parallel import ParallelConfig  # noqa: E402

from .cases import build_request  # noqa: E402
from .conftest import rel_l2  # noqa: E402
from .distributed import free_port  # noqa: E402
from .test_frugal import _RSS_CHILD, _bench_flux, _save  # noqa: E402
from .test_weights import flux_to_bfl, make_flux  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = {"height": 48, "width": 80, "steps": 2, "seed": 5, "text_tokens": 7}  # 3 x 5 = 15 image tokens, 7 text


def _torchrun(world: int, path: str, cases: list[dict], out: Path) -> dict[str, dict]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(ROOT / "tests" / "sharded_load_worker.py"), path,
           str(out / "cases.json"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {}
    for case in cases:
        results[case["id"]] = json.loads((out / f"{case['id']}.json").read_text())
        if not case.get("load_only"):
            results[case["id"]]["latents"] = load_file(out / f"{case['id']}.st")["latents"]
    return results


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory) -> str:
    torch.manual_seed(3)
    model = make_flux()
    path = tmp_path_factory.mktemp("sharded") / "flux-bfl.safetensors"
    torch.save(model.state_dict(), str(path.with_suffix(".pt")))  # a pickle: read whole, then sharded
    return _save(path, flux_to_bfl(model))


CASES = [{**BASE, "id": "shard2_ulysses2", "parallel": {"shard": 2, "ulysses": 2}},
         {**BASE, "id": "shard2", "parallel": {"shard": 2}, "cfg": 2.5},
         {**BASE, "id": "shard2_ulysses2_fp8", "parallel": {"shard": 2, "ulysses": 2}, "weight_dtype": "fp8_e4m3fn"}]


PICKLE = {**BASE, "id": "shard2_pickle", "parallel": {"shard": 2, "ulysses": 2}}


@pytest.fixture(scope="module")
def sharded(flux_file, tmp_path_factory):
    pickle = {**PICKLE, "file": flux_file.replace(".safetensors", ".pt")}
    return _torchrun(2, flux_file, CASES + [pickle], tmp_path_factory.mktemp("sharded_out"))


def _serial(path: str, case: dict, perturb: float = 0.0) -> torch.Tensor:
    loaded = load_model(path, weight_dtype=case.get("weight_dtype", "default"))
    if perturb:
        with torch.no_grad():
            loaded.adapter.model.transformer_blocks[0].attn.to_q.weight.mul_(1 + perturb)
    return run_job(loaded, build_request(loaded, case), ParallelConfig()).latents.float()


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_loaded_sharded_equals_serial(flux_file, sharded, case):
    info = sharded[case["id"]]
    err = rel_l2(info["latents"], _serial(flux_file, case))
    print(f"\n{case['id']}: rel L2 {err:.2e}")
    assert err <= 1e-4
    whole = info["load"][0]["checkpoint_bytes"]
    for rank, report in enumerate(info["load"]):
        assert report["frugal"] and report["layout"] == "converted"
        assert report["read_bytes"] < 0.6 * whole, f"rank {rank} read {report['read_bytes']} of {whole} bytes"
        assert report["params"] < (0.35 if "weight_dtype" in case else 0.6) * whole  # fp8: a quarter of fp32
    assert sum(r["read_bytes"] for r in info["load"]) == pytest.approx(whole, rel=0.01)  # together: every row


def test_a_pickle_loads_whole_then_shards(flux_file, sharded):
    """A torch pickle cannot be read in part: each rank reads it whole (the report says so), then shards it."""
    info = sharded[PICKLE["id"]]
    assert rel_l2(info["latents"], _serial(flux_file, PICKLE)) <= 1e-4
    for report in info["load"]:
        assert not report["frugal"] and report["layout"] == "whole" and report["notes"]
        assert report["read_bytes"] == report["checkpoint_bytes"] and report["params"] < 0.6 * report["read_bytes"]


def test_the_comparison_can_fail(flux_file, sharded):
    """A 1% change of one block's weights moves the serial result far past the tolerance."""
    case = CASES[0]
    assert rel_l2(sharded[case["id"]]["latents"], _serial(flux_file, case, perturb=0.01)) > 1e-4


@pytest.mark.parametrize("original", [False, True], ids=["diffusers", "bfl"])
def test_peak_host_rss_per_rank_of_a_sharded_load(tmp_path, original):
    """Each of 2 ranks (one torchrun, at once): peak RSS during its shard-2 load minus RSS before it is at most half
    the checkpoint plus one block (+ 8 MiB for the meta model's and FSDP2's Python objects); a whole load (a fresh
    process keeping everything) exceeds that bound, so it can fail."""
    path = tmp_path / "bench-flux.safetensors"
    size, block = _bench_flux(path, original)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    whole = subprocess.Popen([sys.executable, "-c", _RSS_CHILD, str(path), "1", "0"], env=env,
                             stdout=subprocess.PIPE, text=True)
    out, _ = whole.communicate(timeout=300)
    assert whole.returncode == 0
    whole_report = json.loads(out.strip().splitlines()[-1])
    if whole_report["peak_rss_bytes"] == 0:
        pytest.skip("no /proc/self/clear_refs here: peak RSS cannot be measured")
    info = _torchrun(2, str(path), [{"id": "load", "parallel": {"shard": 2}, "load_only": True}], tmp_path / "out")
    peaks = [r["peak_rss_bytes"] - r["rss_before_bytes"] for r in info["load"]["load"]]
    whole_peak = whole_report["peak_rss_bytes"] - whole_report["rss_before_bytes"]
    bound = size / 2 + block + (8 << 20)
    print(f"\nfile {size / 2**20:.0f} MiB, largest block {block / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB; "
          + ", ".join(f"shard rank {r}/2 {p / 2**20:.0f} MiB" for r, p in enumerate(peaks))
          + f", whole {whole_peak / 2**20:.0f} MiB; kept per rank "
          + ", ".join(f"{r['kept_bytes'] / 2**20:.0f} MiB" for r in info["load"]["load"]))
    for report in info["load"]["load"]:
        assert report["frugal"] and report["layout"] == ("converted" if original else "diffusers")
    assert all(p <= bound for p in peaks)
    assert whole_peak > bound and whole_peak >= 0.95 * size
