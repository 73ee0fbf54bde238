"""One pool rank, started by torchrun through runtime/bootstrap.py (or `-m comfyui_xdit_runtime.worker --address ...`).

Rank 0 serves clients (server.Rank0Server); the other ranks wait for operations broadcast by rank 0 and run
them. Any failure of the process group ends the rank with a non-zero exit, so torchrun stops the rest."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import socket
import sys

import torch
import torch.distributed as dist

from comfyui_xdit.parallel.mesh import release_process_groups

from .executor import Executor, memory_stats
from .fanout import Fanout
from .messages import CLIENT_TIMEOUT_S, Outcome, ShutdownOp
from .protocol import DEFAULT_MAX_BYTES
from .rank_watch import Terminated
from .security import ADMIN_ENV, as_secret, check_bind_address, secret_from_env

log = logging.getLogger("comfyui_xdit_runtime.worker")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m comfyui_xdit_runtime.worker")
    p.add_argument("--address", required=True, help="where rank 0 binds: tcp://127.0.0.1:PORT or ipc://PATH")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="default: nccl on cuda, else gloo")
    p.add_argument("--pg-timeout", type=float, default=120.0, help="seconds a collective may wait for a peer")
    p.add_argument("--heartbeat", type=float, default=2.0, help="seconds between idle heartbeats")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_BYTES)
    p.add_argument("--client-timeout", type=float, default=CLIENT_TIMEOUT_S,
                   help="seconds after which the jobs of a client that stopped pinging are cancelled")
    return p.parse_args(argv)


def probe_constants(device: torch.device) -> dict | None:
    """The planner's constants measured on this pool's ranks at start (comfyui_xdit.probe: a few matmuls and
    collectives, well under a second), for the status reply (`probe`), which the auto layout reads. Every rank
    calls it (it runs collectives); XDIT_POOL_PROBE=0 skips it everywhere."""
    if os.environ.get("XDIT_POOL_PROBE", "1") == "0":
        return None
    from comfyui_xdit.probe import probe

    kind = probe(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dist.get_rank() == 0:
        log.info("probed: %s", kind.source)
    return dataclasses.asdict(kind)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[xdit-pool %(name)s] %(message)s", stream=sys.stderr)
    secret = secret_from_env()
    check_bind_address(args.address, secret)  # every rank checks, so a refusal fails the whole group at once
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.pg_timeout))
    rank = dist.get_rank()
    fanout = Fanout(device)
    executor = Executor(fanout, device, test_hooks=os.environ.get("XDIT_RUNTIME_TEST_HOOKS") == "1")
    hello = fanout.gather(Outcome(ok=True, rank=rank, pid=os.getpid(), host=socket.gethostname()[:200],
                                  **memory_stats(device)))
    measured = probe_constants(device)
    try:
        if rank == 0:
            from .server import Rank0Server  # zmq: rank 0 only

            info = {"backend": backend, "device": args.device, "address": args.address,
                    **({"probe": measured} if measured else {})}
            Rank0Server(executor, fanout, args.address, secret, args.max_message_bytes, args.heartbeat,
                        info, admin_secret=as_secret(os.environ.get(ADMIN_ENV)),
                        client_timeout_s=args.client_timeout).serve(hello)
        else:
            while True:
                op, tensors = fanout.receive()
                executor.run(op, tensors)
                if isinstance(op, ShutdownOp):
                    break
    except Terminated as e:  # rank 0 told its clients first
        log.warning("rank %d stops: %s", rank, e)
        return 1
    except Exception as e:  # noqa: BLE001 - the rank's own error text ends up in the pool log
        log.exception("rank %d stops: %s", rank, e)
        return 1
    release_process_groups()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
