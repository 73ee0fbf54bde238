"""Parallel execution: device mesh, communication, sequence-parallel attention, CFG and data parallel."""
from .config import MESH_DIMS, ParallelConfig

__all__ = ["MESH_DIMS", "ParallelConfig"]
