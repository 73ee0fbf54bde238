"""layout = auto on Configure Hybrid Parallel (nodes/auto_layout.py) over the ComfyUI stand-ins: on POST /prompt the
planner writes its degrees into the node, which the queue-time check then accepts; the node shows the one-line
reason when it runs; what fits nowhere is refused on the node in one line; prompts without the widget keep their
degrees."""
from __future__ import annotations


from . import comfy_standins as cs
from .test_nodes import CONFIG_DEFAULTS, _graph, _node, _queue


def _auto(graph, **inputs):
    graph["5"]["inputs"].update(layout="auto", **inputs)
    return graph


def test_auto_writes_degrees_the_check_accepts_and_shows_why(ext, rec, monkeypatch):
    monkeypatch.setattr(ext.nodes.auto_layout.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    g = _auto(_graph(cfg=3.0, checkpoint="tiny-flux"))
    assert _queue(ext, rec, g) == {}
    inputs = g["5"]["inputs"]
    world = 1
    for widget in ("ulysses_degree", "ring_degree", "pipefusion_degree", "cfg_degree", "dp_degree"):
        world *= inputs[widget]
    assert world == 2 and inputs["pipefusion_degree"] == 1  # 2 CPU ranks (one per core), an exact method
    assert 4 % inputs["ulysses_degree"] == 0  # tiny-flux has 4 heads
    line = ext.nodes.auto_layout.reason_for("5")
    assert line.startswith("auto: ") and "2 x CPU" in line and "\n" not in line
    node = _node(ext, "XDiTConfigureHybridParallel")
    assert node.INPUT_TYPES()["optional"]["layout"][1]["default"] == "auto"
    out = cs.with_id(node, "5").execute(**{k: v for k, v in inputs.items() if k != "layout"}, layout="auto")
    assert out.ui["text"] == [line] and out[0].world_size == 2


def test_auto_cfg_parallel_only_with_cfg(ext, rec, monkeypatch):
    monkeypatch.setattr(ext.nodes.auto_layout.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    g = _auto(_graph(cfg=1.0, checkpoint="tiny-flux"))
    assert _queue(ext, rec, g) == {}
    assert g["5"]["inputs"]["cfg_degree"] == 1


def test_auto_refuses_what_fits_nowhere_in_one_line(ext, rec, monkeypatch):
    from comfyui_xdit import planner

    small = planner.GPUs(2, planner.KINDS["4090"], 0.001, "pcie")  # cards too small for anything
    monkeypatch.setattr(ext.nodes.auto_layout, "_gpus", lambda inputs: small)
    errors = _queue(ext, rec, _auto(_graph(checkpoint="tiny-flux")))
    assert list(errors) == ["5"] and len(errors["5"]) == 1
    assert "nothing fits 2 x 0.001 GB" in errors["5"][0] and "\n" not in errors["5"][0]


def test_manual_and_unknowns_keep_the_degrees(ext, rec):
    g = _graph(dict(ulysses_degree=2), cfg=3.0)  # no layout input: a prompt saved before the widget
    assert _queue(ext, rec, g) == {} and g["5"]["inputs"]["ulysses_degree"] == 2
    g = _auto(_graph(dict(ulysses_degree=2)), pool_address="tcp://127.0.0.1:5555")
    _queue(ext, rec, g)
    assert g["5"]["inputs"]["ulysses_degree"] == 2
    assert "kept the degrees as set" in ext.nodes.auto_layout.reason_for("5")
    g = _auto(_graph(dict(ulysses_degree=2)))
    g["8"]["inputs"]["steps"] = ["12", 0]  # linked: known only when the graph runs
    _queue(ext, rec, g)
    assert g["5"]["inputs"]["ulysses_degree"] == 2 and "not constants" in ext.nodes.auto_layout.reason_for("5")
    (s,) = _node(ext, "XDiTConfigureHybridParallel").execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2))
    assert s.world_size == 2


def test_auto_uses_what_the_last_pool_probed(ext, rec, monkeypatch):
    """After a pool has started on the GPUs, its probe's constants (the status reply's `probe`, kept by the pool
    manager) replace the table's for the next plan; without one the table's kind is used."""
    import dataclasses
    import types

    import torch

    from comfyui_xdit import planner

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: True)
    manager = ext.nodes.pool.MANAGER
    monkeypatch.setattr(manager, "_probes", {})
    gpus = ext.nodes.auto_layout._gpus({"device": "cuda"})
    assert gpus.kind.name == "H100" and gpus.count == 2 and gpus.link == "nvlink"
    slow = dataclasses.replace(planner.KINDS["H100"], name="H100 (probed)", matmul_flops=1e12, fast_link=5e9,
                               pcie_link=5e9, source="probe on 2 rank(s)")
    manager._probes["cuda"] = dataclasses.asdict(slow)
    gpus = ext.nodes.auto_layout._gpus({"device": "cuda"})
    assert gpus.kind == slow and gpus.bandwidth == 5e9
    manager._probes["cuda"] = {"name": "from another version"}  # unreadable: the table again
    assert ext.nodes.auto_layout._gpus({"device": "cuda"}).kind.name == "H100"
