"""The hook for sharded weights (FSDP2 keeps each parameter as a DTensor sharded on dim 0): each of 2 gloo ranks
patches only the rows it holds, uneven ones included, and the gathered weight equals the patched full weight; the
restore gives the base rows back bit for bit."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from tests import lora_files as lf


def _patch_and_restore(rank: int, world: int, lora: str, results: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from comfyui_xdit.lora import LoraSpec, apply_loras

    mesh = init_device_mesh("cpu", (world,))
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(6, 5)  # 5 rows: 3 on rank 0, 2 on rank 1
    with torch.no_grad():
        model.proj.weight.copy_(torch.arange(30.0).reshape(5, 6) / 7)
    full = model.proj.weight.detach().clone()
    model.proj.weight = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]), requires_grad=False)
    info = apply_loras(model, "", [LoraSpec(lora, 0.7)])
    patched = model.proj.weight.full_tensor()
    local_rows = model.proj.weight.to_local().shape[0]
    apply_loras(model, "", [])
    restored = model.proj.weight.full_tensor()
    if rank == 0:
        torch.save({"patched": patched, "restored": restored, "base": full, "rows": local_rows,
                    "patched_here": info["patched"]}, results)


def _worker(rank: int, world: int, store: str, lora: str, results: str) -> None:
    from comfyui_xdit.parallel.mesh import release_process_groups

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        _patch_and_restore(rank, world, lora, results)  # its mesh and DTensors are gone when it returns
        dist.barrier()
    finally:
        release_process_groups()  # (a gloo group left to the interpreter's exit can abort the process there)


def test_dtensor_shards_patch_their_rows(tmp_path):
    sd = {"proj.weight": torch.zeros(5, 6)}
    pairs = lf.draw_pairs(sd, ["proj"], 2, 1, alpha=1.0)
    lora = tmp_path / "l.safetensors"
    save_file(lf.diffusers(pairs), str(lora))
    results = tmp_path / "out.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(lora), str(results)), nprocs=2, join=True)
    out = torch.load(str(results))
    want = lf.patched({"proj.weight": out["base"]}, [(pairs, 0.7)])["proj.weight"]
    assert out["rows"] == 3 and out["patched_here"] == 1
    assert torch.allclose(out["patched"], want, atol=1e-6, rtol=0)
    assert not torch.allclose(out["patched"], out["base"])
    assert torch.equal(out["restored"], out["base"])
