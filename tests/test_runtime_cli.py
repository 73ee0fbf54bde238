"""`python -m comfyui_xdit serve`: a foreground pool that another process attaches to."""
import os
import subprocess
import sys

from comfyui_xdit.cli import main
from comfyui_xdit_runtime import Pool


def test_serve_refuses_public_address_without_secret(capsys, monkeypatch):
    monkeypatch.delenv("XDIT_POOL_SECRET", raising=False)
    assert main(["serve", "--nproc", "2", "--address", "tcp://0.0.0.0:5598"]) == 2
    assert "without a shared secret" in capsys.readouterr().err


def test_serve_in_foreground_attach_and_shutdown(tmp_path):
    address = f"ipc://{tmp_path}/pool.sock"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDIT_POOL_SECRET": "cli-secret"}
    proc = subprocess.Popen([sys.executable, "-m", "comfyui_xdit", "serve", "--nproc", "2", "--address", address,
                             "--log", str(tmp_path / "pool.log")], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert "ready at " + address in proc.stdout.readline()
        pool = Pool.attach(address, "cli-secret")
        client = pool.client()
        status = client.status()
        assert status["world_size"] == 2 and status["address"] == address
        pool.stop()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
