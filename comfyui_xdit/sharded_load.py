"""Loading a transformer straight into its FSDP2 shards: the model is built on the meta device, sharded there
(`shard_model`: fully_shard per block and the rest as the root), given storage for this rank's local shards only
(`to_empty`), and those are filled with the rows this rank keeps (`kept_slice`), each read alone from the
safetensors file by frugal.py's slice reads. No rank holds more than its 1/N of the parameters, plus one tensor in
flight and the few persistent buffers, which are read whole.

Collective: every rank of the shard group calls it with the same config (the pool's LoadOp reaches every rank).
fp8 weight storage composes: the Linears are switched to fp8 storage on the meta model, so each local shard is
allocated in fp8 and filled from the rows read in the load dtype, cast once per tensor (an fp8 file read into bf16
and stored as the same fp8 type keeps the file's values exactly: bf16 holds every e4m3/e5m2 value).
"""
from __future__ import annotations

import time

import torch

from .errors import WeightsError
from .frugal import (LoadReport, NotDeferrable, _release_freed_heap, build_meta, load_frugal, open_partial,
                     peak_rss_bytes, reset_peak_rss, rss_bytes)
from .parallel.config import ParallelConfig


def load_sharded(source: str, family: str | None, dtype: torch.dtype, device: str, layout: ParallelConfig,
                 weight_dtype: str = "default"):
    """(FamilyAdapter, LoadReport): the transformer at `source`, sharded for `layout` (shard > 1) over this rank's
    shard group, with only this rank's rows read. Sources that cannot be read in part (torch pickles, converters
    that write in place) are loaded whole and then sharded; the report says so (frugal False)."""
    import diffusers

    from .adapters import make_adapter
    from .parallel.mesh import get_mesh
    from .parallel.shard import fill_local_shards, local_parameter_bytes, shard_model
    from .weight_storage import store_weights

    pm = get_mesh(layout, torch.device(device).type)  # collective on first use: before any timing
    t0 = time.perf_counter()
    ckpt, notes = open_partial(source, family, dtype)  # headers only
    if ckpt is None:
        adapter, report = load_frugal(source, family, dtype, device)  # whole, as models.load_model loads a file
        store_weights(adapter.model, weight_dtype)
        shard_model(adapter, pm)
        report.frugal, report.layout = False, "whole"
        report.notes += notes
        report.kept_bytes = local_parameter_bytes(adapter.model) + _buffer_bytes(adapter.model)
        return adapter, report

    getattr(diffusers, ckpt.family.diffusers_class)  # the model's code imported before the baseline
    report = LoadReport(layout=ckpt.layout, checkpoint_bytes=ckpt.nbytes, rss_before_bytes=rss_bytes(),
                        notes=[f"sharded over {layout.shard} ranks while loading"])
    have_peak = reset_peak_rss()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = build_meta(ckpt)
    adapter = make_adapter(ckpt.family.name, model, ckpt.variant)
    store_weights(model, weight_dtype)  # on the meta model: the shards are allocated in the storage dtype
    computed = _real_buffers(model)  # non-persistent buffers the constructor made (to_empty would wipe them)
    shard = shard_model(adapter, pm)
    model.to_empty(device=device)
    for (module, attr), value in computed.items():
        module._buffers[attr] = value.to(device)
    read = [0]

    def read_rows(name: str, rows: slice) -> torch.Tensor:
        try:
            value = ckpt.read(name, (rows,))
        except NotDeferrable as e:
            raise WeightsError(f"{ckpt.path.name}: cannot convert tensor by tensor ({e})") from None
        read[0] += value.numel() * value.element_size()
        _release_freed_heap()  # a converted tensor's sources were read and dropped
        return value

    fill_local_shards(model, read_rows, shard)
    for module, attr, name in _persistent_buffers(model, computed):
        value = ckpt.read(name)
        read[0] += value.numel() * value.element_size()
        module._buffers[attr] = value.to(device)
    report.read_bytes = read[0]
    report.kept_bytes = local_parameter_bytes(model) + _buffer_bytes(model)
    report.seconds = round(time.perf_counter() - t0, 3)
    report.peak_rss_bytes = peak_rss_bytes() if have_peak else 0
    if cuda:
        report.device_peak_bytes = torch.cuda.max_memory_allocated(device)
    return adapter, report


def _real_buffers(model: torch.nn.Module) -> dict[tuple[torch.nn.Module, str], torch.Tensor]:
    return {(m, attr): b for m in model.modules() for attr, b in m._buffers.items()
            if b is not None and b.device.type != "meta"}


def _persistent_buffers(model: torch.nn.Module, computed: dict):
    """(module, attribute, state-dict name) of the buffers the checkpoint holds."""
    for prefix, module in model.named_modules():
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set and (module, attr) not in computed:
                yield module, attr, f"{prefix}.{attr}" if prefix else attr


def _buffer_bytes(model: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers() if b.device.type != "meta")
