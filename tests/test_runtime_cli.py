"""`python -m comfyui_xdit serve`: a foreground pool that other processes attach to; it restarts when a rank dies
and stops, with every process it started, on SIGTERM or SIGINT."""
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from comfyui_xdit.cli import main
from comfyui_xdit_runtime import Pool, PoolClient, PoolDied
from comfyui_xdit_runtime.launcher import _pid_alive
from tests.conftest import rel_l2

REQ = {"height": 128, "width": 128, "steps": 3}


def test_serve_refuses_public_address_without_secret(capsys, monkeypatch):
    monkeypatch.delenv("XDIT_POOL_SECRET", raising=False)
    assert main(["serve", "--nproc", "2", "--address", "tcp://0.0.0.0:5598"]) == 2
    assert "without a shared secret" in capsys.readouterr().err


def test_serve_pg_timeout_reaches_the_pool(monkeypatch):
    import comfyui_xdit_runtime
    from comfyui_xdit_runtime.errors import PoolError

    seen = {}

    def fake_pool(*args, **kwargs):
        seen.update(kwargs)
        raise PoolError("stopped here", "config")

    monkeypatch.setattr(comfyui_xdit_runtime, "Pool", fake_pool)
    assert main(["serve", "--nproc", "2", "--pg-timeout", "30"]) == 2
    assert seen["pg_timeout"] == 30.0
    assert main(["serve", "--nproc", "2"]) == 2 and seen["pg_timeout"] == 120.0


def _serve(tmp_path, *extra, env=None):
    address = f"ipc://{tmp_path}/pool.sock"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDIT_POOL_ADMIN_SECRET": "cli-admin", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "comfyui_xdit", "serve", "--nproc", "2", "--address", address,
                             "--log", str(tmp_path / "pool.log"), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "ready at " + address in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, address


def _pool_processes(proc) -> list[int]:
    """serve's torchrun and its ranks (torchrun's children)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,pgid"], capture_output=True, text=True).stdout.split("\n")[1:]
    rows = [tuple(map(int, line.split())) for line in out if line.strip()]
    torchrun = [pid for pid, ppid, _ in rows if ppid == proc.pid]
    return torchrun + [pid for pid, ppid, _ in rows if ppid in torchrun]


def _wait_gone(pids, seconds=15.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _pid_alive(p)]


def test_serve_in_foreground_attach_and_shutdown(tmp_path, capsys):
    (tmp_path / "secret").write_text("cli-secret\n")
    proc, address = _serve(tmp_path, "--secret-file", str(tmp_path / "secret"))
    try:
        assert "cli-secret" not in " ".join(proc.args)  # not in the process list
        pool = Pool.attach(address, "cli-secret", admin_secret="cli-admin")
        client = pool.client()
        status = client.status()
        assert status["world_size"] == 2 and status["address"] == address
        # generate --pool: the nodes' path from the command line, same result as generating in this process
        job = ["generate", "--model", "tiny-flux", "--height", "128", "--width", "128", "--steps", "4",
               "--cfg", "3", "--cache", "fbcache", "--cache-mask", "1,1,0,1"]
        assert main([*job, "--out", str(tmp_path / "local.safetensors")]) == 0
        assert main([*job, "--out", str(tmp_path / "pool.safetensors"), "--pool", address, "--secret-file",
                     str(tmp_path / "secret"), "--ulysses-degree", "2"]) == 0
        assert "cache: reused 1 of 4 steps [3]" in capsys.readouterr().out
        local, remote = (load_file(tmp_path / f"{n}.safetensors")["latents"] for n in ("local", "pool"))
        assert rel_l2(remote, local) < 1e-5
        assert main([*job, "--out", str(tmp_path / "x.safetensors"), "--pool", address, "--secret", "wrong"]) == 2
        err = capsys.readouterr().err
        assert "no answer from a pool at " + address in err and "visible in the process list" in err
        assert client.status()["world_size"] == 2  # the unsigned messages were dropped; the pool is unharmed
        with pytest.raises(Exception, match="admin secret"):
            PoolClient(address, "cli-secret").shutdown(timeout=5)  # any client may not stop a shared pool
        pool.stop()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_restarts_a_killed_rank_and_attached_clients_learn_it(tmp_path):
    proc, address = _serve(tmp_path)
    client = PoolClient(address)
    try:
        key = client.load_model("tiny-flux")
        first = client.sample(key, {**REQ, "seed": 4})
        ranks = [r["pid"] for r in client.status()["ranks"]]
        seen, killed = [], []

        def kill_rank0(p):
            seen.append(p.step)
            if p.step == 1:
                os.kill(ranks[0], signal.SIGKILL)  # rank 0 serves the socket: its connection closes
                killed.append(time.monotonic())

        with pytest.raises(PoolDied, match="closed its connection during sample .*: its rank 0 ended") as info:
            client.sample(key, {**REQ, "steps": 10000}, on_progress=kill_rank0)
        took = time.monotonic() - killed[0]
        print(f"the attached client learned in {took:.2f} s: {info.value}")
        assert took < 2, "an attached client must learn within seconds that the pool is gone"
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:  # serve starts a new pool at the same address
            try:
                status = client.status(timeout=2)
                break
            except Exception:  # noqa: BLE001 - still restarting
                time.sleep(0.5)
        assert status is not None and status["world_size"] == 2
        assert set(r["pid"] for r in status["ranks"]).isdisjoint(ranks)
        again = client.sample(key, {**REQ, "seed": 4})  # the model is loaded again on demand
        assert rel_l2(again, first) < 1e-5
        assert proc.poll() is None
    finally:
        client.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert "restarting it at " + address in proc.stderr.read()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_everything_on_signal(tmp_path, sig):
    proc, address = _serve(tmp_path)
    pids = _pool_processes(proc)
    assert len(pids) == 3, pids  # torchrun and two ranks
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 0
    assert _wait_gone(pids) == [], "serve left pool processes running"


def test_killing_serve_takes_the_pool_down(tmp_path):
    proc, address = _serve(tmp_path)
    pids = _pool_processes(proc)
    proc.kill()
    proc.wait(timeout=10)
    assert _wait_gone(pids) == [], "the pool outlived a SIGKILLed serve"
