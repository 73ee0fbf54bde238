"""The forward wire op (Parallel DiT Model): message schema, the conditioning cache, and a real 2-rank CPU pool
whose forward equals the in-process model call for every exact method (relative L2 <= 1e-5 across processes)."""
import contextlib
import json
import threading

import pytest
import torch

from comfyui_xdit.errors import XDiTError
from comfyui_xdit.models import load_model
from comfyui_xdit_runtime import Pool, PoolError, protocol
from comfyui_xdit_runtime import messages
from comfyui_xdit_runtime.cond_cache import CondCache, CondMissing, content_hash
from tests.conftest import rel_l2

SECRET = b"forward-secret"


def test_forward_message_round_trip_and_refusals():
    h = messages.Forward(id="f1", key="tiny-flux|auto|fp32", conds={"cond": "0" * 32}, guidance=3.5)
    x = torch.randn(2, 16, 4, 4)
    frames = protocol.encode(h, {"x": x, "timestep": torch.ones(2)}, SECRET)
    msg = protocol.decode(frames, SECRET)
    assert msg.type == "forward" and msg.header.conds == {"cond": "0" * 32} and torch.equal(msg.tensors["x"], x)
    bad = messages.Forward(id="f2", key="k", conds={"cond": "not-a-hash"})
    with pytest.raises(protocol.ProtocolError, match="conds"):
        protocol.decode(protocol.encode(bad))


def test_cond_cache_lru_and_hash_check():
    a, b, c = (torch.full((1, 4, 8), float(i)) for i in range(3))
    cache = CondCache(max_bytes=2 * a.numel() * 4)
    for t in (a, b):
        cache.put(content_hash(t), t)
    cache.get(content_hash(a))  # a is now the most recent: b goes first
    cache.put(content_hash(c), c)
    assert content_hash(a) in cache and content_hash(c) in cache and content_hash(b) not in cache
    with pytest.raises(CondMissing):
        cache.get(content_hash(b))
    with pytest.raises(XDiTError, match="does not match"):
        cache.put(content_hash(a), b)
    assert content_hash(a) != content_hash(a.double()) and content_hash(a) != content_hash(a.reshape(1, 8, 4))


def test_cond_cache_copies_a_runs_conditioning_to_the_device_once():
    """A forward's conditioning on the rank's device: the last call's device copies are kept (a GPU rank copies a
    run's conditioning once, not on every call) and dropped once a call names other digests; on the CPU the held
    tensor itself. The meta device stands in for a GPU (a copy there is a new tensor)."""
    a, b = torch.zeros(1, 4, 8), torch.ones(1, 4, 8)
    da, db = content_hash(a), content_hash(b)
    cache = CondCache()
    cache.put(da, a)
    cache.put(db, b)
    meta = torch.device("meta")
    first = cache.on_device({"cond": da, "pooled": db}, meta)
    assert first["cond"].device == meta and first["cond"] is not a
    again = cache.on_device({"cond": da, "pooled": db}, meta)
    assert again["cond"] is first["cond"] and again["pooled"] is first["pooled"]
    other = cache.on_device({"cond": db}, meta)  # the next run: a's device copy is dropped, b's kept
    assert other["cond"] is first["pooled"] and cache.on_device({"cond": da}, meta)["cond"] is not first["cond"]
    assert cache.on_device({"cond": da}, torch.device("cpu"))["cond"] is a
    with pytest.raises(CondMissing):
        cache.on_device({"cond": content_hash(torch.ones(2))}, meta)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    p = Pool(2, secret=SECRET, env={"XDIT_RUNTIME_TEST_HOOKS": "1", "XDIT_POOL_MAX_BUFFERS": "4"},
             log_path=tmp_path_factory.mktemp("fwd") / "p.log")
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def client(pool):
    c = pool.client()
    yield c
    c.close()


def _inputs(family_model: str, b: int, seed: int = 0, hw: tuple[int, int] = (6, 10)):
    loaded = load_model(family_model)
    a = loaded.adapter
    g = torch.Generator().manual_seed(seed)
    shape = (b, a.latent_channels, *((3,) if a.latent.dims == 3 else ()), *hw)  # 6x10: 15 tokens, not divisible by 2
    x = torch.randn(shape, generator=g)
    c = a.random_conditioning(b, 7, g)
    t = torch.tensor([700.0, 300.0, 500.0, 100.0][:b])
    conds = {"cond": c.cond}
    if c.pooled is not None:
        conds["pooled"] = c.pooled
    if c.mask is not None:
        conds["cond_mask"] = c.mask
    with torch.no_grad():
        ref = a.predict(x, t, c).float()
    return conds, x, t, ref


def _expected_bytes(model: str, degrees: dict, x: torch.Tensor) -> dict[str, int]:
    """What rank 0 of 2 sends in one forward, worked out by hand from the model's shape (4 heads x 16 dims, fp32):
    cfg/dp send rank 0's rows of the output; Ulysses sends 3/4 of Q, K, V of its tokens' other half of the heads and
    the output of the other rank's tokens for its half (each rank holds half the tokens); Ring sends its K and V once
    round (one hop at degree 2); both gather rank 0's image tokens of the output."""
    if not degrees:
        return {}
    (kind, degree), = degrees.items()
    assert degree == 2
    b, row = x.shape[0], x[0].numel() * 4
    if kind in ("cfg", "dp"):
        return {"cfg" if kind == "cfg" else "dp_gather": (b + 1) // 2 * row}
    assert model == "tiny-flux"  # 2 joint + 2 single blocks, 15 image tokens (8 | 7 on the ranks) + 7 text (4 | 3)
    layers, heads, dim, mine, theirs = 4, 4, 16, 8 + 4, 7 + 3
    per_token = b * heads * dim * 4
    sent = {"ulysses": layers * (3 * mine + theirs) * per_token // 2} if kind == "ulysses" else \
        {"ring": layers * 2 * mine * per_token}
    sent["gather"] = b * 8 * row // 15  # rank 0's 8 of the 15 image tokens of each row
    return sent


@pytest.mark.parametrize("model, degrees, batch", [
    ("tiny-flux", {"ulysses": 2}, 1), ("tiny-flux", {"ring": 2}, 2), ("tiny-sd3", {"cfg": 2}, 2),
    ("tiny-sd3", {"cfg": 2}, 3), ("tiny-pixart", {"dp": 2}, 3), ("tiny-pixart", {"cfg": 2}, 1),
    ("tiny-flux", {}, 2)])
def test_pool_forward_matches_in_process(client, model, degrees, batch):
    key = client.load_model(model)
    conds, x, t, ref = _inputs(model, batch)
    out, info = client.forward_with_info(key, x, t, conds, parallel=degrees)
    assert out.shape == ref.shape
    err = rel_l2(out, ref)
    print(f"{model} {degrees} batch {batch}: rel L2 {err:.2e}; rank 0 sent {info.get('comm')}")
    assert err <= 1e-5, err
    assert info.get("comm", {}) == _expected_bytes(model, degrees, x)  # the call really ran in parallel
    other = client.forward(key, x, t.flip(0) + 1.0, conds, parallel=degrees)  # the check can fail
    assert rel_l2(other, ref) > 1e-4


def test_skip_layer_forward_over_the_pool(client):
    """SkipLayerGuidance's call: the named blocks pass their streams through on every rank (Ulysses 2, CFG 2), as
    in one process; a kind the model cannot skip is one line and the pool stays up."""
    from comfyui_xdit.parallel.forward import forward_call

    key = client.load_model("tiny-flux")
    conds, x, t, ref = _inputs("tiny-flux", 2)
    skip = {"double_block": [1], "single_block": [0]}
    from comfyui_xdit.adapters import Conditioning

    c = Conditioning(conds["cond"], conds["pooled"])
    expected = forward_call(load_model("tiny-flux").adapter, x, t, c, skip=skip)
    assert rel_l2(expected, ref) > 1e-3
    for degrees in ({"ulysses": 2}, {"cfg": 2}):
        out = client.forward(key, x, t, conds, parallel=degrees, skip_blocks=skip)
        assert rel_l2(out, expected) <= 1e-5, degrees
    with pytest.raises(PoolError, match=r"cannot skip double_block 5: the model has 2 \(transformer_blocks\)"):
        client.forward(key, x, t, conds, parallel={"ulysses": 2}, skip_blocks={"double_block": [5]})
    assert rel_l2(client.forward(key, x, t, conds, parallel={"ulysses": 2}), ref) <= 1e-5  # next call: no skip


@pytest.mark.parametrize("model", ["tiny-wan", "tiny-qwen-image"])
def test_skip_layer_forward_where_the_first_block_splits_the_tokens(client, model):
    """Wan and Qwen-Image (ComfyUI's "double_block" i is their block i): skipping block 0, where Wan's plan splits
    the video tokens over the Ulysses ranks (its input hook needs the block's calling convention while the block is
    a pass-through), equals the call in one process."""
    from comfyui_xdit.adapters import Conditioning
    from comfyui_xdit.parallel.forward import forward_call

    key = client.load_model(model)
    conds, x, t, ref = _inputs(model, 2, hw=(6, 10))
    c = Conditioning(conds["cond"], conds.get("pooled"), conds.get("cond_mask"))
    skip = {"double_block": [0]}
    expected = forward_call(load_model(model).adapter, x, t, c, skip=skip)
    assert rel_l2(expected, ref) > 1e-3  # the skip changes the output
    for degrees in ({"ulysses": 2}, {"ring": 2}, {"cfg": 2}):
        out = client.forward(key, x, t, conds, parallel=degrees, skip_blocks=skip)
        assert rel_l2(out, expected) <= 1e-5, degrees


@contextlib.contextmanager
def forward_sends(client, record):
    """Calls record(state, tensors, sock) for each forward the client sends."""
    real = client._send

    def spy(state, header, tensors=None, sock=None, buffer=None):
        if isinstance(header, messages.Forward):
            record(state, tensors, sock)
        return real(state, header, tensors, sock, buffer)

    client._send = spy
    try:
        yield
    finally:
        client._send = real


def test_conditioning_uploaded_once_and_resent_when_missing(client, pool):
    key = client.load_model("tiny-flux")
    conds, x, t, ref = _inputs("tiny-flux", 1, seed=5)
    sent = []
    with forward_sends(client, lambda state, tensors, sock: sent.append(sorted(tensors))):
        for _ in range(3):
            assert rel_l2(client.forward(key, x, t, conds), ref) <= 1e-5
        assert [len(s) for s in sent] == [4, 2, 2]  # x, timestep and the two uploads; then x, timestep only
        client._uploaded.clear()
        client._uploaded[content_hash(torch.zeros(1))] = None  # believes the wrong thing: nothing lost either way
        sent.clear()
        # a hash the pool never saw: the client thinks it is there, the pool answers cond_missing, it resends
        client._uploaded.update({d: None for d in (content_hash(conds["cond"] + 1),)})
        bumped = {**conds, "cond": conds["cond"] + 1}
        client.forward(key, x, t, bumped)
        assert len(sent) == 2 and len(sent[0]) == 3 and len(sent[1]) == 4


def test_forwards_take_the_direct_socket_and_the_address_serves_them_too(client, pool):
    """A local client sends forwards to rank 0's direct socket (no accepted reply); one told not to, or one whose
    pool names none, sends them to the pool's address. Both give the in-process result; the checks can fail."""
    key = client.load_model("tiny-sd3")
    conds, x, t, ref = _inputs("tiny-sd3", 2, seed=3)
    via = []
    with forward_sends(client, lambda state, tensors, sock: via.append(sock is not None and sock is state.direct)):
        assert rel_l2(client.forward(key, x, t, conds, parallel={"cfg": 2}), ref) <= 1e-5
    assert via == [True]
    plain = pool.client()
    plain.direct = False
    try:
        assert rel_l2(plain.forward(key, x, t, conds, parallel={"cfg": 2}), ref) <= 1e-5
        assert rel_l2(plain.forward(key, x, t.flip(0) + 1.0, conds), ref) > 1e-4
        assert plain._local.state.direct is None
        assert client.status()["running"] is None and client.status()["healthy"]
    finally:
        plain.close()


@contextlib.contextmanager
def encoded(monkeypatch):
    """The headers (JSON) and frame counts of the forwards this process encodes (the client's side)."""
    real, seen = protocol.encode, []

    def spy(header, tensors=None, secret=None, shared=None):
        frames = real(header, tensors, secret, shared)
        if isinstance(header, messages.Forward):
            seen.append((json.loads(bytes(frames[0])), len(frames)))
        return frames

    monkeypatch.setattr(protocol, "encode", spy)
    yield seen
    monkeypatch.setattr(protocol, "encode", real)


def test_forward_tensors_cross_in_a_shared_buffer(client, pool, monkeypatch):
    """On the direct socket the latents and the result lie in the thread's shared buffer (the header lists them at an
    offset, no frame comes); the result equals the in-process one."""
    key = client.load_model("tiny-sd3")
    conds, x, t, ref = _inputs("tiny-sd3", 2, seed=4, hw=(12, 20))
    with encoded(monkeypatch) as seen:
        first = client.forward(key, x, t, conds, parallel={"cfg": 2})
        other = client.forward(key, x, t.flip(0) + 1.0, conds, parallel={"cfg": 2})
    buffer = client._local.state.buffer
    assert buffer is not None and [h["buffer"] for h, _ in seen] == [buffer.token] * 2
    assert {s["name"]: s.get("at") for s in seen[1][0]["tensors"]} == {"x": 0, "timestep": None}
    assert seen[1][1] == 3  # header, timestep, MAC: x came through no socket
    assert rel_l2(first, ref) <= 1e-5 and rel_l2(other, ref) > 1e-4  # the check can fail
    held = torch.frombuffer(bytearray(buffer.data[:other.numel() * 4]), dtype=torch.float32).view(other.shape)
    assert torch.equal(held, other)  # the result came back in the buffer


def test_shared_buffer_fallbacks_give_the_same_result(client, pool, monkeypatch):
    """A client that cannot map the buffer (another user or pid namespace) sends frames; a buffer evicted by other
    clients' buffers is refused, that forward sent in frames and the next one given a new buffer; larger latents get a
    larger buffer. Every result equals the in-process one."""
    from comfyui_xdit_runtime import client as client_module

    key = client.load_model("tiny-sd3")
    conds, x, t, ref = _inputs("tiny-sd3", 2, seed=6, hw=(12, 20))

    def refuse(**info):
        raise PermissionError(13, "Permission denied", f"/proc/{info['pid']}/fd/{info['fd']}")

    unmapped = pool.client()
    try:
        with monkeypatch.context() as m:
            m.setattr(client_module.SharedBuffer, "attach", refuse)
            with encoded(m) as seen:
                assert rel_l2(unmapped.forward(key, x, t, conds), ref) <= 1e-5
                assert rel_l2(unmapped.forward(key, x, t, conds), ref) <= 1e-5
        state = unmapped._local.state
        assert state.buffer is None and state.buffer_failed and state.direct is not None
        assert [h.get("buffer") for h, _ in seen] == [None, None] and seen[1][1] == 4  # header, x, timestep, MAC
    finally:
        unmapped.close()
    assert rel_l2(client.forward(key, x, t, conds), ref) <= 1e-5
    token = client._local.state.buffer.token
    others = [pool.client() for _ in range(4)]  # four buffers more: the pool keeps 4 (its MAX_BUFFERS), the oldest goes
    try:
        for other in others:
            assert rel_l2(other.forward(key, x, t, conds), ref) <= 1e-5
    finally:
        for other in others:
            other.close()
    with encoded(monkeypatch) as seen:
        assert rel_l2(client.forward(key, x, t, conds), ref) <= 1e-5  # refused, then sent in frames
        assert rel_l2(client.forward(key, x, t, conds), ref) <= 1e-5  # in a new buffer
    assert [h.get("buffer") for h, _ in seen] == [token, None, client._local.state.buffer.token] != [token] * 3
    bconds, big, tb, bigref = _inputs("tiny-sd3", 2, seed=7, hw=(128, 80))  # 1.25 MiB of latents
    small = client._local.state.buffer.nbytes
    assert rel_l2(client.forward(key, big, tb, bconds), bigref) <= 1e-5
    assert client._local.state.buffer.nbytes > small >= 1 << 20
    token, results = client._local.state.buffer.token, []
    worker = threading.Thread(target=lambda: results.append(client.forward(key, x, t, conds)))  # its own buffer
    worker.start()
    worker.join(120)
    with encoded(monkeypatch) as seen:
        assert rel_l2(client.forward(key, big, tb, bconds), bigref) <= 1e-5
    assert rel_l2(results[0], ref) <= 1e-5 and [h["buffer"] for h, _ in seen] == [token]  # this thread's is kept


def test_failed_forward_is_one_error_and_the_pool_stays_up(client):
    key = client.load_model("tiny-flux")
    conds, x, t, ref = _inputs("tiny-flux", 1)
    with pytest.raises(PoolError, match="injected failure"):
        client.forward(key, x, t, conds, debug={"raise_on_rank": 1})
    with pytest.raises(PoolError, match="PipeFusion needs the whole sampling loop"):
        client.forward(key, x, t, conds, parallel={"pipefusion": 2})
    with pytest.raises(PoolError, match="timestep must have one value per sample"):
        client.forward(key, x, t[:0], conds)
    assert rel_l2(client.forward(key, x, t, conds, parallel={"ulysses": 2}), ref) <= 1e-5


def test_one_rank_pool_forward_failure_cancel_and_status(tmp_path):
    """A 1-rank pool sends no op broadcast and gathers no outcomes: its forwards, failures, cancels and status
    figures still behave as on a larger pool."""
    from comfyui_xdit_runtime import JobCancelled

    p = Pool(1, secret=SECRET, env={"XDIT_RUNTIME_TEST_HOOKS": "1"}, log_path=tmp_path / "p.log")
    p.start()
    c = p.client()
    try:
        key = c.load_model("tiny-sd3")
        conds, x, t, ref = _inputs("tiny-sd3", 2)
        assert rel_l2(c.forward(key, x, t, conds), ref) <= 1e-5
        assert rel_l2(c.forward(key, x, t.flip(0) + 1.0, conds), ref) > 1e-4  # the check can fail
        with pytest.raises(PoolError, match="injected failure"):
            c.forward(key, x, t, conds, debug={"raise_on_rank": 0})
        with pytest.raises(PoolError, match="the parallel degrees multiply to 2"):
            c.forward(key, x, t, conds, parallel={"cfg": 2})
        rid, seen = c.new_request_id(), []

        def on_progress(msg):
            seen.append(msg.step)
            if msg.step == 2:
                assert c.cancel(rid) == "running"

        with pytest.raises(JobCancelled):  # steps of a few ms: enough of them that step 2's cancel finds it running
            c.sample(key, {"height": 64, "width": 64, "steps": 1000}, on_progress=on_progress, request_id=rid)
        assert 2 <= max(seen) < 1000
        status = c.status(refresh=True)
        assert status["world_size"] == 1 and status["ranks"][0]["rss_bytes"] > 0 and status["queue_length"] == 0
        assert rel_l2(c.forward(key, x, t, conds), ref) <= 1e-5  # still serving
    finally:
        c.close()
        p.stop()


def test_four_rank_forward_with_fewer_rows_than_the_cfg_and_dp_groups(tmp_path):
    """ComfyUI sends cond and uncond as separate one-row forwards whenever it cannot batch them (texts of other
    lengths, reference latents, cfg 1). At Ulysses 2 x CFG 2 (or x DP 2) one sequence-parallel group then has no row:
    it must still take part in the group-wide agreement on the attention processors (it used to wait in it until
    the gloo timeout). Batches of 1 and 3 on 4 ranks equal the in-process call, and data crossed the ranks."""
    p = Pool(4, secret=SECRET, log_path=tmp_path / "p4.log", pg_timeout=60)
    p.start()
    try:
        c = p.client()
        key = c.load_model("tiny-flux")
        for degrees in ({"ulysses": 2, "cfg": 2}, {"ring": 2, "dp": 2}):
            for batch in (1, 3):
                conds, x, t, ref = _inputs("tiny-flux", batch)
                out, info = c.forward_with_info(key, x, t, conds, parallel=degrees)
                assert rel_l2(out, ref) <= 1e-5, (degrees, batch)
                sp_kind = "ulysses" if "ulysses" in degrees else "ring"
                assert info["comm"].get(sp_kind, 0) > 0, (degrees, batch, info["comm"])
        c.close()
    finally:
        p.stop()


def test_pool_probes_the_planner_constants_at_start(client):
    """Every pool measures the planner's constants on its ranks when it starts (comfyui_xdit.probe): the status
    reply carries them for the auto layout (nodes/auto_layout.py)."""
    from comfyui_xdit.planner import DeviceKind

    kind = DeviceKind(**client.status()["probe"])
    assert kind.name == "CPU (probed)" and kind.source.startswith("probe on 2 rank(s)")
    assert kind.matmul_flops > 1e8 and kind.pcie_link > 1e6 and kind.latency_s > 0
