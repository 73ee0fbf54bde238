"""Persistent multi-rank worker pool for the engine: ZeroMQ front end on rank 0, torch.distributed fan-out.

Importable as the ComfyUI extension's subpackage (`..runtime`) and as the installed top-level package
`comfyui_xdit_runtime` (workers, CLI); hence only relative imports inside.
"""
from .client import PoolClient, Progress
from .errors import JobCancelled, PoolDied, PoolError, PoolStartError, PoolTimeout
from .launcher import Pool

__all__ = ["Pool", "PoolClient", "Progress", "PoolError", "PoolDied", "PoolTimeout", "PoolStartError",
           "JobCancelled"]
