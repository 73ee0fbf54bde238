"""Wire protocol and request checks of the worker-pool runtime, without a pool."""
import json

import pytest
import torch

from comfyui_xdit.errors import XDiTError
from comfyui_xdit_runtime import protocol
from comfyui_xdit_runtime.errors import PoolError
from comfyui_xdit_runtime.executor import build_request
from comfyui_xdit_runtime.protocol import AuthError, ProtocolError, decode, encode
from comfyui_xdit_runtime.security import check_bind_address, is_local_address

TENSORS = {
    "f32": torch.randn(2, 3, 4),
    "f16": torch.randn(5).half(),
    "bf16": torch.randn(3, 2).bfloat16(),
    "f64": torch.randn(1, 1, dtype=torch.float64),
    "i64": torch.arange(-3, 3),
    "i32": torch.tensor([[1, 2], [3, 4]], dtype=torch.int32),
    "u8": torch.arange(10, dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(3.5),
    "empty": torch.zeros(0, 4),
    "strided": torch.randn(4, 6)[:, ::2],
}


def as_bytes(frames):
    return [bytes(f) for f in frames]


@pytest.mark.parametrize("secret", [None, b"s3cret"])
def test_round_trip_every_dtype(secret):
    frames = as_bytes(encode({"type": "sample", "id": "r1", "key": "k"}, TENSORS, secret))
    msg = decode(frames, secret)
    assert msg.type == "sample" and msg.id == "r1" and msg.header["key"] == "k"
    assert list(msg.tensors) == list(TENSORS)
    for name, t in TENSORS.items():
        got = msg.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
        assert got.is_contiguous()


def test_hmac_checks():
    frames = as_bytes(encode({"type": "status", "id": "a"}, {"x": torch.ones(3)}, b"key"))
    with pytest.raises(AuthError):
        decode(frames, b"other")
    tampered = list(frames)
    tampered[1] = bytes(4) + tampered[1][4:]
    with pytest.raises(AuthError):
        decode(tampered, b"key")
    with pytest.raises(AuthError):  # unsigned message to a server with a secret
        decode(as_bytes(encode({"type": "status", "id": "a"})), b"key")


def header(**h):
    return json.dumps({"v": 1, "type": "sample", "id": "q", "tensors": [], **h}).encode()


@pytest.mark.parametrize("frames, text", [
    ([b"\xff{not json"], "not JSON"),
    ([b"[1, 2]"], "not a JSON object"),
    ([header(v=7)], "version"),
    ([header(type="explode")], "unknown message type"),
    ([header(id=5)], "id must be a string"),
    ([header(tensors=[{"name": "x", "dtype": "float32", "shape": [2]}])], "1 tensors but 0 data frames"),
    ([header(), b"extra"], "0 tensors but 1 data frames"),
    ([header(tensors=[{"name": "x", "dtype": "object", "shape": [1]}]), b"12345678"], "not allowed"),
    ([header(tensors=[{"name": "x", "dtype": "float32", "shape": [3]}]), b"12345678"], "expected 12"),
    ([header(tensors=[{"name": "x", "dtype": "float32", "shape": [-1]}]), b""], "bad shape"),
    ([header(tensors=[{"name": "x", "dtype": "uint8", "shape": [2000]}]), bytes(2000)], "exceeds the limit"),
])
def test_malformed_messages_rejected(frames, text):
    with pytest.raises(ProtocolError, match=text) as info:
        decode(frames, None, max_bytes=1000)
    if b"explode" in frames[0] or b"float32" in frames[0]:
        assert info.value.request_id == "q"


def test_bind_policy():
    assert is_local_address("tcp://127.0.0.1:5555") and is_local_address("tcp://[::1]:1")
    assert is_local_address("ipc:///tmp/x.sock") and is_local_address("tcp://localhost:9")
    assert not is_local_address("tcp://0.0.0.0:5555") and not is_local_address("tcp://*:5555")
    assert not is_local_address("tcp://10.1.2.3:5555")
    check_bind_address("tcp://0.0.0.0:5555", b"secret")
    with pytest.raises(PoolError, match="without a shared secret"):
        check_bind_address("tcp://0.0.0.0:5555", None)


def test_request_fields_checked():
    req = build_request({"height": 128, "width": 128, "steps": 2, "cfg": 3, "guidance": None}, {})
    assert req.cfg == 3.0 and isinstance(req.cfg, float) and req.guidance is None
    for bad in ({"height": 128, "width": 128}, {"height": 128, "width": 128, "steps": 2, "colour": 1},
                {"height": "128", "width": 128, "steps": 2}, {"height": 128.5, "width": 128, "steps": 2},
                {"height": 128, "width": 128, "steps": 0}, "nope"):
        with pytest.raises(XDiTError):
            build_request(bad, {})


def test_error_reply_header_round_trip():
    frames = as_bytes(encode(protocol.error(None, "protocol", "bad")))
    msg = decode(frames, allowed_types=protocol.REPLY_TYPES)
    assert msg.type == "error" and msg.id is None and msg.header["kind"] == "protocol"
