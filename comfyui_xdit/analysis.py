"""Redundancy analyser: how much each attention layer's K, V and output, and each block's residual, change from
one sampling step to the next.

For every step t >= 1, layer l and tensor kind, it records the mean absolute difference mean|x_t - x_{t-1}| and
the relative difference mean|x_t - x_{t-1}| / mean|x_{t-1}|. Kinds:

- k, v, out: an attention layer's keys, values and SDPA output (before the output projection). In joint
  attention (Flux, SD3: text and image tokens in one sequence) these cover the image tokens only and
  text_k, text_v, text_out the text tokens; in other attention (PixArt attn1/attn2, SD3.5 attn2) the whole
  sequence (PixArt's cross-attention K/V are text tokens, its output image tokens).
- residual: a transformer block's image-stream output minus its image-stream input (the image tokens of a joint
  stream, e.g. FLUX.2's single blocks).

Sums (sum|diff|, sum|prev|, element count) are accumulated on the device per step, all-reduced over the
default process group at the step boundary (one host sync per step), so a parallel run (sequence parallel:
token shards; PipeFusion: each stage's layers; CFG/data parallel: branches and samples) gives the serial
numbers up to float rounding. Only the previous step's tensors are kept: one per layer, kind and model call of
the step (CFG run serially makes two calls per step; their statistics are summed). A tensor whose shape
differs from the previous step's (PipeFusion going from full-image warm-up steps to patches) is not compared;
a value with nothing compared is NaN, as is every step 0.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import XDiTError
from .families.spec import IMAGE, TEXT
from .parallel.plan import install, remove, shard_sizes
from .parallel.plan import positions as plan_positions

ATTENTION_KINDS = ("k", "v", "out")
TEXT_KINDS = ("text_k", "text_v", "text_out")
BLOCK_KINDS = ("residual",)


@dataclass
class Profile:
    """The analyser's result. abs[kind] and rel[kind] are [prompts, rows, steps] float64 arrays (NaN at step 0
    and where nothing was compared); labels[kind] names the rows (attention layers or blocks)."""

    kinds: list[str]
    abs: dict[str, np.ndarray]
    rel: dict[str, np.ndarray]
    labels: dict[str, list[str]]
    timesteps: list[float]
    meta: dict = field(default_factory=dict)

    @property
    def prompts(self) -> int:
        return next(iter(self.rel.values())).shape[0]

    @property
    def steps(self) -> int:
        return next(iter(self.rel.values())).shape[2]


@dataclass
class _Layout:
    """Global row index of every recorded tensor, computed from the full model (identical on every rank)."""

    attention: list[tuple[str, torch.nn.Module, bool, int]]  # label, module, joint, block index
    blocks: list[tuple[str, torch.nn.Module]]
    kinds: list[str]
    rows: dict[str, list[str]]       # kind -> row labels
    slot: dict[tuple[str, int], int]  # (kind, row) -> accumulator slot
    slots: int


def _attention_classes() -> tuple[type, ...]:
    """diffusers' attention modules: the classic Attention and the newer per-model classes (FluxAttention...)."""
    from diffusers.models.attention_processor import Attention

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # older diffusers
        return (Attention,)
    return (Attention, AttentionModuleMixin)


def _layout(adapter) -> _Layout:
    model = adapter.model
    if getattr(model, "_xdit_stage", None) is not None:
        raise XDiTError("this model was sharded into PipeFusion stages; load it again to analyse it")
    from .parallel.plan import attention_modules

    streams_of = {id(m): streams for m, streams in attention_modules(model, adapter.plan)}
    Attention = _attention_classes()
    blocks, attention = [], []
    for bl in adapter.plan.blocks:
        for i, block in enumerate(getattr(model, bl.name)):
            b = len(blocks)
            blocks.append((f"{bl.name}.{i}", block))
            for sub_name, sub in block.named_modules():
                if isinstance(sub, Attention):
                    streams = streams_of.get(id(sub), ())
                    joint = TEXT in streams and IMAGE in streams
                    role = "joint" if joint else ("cross" if getattr(sub, "is_cross_attention", False) else "self")
                    attention.append((f"{bl.name}.{i}.{sub_name} ({role})", sub, streams if joint else None, b))
    rows = {k: [a[0] for a in attention] for k in ATTENTION_KINDS}
    if any(a[2] for a in attention):
        rows.update({k: [a[0] for a in attention if a[2]] for k in TEXT_KINDS})
    rows["residual"] = [b[0] for b in blocks]
    kinds = [k for k in (*ATTENTION_KINDS, *TEXT_KINDS, *BLOCK_KINDS) if k in rows]
    slot, n = {}, 0
    for k in kinds:
        for r in range(len(rows[k])):
            slot[(k, r)] = n
            n += 1
    return _Layout(attention, blocks, kinds, rows, slot, n)


class _Recorder:
    """Hooks and taps for one job: compares every recorded tensor with the previous step's and accumulates the
    sums of the current step on the device."""

    def __init__(self, layout: _Layout, device: torch.device, steps: int, view: "_LengthView"):
        self.layout, self.view = layout, view
        self.device = device
        self.acc_dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        self.steps = steps
        self.call = -1                  # model call index within the current step
        self.prev: dict[tuple, torch.Tensor] = {}
        self.results = np.zeros((steps, layout.slots, 3))
        self._new_step()

    def _new_step(self) -> None:
        self.acc = torch.zeros(self.layout.slots, 2, dtype=self.acc_dtype, device=self.device)
        self.counts = np.zeros(self.layout.slots)
        self.sdpa_calls: dict[tuple[int, int], int] = {}

    def record(self, kind: str, row: int, x: torch.Tensor, sub: int = 0) -> None:
        key = (kind, row, self.call, sub)
        x = x.detach()
        prev = self.prev.get(key)
        if prev is not None and prev.shape == x.shape:
            slot = self.layout.slot[(kind, row)]
            self.acc[slot, 0] += (x.float() - prev.float()).abs().sum().to(self.acc_dtype)
            self.acc[slot, 1] += prev.float().abs().sum().to(self.acc_dtype)
            self.counts[slot] += x.numel()  # host side: known without a sync
        self.prev[key] = x.clone()

    # hooks
    def model_pre(self, module, args, kwargs):
        self.call += 1

    def block_post(self, b: int, adapter, block: torch.nn.Module):
        blocks = adapter.block_list(block)
        key = blocks.main
        position = key if isinstance(key, int) else plan_positions(block).get(key, 0)

        def hook(module, args, kwargs, output):
            x_in = kwargs[key] if isinstance(key, str) and key in kwargs else args[position]
            x_out = adapter.block_streams(output, blocks)[0]
            self.record("residual", b, self._image_part(x_out - x_in, blocks.inputs[0][1]))
        return hook

    def _image_part(self, x: torch.Tensor, streams: tuple[str, ...]) -> torch.Tensor:
        """The image tokens of a block's main stream (a joint stream holds this rank's part of each stream in
        order; the image part is what the other streams leave)."""
        if len(streams) == 1 or IMAGE not in streams:
            return x
        others = {s: self.view.local(s) for s in streams if s != IMAGE}
        start = sum(others[s] for s in streams[:streams.index(IMAGE)])
        return x.narrow(1, start, x.shape[1] - sum(others.values()))

    def tap(self, row: int, text_row: int | None, b: int, text_first: bool):
        def tap(q, k, v, out):
            sub = self.sdpa_calls.get((row, self.call), 0)  # a processor calling SDPA more than once
            self.sdpa_calls[(row, self.call)] = sub + 1
            if text_row is None:
                for kind, x in zip(ATTENTION_KINDS, (k, v, out)):
                    self.record(kind, row, x, sub)
                return
            n_txt = self.view.local(TEXT)
            n = k.shape[2]
            txt = slice(0, n_txt) if text_first else slice(n - n_txt, n)
            img = slice(n_txt, n) if text_first else slice(0, n - n_txt)
            for kind, tkind, x in zip(ATTENTION_KINDS, TEXT_KINDS, (k, v, out)):
                self.record(kind, row, x[:, :, img], sub)
                self.record(tkind, text_row, x[:, :, txt], sub)
        return tap

    def step_end(self, i: int) -> None:
        host = torch.from_numpy(self.counts).to(self.acc_dtype)
        if self.device.type == "cuda":  # pinned + non_blocking: no stream sync before the one .cpu() below
            host = host.pin_memory()
        counts = host.to(self.device, non_blocking=True)
        acc = torch.cat([self.acc, counts[:, None]], dim=1)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(acc)
        self.results[i] = acc.cpu().numpy()  # the step's one host sync (host stays alive until here)
        self.call = -1
        self._new_step()


class _LengthView:
    """A token view that splits nothing: it records each stream's full length per forward, so the taps know how
    many text tokens this rank's share of a joint sequence holds (sp: the ranks the streams are sharded over)."""

    def __init__(self, sp: int, sp_rank: int):
        self.sp, self.sp_rank = sp, sp_rank
        self.full: dict[str, int] = {}

    def begin(self) -> None:
        self.full = {}

    def take(self, stream: str, t: torch.Tensor, dim: int) -> torch.Tensor:
        self.full[stream] = t.shape[dim]
        return t

    def sizes(self, stream: str) -> list[int]:
        return shard_sizes(self.full.get(stream, 0), self.sp)

    def local(self, stream: str) -> int:
        return self.sizes(stream)[self.sp_rank]

    def gather(self, t: torch.Tensor, spec) -> torch.Tensor:
        return t


def _sp_rank(config) -> int:
    """This rank's index among the sequence-parallel ranks (ring x ulysses are the innermost mesh dimensions)."""
    if config.sp == 1:
        return 0
    return torch.distributed.get_rank() % config.sp


@contextlib.contextmanager
def _installed(adapter, layout: _Layout, recorder: _Recorder):
    from .parallel.sequence import wrap_attention

    # first, so that a refused processor leaves nothing installed; the same model everywhere: the same outcome
    restore = wrap_attention([(m, streams) for _, m, streams, _ in layout.attention],
                             lambda m, streams: (lambda: F.scaled_dot_product_attention), root=adapter.model)
    # before the parallel hooks: the streams' full lengths, whatever splits them later
    handles = install(adapter.model, adapter.plan, recorder.view, gathers=False)
    handles.append(adapter.model.register_forward_pre_hook(recorder.model_pre, with_kwargs=True))
    for b, (_, block) in enumerate(layout.blocks):
        handles.append(block.register_forward_hook(recorder.block_post(b, adapter, block), with_kwargs=True))
    text_row = 0
    for row, (_, module, streams, b) in enumerate(layout.attention):
        joint = streams is not None
        module._xdit_tap = recorder.tap(row, text_row if joint else None, b, joint and streams[0] == TEXT)
        text_row += 1 if joint else 0
    try:
        yield
    finally:
        remove(handles)
        restore()
        for _, module, _, _ in layout.attention:
            if hasattr(module, "_xdit_tap"):
                del module._xdit_tap
        for h in handles:
            h.remove()


def _ratio(num: np.ndarray, den: np.ndarray, count: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(num == 0, 0.0, num / den)
    return np.where(count > 0, r, np.nan)


def analyze(loaded, requests: list, config=None) -> Profile:
    """Sample every request (on every rank of the default process group when config has world size > 1) and
    profile the step-to-step change of every attention layer's K, V, output and every block's residual.
    Requests should have batch size 1 and no step cache; each is one 'prompt' of the profile."""
    from .engine import run_job
    from .parallel import ParallelConfig
    from .sampling import prepare

    if not requests:
        raise XDiTError("analyze needs at least one request")
    config = config or ParallelConfig()
    adapter = loaded.adapter
    layout = _layout(adapter)
    device = next(adapter.model.parameters()).device
    steps = None
    timesteps: list[float] = []
    sums = []
    for req in requests:
        if req.cache is not None:
            raise XDiTError("analyze runs every block of every step: the request must not use the step cache")
        job = prepare(adapter, req, loaded.tiny)
        n = len(job.schedule.timesteps)
        if steps is None:
            steps, timesteps = n, [float(t) for t in job.schedule.timesteps]
        elif n != steps:
            raise XDiTError("every request of an analysis must have the same number of steps")
        recorder = _Recorder(layout, device, n, _LengthView(config.sp, _sp_rank(config)))
        with _installed(adapter, layout, recorder):
            run_job(loaded, req, config, step_end=recorder.step_end)
        sums.append(recorder.results)
    data = np.stack(sums)  # [prompts, steps, slots, 3]
    abs_, rel = {}, {}
    for kind in layout.kinds:
        idx = [layout.slot[(kind, r)] for r in range(len(layout.rows[kind]))]
        d = data[:, :, idx].transpose(0, 2, 1, 3)  # [prompts, rows, steps, 3]
        diff, base, count = d[..., 0], d[..., 1], d[..., 2]
        abs_[kind] = _ratio(diff, count, count)
        rel[kind] = _ratio(diff, base, count)
        abs_[kind][:, :, 0] = np.nan
        rel[kind][:, :, 0] = np.nan
    r0 = requests[0]
    meta = {"model": loaded.source, "family": loaded.family, "steps": steps, "height": r0.height,
            "width": r0.width, "size": [r0.height, r0.width], "sampler": r0.sampler, "cfg": r0.cfg, "prompts": len(requests),
            "parallel": config.to_dict()}
    return Profile(list(layout.kinds), abs_, rel, {k: list(v) for k, v in layout.rows.items()}, timesteps, meta)


def profile_step_curve(profile: Profile, kind: str = "residual") -> list[float]:
    """Per-step mean relative change of `kind` (mean over prompts and rows); NaN at step 0 (nothing compared)."""
    if kind not in profile.rel:
        raise XDiTError(f"the profile has no kind {kind!r}: it has {', '.join(profile.kinds)}")
    r = profile.rel[kind]
    out = []
    for t in range(r.shape[2]):
        col = r[:, :, t]
        out.append(float(np.nanmean(col)) if np.isfinite(col).any() else float("nan"))
    return out


def stability(profile: Profile, kind: str) -> float:
    """Coefficient of variation across prompts (std / mean over prompts of each (row, step) value), averaged."""
    r = profile.rel[kind]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = r.mean(axis=0)
        cv = r.std(axis=0) / mean
    cv = np.where(mean == 0, 0.0, cv)
    return float(np.nanmean(cv)) if np.isfinite(cv).any() else float("nan")


def _mean_rel(profile: Profile, kind: str) -> float:
    r = profile.rel[kind]
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def _nullify(a):
    """Nested lists with NaN as None (strict JSON)."""
    if isinstance(a, np.ndarray):
        a = a.tolist()
    if isinstance(a, list):
        return [_nullify(x) for x in a]
    return None if isinstance(a, float) and not math.isfinite(a) else a


def save_profile(profile: Profile, out_dir: str) -> list[str]:
    """Write profile.npz, profile.json and (with matplotlib) the PNGs into out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    arrays = {}
    for kind in profile.kinds:
        arrays[f"{kind}_abs"] = profile.abs[kind]
        arrays[f"{kind}_rel"] = profile.rel[kind]
        arrays[f"{kind}_labels"] = np.array(profile.labels[kind])
    arrays["layer_labels"] = np.array(profile.labels["k"])
    arrays["block_labels"] = np.array(profile.labels["residual"])
    arrays["timesteps"] = np.array(profile.timesteps, dtype=np.float64)
    npz = os.path.join(out_dir, "profile.npz")
    np.savez(npz, **arrays)
    doc = {**profile.meta, "kinds": profile.kinds, "timesteps": profile.timesteps,
           "layer_labels": profile.labels["k"], "block_labels": profile.labels["residual"],
           "labels": profile.labels,
           "curves": {k: _nullify(profile_step_curve(profile, k)) for k in profile.kinds},
           "abs": {k: _nullify(profile.abs[k]) for k in profile.kinds},
           "rel": {k: _nullify(profile.rel[k]) for k in profile.kinds}}
    js = os.path.join(out_dir, "profile.json")
    with open(js, "w") as f:
        json.dump(doc, f)
    return [npz, js] + _plots(profile, out_dir)


def _plots(profile: Profile, out_dir: str) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed (pip install 'comfyui-xdit[plot]'): PNG plots skipped", flush=True)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    steps = np.arange(profile.steps)
    for kind in profile.kinds:
        with np.errstate(invalid="ignore"), _quiet_nanmean():
            grid = np.nanmean(profile.rel[kind], axis=0)  # [rows, steps]
        labels = profile.labels[kind]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * profile.steps + 2), max(3.0, 0.3 * len(labels) + 1.5)))
        with _quiet_nanmean():  # a single row warns about singular limits
            im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(steps)
        ax.set_yticks(np.arange(len(labels)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.set_xlabel("step")
        ax.set_title(f"{kind}: relative change vs previous step (mean over {profile.prompts} prompts)", fontsize=8)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = os.path.join(out_dir, f"heatmap_{kind}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in profile.kinds:
        ax.plot(steps, profile_step_curve(profile, kind), marker="o", label=kind)
    ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("mean relative change")
    values = np.array([profile_step_curve(profile, k) for k in profile.kinds])
    if (values[np.isfinite(values)] > 0).all():
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "curve.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return paths + [path]


@contextlib.contextmanager
def _quiet_nanmean():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def format_table(profile: Profile) -> str:
    lines = [f"{'kind':<10} {'rows':>5} {'mean rel diff':>14} {'stability (CV)':>15}"]
    for kind in profile.kinds:
        lines.append(f"{kind:<10} {len(profile.labels[kind]):>5} {_mean_rel(profile, kind):>14.4g} "
                     f"{stability(profile, kind):>15.4g}")
    curve = profile_step_curve(profile, "residual")
    lines.append("residual per step: " + " ".join("-" if not math.isfinite(c) else f"{c:.4g}" for c in curve))
    return "\n".join(lines)
