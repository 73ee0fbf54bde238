"""A real ComfyUI for the end-to-end tests (COMFYUI_DIR; COMFYUI_PYTHON picks its interpreter, default
COMFYUI_DIR/.venv/bin/python, else this one): a base directory of its own with this checkout linked into
custom_nodes, and the server started on a free loopback port, stopped (and its models freed) afterwards."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
ROOT = Path(__file__).resolve().parents[1]


def comfy_python() -> str:
    return os.environ.get("COMFYUI_PYTHON") or next(
        (str(p) for p in [Path(COMFYUI_DIR) / ".venv" / "bin" / "python"] if p.exists()), sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout_env(base: Path) -> dict[str, str]:
    """The environment for ComfyUI and its pool ranks (they inherit it): this checkout's engine and runtime first on
    the path, ahead of any installed comfyui-xdit (an editable install of another checkout)."""
    shim = base / "pythonpath"
    if not shim.exists():
        shim.mkdir()
        (shim / "comfyui_xdit").symlink_to(ROOT / "comfyui_xdit")
        (shim / "comfyui_xdit_runtime").symlink_to(ROOT / "runtime")
    rest = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), *rest]))


def make_base(base: Path, custom_nodes: dict[str, str]) -> Path:
    """A ComfyUI base directory with this checkout and the given test-only node files (name -> source) in
    custom_nodes; returns its models/diffusion_models folder."""
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-xdit").symlink_to(ROOT)
    for name, text in custom_nodes.items():
        (base / "custom_nodes" / name).write_text(text)
    models = base / "models" / "diffusion_models"
    models.mkdir(parents=True)
    return models


def start_comfyui(base: Path, python: str | None = None, env: dict[str, str] | None = None
                  ) -> tuple[subprocess.Popen, str]:
    """ComfyUI on the CPU with `base` as its base directory (its output in base/comfyui.log), in a session of its own;
    returns the process and its URL once it answers /system_stats. `python`: default comfy_python(); `env`: default
    checkout_env(base)."""
    port = free_port()
    with open(base / "comfyui.log", "ab") as log:
        proc = subprocess.Popen([python or comfy_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port",
                                 str(port), "--base-directory", str(base), "--preview-method", "latent2rgb"],
                                cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT,
                                env=checkout_env(base) if env is None else env, start_new_session=True)
    server = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            pytest.fail(f"ComfyUI exited: {(base / 'comfyui.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(server + "/system_stats", timeout=2).read()
            return proc, server
        except OSError:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
                pytest.fail("ComfyUI did not answer within 300 s")
            time.sleep(0.5)


@contextmanager
def running_comfyui(base: Path, python: str | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """start_comfyui; yields its URL, and stops it (its models freed first) afterwards."""
    proc, server = start_comfyui(base, python, env)
    try:
        yield server
    finally:
        try:
            urllib.request.urlopen(urllib.request.Request(server + "/free", data=b'{"unload_models": true}',
                                                          headers={"Content-Type": "application/json"}), timeout=5)
        except OSError:
            pass
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def saved_latent(base: Path, prefix: str):
    """The last LATENT a SaveLatent node with `prefix` wrote in this ComfyUI's output folder, as float32."""
    from safetensors.torch import load_file

    files = sorted((base / "output").glob(f"{prefix}_*.latent"))
    assert files, f"no {prefix} latent saved"
    return load_file(str(files[-1]))["latent_tensor"].float()


def config_node(nid: str, **degrees) -> dict:
    """A Configure Hybrid Parallel node on the CPU with these degrees (the rest 1)."""
    conf = {"device": "cpu", "ulysses_degree": 1, "ring_degree": 1, "pipefusion_degree": 1, "cfg_degree": 1,
            "dp_degree": 1, "num_patches": 0, "warmup_steps": 1, "attention": "auto", **degrees}
    return {nid: {"class_type": "XDiTConfigureHybridParallel", "inputs": conf}}
