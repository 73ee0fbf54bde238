"""The device mesh of a parallel config and the process groups each method uses."""
from __future__ import annotations

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

    def group(self, dim: str) -> ProcessGroup:
        return self.sp_mesh.get_group() if dim == "sp" else self.mesh.get_group(dim)

    def rank(self, dim: str) -> int:
        return self.sp_mesh.get_local_rank() if dim == "sp" else self.mesh.get_local_rank(dim)


_MESHES: dict[tuple, ParallelMesh] = {}


def get_mesh(config: ParallelConfig, device_type: str) -> ParallelMesh:
    """The mesh for `config` over the default process group (built once per config; collective on first use)."""
    key = (config.mesh_shape, device_type)
    if key not in _MESHES:
        config.validate(dist.get_world_size())
        mesh = init_device_mesh(device_type, config.mesh_shape, mesh_dim_names=MESH_DIMS)
        sp_mesh = mesh["ring", "ulysses"]._flatten("sp")
        _MESHES[key] = ParallelMesh(config, mesh, sp_mesh, Comm())
    return _MESHES[key]
