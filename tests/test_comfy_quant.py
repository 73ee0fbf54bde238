"""Checkpoints quantised by the newer ComfyUI: a quantised layer carries `<layer>.comfy_quant`, a uint8 tensor of
UTF-8 JSON {"format": ...} (comfy/quant_ops.py's QUANT_ALGOS names the formats), beside `<layer>.weight` in the
storage format and `<layer>.weight_scale` (nvfp4 also `weight_scale_2`); older files list the same in their
safetensors metadata `_quantization_metadata`. float8 with one scale per tensor loads as its dequantised weights;
every other format is refused in one line naming it: when the prompt is queued (Load Parallel DiT's check, from the
header and the markers, no weights read) and by both of the engine's loaders."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from comfyui_xdit.errors import WeightsError
from comfyui_xdit.frugal import open_checkpoint
from comfyui_xdit.weights import load_transformer

from .test_nodes import _graph, _queue
from .test_weights import flux_to_bfl, make_flux

FP8 = torch.float8_e4m3fn
BLOCKS = ("double_blocks.", "single_blocks.")  # the matrices ComfyUI's quantised files store quantised


def _marker(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def _quantised(fmt: str, marked: bool = True) -> tuple[dict, dict]:
    """(the file's tensors, BFL keys under ComfyUI's prefix, with every 2-D block matrix stored as ComfyUI stores
    `fmt`; the weights it stands for). Only float8 stands for its dequantised values; for the other formats the
    values are not used (they are refused)."""
    sd, expected = {}, {}
    for k, v in flux_to_bfl(make_flux()).items():
        if not (v.ndim == 2 and k.startswith(BLOCKS) and k.endswith(".weight")):
            sd[k] = expected[k] = v
            continue
        layer = k[: -len(".weight")]
        n, m = v.shape
        if fmt in ("float8_e4m3fn", "float8_e4m3fn_rowwise"):
            rowwise = fmt.endswith("rowwise")
            scale = (v.abs().amax(dim=1, keepdim=True) if rowwise else v.abs().max()) / 448
            sd[k] = (v / scale).to(FP8)
            sd[layer + ".weight_scale"] = scale.float()
            expected[k] = sd[k].float() * scale
            fmt_name = "float8_e4m3fn"
        elif fmt == "nvfp4":  # two 4-bit values a byte, a float8 scale per 16, a global scale
            sd[k] = torch.randint(0, 255, (n, m // 2), dtype=torch.uint8)
            sd[layer + ".weight_scale"] = torch.ones(n, m // 16).to(FP8)
            sd[layer + ".weight_scale_2"] = torch.tensor(1.0)
            fmt_name = fmt
        elif fmt == "mxfp8":  # float8 values, a power-of-two scale per 32 (stored as bytes here)
            sd[k] = v.to(FP8)
            sd[layer + ".weight_scale"] = torch.full((n, m // 32), 127, dtype=torch.uint8)
            fmt_name = fmt
        elif fmt == "int8_tensorwise":
            sd[k] = torch.randint(-127, 127, (n, m), dtype=torch.int8)
            sd[layer + ".weight_scale"] = torch.tensor(0.01)
            fmt_name = fmt
        else:
            raise AssertionError(fmt)
        if marked:
            sd[layer + ".comfy_quant"] = _marker(fmt_name)
    return {"model.diffusion_model." + k: v for k, v in sd.items()}, expected


def _layers(sd: dict) -> int:
    return sum(k.endswith(".comfy_quant") for k in sd)


def test_fp8_with_markers_loads_as_its_dequantised_weights(tmp_path, ext, rec):
    sd, expected = _quantised("float8_e4m3fn")
    path, ref = tmp_path / "flux-fp8-mixed.safetensors", tmp_path / "ref.safetensors"
    save_file(sd, str(path))
    save_file(expected, str(ref))
    want = load_transformer(str(ref)).model.state_dict()
    got = load_transformer(str(path)).model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    original = make_flux().state_dict()  # fp8 did round: the comparison can fail
    q = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(want[q], original[q])
    assert open_checkpoint(str(path)).variant == open_checkpoint(str(ref)).variant  # the per-rank reader opens it
    rec.folders = {"diffusion_models": [str(path)]}
    assert _queue(ext, rec, _graph(checkpoint=path.name)) == {}


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8", "int8_tensorwise"])
def test_other_formats_refused_in_one_line_naming_the_format(tmp_path, ext, rec, fmt):
    sd, _ = _quantised(fmt)
    path = tmp_path / f"flux-{fmt}.safetensors"
    save_file(sd, str(path))
    n = _layers(sd)
    line = (f"{path.name} is quantised by ComfyUI as {fmt} ({n} layers) (its .comfy_quant markers), which the pool "
            "cannot load: use a bf16, fp16 or fp8 checkpoint (float8 with one scale per tensor)")
    rec.folders = {"diffusion_models": [str(path)]}
    assert _queue(ext, rec, _graph(checkpoint=path.name)) == {"6": [f"checkpoint - checkpoint {line}"]}
    with pytest.raises(WeightsError) as e:
        load_transformer(str(path))
    assert str(e.value) == line
    with pytest.raises(WeightsError) as e:
        open_checkpoint(str(path))
    assert str(e.value) == line


def test_formats_listed_in_the_file_metadata(tmp_path, ext, rec):
    """Older files name each layer's format in `_quantization_metadata` instead of markers."""
    sd, _ = _quantised("nvfp4", marked=False)
    layers = {k[len("model.diffusion_model."):-len(".weight_scale_2")]: {"format": "nvfp4"}
              for k in sd if k.endswith(".weight_scale_2")}
    path = tmp_path / "flux-nvfp4-listed.safetensors"
    save_file(sd, str(path), metadata={"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                                             "layers": layers})})
    rec.folders = {"diffusion_models": [str(path)]}
    (msg,) = _queue(ext, rec, _graph(checkpoint=path.name))["6"]
    assert f"quantised by ComfyUI as nvfp4 ({len(layers)} layers)" in msg and "\n" not in msg
    with pytest.raises(WeightsError, match=r"as nvfp4 \("):
        load_transformer(str(path))


def test_fp8_scaled_per_row_refused_not_misread(tmp_path, ext, rec):
    """A float8 weight whose scale is per row (a marker saying float8_e4m3fn): multiplying it in as one scale per
    tensor would load other weights; refused, at queue time and at loading."""
    sd, _ = _quantised("float8_e4m3fn_rowwise")
    path = tmp_path / "flux-fp8-rowwise.safetensors"
    save_file(sd, str(path))
    rec.folders = {"diffusion_models": [str(path)]}
    (msg,) = _queue(ext, rec, _graph(checkpoint=path.name))["6"]
    assert "scales its weight per row or block" in msg and "\n" not in msg
    for load in (load_transformer, open_checkpoint):
        with pytest.raises(WeightsError, match="scales its weight per row or block"):
            load(str(path))


def test_unreadable_marker_refused(tmp_path, ext, rec):
    sd, _ = _quantised("float8_e4m3fn")
    key = next(k for k in sd if k.endswith(".comfy_quant"))
    sd[key] = torch.tensor([0xff, 0xfe], dtype=torch.uint8)
    path = tmp_path / "flux-bad-marker.safetensors"
    save_file(sd, str(path))
    rec.folders = {"diffusion_models": [str(path)]}
    (msg,) = _queue(ext, rec, _graph(checkpoint=path.name))["6"]
    assert "as unreadable (1 layer)" in msg
    with pytest.raises(WeightsError, match=r"as unreadable \(1 layer\)"):
        load_transformer(str(path))
