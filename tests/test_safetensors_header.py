"""The one safetensors header reader (comfyui_xdit/safetensors_header.py) against the safetensors library, and the
same reason reaching loading (frugal), the nodes (geometry) and LoRA checks."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_xdit.errors import WeightsError
from comfyui_xdit.frugal import _header
from comfyui_xdit.safetensors_header import SAFETENSORS_DTYPES, HeaderError, read_header


@pytest.fixture
def file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.ones(7, dtype=torch.int64),
               "c": torch.zeros(2, 1, 4)}, str(path), metadata={"format": "pt"})
    return path


def test_header_is_what_the_safetensors_library_reads(file):
    header = read_header(file)
    with safe_open(str(file), "pt") as f:
        assert header.shapes() == {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert {k: SAFETENSORS_DTYPES[t.dtype] for k, t in header.tensors.items()} == \
            {k: f.get_tensor(k).dtype for k in f.keys()}
        assert header.metadata == f.metadata()
    assert header.described_bytes == header.file_bytes == file.stat().st_size


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b[:5], "too short for a safetensors header"),
    (lambda b: (10 ** 9).to_bytes(8, "little") + b[8:], r"header length \(1000000000 bytes\) exceeds the file"),
    (lambda b: b[:8] + b"{" * (len(b) - 8), "its header is not valid JSON"),
])
def test_damage_is_one_reason_for_loading_and_nodes(file, damage, reason):
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(HeaderError, match=reason):
        read_header(file)
    with pytest.raises(WeightsError, match=f"truncated or corrupt, not a readable safetensors file .*{reason}"):
        _header(file)


def test_truncated_data_is_seen_by_both_callers(file, ext):
    data = file.read_bytes()
    file.write_bytes(data[:-4])
    header = read_header(file)
    assert header.described_bytes == len(data) and header.file_bytes == len(data) - 4
    with pytest.raises(WeightsError, match="ends past the end of the file"):
        _header(file)
    geo = ext.nodes.geometry
    with pytest.raises(geo.CheckpointError, match=f"the header describes {len(data)} bytes, the file has"):
        geo.tensor_shapes(file)
