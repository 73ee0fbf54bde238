"""The README's main job: the demo starts a CPU pool and samples through ZeroMQ."""
import subprocess
import sys


def test_demo_samples_through_the_pool():
    out = subprocess.run([sys.executable, "-m", "comfyui_xdit", "demo", "--steps", "2", "--size", "64"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pool ready at tcp://127.0.0.1:" in out.stdout
    for model in ("tiny-flux", "tiny-sd3", "tiny-pixart"):
        assert f"{model}: loaded on every rank" in out.stdout
    assert out.stdout.count("rel. L2 vs serial") == 6
    assert "all parallel results match serial" in out.stdout
