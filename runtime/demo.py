"""The main demo: start a CPU worker pool, sample the built-in tiny models through the full ZeroMQ path.

Each model is sampled serially on the pool, then with Ulysses 2 and CFG parallel 2 across its two ranks; the
parallel results are compared with the serial one and the per-step times that streamed back are printed.
"""
from __future__ import annotations

import time


from .launcher import Pool

MODELS = ("tiny-flux", "tiny-sd3", "tiny-pixart")
CONFIGS = (("serial", {}), ("ulysses 2", {"ulysses": 2}), ("cfg parallel 2", {"cfg": 2}))


def run_demo(nproc: int = 2, steps: int = 8, size: int = 256, seed: int = 0) -> int:
    """Returns 0 when every parallel result matched serial (relative L2 below 1e-4), else 1."""
    pool = Pool(nproc, device="cpu")
    t0 = time.perf_counter()
    print(f"starting a pool of {nproc} CPU ranks (torchrun, gloo) ...", flush=True)
    pool.start()
    print(f"pool ready at {pool.address} in {time.perf_counter() - t0:.1f}s (log: {pool.log_path})", flush=True)
    ok = True
    try:
        client = pool.client()
        for model in MODELS:
            info = client.load(model)
            print(f"\n{model}: loaded on every rank in {info.get('seconds', 0.0):.2f}s (key {info['key']})", flush=True)
            fields = {"height": size, "width": size, "steps": steps, "seed": seed, "cfg": 3.0}
            serial = None
            for name, parallel in CONFIGS:
                steps_ms: list[float] = []
                latents, result = client.sample_with_info(
                    info["key"], fields, parallel=parallel,
                    on_progress=lambda p: steps_ms.append(p.step_seconds * 1000))
                line = (f"  {name:<15} latents {tuple(latents.shape)}  {result.get('seconds', 0.0):.2f}s on the pool; "
                        f"step ms: {' '.join(f'{t:.0f}' for t in steps_ms)}")
                if serial is None:
                    serial = latents
                else:
                    rel = float((latents - serial).norm() / serial.norm())
                    ok &= rel < 1e-4
                    line += f"  rel. L2 vs serial {rel:.1e}"
                print(line, flush=True)
        print("\nall parallel results match serial" if ok else "\nMISMATCH between parallel and serial", flush=True)
    finally:
        pool.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(run_demo())
