import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

FAMILIES = ["tiny-flux", "tiny-sd3", "tiny-pixart"]


@pytest.fixture(scope="session")
def tiny_models():
    """Built-in tiny models, built once per test session."""
    from comfyui_xdit.models import load_model

    return {name: load_model(name) for name in FAMILIES}


def rel_l2(a, b) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm()).item()


def forward_inputs(adapter, seed: int):
    """One forward's inputs for a tiny Flux-like adapter: latents of 6 x 10 (15 tokens), 7 text tokens, t 600; returns
    (x, t, conditioning, the pool forward's conds)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, adapter.latent_channels, 6, 10, generator=g)
    c = adapter.random_conditioning(1, 7, g)
    return x, torch.tensor([600.0]), c, {"cond": c.cond, "pooled": c.pooled}


@pytest.fixture
def rec():
    from . import comfy_standins as cs

    return cs.Recorder()


@pytest.fixture
def ext(rec, monkeypatch):
    """The extension loaded over the ComfyUI stand-ins, sys.modules patched for the test; `ext.rec` is `rec`."""
    from . import comfy_standins as cs

    for name, module in cs.install(rec).items():
        monkeypatch.setitem(sys.modules, name, module)
    module = cs.load_extension()
    module.rec = rec
    yield module
    module.nodes.xdit_nodes.MANAGER.stop()


# ------------------------------------------------------------------------------------------------ test tiers
# The fast tier (`pytest --fast`, `./dev test --fast`; marker `fast`): the tests that start no process (subprocess,
# torchrun, a worker pool, ComfyUI) and join no process group. Found from the source, nothing listed by hand: a test
# is left out when its body, its fixtures or the test helpers they call (tests/*, followed through names) mention
# one of SPAWNS. `pytest --rest` runs the others (CI runs both: docs/testing.md). In the fast tier a test that
# starts a process or a process group anyway fails, naming what the detection missed.
SPAWNS = frozenset({
    "subprocess", "Popen", "fork", "spawn", "start_processes", "multiprocessing",  # processes
    "init_process_group", "run_cases", "Runs",  # process groups (tests/distributed.py, tests/family_matrix.py)
    "Pool", "PoolClient", "relaunch_under_torchrun",  # the worker pool
    "COMFYUI_DIR", "comfy_server",  # a real ComfyUI
})
# Node ids whose node starts a pool when it runs (Load Parallel DiT asks the nodes' MANAGER for one): a test that
# instantiates one by its id (`mapping["XDiTLoadParallelDiT"]()`, `_node(ext, "XDiTLoadParallelDiT")`) is left out
# too. A test that starts one in a way no name shows (a graph read from a file) carries `@pytest.mark.spawns`.
SPAWNING_NODES = frozenset({"XDiTLoadParallelDiT"})


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true", help="run the fast tier only: no processes, no process groups")
    parser.addoption("--rest", action="store_true", help="run every test the fast tier leaves out")


def pytest_configure(config):
    config.addinivalue_line("markers", "fast: starts no process and no process group (set by tests/conftest.py)")
    config.addinivalue_line("markers", "spawns: starts a process in a way tests/conftest.py cannot see by name")
    config.addinivalue_line("markers", "families(*names): the test reads the family matrix's runs of these families "
                                       "(tests/family_matrix.py)")


def _spawn_reason(obj, seen: set) -> str | None:
    """What `obj` (a test, fixture or helper function, or a helper class) mentions of SPAWNS, as a chain of names,
    or None. Follows the names it uses that are functions or classes of this tests package."""
    import ast
    import inspect
    import textwrap

    obj = inspect.unwrap(obj)
    if id(obj) in seen:
        return None
    seen.add(id(obj))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    except (OSError, TypeError, SyntaxError):
        return None
    scope = getattr(obj, "__globals__", None) or vars(sys.modules.get(obj.__module__, sys))
    follow = []
    for node in ast.walk(tree):
        keys = [node.slice] if isinstance(node, ast.Subscript) else node.args if isinstance(node, ast.Call) else []
        for key in keys:
            if isinstance(key, ast.Constant) and key.value in SPAWNING_NODES:
                return key.value
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else \
            node.name if isinstance(node, (ast.alias,)) else None
        if isinstance(node, ast.alias):
            name = node.asname or node.name.rsplit(".", 1)[-1]
            if any(part in SPAWNS for part in node.name.split(".")):
                return node.name
        if name is None:
            continue
        if name in SPAWNS:
            return name
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            base = scope.get(node.value.id)
            target = getattr(base, node.attr, None) if inspect.ismodule(base) else None
        else:
            target = scope.get(name)
        if (inspect.isfunction(target) or inspect.isclass(target)) and \
                getattr(target, "__module__", "").split(".")[0] == __name__.split(".")[0]:
            follow.append((name, target))
    for name, target in follow:
        why = _spawn_reason(target, seen)
        if why:
            return f"{name} -> {why}"
    return None


def tier_reason(item) -> str | None:
    """Why `item` is not in the fast tier (the chain of names that leads to a process), or None."""
    if item.get_closest_marker("spawns"):
        return "marked spawns"
    seen: set = set()
    why = _spawn_reason(item.function, seen)
    if why:
        return why
    for name in item.fixturenames:
        if name == "_fast_tier_guard":
            continue
        for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):
            func = fixturedef.func
            if getattr(func, "__module__", "").split(".")[0] == __name__.split(".")[0]:
                why = _spawn_reason(func, seen)
                if why:
                    return f"fixture {name} -> {why}"
    return None


def pytest_collection_modifyitems(config, items):
    fast, rest = [], []
    report = os.environ.get("XDIT_TIER_REPORT")  # a file: each test's tier and why, for checking the detection
    lines = []
    for item in items:
        why = tier_reason(item)
        lines.append(f"{item.nodeid}\t{'fast' if why is None else 'rest: ' + why}")
        if why is None:
            item.add_marker(pytest.mark.fast)
            fast.append(item)
        else:
            rest.append(item)
    if config.getoption("--fast") or config.getoption("--rest"):
        keep, drop = (fast, rest) if config.getoption("--fast") else (rest, fast)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)
    if report:
        with open(report, "w") as f:
            f.write("\n".join(lines) + "\n")


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise RuntimeError(f"fast tier: this test {what}, which tests/conftest.py's detection did not see; add the "
                           "name that leads there to SPAWNS")
    return refused


@pytest.fixture(autouse=True)
def _fast_tier_guard(request, monkeypatch):
    """In `--fast` runs: starting a process or a process group fails the test (so the tier is what it says)."""
    if request.config.getoption("--fast"):
        import multiprocessing.process
        import subprocess

        import torch.distributed

        monkeypatch.setattr(subprocess.Popen, "_execute_child", _refuse("starts a process"))
        monkeypatch.setattr(os, "fork", _refuse("forks"))
        monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", _refuse("starts a process"))
        monkeypatch.setattr(torch.distributed, "init_process_group", _refuse("starts a process group"))
    yield


@pytest.fixture(scope="session")
def matrix(request, tmp_path_factory):
    """The family matrix's torchrun runs (tests/family_matrix.py): one launch per world size, of the cases the
    selected tests need."""
    from tests.family_matrix import Runs, needed_by

    needed = set()
    for item in request.session.items:
        needed |= needed_by(item)
    return Runs(needed, tmp_path_factory)
