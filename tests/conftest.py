import os

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
