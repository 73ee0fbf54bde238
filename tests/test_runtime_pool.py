"""End to end: a real 2-rank CPU/gloo pool on loopback, tiny models, small sizes.

One pool (with a shared secret, so every message is HMAC-checked) serves the whole module; the test that kills
a rank runs last and leaves a restarted pool behind."""
import json
import os
import signal
import threading
import time

import pytest
import torch
import zmq

from comfyui_xdit.models import load_model
from comfyui_xdit.sampling import SampleRequest, sample
from comfyui_xdit_runtime import JobCancelled, Pool, PoolError
from comfyui_xdit_runtime import protocol
from comfyui_xdit_runtime.launcher import _pid_alive

SECRET = b"test-secret"
MAX_BYTES = 8 << 20
REQ = {"height": 128, "width": 128, "steps": 3}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    p = Pool(2, secret=SECRET, max_message_bytes=MAX_BYTES, env={"XDIT_RUNTIME_TEST_HOOKS": "1"},
             log_path=tmp_path_factory.mktemp("pool") / "pool.log", heartbeat=1.0)
    p.start()
    yield p
    pids = p.rank_pids
    p.stop()
    assert not p.is_alive() and not any(_pid_alive(pid) for pid in pids)


@pytest.fixture(scope="module")
def client(pool):
    c = pool.client()
    yield c
    c.close()


@pytest.fixture(scope="module")
def flux_key(client):
    return client.load_model("tiny-flux")


_refs = {}


def reference(model: str, **fields) -> torch.Tensor:
    if model not in _refs:
        _refs[model] = load_model(model)
    loaded = _refs[model]
    return sample(loaded.adapter, SampleRequest(**{**REQ, **fields}), tiny=loaded.tiny)


def test_load_cached_then_sample_matches_in_process(client):
    first = client.load("tiny-flux")
    again = client.load("tiny-flux")
    assert again["key"] == first["key"] and again["cached"] and again["seconds"] == 0.0
    key = first["key"]
    steps = []
    out = client.sample(key, {**REQ, "seed": 7}, on_progress=steps.append, preview=True)
    assert torch.equal(out, reference("tiny-flux", seed=7))
    assert [s.step for s in steps] == [1, 2, 3] and steps[-1].total == 3
    assert steps[0].preview is not None and steps[0].preview.shape == (1, 16, 16, 16)
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    out = client.sample(key, {**REQ, "seed": 8, "cfg": 2.0}, {"noise": noise})
    assert torch.allclose(out, reference("tiny-flux", seed=8, cfg=2.0, inputs={"noise": noise}), atol=1e-6)
    status = client.status(refresh=True)
    assert status["healthy"] and status["world_size"] == 2 and status["queue_length"] == 0
    assert key in [m["key"] for m in status["models"]]
    assert all(r["rss_bytes"] > 0 and r["age_s"] < 5 for r in status["ranks"])


def test_unload_and_second_model(client):
    key = client.load_model("tiny-pixart")
    out = client.sample(key, {**REQ, "seed": 1, "batch_size": 2})
    assert torch.equal(out, reference("tiny-pixart", seed=1, batch_size=2))
    assert client.unload(key) and not client.unload(key)
    with pytest.raises(PoolError, match="not loaded"):
        client.sample("tiny-sd3|auto|fp32", REQ)


def test_two_clients_at_once(pool, client, flux_key):
    other = pool.client()
    results, errors = {}, []

    def run(c, seed):
        try:
            results[seed] = c.sample(flux_key, {**REQ, "seed": seed})
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    # `client` is shared by two threads (one socket each), `other` is a second client
    threads = [threading.Thread(target=run, args=(c, s)) for c, s in ((client, 11), (client, 12), (other, 13))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    other.close()
    assert not errors, errors
    for seed in (11, 12, 13):
        assert torch.equal(results[seed], reference("tiny-flux", seed=seed)), seed


def test_cancel_running_and_queued_then_success(client, flux_key):
    seen = []
    rid = client.new_request_id()

    def on_progress(p):
        seen.append(p.step)
        if p.step == 2:
            assert client.cancel(rid) == "running"  # re-entrant: issued from inside the job's own wait

    with pytest.raises(JobCancelled):
        client.sample(flux_key, {**REQ, "steps": 50}, on_progress=on_progress, request_id=rid)
    assert max(seen) < 50

    # a queued job: cancelled from another thread before it starts
    long_id, queued_id, outcome = client.new_request_id(), client.new_request_id(), {}

    def run(name, rid, steps):
        try:
            client.sample(flux_key, {**REQ, "steps": steps}, request_id=rid)
            outcome[name] = "done"
        except JobCancelled:
            outcome[name] = "cancelled"

    t1 = threading.Thread(target=run, args=("long", long_id, 60))
    t1.start()
    deadline = time.monotonic() + 30
    while client.status()["running"] != long_id and time.monotonic() < deadline:
        time.sleep(0.02)
    t2 = threading.Thread(target=run, args=("queued", queued_id, 3))
    t2.start()
    while client.status()["queue_length"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.cancel(queued_id) == "queued"
    t1.join(60), t2.join(60)
    assert outcome == {"long": "done", "queued": "cancelled"}
    assert client.cancel("no-such-job") == "unknown"
    assert torch.equal(client.sample(flux_key, {**REQ, "seed": 5}), reference("tiny-flux", seed=5))


def test_failing_jobs_report_and_pool_stays_up(client, flux_key):
    with pytest.raises(PoolError, match="divisible|multiple") as info:  # engine validation, identical on all ranks
        client.sample(flux_key, {**REQ, "height": 120})
    assert info.value.kind == "invalid"
    with pytest.raises(PoolError, match="injected failure at step 2") as info:  # one rank fails mid-job
        client.sample(flux_key, REQ, debug={"raise_on_rank": 1, "at_step": 2})
    assert info.value.rank == 1 and info.value.kind == "internal"
    with pytest.raises(PoolError, match="multiply to 4"):
        client.sample(flux_key, REQ, parallel={"ulysses": 4})
    with pytest.raises(PoolError, match="unknown parallel"):
        client.sample(flux_key, REQ, parallel={"warp": 2})
    assert torch.equal(client.sample(flux_key, {**REQ, "seed": 2}), reference("tiny-flux", seed=2))


def test_real_parallel_config(client, flux_key):
    out = client.sample(flux_key, {**REQ, "seed": 4}, parallel={"ulysses": 2})
    ref = reference("tiny-flux", seed=4)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def raw_request(sock, frames, secret=SECRET, wait_ms=3000):
    frames = [bytes(f) for f in frames]
    if secret is not None:
        frames.append(protocol._mac(secret, frames))
    sock.send_multipart(frames)
    if not sock.poll(wait_ms):
        return None
    return protocol.decode(sock.recv_multipart(), SECRET, allowed_types=protocol.REPLY_TYPES).header


def test_malformed_messages_and_bad_hmac(pool, client):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pool.address)
    try:
        def head(**h):
            return json.dumps({"v": 1, "type": "sample", "id": "m1", "key": "k", "tensors": [], **h}).encode()

        spec = [{"name": "noise", "dtype": "float32", "shape": [4]}]
        cases = [
            ([b"garbage \x00\xff"], None),
            ([head(v=2)], "m1"),
            ([head(type="format_disk")], "m1"),
            ([head(tensors=spec)], "m1"),                                          # frame missing
            ([head(tensors=[{**spec[0], "dtype": "complex64"}]), bytes(16)], "m1"),  # dtype not allowed
            ([head(tensors=spec), bytes(15)], "m1"),                               # size mismatch
            ([head(tensors=[{**spec[0], "shape": [MAX_BYTES // 4 + 16]}]), bytes(MAX_BYTES + 64)], "m1"),  # oversize
            ([json.dumps({"v": 1, "type": "load_model", "id": "m2", "source": 5}).encode()], "m2"),
        ]
        for frames, rid in cases:
            reply = raw_request(sock, frames)
            assert reply is not None and reply["type"] == "error" and reply["id"] == rid, (frames[0][:60], reply)
            assert reply["kind"] == "protocol"
        status_frames = [json.dumps({"v": 1, "type": "status", "id": "s"}).encode()]
        assert raw_request(sock, status_frames, secret=b"wrong", wait_ms=1000) is None  # dropped, no reply
        assert raw_request(sock, status_frames, secret=None, wait_ms=1000) is None      # unsigned: dropped
        assert raw_request(sock, status_frames)["type"] == "result"
    finally:
        sock.close()
    assert client.status()["healthy"]


def test_refuses_public_bind_without_secret():
    with pytest.raises(PoolError, match="without a shared secret"):
        Pool(2, address="tcp://0.0.0.0:5599").start()


def test_killed_rank_is_detected_and_pool_restarts(pool, client, flux_key):
    """Runs last: kills rank 1 mid-job, then the next request restarts the pool (and reloads the model)."""
    old = pool.generation
    pids = [r["pid"] for r in client.status()["ranks"]]

    def kill_rank1(p):
        if p.step == 1:
            os.kill(pids[1], signal.SIGKILL)

    start = time.monotonic()
    with pytest.raises(PoolError, match="pool") as info:
        client.sample(flux_key, {**REQ, "steps": 200}, on_progress=kill_rank1)
    print(f"mid-job death reported after {time.monotonic() - start:.2f} s: {str(info.value)[:300]}")
    assert time.monotonic() - start < 15
    deadline = time.monotonic() + 10
    while pool.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pool.is_alive()

    out = client.sample(flux_key, {**REQ, "seed": 9})  # restarts the pool, loads tiny-flux again
    assert torch.equal(out, reference("tiny-flux", seed=9))
    assert pool.generation == old + 1
    new_pids = [r["pid"] for r in client.status()["ranks"]]
    assert set(new_pids).isdisjoint(pids) and not any(_pid_alive(p) for p in pids)
