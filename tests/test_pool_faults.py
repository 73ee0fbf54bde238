"""The pool from outside: what it listens on. One 2-rank CPU/gloo pool (a shared secret) serves the module."""
import os

import pytest
import torch

from comfyui_xdit.models import load_model
from comfyui_xdit_runtime import Pool, PoolClient

SECRET = b"faults-secret"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    p = Pool(2, secret=SECRET, log_path=tmp_path_factory.mktemp("faults") / "pool.log")
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def attached(pool):
    """A client without a supervisor, as ComfyUI attached to `serve` is."""
    c = PoolClient(pool.address, SECRET)
    yield c
    c.close()


@pytest.fixture(scope="module")
def case():
    adapter = load_model("tiny-flux").adapter
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, adapter.latent_channels, 16, 16, generator=g)  # 16 KiB: it goes in a shared buffer
    c = adapter.random_conditioning(1, 7, g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        ref = adapter.predict(x, t, c).float()
    return x, t, {"cond": c.cond, "pooled": c.pooled}, ref


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, parent in parents.items() if parent == p]
    return out


def _listening(pids: list[int]) -> list[tuple[str, str]]:
    """(local address, table) of every LISTEN TCP socket these processes hold (inodes from /proc/PID/fd)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    rows = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # state 0A: LISTEN
                    rows.append((fields[1], table))
    return rows


def _is_loopback(hex_address: str) -> bool:
    host = hex_address.split(":")[0]
    if len(host) == 8:  # IPv4, little-endian: 127.x.x.x
        return host.endswith("7F")
    words = [host[i:i + 8] for i in range(0, 32, 8)]  # IPv6 ::1, or ::ffff:127.x.x.x
    return words == ["00000000"] * 3 + ["01000000"] or (words[:2] == ["00000000"] * 2 and words[2] == "FFFF0000"
                                                         and words[3].endswith("7F"))


def test_a_one_node_pool_listens_on_loopback_only(pool, attached, case):
    x, t, conds, _ = case
    attached.forward(attached.load_model("tiny-flux"), x, t, conds)  # the direct socket too
    pids = _descendants(pool._proc.pid)
    assert len(pids) == 3, pids  # torchrun (its rendezvous store) and two ranks
    rows = _listening(pids)
    print("listening:", rows)
    assert len(rows) >= 4  # the store, rank 0's two ZeroMQ sockets, gloo's listeners: the check sees them
    assert [r for r in rows if not _is_loopback(r[0])] == []
    assert _is_loopback("0100007F:1F90") and not _is_loopback("00000000000000000000000000000000:1F90")
