"""Per-call overhead of Parallel DiT Model's forward op:
`python benchmarks/forward_overhead.py [--repeats 30] [--secret on|off|both] [--shared on|off|both] [--device cuda]
[--flux-sides 256,512]`.

A 1-rank pool (with a shared secret, so HMAC on every message; or without, as ComfyUI
starts a loopback pool by default) and the same tiny model in this process, same inputs: CFG-batched latents [2, C,
h, w] and conditioning as ComfyUI forms them (cached on the pool after the first call). Prints a Markdown table of
medians: the client's per-call work (the proxy's strided-sample check of its per-run conditioning hashes, and the
message encode with HMAC), pool decode (the server's protocol.decode, timed here on the same frames), the pool's
forward (rank 0's own time for the op), reply encode + decode, the rest of the round trip (transfer over loopback
TCP, queueing, the accepted reply where the forward goes to the pool's address rather than its direct socket,
broadcast and outcome gather), and the in-process forward as the baseline step; the floor of the transport (a bare
pyzmq DEALER/ROUTER exchange between two processes with the same bytes each way, an accepted reply, and the server
busy for the pool forward's time in between); and, once per sampling run, hashing the conditioning and the first
call's upload.
--shared: the round trip with the latents and result in the client's shared buffer (on), in frames (off), or both
rows (the stage columns are the frames path's). Device: CPU, one torch thread per process (as the pool's ranks run);
or, with --device cuda, the pool's rank and the baseline on the GPU, the client's latents on the GPU as ComfyUI holds
them (their copy to the host is the client's encode, into the buffer or a frame) and its result copied back after it
(in the round trip, as Parallel DiT Model's proxy does; the pool's own copies are in its forward time)."""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import time

import torch
import zmq

from comfyui_xdit.models import load_model
from comfyui_xdit_runtime import Pool, messages, protocol
from comfyui_xdit_runtime.bench import median_time
from comfyui_xdit_runtime.cond_cache import content_hash

SECRET = b"bench-secret"


def median(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    return median_time(fn, repeats, warmup=1)


def _echo(port_out, nbytes: int, busy_s: float) -> None:
    """The bare exchange's server: an accepted reply at once, then `nbytes` after `busy_s` of spinning."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port_out.put(router.bind_to_random_port("tcp://127.0.0.1"))
    reply = bytes(nbytes)
    while True:
        identity, body = router.recv_multipart(copy=False)
        if not len(body.buffer):
            break
        router.send_multipart([identity, b"accepted"])
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < busy_s:
            pass
        router.send_multipart([identity, reply], copy=False)
    router.close(linger=0)
    ctx.term()


def bare_zmq(nbytes_in: int, nbytes_out: int, busy_s: float, repeats: int) -> float:
    """Median seconds a bare pyzmq exchange takes beyond the server's busy time (see the module's text)."""
    mp = multiprocessing.get_context("spawn")
    ports = mp.Queue()
    server = mp.Process(target=_echo, args=(ports, nbytes_out, busy_s), daemon=True)
    server.start()
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{ports.get(timeout=60)}")
    payload = bytes(nbytes_in)

    def call():
        dealer.send(payload, copy=False)
        dealer.recv()
        dealer.recv(copy=False)

    try:
        return median_time(call, repeats, warmup=1) - busy_s
    finally:
        dealer.send(b"")
        server.join(timeout=10)
        dealer.close(linger=0)
        ctx.term()


def case(client, model: str, side: int, repeats: int, secret: bytes | None, device: str = "cpu") -> list[str]:
    """One row: the round trip through `client` (its shared_memory setting decides buffer or frames)."""
    key = client.load_model(model)
    a = load_model(model, device=device).adapter
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, a.latent_channels, side // 8, side // 8, generator=g)
    c = a.random_conditioning(2, a.spec.cond.tokens, g)
    conds = {"cond": c.cond, **({"pooled": c.pooled} if c.pooled is not None else {})}
    t = torch.tensor([500.0, 500.0])
    torch.set_num_threads(1)  # as the pool's rank runs
    gpu = device != "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    move = lambda v: None if v is None else v.to(device)  # noqa: E731
    x_dev = x.to(device)
    c_dev = dataclasses.replace(c, cond=move(c.cond), pooled=move(c.pooled), mask=move(c.mask),
                                extra={k: move(v) for k, v in c.extra.items()})

    def in_process():
        a.predict(x_dev, t.to(device), c_dev)
        sync()

    with torch.no_grad():
        local = median(in_process, repeats)
    refs = {r: content_hash(v) for r, v in conds.items()}
    header = messages.Forward(id="b", key=key, conds=refs, client="c" * 32, ts=time.time(), nonce="n" * 32)
    tensors = {"x": x, "timestep": t}

    def guard():  # what the proxy does per call instead of hashing: a strided sample compared to the run's
        for v in conds.values():
            flat = v.reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, min(flat.numel(), 4099)).long()
            torch.equal(flat[idx], flat[idx])

    encode = median(lambda: (guard(), protocol.encode(header, tensors, secret)), repeats)
    hash_once = median(lambda: [content_hash(v) for v in conds.values()], max(3, repeats // 5))
    frames = [bytes(f) for f in protocol.encode(header, tensors, secret)]
    decode = median(lambda: protocol.decode(frames, secret), repeats)
    with torch.no_grad():
        out = a.predict(x_dev, t.to(device), c_dev).float().cpu()
    reply = protocol.result("b", seconds=0.1)
    reply_time = median(lambda: protocol.decode_reply(
        [bytes(f) for f in protocol.encode(reply, {"out": out}, secret)], secret), repeats)
    client._uploaded.clear()
    t0 = time.perf_counter()
    client.forward(key, x, t, conds, hashes=refs)  # uploads the conditioning (or finds it cached on the pool)
    first = time.perf_counter() - t0
    walls, pool_fw = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        # on a GPU the latents come from and go back to the device, as Parallel DiT Model's proxy moves them
        y, info = client.forward_with_info(key, x_dev if gpu else x, t, conds, hashes=refs)
        if gpu:
            y.to(device)
            sync()
        walls.append(time.perf_counter() - t0)
        pool_fw.append(info["seconds"])
    wall, fw = statistics.median(walls), statistics.median(pool_fw)
    floor = bare_zmq(x.numel() * 4 + t.numel() * 4, out.numel() * 4, fw, repeats)
    rest = max(0.0, wall - encode - decode - fw - reply_time)
    over = wall - fw
    ms = lambda v: f"{v * 1e3:.2f}"  # noqa: E731
    upload = sum(v.numel() * v.element_size() for v in conds.values())
    mac = ("HMAC" if secret else "no secret") + (", shared buffer" if client._local.state.buffer else ", frames")
    return [f"| {mac} | {model} {side}x{side}, batch 2 ({a.image_tokens(side, side)} tokens/image; cond {upload >> 10} KiB "
            f"cached, x {x.numel() * 4 >> 10} KiB/call) | {ms(encode)} | {ms(decode)} | {ms(fw)} | {ms(reply_time)} "
            f"| {ms(rest)} | {ms(wall)} | {ms(local)} | {100 * over / local:.1f}% | {ms(floor)} "
            f"({100 * floor / local:.1f}%) | {ms(hash_once)} + {ms(max(0.0, first - wall))} |"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--secret", choices=("on", "off", "both"), default="both",
                   help="on: HMAC on every message; off: a loopback pool without a secret (ComfyUI's default)")
    p.add_argument("--shared", choices=("on", "off", "both"), default="both",
                   help="latents and result in a shared buffer (on, the default client) or in frames (off)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: the pool's rank and the in-process baseline on "
                   "the GPU, the client's latents copied from and back to it in each round trip")
    p.add_argument("--flux-sides", default="256,512", help="comma-separated tiny-flux image sides (a GPU takes "
                   "larger ones: 1024,2048 move 2 and 8 MiB each way)")
    args = p.parse_args()
    rows = ["| messages | model, latent | client per call: hash check + encode (ms) | pool decode | pool forward | reply "
            "enc+dec | transfer, queue, collectives | round trip | in-process forward (baseline) | overhead (round "
            "trip - pool forward) / baseline | bare pyzmq exchange, same bytes and wait (floor) | once per run: hash + "
            "upload |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for secret in {"on": [SECRET], "off": [None], "both": [None, SECRET]}[args.secret]:
        pool = Pool(1, secret=secret, device=args.device)
        pool.start()
        clients = []
        for shared in {"on": [True], "off": [False], "both": [False, True]}[args.shared]:
            clients.append(pool.client())
            clients[-1].shared_memory = shared
        cases = [("tiny-flux", int(v)) for v in args.flux_sides.split(",")] + [("tiny-sd3", 512), ("tiny-pixart", 512)]
        try:
            for model, side in cases:
                for c in clients:
                    rows += case(c, model, side, args.repeats, secret, args.device)
        finally:
            for c in clients:
                c.close()
            pool.stop()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
