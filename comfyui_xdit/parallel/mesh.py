"""The device mesh of a parallel config and the process groups each method uses."""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .comm import Comm
from .config import MESH_DIMS, ParallelConfig


@dataclass
class ParallelMesh:
    config: ParallelConfig
    mesh: DeviceMesh
    sp_mesh: DeviceMesh  # ring x ulysses flattened: the ranks that share one image's tokens
    comm: Comm
    stage_mesh: DeviceMesh | None = None  # ranks at the same pipefusion stage (all but the pipefusion dim)
    shard_mesh: DeviceMesh | None = None  # the innermost `shard` ranks, which split each block's weights (FSDP2)

    def group(self, dim: str) -> ProcessGroup:
        if dim == "sp":
            return self.sp_mesh.get_group()
        if dim == "stage":
            return self.stage_mesh.get_group()
        if dim == "shard":
            return self.shard_mesh.get_group()
        return self.mesh.get_group(dim)

    def rank(self, dim: str) -> int:
        if dim == "sp":
            return self.sp_mesh.get_local_rank()
        if dim == "shard":
            return 0 if self.shard_mesh is None else self.shard_mesh.get_local_rank()
        return self.mesh.get_local_rank(dim)


_MESHES: dict[tuple, tuple] = {}


def release_process_groups() -> None:
    """Forget the cached meshes, collect what still refers to their groups, then destroy every process group.

    Call it instead of dist.destroy_process_group(): a gloo group left to the interpreter's exit (held by the
    mesh cache or by a reference cycle of a finished job) can abort the process there ("terminate called
    without an active exception": 3 of 60 two-rank PipeFusion runs on the CPU machine; none of 80 with this)."""
    _MESHES.clear()
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def get_mesh(config: ParallelConfig, device_type: str) -> ParallelMesh:
    """The mesh for `config` over the default process group (built once per shape; collective on first use)."""
    key = (config.replicas, config.mesh_shape, config.shard, device_type)
    if key not in _MESHES:
        config.validate(dist.get_world_size())
        # "replica" (outermost) holds ranks that compute the same thing: more than 1 only for shard alone
        dims = ("replica",) + MESH_DIMS
        mesh = init_device_mesh(device_type, (config.replicas,) + config.mesh_shape, mesh_dim_names=dims)
        sp_mesh = mesh["ring", "ulysses"]._flatten("sp")
        stage_mesh = mesh["dp", "cfg", "ring", "ulysses"]._flatten("stage") if config.pipefusion > 1 else None
        shard_mesh = None
        if config.shard > 1:
            from .shard import shard_dims

            inner = shard_dims(config, dims)
            shard_mesh = mesh[inner[0]] if len(inner) == 1 else mesh[inner]._flatten("shard")
        _MESHES[key] = (mesh, sp_mesh, stage_mesh, shard_mesh)
    mesh, sp_mesh, stage_mesh, shard_mesh = _MESHES[key]
    return ParallelMesh(config, mesh, sp_mesh, Comm(), stage_mesh, shard_mesh)
