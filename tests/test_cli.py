"""The CLI contract: output file, clear one-line errors with a non-zero exit, parallel flags."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_xdit.cli import main
from tests.conftest import rel_l2

BASE = ["generate", "--height", "128", "--width", "128", "--steps", "2"]


def run(args, tmp_path, capsys):
    code = main([*BASE, *args, "--out", str(tmp_path / "out.safetensors")])
    return code, capsys.readouterr()


def test_generate_writes_comfyui_latents(tmp_path, capsys):
    code, out = run(["--model", "tiny-pixart", "--batch-size", "2"], tmp_path, capsys)
    assert code == 0, out.err
    lat = load_file(tmp_path / "out.safetensors")["latents"]
    assert lat.shape == (2, 4, 16, 16) and lat.dtype == torch.float32
    assert "step 2/2" in out.out


def test_inputs_file_is_used(tmp_path, capsys):
    noise = torch.randn(1, 16, 16, 16)
    save_file({"noise": noise}, tmp_path / "in.safetensors")
    code, _ = run(["--model", "tiny-sd3", "--inputs", str(tmp_path / "in.safetensors")], tmp_path, capsys)
    a = load_file(tmp_path / "out.safetensors")["latents"]
    save_file({"noise": noise * 2}, tmp_path / "in.safetensors")
    run(["--model", "tiny-sd3", "--inputs", str(tmp_path / "in.safetensors")], tmp_path, capsys)
    b = load_file(tmp_path / "out.safetensors")["latents"]
    assert code == 0 and rel_l2(a, b) > 1e-2


def _truncated(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"cond": torch.randn(1, 16, 4096)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


@pytest.mark.parametrize("args,message", [
    (["--model", "tiny-dit"], "not found"),
    (["--model", "tiny-flux", "--family", "sd3"], "family mismatch"),
    (["--model", "tiny-flux", "--height", "120"], "multiples of 16"),
    (["--model", "/nonexistent/model.safetensors"], "not found"),
    (["--model", "tiny-flux", "--inputs", "/nonexistent/in.safetensors"], "inputs file not found"),
    (["--model", "tiny-flux", "--ulysses-degree", "0"], "must be >= 1"),
])
def test_bad_input_exits_with_one_line(tmp_path, capsys, args, message):
    code, out = run(args, tmp_path, capsys)
    assert code == 2
    assert message in out.err and out.err.count("\n") == 1


def test_wrong_conditioning_width(tmp_path, capsys):
    save_file({"cond": torch.randn(1, 16, 768), "pooled": torch.randn(1, 768)}, tmp_path / "in.safetensors")
    code, out = run(["--model", "tiny-flux", "--inputs", str(tmp_path / "in.safetensors")], tmp_path, capsys)
    assert code == 2 and "expected cond of shape [B, L, 4096]" in out.err


def test_truncated_inputs_file(tmp_path, capsys):
    code, out = run(["--model", "tiny-flux", "--inputs", _truncated(tmp_path)], tmp_path, capsys)
    assert code == 2 and "cannot read inputs file" in out.err


def test_parallel_cli_launches_ranks_and_matches_serial(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outs = {}
    for name, extra in [("serial", []), ("usp", ["--ulysses-degree", "2", "--report-comm"])]:
        out = tmp_path / f"{name}.safetensors"
        proc = subprocess.run([sys.executable, "-m", "comfyui_xdit", *BASE, "--model", "tiny-flux", "--width", "160",
                               "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[name] = load_file(out)["latents"]
        if extra:
            assert "rank 1 step 2 bytes sent: gather" in proc.stdout
    assert rel_l2(outs["usp"], outs["serial"]) <= 1e-4


def test_pipefusion_cli_prints_rank_memory_and_matches_serial(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outs = {}
    for name, extra in [("serial", []), ("pf", ["--pipefusion-degree", "2", "--num-patches", "1"])]:
        out = tmp_path / f"{name}.safetensors"
        proc = subprocess.run([sys.executable, "-m", "comfyui_xdit", *BASE, "--model", "tiny-sd3", "--out", str(out),
                               *extra], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[name] = load_file(out)["latents"]
        if extra:
            lines = [ln for ln in proc.stdout.splitlines() if "block parameters" in ln]
            assert len(lines) == 2 and lines[0].startswith("rank 0 stage 0") and lines[1].startswith("rank 1 stage 1")
    assert rel_l2(outs["pf"], outs["serial"]) <= 1e-4


def test_generate_cache_flags(tmp_path, capsys):
    out = str(tmp_path / "out.safetensors")
    common = ["generate", "--model", "tiny-flux", "--height", "128", "--width", "128", "--steps", "6", "--out", out]
    assert main(common) == 0
    plain = load_file(out)["latents"]
    assert main([*common, "--cache", "fbcache", "--cache-threshold", "0"]) == 0
    assert torch.equal(load_file(out)["latents"], plain)
    assert main([*common, "--cache", "fbcache", "--cache-mask", "1,1,0,1,0,1"]) == 0
    text = capsys.readouterr().out
    assert "step 3/6" in text and text.count("(reused)") == 2 and "cache: reused 2 of 6 steps [3, 5]" in text
    assert rel_l2(load_file(out)["latents"], plain) > 1e-4
    # a static mask from an analyser profile
    assert main(["analyze", "--model", "tiny-flux", "--prompts", "1", "--steps", "6", "--out",
                 str(tmp_path / "prof")]) == 0
    assert main([*common, "--cache", "fbcache", "--cache-profile", str(tmp_path / "prof" / "profile.json"),
                 "--cache-threshold", "100"]) == 0
    assert "cache: reused 5 of 6 steps" in capsys.readouterr().out
    assert main([*common, "--cache", "fbcache", "--cache-mask", "1,0"]) == 2
    assert "cache mask has 2 entries for 6 steps" in capsys.readouterr().err


@pytest.mark.spawns  # inductor runs the C++ compiler as a subprocess
def test_generate_compile_matches_eager(tmp_path, capsys):
    """`generate --compile` (world 1, tiny-pixart) gives eager's latents within 1e-5."""
    code, out = run(["--model", "tiny-pixart", "--cfg", "3"], tmp_path, capsys)
    assert code == 0, out.err
    eager = load_file(tmp_path / "out.safetensors")["latents"]
    from comfyui_xdit.compile import CALLS

    before = CALLS[0]
    code, out = run(["--model", "tiny-pixart", "--cfg", "3", "--compile"], tmp_path, capsys)
    assert code == 0, out.err
    assert CALLS[0] > before  # the blocks ran compiled
    assert rel_l2(load_file(tmp_path / "out.safetensors")["latents"], eager) <= 1e-5
