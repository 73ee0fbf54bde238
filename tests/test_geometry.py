"""The queue-time checks read a checkpoint's heads, blocks and SD3 position table from its header or config.json
(nodes/geometry.py); they must be what the engine builds from the same file, in every layout it loads."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from safetensors.torch import save_file

from comfyui_xdit.tiny import build_tiny
from comfyui_xdit.weights import load_transformer

from . import comfy_standins as cs
from .test_weights import flux_to_bfl, make_flux, make_pixart, make_sd3, pixart_to_original, sd3_to_mmdit


@pytest.fixture(scope="module")
def geo():
    """nodes/geometry.py, which needs no ComfyUI, imported on its own."""
    spec = importlib.util.spec_from_file_location("xdit_geometry_under_test", cs.ROOT / "nodes" / "geometry.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def engine_geometry(config) -> tuple:
    blocks = config.num_layers + getattr(config, "num_single_layers", 0)
    side = config.pos_embed_max_size * 16 if "pos_embed_max_size" in config else None
    return config.num_attention_heads, blocks, side


def _ours(g) -> tuple:
    return g.heads, g.blocks, g.max_side


MODELS = {
    "flux": make_flux, "flux-schnell": lambda: make_flux(guidance=False), "sd3.5": make_sd3,
    "sd3": lambda: make_sd3(sd35=False), "pixart": make_pixart, "pixart-alpha": lambda: make_pixart(alpha=True),
}
ORIGINAL = {"flux": flux_to_bfl, "sd3": sd3_to_mmdit, "pixart": pixart_to_original}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("layout", ["original", "prefixed", "diffusers-file", "folder"])
def test_geometry_is_the_engines(tmp_path, geo, name, layout):
    model = MODELS[name]()
    family = name.split("-")[0].rstrip(".5")
    overrides = None
    if layout == "folder":
        path = tmp_path / "model"
        model.save_pretrained(str(path))
    else:
        sd = ORIGINAL[family](model) if layout in ("original", "prefixed") else dict(model.state_dict())
        if layout == "prefixed":
            sd = {"model.diffusion_model." + k: v for k, v in sd.items()}
        path = tmp_path / "m.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        if family == "pixart" and layout == "diffusers-file":
            overrides = {"sample_size": 32, "interpolation_scale": 1}  # not in the keys
    loaded = load_transformer(str(path), config_overrides=overrides)
    g = geo.geometry(str(path))
    assert g.family == loaded.family
    assert _ours(g) == engine_geometry(loaded.model.config)


def test_geometry_of_torch_checkpoint_and_tiny_models(tmp_path, geo):
    model = make_pixart()
    path = tmp_path / "PixArt-Sigma-mini.pth"
    torch.save(pixart_to_original(model), str(path))
    assert _ours(geo.geometry(str(path))) == engine_geometry(load_transformer(str(path)).model.config)
    for name in ("tiny-flux", "tiny-sd3", "tiny-pixart"):
        assert _ours(geo.geometry(name)) == engine_geometry(build_tiny(name)[1].config), name


@pytest.mark.parametrize("cut", ["half", "header", "tiny"])
def test_damaged_safetensors_named(tmp_path, geo, cut):
    path = tmp_path / "broken-flux.safetensors"
    save_file(flux_to_bfl(make_flux()), str(path))
    data = path.read_bytes()
    keep = {"half": len(data) // 2, "header": 100, "tiny": 5}[cut]
    path.write_bytes(data[:keep])
    with pytest.raises(geo.CheckpointError, match=r"checkpoint broken-flux\.safetensors is damaged or truncated") as e:
        geo.tensor_shapes(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_damaged_torch_checkpoint_named(tmp_path, geo):
    path = tmp_path / "broken.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(12, 4)}, str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(geo.CheckpointError, match=r"checkpoint broken\.pth is damaged or truncated: not a readable"):
        geo.tensor_shapes(path)
