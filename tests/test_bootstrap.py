"""The pack from a folder of its own, not installed (ComfyUI-Manager's git clone): a copy of the tracked files, loaded
as ComfyUI loads a custom node over the stand-ins, takes `comfyui_xdit` and `comfyui_xdit_runtime` from the copy
(ahead of this checkout's editable install), leaves ComfyUI's top-level `nodes` alone and never puts the copy on
sys.path; a rank's script (runtime/bootstrap.py) does the same. The real ComfyUI: tests/test_comfyui_install.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOAD_AS_COMFYUI = '''
import importlib.util, json, sys
sys.path.insert(0, {root!r})
from tests import comfy_standins as cs
sys.modules.update(cs.install(cs.Recorder()))
sys.path.remove({root!r})
pack = {pack!r}
spec = importlib.util.spec_from_file_location("comfyui-xdit", pack + "/__init__.py", submodule_search_locations=[pack])
module = importlib.util.module_from_spec(spec)
sys.modules["comfyui-xdit"] = module
spec.loader.exec_module(module)
import comfyui_xdit, comfyui_xdit_runtime
from comfyui_xdit_runtime.launcher import RANK_SCRIPT
print(json.dumps({{"nodes": sorted(module.nodes.NODE_CLASS_MAPPINGS), "engine": comfyui_xdit.__file__,
                  "runtime": comfyui_xdit_runtime.__file__, "rank_script": RANK_SCRIPT,
                  "own_nodes": bool(getattr(sys.modules["nodes"], "COMFY_OWN_NODES_MODULE", False)),
                  "on_path": [p for p in sys.path if p.startswith(pack)]}}))
'''

AS_RANK = '''
import runpy, sys
sys.argv = [{script!r}]
g = runpy.run_path({script!r}, run_name="not_main")
g["register"]()
import comfyui_xdit, comfyui_xdit_runtime.worker
print(comfyui_xdit.__file__); print(comfyui_xdit_runtime.worker.__file__)
'''


def _copy_pack(dest: Path) -> Path:
    pack = dest / "comfyui-xdit"
    pack.mkdir()
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    subprocess.run(["tar", "-cf", str(dest / "pack.tar"), "--null", "-T", "-"], cwd=ROOT, check=True,
                   input=b"\0".join(f for f in files if f and (ROOT / f.decode()).exists()))
    subprocess.run(["tar", "-xf", str(dest / "pack.tar"), "-C", str(pack)], check=True)
    return pack


def test_cloned_pack_imports_its_own_engine_and_runtime(tmp_path):
    pack = _copy_pack(tmp_path)
    out = subprocess.run([sys.executable, "-c", LOAD_AS_COMFYUI.format(root=str(ROOT), pack=str(pack))],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert "XDiTParallelSampler" in info["nodes"] and info["own_nodes"]  # ComfyUI's `nodes` untouched
    assert info["engine"] == str(pack / "comfyui_xdit" / "__init__.py")  # the copy's, not the editable install's
    assert info["runtime"] == str(pack / "runtime" / "__init__.py")
    assert info["rank_script"] == str(pack / "runtime" / "bootstrap.py") and info["on_path"] == []
    assert "comes from" not in out.stderr


def test_rank_script_runs_the_worker_beside_it(tmp_path):
    pack = _copy_pack(tmp_path)
    script = str(pack / "runtime" / "bootstrap.py")
    out = subprocess.run([sys.executable, "-c", AS_RANK.format(script=script)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(pack / "comfyui_xdit" / "__init__.py"), str(pack / "runtime" / "worker.py")]
    help_ = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert help_.returncode == 0 and "--address" in help_.stdout, help_.stderr[-2000:]


def test_an_engine_imported_before_the_pack_is_named_in_a_warning(tmp_path):
    pack = _copy_pack(tmp_path)
    code = ("import logging, runpy; logging.basicConfig(); import comfyui_xdit; "
            f"runpy.run_path({str(pack / 'runtime' / 'bootstrap.py')!r}, run_name='x')['register'](); "
            "print(comfyui_xdit.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(ROOT / "comfyui_xdit" / "__init__.py")  # imported already: kept
    assert "comfyui_xdit comes from" in out.stderr and str(pack / "comfyui_xdit") in out.stderr


def test_a_second_copy_of_the_pack_is_named_in_a_warning(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _copy_pack(tmp_path / "a"), _copy_pack(tmp_path / "b")
    code = ("import logging, runpy; logging.basicConfig(); "
            f"runpy.run_path({str(first / 'runtime' / 'bootstrap.py')!r}, run_name='x')['register'](); "
            f"runpy.run_path({str(second / 'runtime' / 'bootstrap.py')!r}, run_name='x')['register'](); "
            "import comfyui_xdit; print(comfyui_xdit.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(first / "comfyui_xdit" / "__init__.py")
    assert "comfyui_xdit comes from" in out.stderr and str(second / "comfyui_xdit") in out.stderr
