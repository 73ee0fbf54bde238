"""fp8 weight storage (weight_storage.py): Linear weights kept in float8, upcast per call; equal to the same fp8
weights upcast up front, bit for bit, on every family's tiny model; parameter bytes against bf16."""
import pytest
import torch

from comfyui_xdit.errors import XDiTError
from comfyui_xdit.models import load_model
from comfyui_xdit.sampling import sample
from comfyui_xdit.weight_storage import UpcastLinear, upcast_weights
from tests.cases import build_request

MODELS = ["tiny-flux", "tiny-sd3", "tiny-pixart", "tiny-qwen-image", "tiny-z-image", "tiny-flux2", "tiny-wan",
          "tiny-wan-a14b"]
CASE = dict(height=64, width=80, seed=5, steps=2, cfg=2.0, text_tokens=7)


def _case(model: str) -> dict:
    return {**CASE, "model": model, "frames": 5 if "wan" in model else 1, "cfg": 1.0 if model == "tiny-flux2" else 2.0}


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e5m2"])
@pytest.mark.parametrize("model", MODELS)
def test_fp8_storage_equals_upcast_first(model, weight_dtype):
    case = _case(model)
    stored = load_model(model, dtype="fp32", weight_dtype=weight_dtype)
    converted = [m for m in stored.adapter.model.modules() if isinstance(m, UpcastLinear)]
    storage = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[weight_dtype]
    assert converted and all(m.weight.dtype == storage for m in converted)
    out = sample(stored.adapter, build_request(stored, case), tiny=True)
    reference = load_model(model, dtype="fp32", weight_dtype=weight_dtype)
    upcast_weights(reference.adapter.model)  # the same fp8 values, upcast before sampling
    assert not any(p.dtype.itemsize == 1 for p in reference.adapter.model.parameters())
    expected = sample(reference.adapter, build_request(reference, case), tiny=True)
    assert torch.equal(out, expected)
    full = sample(load_model(model, dtype="fp32").adapter, build_request(stored, case), tiny=True)
    assert not torch.equal(out, full)  # the comparison can fail: fp8 rounding changes the result


def test_fp8_halves_linear_bytes_against_bf16():
    bf16 = load_model("bench-flux", dtype="bf16")
    fp8 = load_model("bench-flux", dtype="bf16", weight_dtype="fp8_e4m3fn")
    whole, narrow = _param_bytes(bf16.adapter.model), _param_bytes(fp8.adapter.model)
    linear = sum(_param_bytes(m) for m in bf16.adapter.model.modules() if type(m) is torch.nn.Linear)
    kept = sum(_param_bytes(m) for m in fp8.adapter.model.modules() if type(m) is torch.nn.Linear)  # embedders
    print(f"bench-flux parameter bytes: bf16 {whole}, fp8_e4m3fn {narrow} ({narrow / whole:.3f}); "
          f"Linear share {linear / whole:.3f}")
    assert whole - narrow == (linear - kept) // 2  # every stored byte halved, the embedders kept
    assert narrow <= 0.52 * whole


def test_unknown_weight_dtype_is_refused():
    with pytest.raises(XDiTError, match="unknown weight_dtype 'fp4'"):
        load_model("tiny-flux", weight_dtype="fp4")
