"""`python -m comfyui_xdit serve`: a foreground pool that another process attaches to."""
import os
import subprocess
import sys

from safetensors.torch import load_file

from comfyui_xdit.cli import main
from tests.conftest import rel_l2
from comfyui_xdit_runtime import Pool


def test_serve_refuses_public_address_without_secret(capsys, monkeypatch):
    monkeypatch.delenv("XDIT_POOL_SECRET", raising=False)
    assert main(["serve", "--nproc", "2", "--address", "tcp://0.0.0.0:5598"]) == 2
    assert "without a shared secret" in capsys.readouterr().err


def test_serve_in_foreground_attach_and_shutdown(tmp_path, capsys):
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
        # generate --pool: the nodes' path from the command line, same result as generating in this process
        job = ["generate", "--model", "tiny-flux", "--height", "128", "--width", "128", "--steps", "4",
               "--cfg", "3", "--cache", "fbcache", "--cache-mask", "1,1,0,1"]
        assert main([*job, "--out", str(tmp_path / "local.safetensors")]) == 0
        assert main([*job, "--out", str(tmp_path / "pool.safetensors"), "--pool", address, "--secret", "cli-secret",
                     "--ulysses-degree", "2"]) == 0
        assert "cache: reused 1 of 4 steps [3]" in capsys.readouterr().out
        local, remote = (load_file(tmp_path / f"{n}.safetensors")["latents"] for n in ("local", "pool"))
        assert rel_l2(remote, local) < 1e-5
        assert main([*job, "--out", str(tmp_path / "x.safetensors"), "--pool", address, "--secret", "wrong"]) == 2
        assert "no answer from a pool at " + address in capsys.readouterr().err
        assert client.status()["world_size"] == 2  # the unsigned messages were dropped; the pool is unharmed
        pool.stop()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
