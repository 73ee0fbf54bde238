"""A pool over two "nodes" on one machine: two torchrun invocations (`Pool(nnodes=2, node_rank=0|1)`, what
`serve --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT` runs) over a loopback rendezvous, one rank each. Rank 0
serves; jobs equal serial (rel. L2 <= 1e-4, fp32, across processes), a PipeFusion model loaded for its degrees
reads half the blocks on each node, and other degrees are refused for it."""
from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file

from comfyui_xdit.models import load_model
from comfyui_xdit.sampling import SampleRequest, sample
from comfyui_xdit_runtime import Pool, PoolError
from comfyui_xdit_runtime.launcher import free_port
from comfyui_xdit_runtime.security import check_rendezvous
from tests.conftest import rel_l2

from .test_weights import flux_to_bfl, make_flux

REQ = {"height": 80, "width": 48, "steps": 3, "seed": 5}  # 15 image tokens: uneven on 2 ranks


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nodes")
    endpoint, address = f"127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    second = Pool(1, address, nnodes=2, node_rank=1, rdzv_endpoint=endpoint, log_path=tmp / "node1.log")
    first = Pool(1, address, nnodes=2, node_rank=0, rdzv_endpoint=endpoint, log_path=tmp / "node0.log",
                 startup_timeout=120)
    second.start()  # returns at once: node 1 only runs its rank
    try:
        first.start()  # returns when rank 0 answers: both nodes joined
        yield first, second, tmp
    finally:
        first.stop()
        done = threading.Event()
        threading.Thread(target=lambda: (second.wait(), done.set()), daemon=True).start()
        done.wait(15)  # node 1's ranks end with the shutdown of the pool
        second.stop()


def test_two_nodes_serve_jobs_equal_to_serial(nodes):
    first, _, tmp = nodes
    path = tmp / "flux.safetensors"
    save_file({k: v.contiguous() for k, v in flux_to_bfl(make_flux()).items()}, str(path))
    ref = load_model(str(path))
    client = first.client()
    try:
        status = client.status()
        assert status["world_size"] == 2 and len({r["pid"] for r in status["ranks"]}) == 2

        g = torch.Generator().manual_seed(0)
        inputs = {"cond": torch.randn(1, 7, 4096, generator=g), "pooled": torch.randn(1, 768, generator=g)}
        key = client.load_model(str(path))
        serial = sample(ref.adapter, SampleRequest(**REQ, inputs=inputs))
        out = client.sample(key, REQ, inputs, parallel={"ulysses": 2})
        assert rel_l2(out, serial) <= 1e-4
        perturbed = sample(ref.adapter, SampleRequest(**{**REQ, "seed": 6}, inputs=inputs))
        assert rel_l2(perturbed, serial) > 1e-2  # the comparison can fail

        # PipeFusion over the two nodes, loaded for its degrees: each node reads its stage only
        degrees = {"pipefusion": 2, "num_patches": 2, "warmup_steps": REQ["steps"]}  # synchronous: exact
        info = client.load(str(path), parallel=degrees)
        ranks = {r["rank"]: r for r in info["ranks"]}
        assert info["key"] != key and set(ranks) == {0, 1}
        total = ranks[0]["checkpoint_bytes"]
        assert all(r["frugal"] and r["read_bytes"] < total for r in ranks.values())
        assert all(r["peak_rss_bytes"] > 0 for r in ranks.values())
        out = client.sample(info["key"], REQ, inputs, parallel=degrees)
        assert rel_l2(out, serial) <= 1e-4
        with pytest.raises(PoolError, match="loaded for pipefusion 2"):
            client.sample(info["key"], REQ, inputs, parallel={"ulysses": 2})
    finally:
        client.close()


def test_rendezvous_off_loopback_needs_the_secret():
    with pytest.raises(PoolError, match="without a shared secret"):
        check_rendezvous("10.0.0.2:29500", None)
    assert check_rendezvous("10.0.0.2:29500", b"s") == ("10.0.0.2", 29500)
    assert check_rendezvous("127.0.0.1:29500", None) == ("127.0.0.1", 29500)
    with pytest.raises(PoolError, match="HOST:PORT"):
        check_rendezvous("10.0.0.2", b"s")
    with pytest.raises(PoolError, match="needs --rdzv-endpoint"):
        Pool(1, nnodes=2, node_rank=1)
    with pytest.raises(PoolError, match="node rank 2"):
        Pool(1, nnodes=2, node_rank=2, rdzv_endpoint="127.0.0.1:1")
    with pytest.raises(PoolError, match="without a shared secret"):
        Pool(1, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.2:29500").start()


def test_serve_flags(capsys):
    from comfyui_xdit.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h:1"])
    assert (args.nnodes, args.node_rank, args.rdzv_endpoint) == (2, 1, "h:1")
    assert main(["serve", "--nnodes", "2", "--node-rank", "1"]) == 2
    assert "needs --rdzv-endpoint" in capsys.readouterr().err
    assert main(["serve", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "10.0.0.2:29500"]) == 2
    assert "without a shared secret" in capsys.readouterr().err
