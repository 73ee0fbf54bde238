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


def pytest_configure(config):
    config.addinivalue_line("markers", "families(*names): the test reads the family matrix's runs of these families "
                                       "(tests/family_matrix.py)")


@pytest.fixture(scope="session")
def matrix(request, tmp_path_factory):
    """The family matrix's torchrun runs (tests/family_matrix.py): one launch per world size, of the cases the
    selected tests need."""
    from tests.family_matrix import Runs, needed_by

    needed = set()
    for item in request.session.items:
        needed |= needed_by(item)
    return Runs(needed, tmp_path_factory)
