"""torchrun whose rendezvous store listens on its rendezvous host only: `python -m comfyui_xdit_runtime.torchrun ...`
(or `python runtime/bootstrap.py --torchrun ...`, as the launcher starts it) takes torchrun's arguments.

torch's TCPStore binds every interface (`[::]:PORT`) whatever host it is given, and it is not authenticated; given a
socket already bound (`master_listen_fd`), it listens there instead. The static rendezvous the launcher uses makes its
store on node 0 from `--master-addr`/`--master-port`, so node 0's store is made here on a socket bound to that address:
127.0.0.1 for a one-node pool (loopback only), the rendezvous host of a pool over several nodes. The ranks' own
collectives (gloo, NCCL's bootstrap) are kept on loopback by the launcher's environment for a one-node pool."""
from __future__ import annotations

import socket

import torch.distributed.elastic.rendezvous.static_tcp_rendezvous as static_rdzv
from torch.distributed import TCPStore


def _bound_listener(host: str, port: int) -> int:
    """A listening socket on host:port only (IPv4 or IPv6 by the host's form); its descriptor, owned by the store."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    return sock.detach()


def store_on_host(host: str, port: int, world_size: int, is_master: bool, timeout, **kwargs) -> TCPStore:
    """What the static rendezvous calls for TCPStore: the server's socket bound to `host` (the libuv server takes it)."""
    if is_master:
        kwargs.update(master_listen_fd=_bound_listener(host, port), use_libuv=True)
    return TCPStore(host, port, world_size, is_master, timeout, **kwargs)


def main() -> None:
    static_rdzv.TCPStore = store_on_host
    from torch.distributed.run import main as torchrun_main

    torchrun_main()


if __name__ == "__main__":
    main()
