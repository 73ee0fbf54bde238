"""Wire protocol, message schema and request checks of the worker-pool runtime, without a pool."""
import json

import msgspec
import pytest
import torch

from comfyui_xdit_runtime import messages, protocol
from comfyui_xdit_runtime.errors import PoolError
from comfyui_xdit_runtime.executor import build_request
from comfyui_xdit_runtime.fanout import OUTCOME_BYTES, fit_outcome
from comfyui_xdit_runtime.messages import Outcome, SampleFields
from comfyui_xdit_runtime.protocol import AuthError, ProtocolError, decode, encode
from comfyui_xdit_runtime.security import ReplayGuard, check_bind_address, is_local_address, read_secret

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
REQUEST = {"height": 128, "width": 128, "steps": 2}


def as_bytes(frames):
    return [bytes(f) for f in frames]


def sample_message(**kw):
    return messages.Sample(id="r1", key="k", request=SampleFields(**REQUEST), **kw)


@pytest.mark.parametrize("secret", [None, b"s3cret"])
def test_round_trip_every_dtype(secret):
    frames = as_bytes(encode(sample_message(), TENSORS, secret))
    msg = decode(frames, secret)
    assert msg.type == "sample" and msg.id == "r1" and msg.header.key == "k"
    assert msg.header.request.steps == 2 and msg.header.parallel.ulysses == 1
    assert list(msg.tensors) == list(TENSORS)
    for name, t in TENSORS.items():
        got = msg.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
        assert got.is_contiguous()


def test_hmac_checks():
    frames = as_bytes(encode(messages.Status(id="a"), {"x": torch.ones(3)}, b"key"))
    with pytest.raises(AuthError):
        decode(frames, b"other")
    tampered = list(frames)
    tampered[1] = bytes(4) + tampered[1][4:]
    with pytest.raises(AuthError):
        decode(tampered, b"key")
    with pytest.raises(AuthError):  # unsigned message to a server with a secret
        decode(as_bytes(encode(messages.Status(id="a"))), b"key")


def header(**h):
    return json.dumps({"v": 2, "type": "sample", "id": "q", "key": "k", "request": REQUEST, **h}).encode()


@pytest.mark.parametrize("frames, text", [
    ([b"\xff{not json"], "not valid JSON"),
    ([b"[1, 2]"], "not a JSON object"),
    ([b"[" * 400_000 + b"]" * 400_000], "not a JSON object"),
    ([header(extra=json.loads("[" * 500 + "]" * 500))], "unknown field `extra`"),
    ([b'{"v": 2, "type": "sample", "id": "q", "x": ' + b"[" * 400_000 + b"]" * 400_000 + b"}"], "nests too deeply"),
    ([header(v=1)], "version"),
    ([header(type="explode")], "unknown message type"),
    ([header(id=5)], "id must be a string"),
    ([header(id="x" * 129)], "id must be a string"),
    ([header(request={**REQUEST, "seed": 2 ** 70})], "request.seed"),
    ([header(request={**REQUEST, "seed": -1})], "request.seed"),
    ([header().replace(b'"steps": 2', b'"steps": 2, "cfg": 1e999')], "request.cfg"),
    ([header().replace(b'"steps": 2', b'"steps": NaN')], "not valid JSON"),
    ([header().replace(b'"steps": 2', b'"steps": Infinity')], "not valid JSON"),
    ([header(request={**REQUEST, "steps": 0})], "request.steps"),
    ([header(request={**REQUEST, "height": "128"})], "request.height"),
    ([header(request={**REQUEST, "colour": 1})], "unknown field `colour`"),
    ([header(parallel={"warp": 2})], "unknown field `warp`"),
    ([header(parallel={"ulysses": 0})], "parallel.ulysses"),
    ([header(key="k" * 9000)], "key"),
    ([header(tensors=[{"name": "x", "dtype": "float32", "shape": [2]}])], "1 tensors but 0 data frames"),
    ([header(), b"extra"], "0 tensors but 1 data frames"),
    ([header(tensors=[{"name": "x", "dtype": "object", "shape": [1]}]), b"12345678"], "dtype"),
    ([header(tensors=[{"name": "x", "dtype": "float32", "shape": [3]}]), b"12345678"], "expected 12"),
    ([header(tensors=[{"name": "x", "dtype": "float32", "shape": [-1]}]), b""], "shape"),
    ([header(tensors=[{"name": "x", "dtype": "uint8", "shape": [30000]}]), bytes(30000)], "exceeds the limit"),
])
def test_malformed_messages_rejected(frames, text):
    with pytest.raises(ProtocolError, match=text) as info:
        decode(frames, None, max_bytes=20000)
    assert "\n" not in str(info.value)
    if frames[0].startswith(b'{"v": 2, "type": "sample", "id": "q", "key"') and "JSON" not in text:
        assert info.value.request_id == "q"  # the error reply reaches the request it answers


def test_replay_guard():
    guard = ReplayGuard(window_s=60)
    guard.check(1000.0, "n" * 16, now=1000.5)
    with pytest.raises(AuthError, match="replayed"):
        guard.check(1000.0, "n" * 16, now=1001.0)
    with pytest.raises(AuthError, match="stale"):
        guard.check(900.0, "m" * 16, now=1000.0)
    with pytest.raises(AuthError, match="timestamp"):
        guard.check(None, None)


def test_bind_policy_and_secret_file(tmp_path, monkeypatch):
    assert is_local_address("tcp://127.0.0.1:5555") and is_local_address("tcp://[::1]:1")
    assert is_local_address("ipc:///tmp/x.sock") and is_local_address("tcp://localhost:9")
    assert not is_local_address("tcp://0.0.0.0:5555") and not is_local_address("tcp://*:5555")
    assert not is_local_address("tcp://10.1.2.3:5555")
    check_bind_address("tcp://0.0.0.0:5555", b"secret")
    with pytest.raises(PoolError, match="without a shared secret"):
        check_bind_address("tcp://0.0.0.0:5555", None)
    (tmp_path / "s").write_text("from-file\n")
    monkeypatch.setenv("XDIT_POOL_SECRET", "from-env")
    assert read_secret(None, str(tmp_path / "s")) == b"from-file"
    assert read_secret(None, None) == b"from-env" and read_secret("given", None) == b"given"
    (tmp_path / "empty").write_text("")
    with pytest.raises(PoolError, match="empty"):
        read_secret(None, str(tmp_path / "empty"))


def test_seed_bounds_in_the_schema():
    assert msgspec.convert({**REQUEST, "seed": (1 << 63) - 1}, SampleFields).seed == (1 << 63) - 1
    with pytest.raises(msgspec.ValidationError, match="seed"):
        msgspec.convert({**REQUEST, "seed": 1 << 63}, SampleFields)


def test_request_from_schema():
    fields = msgspec.convert({**REQUEST, "cfg": 3, "guidance": None, "cache": {"threshold": 0.1}}, SampleFields)
    req = build_request(fields, {})
    assert req.cfg == 3.0 and isinstance(req.cfg, float) and req.guidance is None
    assert req.cache.threshold == 0.1 and req.cache.warmup == 1 and req.shift is None
    assert build_request(msgspec.convert({**REQUEST, "shift": 5}, SampleFields), {}).shift == 5.0  # --shift
    with pytest.raises(msgspec.ValidationError, match="shift"):
        msgspec.convert({**REQUEST, "shift": 0}, SampleFields)


def test_error_reply_round_trip_and_length_cap():
    frames = as_bytes(encode(protocol.error(None, "protocol", "bad " + "é" * 5000)))
    msg = protocol.decode_reply(frames)
    assert msg.type == "error" and msg.id is None and msg.header.kind == "protocol"
    assert len(msg.header.message) <= protocol.MAX_ERROR_CHARS + 3


@pytest.mark.parametrize("text", ["é" * 3000, '"' * 2100, "\x00" * 5000, "x" * 100_000, "😀" * 2000])
def test_outcome_shortened_before_encoding(text):
    """An error text of any length and any characters fits the fixed outcome buffer and stays decodable."""
    outcome = Outcome(ok=False, rank=1, pid=2, kind="invalid", message=f"model path not found: {text}",
                      host="h", rss_bytes=1 << 40)
    raw = fit_outcome(outcome)
    assert len(raw) <= OUTCOME_BYTES
    back = messages.outcome_decoder.decode(raw)
    assert back.kind == "invalid" and back.message.startswith("model path not found: ")
    whole = len(messages.msgpack_encoder.encode(outcome)) <= OUTCOME_BYTES
    assert back.message == outcome.message if whole else (back.message.endswith("...") and len(raw) > 3000)


def test_tensors_in_a_shared_buffer_round_trip_and_refusals():
    """Tensors of SHARED_MIN_BYTES or more lie in the shared buffer (no frame, the spec names the offset); small ones
    and those that no longer fit go as frames; the receiver copies them out and checks every range."""
    from comfyui_xdit_runtime.shared_buffer import SharedBuffer

    buf = SharedBuffer.create(1 << 16, "me")
    try:
        tensors = {"x": torch.randn(2, 16, 10, 10), "t": torch.ones(2), "bf": torch.randn(50, 50).bfloat16(),
                   "big": torch.randn(1 << 14)}  # x, bf fit; t is small; big (64 KiB) no longer fits
        frames = encode(messages.Forward(id="f1", key="k", buffer=buf.token), tensors, b"s", buf.data)
        specs = {s["name"]: s.get("at") for s in json.loads(bytes(frames[0]))["tensors"]}
        assert specs == {"x": 0, "t": None, "bf": 12800, "big": None} and len(frames) == 4  # header, t, big, MAC
        msg = decode(as_bytes(frames), b"s", shared=lambda h: buf.data if h.buffer == buf.token else None)
        for name, t in tensors.items():
            assert msg.tensors[name].dtype == t.dtype and torch.equal(msg.tensors[name], t), name
        buf.data[:8] = bytes(8)  # the decoded tensors are copies: the next message may overwrite the buffer
        assert torch.equal(msg.tensors["x"], tensors["x"])
        with pytest.raises(protocol.BufferMissing, match="shared buffer"):
            decode(as_bytes(frames), b"s")  # a receiver without the buffer (another client's token, the main socket)
        with pytest.raises(protocol.BufferMissing):
            decode(as_bytes(frames), b"s", shared=lambda h: None)
        outside = header(tensors=[{"name": "x", "dtype": "float32", "shape": [100], "at": (1 << 16) - 100}])
        with pytest.raises(ProtocolError, match="outside the shared buffer"):
            decode([outside], shared=lambda h: buf.data)
        with pytest.raises(ProtocolError, match="at"):
            decode([header(tensors=[{"name": "x", "dtype": "float32", "shape": [1], "at": -64}])],
                   shared=lambda h: buf.data)
    finally:
        buf.close()


def test_shared_buffer_maps_only_the_buffer_described():
    """A client maps rank 0's memfd through /proc: the link name, size and token must all match; once rank 0 has
    closed the descriptor it named (at first use), that name opens nothing."""
    import os

    from comfyui_xdit_runtime.shared_buffer import SharedBuffer

    buf = SharedBuffer.create(4096, "me")
    try:
        info = buf.describe()
        mapped = SharedBuffer.attach(**info)
        mapped.data[:5] = b"hello"
        assert bytes(buf.data[:5]) == b"hello"  # one memory
        mapped.close()
        with pytest.raises(ValueError, match="another buffer"):
            SharedBuffer.attach(**{**info, "token": "0" * 32})
        with pytest.raises(ValueError, match="bytes"):
            SharedBuffer.attach(**{**info, "nbytes": 8192})
        r, w = os.pipe()
        try:
            with pytest.raises(ValueError, match="not a pool buffer"):
                SharedBuffer.attach(**{**info, "fd": r})
        finally:
            os.close(r)
            os.close(w)
        buf.close_fd()
        with pytest.raises(OSError):
            SharedBuffer.attach(**info)
    finally:
        buf.close()


def test_sample_fields_carry_the_compile_switch():
    assert build_request(msgspec.convert(REQUEST, SampleFields), {}).compile is False
    assert build_request(msgspec.convert({**REQUEST, "compile": True}, SampleFields), {}).compile is True
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**REQUEST, "compile": "yes"}, SampleFields)
