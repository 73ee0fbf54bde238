"""Frugal loading: the transformer built on the meta device, then only the tensors this rank keeps read from the
safetensors file(s), one at a time, so that no rank holds the whole checkpoint in host RAM unless it keeps all of it.

What a rank keeps is decided before any weight is read:
  * `prepare(adapter)` may drop parts of the meta model (PipeFusion: `pipefusion_prepare` keeps one stage's
    blocks, the same split `shard_stage` makes at sampling time); every tensor the model still has is read;
  * `keep(name, shape)` may narrow each of them (weight sharding: the rows this rank keeps). `name` is the
    tensor's diffusers state-dict name in the model as built (before `prepare` renumbered any block list), `shape`
    its full shape. It returns True (the whole tensor), a slice or a tuple of slices (that part of it, indexed as
    `tensor[index]`), or None/False (not read: the tensor stays on the meta device for the caller to fill).
    `place(module, attr, name, tensor)`, when given, installs each read tensor instead of the default (a
    requires_grad=False Parameter or a buffer replacing the meta one), e.g. into an FSDP2 DTensor's local shard.

Layouts: a diffusers folder (config.json + diffusion_pytorch_model*.safetensors, sharded or not) and a single
safetensors file in diffusers layout are read tensor by tensor (and slices of a tensor by `get_slice`, nothing
else); a single file in an original layout (BFL Flux/FLUX.2, Wan, SD3 MMDiT, PixArt) is converted by the family's
converter (diffusers' own) on deferred tensors (lazy_tensors.py), so each converted tensor is read from its own
source tensors alone (a fused projection once per part it is split into). Torch pickles (.pt/.ckpt/.bin) cannot be
read in part: they load whole (LoadReport.frugal False), as does a converter that writes in place.
"""
from __future__ import annotations

import functools
import importlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils._pytree import tree_map

from . import families
from .errors import WeightsError
from .families.checkpoint import first_line
from .families.spec import Family
from .lazy_tensors import DeferredTensor, NotDeferrable, deferred, realize
from .safetensors_header import SAFETENSORS_DTYPES, HeaderError, read_header

KeepFn = Callable[[str, tuple[int, ...]], "bool | slice | tuple[slice, ...] | None"]
PlaceFn = Callable[[torch.nn.Module, str, str, torch.Tensor], None]


# ------------------------------------------------------------------------------------------------ memory figures
def rss_bytes() -> int:
    """Resident set size of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The kernel's high-water mark of this process's RSS (VmHWM) since start or the last reset_peak_rss()."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class LoadReport:
    """What a load read and what it cost this rank."""
    frugal: bool = True            # only the tensors this rank keeps were read
    layout: str = "diffusers"      # "diffusers" (read as stored), "converted" (per tensor), "whole" (read whole)
    checkpoint_bytes: int = 0      # every tensor of the checkpoint, in the load dtype
    read_bytes: int = 0            # the tensors (or parts) read, in the load dtype
    kept_bytes: int = 0            # parameters and buffers the model holds after the load
    rss_before_bytes: int = 0      # host RSS when the load started (the loader's libraries imported)
    peak_rss_bytes: int = 0        # host RSS high-water mark during the load (0: unknown on this system)
    device_peak_bytes: int = 0     # CUDA memory high-water mark during the load (0 on CPU)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ the checkpoint
class Checkpoint:
    """A checkpoint's tensors by diffusers name, as deferred tensors (shapes and dtypes from the headers), with its
    family, config and variant; nothing is read until `read`."""

    def __init__(self, path: Path, family: Family, config: dict, variant: str, tensors: dict[str, torch.Tensor],
                 direct: dict[str, tuple[Path, str]], layout: str, dtype: torch.dtype):
        self.path, self.family, self.config, self.variant = path, family, config, variant
        self.tensors, self.layout, self.dtype = tensors, layout, dtype
        self._direct = direct  # name -> (file, key) of tensors stored as they are needed (sliceable on read)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def read(self, name: str, index=None) -> torch.Tensor:
        """The values of tensor `name` (or of `tensor[index]`), read from disk now."""
        if name in self._direct and index is not None:
            file, key = self._direct[name]
            return _read_file_tensor(file, key, self.dtype, index)
        t = realize(self.tensors[name])
        if index is not None:
            t = t[index]
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        return t if whole and t.is_contiguous() and not t.data_ptr() % 64 else t.clone()  # e.g. a split's part


def open_checkpoint(source: str | os.PathLike, family: str | None = None, dtype: torch.dtype = torch.float32,
                    config_overrides: dict | None = None) -> Checkpoint:
    """Read a checkpoint's headers only: what it holds, its family and config. Raises WeightsError for sources that
    cannot be read in part (torch pickles), and for everything load_transformer refuses."""
    from .weights import (_base_config, _parse_family, _strip_prefix, detect_family, existing_path, expert_folders,
                          folder_config, resolve_variant, split_pair)

    want_family, want_variant = _parse_family(family)
    pair = split_pair(str(source))
    if pair is not None:
        return _open_pair(pair, want_family, want_variant, dtype, config_overrides)
    path, is_dir = existing_path(str(source))
    if is_dir:
        fam, config, pipeline_class = folder_config(path)
        folder = path if (path / "config.json").is_file() else path / "transformer"
        if want_family and fam.name != want_family:
            raise WeightsError(f"family mismatch: {folder} looks like {fam.name}, not {want_family}")
        # two experts (transformer/, transformer_2/): their tensors under the names the joint model gives them
        parts = [(f"{d.name}.", d) for d in expert_folders(path)] if "boundary_ratio" in config else [("", folder)]
        tensors, direct = {}, {}
        for prefix, part in parts:
            files = sorted(p for p in part.iterdir() if p.name.startswith("diffusion_pytorch_model")
                           and p.name.endswith(".safetensors"))
            if not files:
                raise WeightsError(f"{part}: no diffusion_pytorch_model*.safetensors to read in part")
            for file in files:
                for key, (shape, st_dtype) in _header(file).items():
                    tensors[prefix + key] = _deferred_read(file, key, shape, st_dtype, dtype, ())
                    direct[prefix + key] = (file, key)
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        variant = resolve_variant(fam, config, pipeline_class, want_variant, path.name)
        return Checkpoint(path, fam, config, variant, tensors, direct, "diffusers", dtype)
    if not path.name.lower().endswith((".safetensors", ".sft")):
        raise WeightsError(f"{path.name} is not a safetensors file: it cannot be read in part")
    header = _header(path)
    from .weights import file_quant_refusal

    refusal = file_quant_refusal(path)  # the newer ComfyUI's formats other than per-tensor fp8
    if refusal:
        raise WeightsError(refusal)
    _refuse_unsupported(header)
    raw = {}
    for key, (shape, st_dtype) in header.items():
        if key == "scaled_fp8" or key.endswith(_quant_markers()):
            continue
        scales = tuple(s for s in _scale_keys(key) if s in header)
        raw[key] = _deferred_read(path, key, shape, st_dtype, dtype, scales)
    stripped = _strip_prefix({k: k for k in raw})  # stripped name -> key in the file
    sd = {name: raw[key] for name, key in stripped.items()}
    fam = families.get(detect_family(sd.keys()))
    if want_family and fam.name != want_family:
        raise WeightsError(f"family mismatch: {path.name} looks like {fam.name}, not {want_family}")
    hints: dict = {}
    direct = {name: (path, key) for name, key in stripped.items() if not header_scales(header, key)}
    layout = "diffusers"
    if fam.convert is not None and fam.is_original(set(sd)):
        sd, hints = fam.convert(sd, path.name)
        hints = tree_map(lambda v: realize(v) if isinstance(v, torch.Tensor) else v, hints)
        made_up = [k for k, v in sd.items() if not isinstance(v, DeferredTensor)]
        if made_up:
            raise NotDeferrable(f"the converter made {', '.join(made_up[:3])} from no source tensor")
        direct, layout = {}, "converted"
    config = fam.infer_config(sd, hints)
    variant = resolve_variant(fam, config, hints.get("pipeline", ""), want_variant, path.name)
    config = {**_base_config(fam, variant), **config, **(config_overrides or {})}
    return Checkpoint(path, fam, config, variant, sd, direct, layout, dtype)


def _open_pair(pair: tuple[str, str], want_family: str | None, want_variant: str | None, dtype: torch.dtype,
               config_overrides: dict | None) -> Checkpoint:
    """Two single files, the high- and the low-noise expert of one architecture, as one checkpoint: their tensors
    under `transformer.` and `transformer_2.`, the config with `boundary_ratio` (the variant's)."""
    from .weights import resolve_variant

    high, low = (open_checkpoint(p, want_family, dtype, config_overrides) for p in pair)
    names = f"{high.path.name} + {low.path.name}"
    if high.family is not low.family or high.config != low.config:
        raise WeightsError(f"{names}: not two experts of one architecture ({high.family.name} {high.variant}, "
                           f"{low.family.name} {low.variant})")
    if not high.family.experts:
        raise WeightsError(f"{names}: two files make one model only for two-expert families (wan), not "
                           f"{high.family.name}")
    if "low_noise" in high.path.name.lower() and "high_noise" in low.path.name.lower():
        raise WeightsError(f"{names}: the high-noise expert comes first (these names say low, then high)")
    tensors = {f"{prefix}.{k}": v for prefix, ck in (("transformer", high), ("transformer_2", low))
               for k, v in ck.tensors.items()}
    direct = {f"{prefix}.{k}": v for prefix, ck in (("transformer", high), ("transformer_2", low))
              for k, v in ck._direct.items()}
    config = {**high.config, "boundary_ratio": None}
    variant = resolve_variant(high.family, config, "", want_variant, names)
    layout = high.layout if high.layout == low.layout else f"{high.layout}+{low.layout}"
    return Checkpoint(high.path.parent / names, high.family, config, variant, tensors, direct, layout, dtype)


def header_scales(header: dict, key: str) -> bool:
    """Whether a tensor is stored with a scale (ComfyUI scaled fp8): read whole, then scaled."""
    return any(s in header for s in _scale_keys(key))


def _scale_keys(key: str) -> tuple[str, ...]:
    if not key.endswith(".weight"):
        return ()
    return (key[: -len("weight")] + "scale_weight", key + "_scale")


def _quant_markers() -> tuple[str, ...]:
    from .weights import _QUANT_MARKERS

    return _QUANT_MARKERS


def _refuse_unsupported(header: dict) -> None:
    from .weights import _dequantize

    meta = {k: torch.empty(shape, dtype=SAFETENSORS_DTYPES.get(dt, torch.uint8), device="meta")
            for k, (shape, dt) in header.items()}
    _dequantize(meta, torch.float32)  # the same refusals (NVFP4, scaled integers) as loading whole


def _header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, safetensors dtype) from a file's header."""
    try:
        header = read_header(file)
    except (OSError, HeaderError) as e:
        raise WeightsError(f"{file} is truncated or corrupt, not a readable safetensors file "
                           f"({first_line(e)})") from None
    out = {}
    for key, info in header.tensors.items():
        if info.dtype not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{file.name}: tensor {key} has unsupported dtype {info.dtype}")
        if 8 + header.header_bytes + info.offsets[1] > header.file_bytes:
            raise WeightsError(f"{file} is truncated or corrupt, not a readable safetensors file "
                               f"(tensor {key} ends past the end of the file)")
        out[key] = (info.shape, info.dtype)
    return out


def _deferred_read(file: Path, key: str, shape: tuple[int, ...], st_dtype: str, dtype: torch.dtype,
                   scales: tuple[str, ...]) -> DeferredTensor:
    stored = SAFETENSORS_DTYPES[st_dtype]
    out_dtype = dtype if stored.is_floating_point else stored
    return deferred(shape, out_dtype, lambda: _read_file_tensor(file, key, dtype, None, scales))


def _read_file_tensor(file: Path, key: str, dtype: torch.dtype, index=None, scales: tuple[str, ...] = ()
                      ) -> torch.Tensor:
    """One tensor (or `tensor[index]`) of a safetensors file, dequantized and cast as loading whole does, in memory
    of its own at a 64-byte aligned address (safetensors hands out views of its file mapping: a model on them would
    change with the file, and its pages would count only once touched)."""
    from safetensors import SafetensorError, safe_open

    from .weights import _dequantize

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            t = f.get_slice(key)[index] if index is not None else f.get_tensor(key)
            raw = {key: t, **{s: f.get_tensor(s) for s in scales}}
    except SafetensorError as e:
        raise WeightsError(f"{file} is truncated or corrupt ({first_line(e)})") from None
    t = _dequantize(raw, dtype)[key]
    return t.clone() if t.data_ptr() % 64 or t.untyped_storage().data_ptr() == raw[key].untyped_storage().data_ptr() \
        else t


# ------------------------------------------------------------------------------------------------ the model
def build_meta(ckpt: Checkpoint) -> torch.nn.Module:
    """The checkpoint's transformer with every parameter and persistent buffer on the meta device (non-persistent
    buffers the constructor computes, such as rotary tables, are real), checked against the checkpoint's names and
    shapes."""
    import diffusers

    from .families.checkpoint import few

    cls = getattr(diffusers, ckpt.family.diffusers_class)
    try:
        with _parameters_on_meta(ckpt.dtype):
            if "boundary_ratio" in ckpt.config:  # two experts in one model (the family's build)
                model = ckpt.family.build(ckpt.config, ckpt.variant)
            else:
                model = cls.from_config(ckpt.config)
    except (TypeError, ValueError, AssertionError) as e:
        raise WeightsError(f"{ckpt.path.name}: inferred {ckpt.family.name} config is invalid: {first_line(e)}"
                           ) from None
    for module, attr, t, is_param in list(_slots(model)):
        if not is_param:  # persistent buffers come from the checkpoint, as a strict load_state_dict takes them
            module._buffers[attr] = t.to("meta")
    expected = dict(model.state_dict(keep_vars=True))
    missing, unexpected = expected.keys() - ckpt.tensors.keys(), ckpt.tensors.keys() - expected.keys()
    if missing or unexpected:
        parts = ([f"missing keys {few(missing)}"] if missing else []) + \
                ([f"unexpected keys {few(unexpected)}"] if unexpected else [])
        raise WeightsError(f"{ckpt.path.name}: weights do not fit the {ckpt.family.name} model: {'; '.join(parts)}")
    for name, t in expected.items():
        if tuple(t.shape) != tuple(ckpt.tensors[name].shape):
            raise WeightsError(f"{ckpt.path.name}: weights do not fit the inferred {ckpt.family.name} config: "
                               f"{name} is {tuple(ckpt.tensors[name].shape)} in the checkpoint, {tuple(t.shape)} "
                               "in the model")
    return model.eval().requires_grad_(False)


class _parameters_on_meta:
    """Parameters created inside go to the meta device at registration (allocated uninitialised first: no page of
    them is touched), floating ones in `dtype` (the sizes the stage split weighs); buffers stay where they are made."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __enter__(self):
        from diffusers.models.modeling_utils import no_init_weights

        self._no_init = no_init_weights()
        self._no_init.__enter__()
        self._register = torch.nn.Module.register_parameter
        register, dtype = self._register, self.dtype

        def on_meta(module, name, param):
            if param is not None and param.device.type != "meta":
                meta = param.to("meta", dtype=dtype) if param.is_floating_point() else param.to("meta")
                param = torch.nn.Parameter(meta, requires_grad=param.requires_grad)
            register(module, name, param)

        torch.nn.Module.register_parameter = on_meta
        return self

    def __exit__(self, *exc):
        torch.nn.Module.register_parameter = self._register
        self._no_init.__exit__(*exc)


def _release_freed_heap() -> None:
    """Hand the heap's free pages back to the system (glibc malloc_trim): the transient copies of one tensor's
    reads would otherwise stay resident between the kept ones. A no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def tensor_names(model: torch.nn.Module) -> dict[int, str]:
    """id of each parameter and buffer -> its state-dict name (record it before blocks are dropped/renumbered)."""
    sd = model.state_dict(keep_vars=True)
    return {id(t): name for name, t in sd.items()}


def _slots(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.Tensor, bool]]:
    """(owner module, attribute, tensor, is parameter) of every persistent tensor still in the model."""
    for module in model.modules():
        for attr, p in list(module._parameters.items()):
            if p is not None:
                yield module, attr, p, True
        for attr, b in list(module._buffers.items()):
            if b is not None and attr not in module._non_persistent_buffers_set:
                yield module, attr, b, False


def materialize(model: torch.nn.Module, ckpt: Checkpoint, names: dict[int, str], keep: KeepFn | None = None,
                device: str | torch.device = "cpu", place: PlaceFn | None = None) -> int:
    """Read every tensor the (meta) model still holds from the checkpoint, one at a time, and put it on `device`;
    `keep` narrows each (see the module's docstring). Returns the bytes read."""
    read = 0
    seen: dict[int, torch.Tensor] = {}  # tied tensors are read once
    for module, attr, t, is_param in list(_slots(model)):
        if t.device.type != "meta":
            continue
        name = names[id(t)]
        if id(t) in seen:
            value = seen[id(t)]
        else:
            choice = True if keep is None else keep(name, tuple(t.shape))
            if choice is None or choice is False:
                continue
            value = ckpt.read(name, None if choice is True else choice).to(device)
            read += value.numel() * value.element_size()
            seen[id(t)] = value
            _release_freed_heap()  # a converted tensor's sources were read and dropped
        if place is not None:
            place(module, attr, name, value)
        elif is_param:
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
    return read


# ------------------------------------------------------------------------------------------------ one call
PrepareFn = Callable[[object], None]


def open_partial(source: str, family: str | None, dtype: torch.dtype) -> tuple[Checkpoint | None, list[str]]:
    """(open_checkpoint's headers, []) or, for a source that cannot be read in part, (None, [why: it loads
    whole])."""
    try:
        return open_checkpoint(source, family, dtype), []
    except NotDeferrable as e:
        return None, [f"read whole: {e}"]
    except WeightsError as e:
        if "cannot be read in part" not in str(e) and "to read in part" not in str(e):
            raise
        return None, [f"read whole: {e}"]


def load_frugal(source: str, family: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
                prepare: PrepareFn | None = None, keep: KeepFn | None = None, place: PlaceFn | None = None):
    """(FamilyAdapter, LoadReport): the transformer at `source` with only what this rank keeps read (see the
    module's docstring). Sources that cannot be read in part are loaded whole, then `prepare` applied; the report
    says so."""
    import diffusers
    import safetensors  # noqa: F401

    from .adapters import make_adapter
    from .weights import _finalize_tensors, load_transformer

    t0 = time.perf_counter()
    ckpt, notes = open_partial(source, family, dtype)
    if ckpt is not None:  # the model's code imported before the baseline: it is no part of the checkpoint's memory
        getattr(diffusers, ckpt.family.diffusers_class)
        importlib.import_module(ckpt.family.adapter.partition(":")[0])
    report = LoadReport(rss_before_bytes=rss_bytes(), notes=notes)
    have_peak = reset_peak_rss()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if ckpt is None:
        loaded = load_transformer(source, family, dtype, device)
        adapter = make_adapter(loaded.family, loaded.model, loaded.variant)
        report.frugal, report.layout = False, "whole"
        report.checkpoint_bytes = report.read_bytes = _nbytes(adapter.model)
        if prepare is not None:
            prepare(adapter)
    else:
        model = build_meta(ckpt)
        names = tensor_names(model)
        adapter = make_adapter(ckpt.family.name, model, ckpt.variant)
        if prepare is not None:
            prepare(adapter)
        report.layout, report.checkpoint_bytes = ckpt.layout, ckpt.nbytes
        try:
            report.read_bytes = materialize(adapter.model, ckpt, names, keep, device, place)
        except NotDeferrable as e:
            raise WeightsError(f"{ckpt.path.name}: cannot convert tensor by tensor ({e})") from None
        _finalize_tensors(adapter.model, dtype)
        _move_real_tensors(adapter.model, torch.device(device))
    report.kept_bytes = _nbytes(adapter.model)
    report.seconds = round(time.perf_counter() - t0, 3)
    report.peak_rss_bytes = peak_rss_bytes() if have_peak else 0
    if cuda:
        report.device_peak_bytes = torch.cuda.max_memory_allocated(device)
    return adapter, report


def _move_real_tensors(model: torch.nn.Module, device: torch.device) -> None:
    """Tensors made by the constructor (non-persistent buffers) to `device`; meta ones (not kept) stay."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and t.device.type not in ("meta", device.type):
                    moved = t.to(device)
                    store[name] = torch.nn.Parameter(moved, requires_grad=False) if isinstance(
                        t, torch.nn.Parameter) else moved


def _nbytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.device.type != "meta")


# ------------------------------------------------------------------------------------------------ weight sharding
def dim0_shard_keep(rank: int, world: int) -> KeepFn:
    """`keep` for FSDP2's Shard(0) placement: rank `rank` of `world` keeps rows [r*c, min((r+1)*c, n)) of every
    tensor, c = ceil(n / world) (torch.chunk's split; trailing ranks may keep none). Scalars are kept whole."""
    def keep(name: str, shape: tuple[int, ...]):
        if not shape:
            return True
        chunk = -(-shape[0] // world)
        start = min(rank * chunk, shape[0])
        return (slice(start, min(start + chunk, shape[0])),)

    return keep


# ------------------------------------------------------------------------------------------------ PipeFusion
def mesh_coordinates(rank: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """This rank's coordinates in a row-major mesh of `shape` (init_device_mesh's layout)."""
    coords = []
    for size in reversed(shape):
        coords.append(rank % size)
        rank //= size
    return tuple(reversed(coords))


def pipefusion_prepare(config, rank: int) -> PrepareFn:
    """`prepare` for a rank of a PipeFusion config: keep the blocks of the rank's stage (shard_stage's split)."""
    from .parallel.config import MESH_DIMS
    from .parallel.pipefusion import shard_stage

    stage = mesh_coordinates(rank, config.mesh_shape)[MESH_DIMS.index("pipefusion")]

    def prepare(adapter) -> None:
        shard_stage(adapter, stage, config.pipefusion)

    return prepare
