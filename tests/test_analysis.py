"""The redundancy analyser: CLI outputs, numbers checked against an independent capture, parallel == serial."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from comfyui_xdit.analysis import Profile, analyze, profile_step_curve, save_profile
from comfyui_xdit.cli import main
from comfyui_xdit.engine import run_job
from comfyui_xdit.sampling import SampleRequest

SIZE = ["--height", "64", "--width", "64"]


def _cli(model: str, out, *extra: str) -> None:
    assert main(["analyze", "--model", model, "--prompts", "2", "--steps", "4", *SIZE, "--out", str(out),
                 *extra]) == 0


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3", "tiny-pixart"])
def test_cli_writes_profile(model, tmp_path, capsys):
    _cli(model, tmp_path)
    printed = capsys.readouterr().out
    assert "residual per step:" in printed and "stability" in printed
    npz = np.load(tmp_path / "profile.npz")
    doc = json.loads((tmp_path / "profile.json").read_text())
    joint = model != "tiny-pixart"
    kinds = ["k", "v", "out"] + (["text_k", "text_v", "text_out"] if joint else []) + ["residual"]
    assert doc["kinds"] == kinds
    layers = {"tiny-flux": 4, "tiny-sd3": 3, "tiny-pixart": 4}[model]  # sd3: dual attention in block 0
    blocks = {"tiny-flux": 4, "tiny-sd3": 2, "tiny-pixart": 2}[model]
    assert len(npz["layer_labels"]) == layers and len(npz["block_labels"]) == blocks
    assert doc["layer_labels"] == list(npz["layer_labels"])
    assert len(npz["timesteps"]) == 4 and doc["steps"] == 4 and doc["model"] == model
    for kind in kinds:
        rows = blocks if kind == "residual" else (2 if model == "tiny-sd3" else layers) if kind.startswith(
            "text") else layers
        for stat in ("abs", "rel"):
            a = npz[f"{kind}_{stat}"]
            assert a.shape == (2, rows, 4), (kind, a.shape)
            assert np.isnan(a[:, :, 0]).all() and np.isfinite(a[:, :, 1:]).all()
            assert np.array_equal(np.array(doc[stat][kind], dtype=float), a, equal_nan=True)
        assert len(doc["curves"][kind]) == 4 and doc["curves"][kind][0] is None
        assert np.allclose(doc["curves"][kind][1:], npz[f"{kind}_rel"][:, :, 1:].mean(axis=(0, 1)))
    assert (npz["residual_rel"][:, :, 1:] > 0).all()
    if model == "tiny-pixart":  # cross-attention K/V come from the (fixed) text: no change at all
        cross = [i for i, label in enumerate(npz["layer_labels"]) if "attn2" in label]
        assert cross and (npz["k_abs"][:, cross, 1:] == 0).all() and (npz["v_rel"][:, cross, 1:] == 0).all()
        assert (npz["out_rel"][:, cross, 1:] > 0).all()
    pytest.importorskip("matplotlib")
    for kind in kinds:
        assert (tmp_path / f"heatmap_{kind}.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def _requests(loaded, prompts: int, cfg: float) -> list[SampleRequest]:
    reqs = []
    for p in range(prompts):
        gen = torch.Generator().manual_seed(7 + p)
        pos, neg = (loaded.adapter.random_conditioning(1, 16, gen) for _ in range(2))
        inputs = {"cond": pos.cond, "neg_cond": neg.cond}
        for name, c in (("", pos), ("neg_", neg)):
            if c.pooled is not None:
                inputs[name + "pooled"] = c.pooled
            if c.mask is not None:
                inputs[name + "cond_mask"] = c.mask
        reqs.append(SampleRequest(height=64, width=64, steps=4, seed=7 + p, cfg=cfg, inputs=inputs))
    return reqs


def _capture(loaded, req, taps: dict) -> dict[str, list[list[torch.Tensor]]]:
    """Run serially with plain hooks; taps: name -> (module, 'out' | 'in', transform). Per name: per step, the
    tensors of every model call of that step in call order."""
    seen = {name: [[]] for name in taps}
    handles = []
    for name, (module, where, fn) in taps.items():
        if where == "out":
            def hook(m, args, kwargs, out, name=name, fn=fn):
                seen[name][-1].append(fn(args, kwargs, out).detach().clone())
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        else:
            def pre(m, args, kwargs, name=name, fn=fn):
                seen[name][-1].append(fn(args, kwargs, None).detach().clone())
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    def step(info):
        for v in seen.values():
            v.append([])

    try:
        run_job(loaded, req, callback=step)
    finally:
        for h in handles:
            h.remove()
    return {k: v[:-1] for k, v in seen.items()}


def _expected(steps: list[list[torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    abs_, rel = [np.nan], [np.nan]
    for t in range(1, len(steps)):
        assert len(steps[t]) == len(steps[t - 1]) > 0
        diff = sum((x.double() - p.double()).abs().sum().item() for x, p in zip(steps[t], steps[t - 1]))
        base = sum(p.double().abs().sum().item() for p in steps[t - 1])
        count = sum(x.numel() for x in steps[t])
        abs_.append(diff / count)
        rel.append(diff / base)
    return np.array(abs_), np.array(rel)


def _row(profile, kind: str, prefix: str) -> int:
    return next(i for i, label in enumerate(profile.labels[kind]) if label.startswith(prefix))


def _check(profile, prompt: int, kind: str, row: int, steps) -> None:
    a, r = _expected(steps)
    assert np.isfinite(a[1:]).all() and (a[1:] > 1e-4).all() and (r[1:] > 1e-3).all()  # non-trivial numbers
    np.testing.assert_allclose(profile.abs[kind][prompt, row], a, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(profile.rel[kind][prompt, row], r, rtol=1e-5, equal_nan=True)


def _residual(adapter):
    return lambda args, kwargs, out: adapter.block_streams(out)[0] - kwargs.get("hidden_states", args[0] if args
                                                                                 else None)


def test_pixart_profile_matches_direct_capture_with_serial_cfg(tiny_models):
    """K, V (outputs of to_k/to_v) and the attention output (input of to_out[0]) of attn1 and one block's
    residual, captured with plain hooks; CFG runs two model calls per step, compared call by call."""
    loaded = tiny_models["tiny-pixart"]
    reqs = _requests(loaded, 2, cfg=3.0)
    profile = analyze(loaded, reqs)
    block = loaded.adapter.model.transformer_blocks[1]
    attn = block.attn1
    taps = {"k": (attn.to_k, "out", lambda a, k, o: o), "v": (attn.to_v, "out", lambda a, k, o: o),
            "out": (attn.to_out[0], "in", lambda a, k, o: a[0]), "residual": (block, "out", _residual(loaded.adapter))}
    for p, req in enumerate(reqs):
        seen = _capture(loaded, req, taps)
        assert all(len(s) == 2 for s in seen["k"])  # two model calls per step
        row = _row(profile, "k", "transformer_blocks.1.attn1")
        for kind in ("k", "v", "out"):
            _check(profile, p, kind, row, seen[kind])
        _check(profile, p, "residual", 1, seen["residual"])
    curve = profile_step_curve(profile)
    assert np.isnan(curve[0]) and np.allclose(curve[1:], profile.rel["residual"][:, :, 1:].mean(axis=(0, 1)))


def test_flux_joint_split_matches_direct_capture(tiny_models):
    """Joint attention: image and text attention outputs of a double block (inputs of to_out[0] and to_add_out)
    and of a single block (its attention module's output, text tokens first), and a single block's residual."""
    loaded = tiny_models["tiny-flux"]
    reqs = _requests(loaded, 1, cfg=1.0)
    profile = analyze(loaded, reqs)
    m = loaded.adapter.model
    double, single = m.transformer_blocks[1].attn, m.single_transformer_blocks[0]
    taps = {"out": (double.to_out[0], "in", lambda a, k, o: a[0]),
            "text_out": (double.to_add_out, "in", lambda a, k, o: a[0]),
            "single_out": (single.attn, "out", lambda a, k, o: o[:, 16:]),
            "single_text_out": (single.attn, "out", lambda a, k, o: o[:, :16]),
            "residual": (single, "out", _residual(loaded.adapter))}
    seen = _capture(loaded, reqs[0], taps)
    _check(profile, 0, "out", _row(profile, "out", "transformer_blocks.1.attn"), seen["out"])
    _check(profile, 0, "text_out", _row(profile, "text_out", "transformer_blocks.1.attn"), seen["text_out"])
    row = _row(profile, "out", "single_transformer_blocks.0.attn")
    _check(profile, 0, "out", row, seen["single_out"])
    _check(profile, 0, "text_out", _row(profile, "text_out", "single_transformer_blocks.0.attn"),
           seen["single_text_out"])
    _check(profile, 0, "residual", profile.labels["residual"].index("single_transformer_blocks.0"), seen["residual"])
    # the processors and attributes are back as they were
    assert not any(hasattr(mod, "_xdit_tap") for mod in m.modules())
    assert not any(type(mod.processor).__name__.startswith("SequenceParallel")
                   for mod in m.modules() if hasattr(mod, "processor"))


def test_ulysses_profile_matches_serial(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--model", "tiny-flux", "--prompts", "2", "--steps", "3", *SIZE]
    proc = subprocess.run([sys.executable, "-m", "comfyui_xdit", "analyze", *args, "--ulysses-degree", "2",
                           "--out", str(tmp_path / "usp")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("residual per step:") == 1  # rank 0 prints
    assert main(["analyze", *args, "--out", str(tmp_path / "serial")]) == 0
    usp, serial = np.load(tmp_path / "usp" / "profile.npz"), np.load(tmp_path / "serial" / "profile.npz")
    assert json.loads((tmp_path / "usp" / "profile.json").read_text())["parallel"]["ulysses"] == 2
    keys = [k for k in serial.files if k.endswith(("_abs", "_rel"))]
    assert len(keys) == 14 and sorted(keys) == sorted(k for k in usp.files if k.endswith(("_abs", "_rel")))
    for k in keys:
        assert np.isfinite(serial[k][:, :, 1:]).all()
        np.testing.assert_allclose(usp[k], serial[k], rtol=1e-4, atol=1e-7, equal_nan=True, err_msg=k)


def test_without_matplotlib_writes_data_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rel = np.array([[[np.nan, 0.5, 0.25]], [[np.nan, 0.3, 0.35]]])
    profile = Profile(["residual"], {"residual": rel * 2}, {"residual": rel}, {"residual": ["blocks.0"], "k": []},
                      [999.0, 500.0, 1.0], {"model": "x"})
    paths = save_profile(profile, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["profile.json", "profile.npz"]
    assert "matplotlib is not installed" in capsys.readouterr().out
    doc = json.loads((tmp_path / "profile.json").read_text())
    assert doc["curves"]["residual"][0] is None and np.allclose(doc["curves"]["residual"][1:], [0.4, 0.3])
    assert profile_step_curve(profile)[1:] == pytest.approx([0.4, 0.3])


@pytest.mark.parametrize("extra, message", [(["--steps", "1"], "--steps must be >= 2"),
                                            (["--steps", "3", "--prompts", "0"], "--prompts must be >= 1")])
def test_cli_rejects_bad_arguments(extra, message, tmp_path, capsys):
    assert main(["analyze", "--model", "tiny-flux", *SIZE, "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_pipefusion_profile_covers_every_stage(tmp_path):
    """Two stages, each recording only its own blocks: the all-reduced table has every row. Step 1 goes from the
    full-image warm-up to patches, so image-token tensors change shape there and are not compared (NaN)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "comfyui_xdit", "analyze", "--model", "tiny-sd3", "--prompts", "1",
                           "--steps", "4", *SIZE, "--pipefusion-degree", "2", "--num-patches", "2",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    npz = np.load(tmp_path / "profile.npz")
    for kind in ("k", "v", "out", "residual"):
        a = npz[f"{kind}_rel"]
        assert a.shape[1] == (2 if kind == "residual" else 3)
        assert np.isnan(a[:, :, :2]).all() and np.isfinite(a[:, :, 2:]).all() and (a[:, :, 2:] > 0).all(), kind
    assert np.isfinite(npz["text_k_rel"][:, :, 1:]).all()  # text tokens: full length in every call
