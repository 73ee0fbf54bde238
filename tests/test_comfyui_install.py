"""The pack as users install it, in a real ComfyUI (skipped unless COMFYUI_DIR; COMFYUI_PYTHON: the interpreter
whose Python version the fresh environment gets, default COMFYUI_DIR/.venv/bin/python).

A fresh venv with ComfyUI's requirements and the pack's requirements.txt only (what ComfyUI-Manager installs; no
`pip install -e`, no PYTHONPATH), cached in the temp folder under the requirements' hash; a `git clone` of this
checkout's HEAD in custom_nodes of a fresh base directory. ComfyUI must list every node of the pack and run a small
job on a 2-rank CPU pool; Ctrl-C (SIGINT) or SIGTERM during a long job must end ComfyUI and every pool process within
10 s, without a traceback in ComfyUI's log."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from .comfy_server import COMFYUI_DIR, ROOT, comfy_python, running_comfyui, start_comfyui

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
sys.path.insert(0, str(ROOT / "scripts"))

# ComfyUI's own torch, as a user's environment has it (these lie on this machine's disk); the pack must not change it
TORCH = ("torch==2.14.1", "torchvision==0.29.1")
NODES = ("XDiTConfigureHybridParallel", "XDiTLoadParallelDiT", "XDiTParallelSampler", "XDiTParallelSamplerAdvanced",
         "XDiTParallelLoRA")
EXIT_SECONDS = 10.0


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], check=True,
                   timeout=1800)


def _torch_version(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                          text=True, check=True, timeout=300).stdout.strip()


@pytest.fixture(scope="module")
def fresh_python() -> Path:
    """A venv with ComfyUI's requirements and the pack's requirements.txt, kept in the temp folder under the hash of
    both files, the torch pins and the Python; rebuilt when it is missing or was left unfinished."""
    reqs = [Path(COMFYUI_DIR) / "requirements.txt", ROOT / "requirements.txt"]
    base_python = comfy_python()
    version = subprocess.run([base_python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True,
                             check=True).stdout
    digest = hashlib.sha256("\n".join([*TORCH, version, *(p.read_text() for p in reqs)]).encode()).hexdigest()[:16]
    venv = Path(tempfile.gettempdir()) / f"xdit-install-venv-{digest}"
    python, done = venv / "bin" / "python", venv / "complete"
    if not done.exists():
        t0 = time.monotonic()
        subprocess.run([base_python, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        _pip(python, *TORCH)
        torch_before = _torch_version(python)
        _pip(python, "-r", str(reqs[0]), "requests")  # ComfyUI 0.3.64 forgets requests
        _pip(python, "-r", str(reqs[1]))
        assert _torch_version(python) == torch_before  # installing the pack left ComfyUI's torch as it was
        done.write_text(f"built in {time.monotonic() - t0:.0f} s\n")
    out = subprocess.run([str(python), "-c", "import importlib.util as u; print([n for n in "
                          "('comfyui_xdit', 'comfyui_xdit_runtime') if u.find_spec(n)])"],
                         capture_output=True, text=True, check=True, timeout=120, cwd=tempfile.gettempdir(),
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.stdout.strip() == "[]"  # not installed: ComfyUI must find them in the pack's folder
    return python


@pytest.fixture(scope="module")
def installed(fresh_python, tmp_path_factory):
    """A base directory with the pack cloned into custom_nodes (HEAD of this checkout: commit first), a seeded
    conditioning node and a tiny SD3 checkpoint; ComfyUI's environment without PYTHONPATH."""
    from .test_comfyui_e2e import COND_NODE, _write_tiny_sd3

    base = tmp_path_factory.mktemp("install_base")
    (base / "custom_nodes").mkdir()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(base / "custom_nodes" / "comfyui-xdit")], check=True,
                   timeout=300)
    (base / "custom_nodes" / "xdit_e2e_cond.py").write_text(COND_NODE)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    _write_tiny_sd3(base / "models" / "diffusion_models" / "tiny_sd3_e2e.safetensors")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return fresh_python, base, env


def _graph(steps: int, prefix: str) -> dict:
    return {
        "1": {"class_type": "XDiTE2EConditioning", "inputs": {"seed": 1, "tokens": 16}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "7": {"class_type": "XDiTConfigureHybridParallel", "inputs": {
            "device": "cpu", "ulysses_degree": 2, "ring_degree": 1, "pipefusion_degree": 1, "cfg_degree": 1,
            "dp_degree": 1, "num_patches": 0, "warmup_steps": 1, "attention": "auto"}},
        "8": {"class_type": "XDiTLoadParallelDiT", "inputs": {"parallel_config": ["7", 0],
                                                              "checkpoint": "tiny_sd3_e2e.safetensors",
                                                              "weight_dtype": "fp32", "family": "auto"}},
        "9": {"class_type": "XDiTParallelSampler", "inputs": {
            "model": ["8", 0], "positive": ["1", 0], "negative": ["1", 0], "latent_image": ["3", 0], "seed": 3,
            "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": prefix}},
    }


def test_cloned_pack_lists_its_nodes_and_runs_a_job(installed):
    from queue_workflow import queue_and_wait

    python, base, env = installed
    with running_comfyui(base, str(python), env) as server:
        info = json.load(urllib.request.urlopen(server + "/object_info", timeout=60))
        log = (base / "comfyui.log").read_text()
        missing = [n for n in NODES if n not in info]
        assert not missing, (missing, log[-3000:])
        assert "IMPORT FAILED" not in log, log[-3000:]
        _, entry = queue_and_wait(server, _graph(2, "installed"), timeout=600, log=lambda line: None)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert sorted((base / "output").glob("installed_*.latent"))


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_a_job_ends_comfyui_and_the_pool(installed, sig):
    from queue_workflow import queue_and_wait

    python, base, env = installed
    log_path = base / "comfyui.log"
    log_path.write_bytes(b"")
    proc, server = start_comfyui(base, str(python), env)
    try:
        stepping = threading.Event()

        def follow():
            def line(text):
                if text.startswith("node 9: step 2/"):
                    stepping.set()

            try:
                queue_and_wait(server, _graph(5000, f"signal{sig.name}"), timeout=600, log=line)
            except Exception:  # noqa: BLE001 - ComfyUI goes away under it
                pass

        threading.Thread(target=follow, daemon=True).start()
        assert stepping.wait(300), log_path.read_text()[-3000:]
        pool = _descendants(proc.pid)
        assert len(pool) >= 3, pool  # torchrun and two ranks
        os.kill(proc.pid, sig)
        t0 = time.monotonic()
        while time.monotonic() - t0 < EXIT_SECONDS and (proc.poll() is None or any(_alive(p) for p in pool)):
            time.sleep(0.1)
        took = time.monotonic() - t0
        left = [p for p in pool if _alive(p)]
        print(f"{sig.name}: ComfyUI exited with {proc.poll()}, pool gone {not left}, after {took:.1f} s")
        text = log_path.read_text()
        assert proc.poll() is not None, f"ComfyUI still runs {EXIT_SECONDS} s after {sig.name}"
        assert not left, f"pool processes left after {sig.name}: {left}"
        assert "Traceback" not in text, text[-4000:]
        if sig == signal.SIGINT:  # the job was interrupted (and so cancelled on the pool) before the pool stopped
            assert "Processing interrupted" in text, text[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
