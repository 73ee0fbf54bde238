"""Model sources: built-in tiny models, diffusers folders and single-file checkpoints, behind one loader."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .adapters import FamilyAdapter, make_adapter
from .errors import XDiTError
from .tiny import build_tiny, is_tiny

if TYPE_CHECKING:
    from .frugal import LoadReport
    from .parallel.config import ParallelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    adapter: FamilyAdapter
    source: str
    tiny: bool
    report: "LoadReport | None" = None  # what the load read and cost this rank (files only)
    layout: "ParallelConfig | None" = None  # the layout it was loaded for: one PipeFusion stage, or FSDP2 shards

    @property
    def family(self) -> str:
        return self.adapter.family


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise XDiTError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(source: str, family: str | None = None, dtype: str = "fp32", device: str = "cpu",
               layout: "ParallelConfig | None" = None, rank: int = 0, weight_dtype: str = "default",
               **tiny_overrides) -> LoadedModel:
    """Load a transformer and wrap it in its family adapter. Files are loaded frugally (frugal.py): with a
    `layout` of PipeFusion degree > 1, rank `rank` of it reads only its stage's blocks (and the model serves only
    jobs of that layout); with a `layout` of shard degree > 1 (collective: every rank calls it) the model is
    built sharded (FSDP2) and each rank reads only its rows (sharded_load.py). `weight_dtype` fp8_e4m3fn / fp8_e5m2 keeps the Linear weights in fp8, computing in
    `dtype` (weight_storage.py)."""
    from .weight_storage import WEIGHT_DTYPES, parse_weight_dtype, store_weights

    if dtype in WEIGHT_DTYPES and dtype != "default":  # the pool's and the nodes' fp8 choices: computed in bf16
        dtype, weight_dtype = "bf16", dtype
    parse_weight_dtype(weight_dtype)
    torch_dtype = parse_dtype(dtype)
    staged = layout is not None and layout.pipefusion > 1
    if layout is not None and layout.shard > 1:
        return _load_sharded(source, family, torch_dtype, device, layout, weight_dtype, tiny_overrides)
    if is_tiny(source):
        fam, model = build_tiny(source, torch_dtype, **tiny_overrides)
        if family not in (None, "", "auto", fam):
            raise XDiTError(f"family mismatch: {source} is a {fam} model, not {family}")
        loaded = LoadedModel(make_adapter(fam, model.to(device), ""), source, True)
        if staged:
            from .frugal import pipefusion_prepare

            pipefusion_prepare(layout, rank)(loaded.adapter)
    else:
        from .frugal import load_frugal, pipefusion_prepare

        prepare = pipefusion_prepare(layout, rank) if staged else None
        adapter, report = load_frugal(source, None if family in (None, "", "auto") else family, torch_dtype,
                                      device, prepare=prepare)
        loaded = LoadedModel(adapter, source, False, report)
    loaded.layout = layout if staged else None
    store_weights(loaded.adapter.model, weight_dtype)  # after the adapter read the compute dtype
    return loaded


def _load_sharded(source: str, family: str | None, dtype: torch.dtype, device: str, layout: "ParallelConfig",
                  weight_dtype: str, tiny_overrides: dict) -> LoadedModel:
    from .parallel.mesh import get_mesh
    from .parallel.shard import check_shard_degree, shard_model
    from .sharded_load import load_sharded
    from .weight_storage import store_weights

    import torch.distributed as dist

    check_shard_degree(layout)
    if not dist.is_initialized() or dist.get_world_size() != layout.world_size:
        raise XDiTError(f"a load for shard {layout.shard} is collective: it needs {layout.world_size} ranks in a "
                        "process group (torchrun or the pool)")
    if is_tiny(source):  # built whole in memory (no file to read in part), then sharded
        fam, model = build_tiny(source, dtype, **tiny_overrides)
        if family not in (None, "", "auto", fam):
            raise XDiTError(f"family mismatch: {source} is a {fam} model, not {family}")
        loaded = LoadedModel(make_adapter(fam, model.to(device), ""), source, True, layout=layout)
        store_weights(loaded.adapter.model, weight_dtype)
        shard_model(loaded.adapter, get_mesh(layout, torch.device(device).type))
        return loaded
    adapter, report = load_sharded(source, None if family in (None, "", "auto") else family, dtype, device,
                                   layout, weight_dtype)
    return LoadedModel(adapter, source, False, report, layout=layout)
