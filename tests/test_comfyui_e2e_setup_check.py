"""The set-up check a user without model weights runs (workflows/api/setup-check.json, as shipped) in a real ComfyUI
(skipped unless COMFYUI_DIR is set): the built-in tiny-flux on Ulysses 2, by Parallel Sampler and by KSampler on
Parallel DiT Model, each against one rank, Tiny Conditioning, Setup Check. It must succeed with the PASS text in the prompt's history, in about a minute; then, with the
reference sampled from other conditioning, it must stop with Setup Check's FAILED error."""
from __future__ import annotations

import json
import sys
import time

import pytest

from .comfy_server import COMFYUI_DIR, ROOT, make_base, running_comfyui

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
sys.path.insert(0, str(ROOT / "scripts"))


def test_setup_check_workflow_passes_in_comfyui(tmp_path):
    from queue_workflow import queue_and_wait

    graph = json.loads((ROOT / "workflows" / "api" / "setup-check.json").read_text())
    checks = [n for n, node in graph.items() if node["class_type"] == "XDiTSetupCheck"]
    samplers = {graph[graph[n]["inputs"]["parallel"][0]]["class_type"] for n in checks}
    assert samplers == {"XDiTParallelSampler", "KSampler"}  # both paths: the pool's loop, and ComfyUI's on the pool
    make_base(tmp_path, {})  # no model files at all
    started = time.monotonic()
    with running_comfyui(tmp_path) as server:
        up = time.monotonic()
        log: list[str] = []
        _, entry = queue_and_wait(server, graph, timeout=600, log=log.append)
        took = time.monotonic() - up
        status = entry.get("status") or {}
        assert status.get("status_str") == "success", status
        for n in checks:
            (line,) = entry["outputs"][n]["text"]
            print(f"\nComfyUI up in {up - started:.1f} s; the setup check took {took:.1f} s: {line}")
            assert line.startswith("PASS: parallel equals one GPU's result (rel. L2 ")
        assert took < 300, took  # about a minute on a free machine; generous for a shared one

        # the reference from other conditioning: the check must fail, with its numbers, on the Setup Check node
        cond = next(n for n, node in graph.items() if node["class_type"] == "XDiTTinyConditioning")
        graph["99"] = {"class_type": "XDiTTinyConditioning", "inputs": {**graph[cond]["inputs"], "seed": 1}}
        graph[graph[checks[0]]["inputs"]["reference"][0]]["inputs"].update(positive=["99", 0], negative=["99", 1])
        failed = rf"node ({'|'.join(checks)}) \(XDiTSetupCheck\) failed: Setup check FAILED: .*rel\. L2 "
        with pytest.raises(RuntimeError, match=failed):
            queue_and_wait(server, graph, timeout=600, log=log.append)
