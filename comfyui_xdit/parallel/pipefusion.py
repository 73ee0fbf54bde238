"""PipeFusion: the transformer blocks split into pipeline stages, the image into M patches along height (a video's
frames are folded into its rows: patches are contiguous ranges of the flattened T x H x W token sequence, frame
after frame, row after row).

Warm-up steps run the whole image through the stages one after another and fill every self-attention layer's
K/V buffer. Afterwards each stage runs its blocks on one patch at a time; attention uses the full-image K/V
buffer, whose slice for the current patch is fresh and the rest from earlier patches of this step or from the
previous step. Only patch activations move between stages; the last stage applies the sampler step to the
patch and sends the new latent rows back to stage 0, so the next step's first patch starts while later ones
drain. Sequence parallelism works inside a stage (each patch split over the ring x ulysses ranks).

The transformer runs unmodified: forward hooks pick the patch tokens (or inject the received activations) at
the embedders, end the forward after the stage's last block, and put the patch output back in a full-size
tensor at the final projection; self-attention processors are wrapped as in sequence parallelism.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..adapters.base import per_token_bytes
from ..cache import BlockCache
from ..errors import ConfigError
from ..families.spec import IMAGE
from ..lora import record_layout
from . import plan as plan_mod
from .attention import _bias_of, padding_of, ulysses_gather, ulysses_scatter, zero_padded_queries
from .plan import regroup, shard_range, shard_sizes
from .sequence import wrap_attention


def partition(costs: list[int], parts: int, weights: list[int] | None = None, cap: float | None = None) -> list[int]:
    """Start index of each of `parts` contiguous, non-empty groups of `costs` minimising the largest group sum;
    with `weights` and `cap`, only groups whose weight sum is at most `cap` are allowed."""
    n = len(costs)
    prefix, wprefix = [0], [0]
    for c, w in zip(costs, weights or [0] * n):
        prefix.append(prefix[-1] + c)
        wprefix.append(wprefix[-1] + w)
    inf = float("inf")
    # best[p][i]: smallest achievable max over the first i items in p groups
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                if cap is not None and wprefix[i] - wprefix[j] > cap:
                    continue
                v = max(best[p - 1][j], prefix[i] - prefix[j])
                if v < best[p][i]:
                    best[p][i], cut[p][i] = v, j
    if best[parts][n] == inf:
        raise ConfigError(f"no split into {parts} stages keeps each under {cap} parameter bytes")
    starts, i = [], n
    for p in range(parts, 0, -1):
        i = cut[p][i]
        starts.append(i)
    return starts[::-1]


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass
class Stage:
    index: int
    count: int
    blocks: list[torch.nn.Module]  # this stage's pipelined blocks in execution order
    extra: list[torch.nn.Module] = field(default_factory=list)  # blocks of unpipelined lists (first stage only)

    @property
    def modules(self) -> list[torch.nn.Module]:
        return self.extra + self.blocks

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def shard_stage(adapter, stage: int, stages: int) -> Stage:
    """Keep only this stage's blocks in the model (the others are dropped and their memory freed).

    Blocks are split into contiguous stages balanced by compute per image token (the parameter bytes a block
    applies to every token: a joint block's text stream and adaLN modulation hardly count), subject to each
    stage holding at most 1/P of the blocks' parameter bytes plus one block. Idempotent for the same layout;
    a model sharded for another layout must be reloaded.
    """
    model = adapter.model
    layout = getattr(model, "_xdit_stage", None)
    if layout is not None:
        if layout[0] != (stage, stages):
            raise ConfigError(f"this model was loaded for pipefusion stage {layout[0][0]} of {layout[0][1]}; "
                              f"load it again for stage {stage} of {stages}")
        return layout[1]
    lists = adapter.plan.blocks
    flat = [(bl.name, i, b) for bl in lists if bl.pipelined for i, b in enumerate(getattr(model, bl.name))]
    if stages > len(flat):
        raise ConfigError(f"pipefusion degree {stages} is larger than the model's {len(flat)} transformer blocks")
    sizes = [_param_bytes(b) for _, _, b in flat]
    starts = partition([per_token_bytes(b) for _, _, b in flat], stages, sizes,
                       cap=sum(sizes) / stages + max(sizes)) + [len(flat)]
    mine = flat[starts[stage]:starts[stage + 1]]
    record_layout(model)  # LoRA keys name blocks by their index in the full model
    extra = [b for bl in lists if not bl.pipelined for b in getattr(model, bl.name)] if stage == 0 else []
    for bl in lists:
        if bl.pipelined:
            keep = [b for n, _, b in mine if n == bl.name]
        else:  # the first stage runs the whole list
            keep = list(getattr(model, bl.name)) if stage == 0 else []
        setattr(model, bl.name, torch.nn.ModuleList(keep))
    result = Stage(stage, stages, [b for _, _, b in mine], extra)
    model._xdit_stage = ((stage, stages), result)
    return result


def parameter_report(adapter) -> dict[str, int]:
    """Parameter bytes this process holds: transformer blocks and everything else (embedders, final layer)."""
    blocks = sum(_param_bytes(getattr(adapter.model, bl.name)) for bl in adapter.plan.blocks)
    return {"blocks": blocks, "other": _param_bytes(adapter.model) - blocks}


class _StageDone(Exception):
    """Raised by the hook on a stage's last block to end the forward there (later stages do the rest)."""

    def __init__(self, streams: dict[str, torch.Tensor]):
        self.streams = streams  # the block's output, per token stream


class PatchView:
    """PipeFusion's token view: the image stream restricted to the current patch's tokens (the last patch also
    takes any tail the model appends to the image stream), then every stream sharded over the sp ranks."""

    def __init__(self, sp: int, rank: int, all_gather):
        self.sp, self.rank, self._all_gather = sp, rank, all_gather
        self.tokens = slice(0, 0)            # the patch's image tokens
        self.expected: dict[str, int] = {}  # each stream's full length in this job
        self.branch = 0
        self.received: dict[str, torch.Tensor] | None = None  # activations from the previous stage

    def set_patch(self, tokens: slice, expected: dict[str, int], branch: int) -> None:
        self.tokens, self.expected, self.branch = tokens, expected, branch

    def begin(self) -> None:
        pass

    def _length(self, stream: str) -> int:
        if stream == IMAGE:
            return self.tokens.stop - self.tokens.start
        return self.expected.get(stream, 0)

    def take(self, stream: str | tuple[str, ...], t: torch.Tensor, dim: int) -> torch.Tensor:
        if not isinstance(stream, str):
            return plan_mod.take_joint(self, stream, t, dim, self.expected)
        if t.shape[dim] != self.expected.get(stream):
            raise ConfigError(f"pipefusion: the {stream} stream has {t.shape[dim]} tokens, expected "
                              f"{self.expected.get(stream)} (the family's stream_lengths)")
        if stream == IMAGE:
            t = t.narrow(dim, self.tokens.start, self._length(IMAGE))
        sizes = self.sizes(stream)
        return t.narrow(dim, shard_range(sizes, self.rank).start, sizes[self.rank])

    def sizes(self, stream: str) -> list[int]:
        return shard_sizes(self._length(stream), self.sp)

    def gather(self, t: torch.Tensor, spec) -> torch.Tensor:
        """The patch's output put into a full-size tensor (zeros outside the patch's image tokens)."""
        per_rank = [[self.sizes(s)[r] for s in spec.streams] for r in range(self.sp)]
        if self.sp > 1:
            t = regroup(self._all_gather(t, [sum(p) for p in per_rank], spec.dim), per_rank, spec.dim)
        parts = t.split([self._length(s) for s in spec.streams], dim=spec.dim)
        out = []
        for stream, part in zip(spec.streams, parts):
            if stream == IMAGE:
                shape = list(part.shape)
                shape[spec.dim] = self.expected[IMAGE]
                full = part.new_zeros(shape)
                full.narrow(spec.dim, self.tokens.start, part.shape[spec.dim]).copy_(part)
                part = full
            out.append(part)
        return torch.cat(out, dim=spec.dim) if len(out) > 1 else out[0]


class _BufferedAttention:
    """SDPA replacement for one self-attention layer: attends the patch's queries to the full-image K/V buffer
    (freshly updated at the patch's tokens) plus the fresh K/V of the other streams (text). A key-padding mask
    is buffered with the image keys it belongs to."""

    def __init__(self, pm, view: PatchView, streams: tuple[str, ...]):
        self.pm, self.view, self.streams = pm, view, streams
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        if is_causal or dropout_p or enable_gqa:
            raise NotImplementedError("pipefusion attention supports non-causal attention only")
        pm, cfg, view = self.pm, self.pm.config, self.view
        per_stream = [view.sizes(s) for s in self.streams]
        sp = len(per_stream[0])
        totals = [sum(p[m] for p in per_stream) for m in range(sp)]
        valid = padded_queries = None
        if attn_mask is not None:  # every sp rank's key mask, in sp-rank order
            mine, queries = padding_of(attn_mask, query.shape[0], key.shape[2])
            local = mine.to(torch.uint8).contiguous()
            valid = (pm.comm.all_gather(local, totals, pm.group("sp"), dim=1, kind="mask") if sp > 1
                     else local).bool()
            padded_queries = mine if queries else None
        u = cfg.ulysses
        ring_idx, uly_idx = divmod(pm.rank("sp"), u)
        q, k, v = query, key, value
        members = [pm.rank("sp")]  # sp ranks whose tokens k and v hold, in order
        if u > 1:
            group_totals = totals[ring_idx * u:(ring_idx + 1) * u]
            q, k, v = ulysses_scatter((q, k, v), group_totals, pm.group("ulysses"), pm.comm).unbind(0)
            members = list(range(ring_idx * u, (ring_idx + 1) * u))
        if cfg.ring > 1:  # every ring member needs the patch's full fresh K/V for the buffer
            ring_totals = [sum(totals[r * u:(r + 1) * u]) for r in range(cfg.ring)]
            kv = pm.comm.all_gather(torch.stack([k, v]), ring_totals, pm.group("ring"), dim=3, kind="pipefusion_kv")
            k, v = kv.unbind(0)
            members = list(range(sp))
        # each member's segment holds its part of every stream, in the processor's order
        seg_k = k.split([totals[m] for m in members], dim=2)
        seg_v = v.split([totals[m] for m in members], dim=2)
        seg_mask = None
        if valid is not None:
            start = sum(totals[:members[0]])
            seg_mask = valid[:, start:start + sum(totals[m] for m in members)].split([totals[m] for m in members], 1)
        keys = {s: [] for s in self.streams}
        vals = {s: [] for s in self.streams}
        masks = {s: [] for s in self.streams}
        for i, m in enumerate(members):
            sizes = [p[m] for p in per_stream]
            for s, kk, vv in zip(self.streams, seg_k[i].split(sizes, dim=2), seg_v[i].split(sizes, dim=2)):
                keys[s].append(kk)
                vals[s].append(vv)
            if seg_mask is not None:
                for s, mm in zip(self.streams, seg_mask[i].split(sizes, dim=1)):
                    masks[s].append(mm)
        all_k, all_v, all_m = [], [], []
        for s in self.streams:
            if s == IMAGE:
                bk, bv, bm = self._buffered(torch.cat(keys[s], 2), torch.cat(vals[s], 2),
                                            torch.cat(masks[s], 1) if seg_mask is not None else None)
                all_k.append(bk), all_v.append(bv), all_m.append(bm)
            else:
                all_k += keys[s]
                all_v += vals[s]
                all_m += masks[s] if seg_mask is not None else []
        bias = None if seg_mask is None else _bias_of(torch.cat(all_m, dim=1), q.dtype)
        out = F.scaled_dot_product_attention(q, torch.cat(all_k, dim=2), torch.cat(all_v, dim=2), attn_mask=bias,
                                             scale=scale)
        if u > 1:
            out = ulysses_gather(out, totals[ring_idx * u:(ring_idx + 1) * u], uly_idx, pm.group("ulysses"), pm.comm)
        return out if padded_queries is None else zero_padded_queries(out, padded_queries)

    def _buffered(self, fresh_k, fresh_v, fresh_m):
        """The full image's K/V (and key mask) with this patch's tokens replaced by the fresh ones."""
        view = self.view
        total = view.expected[IMAGE]
        buf = self.buffers.get(view.branch)
        if buf is None or buf[0].shape[2] != total or buf[0].shape[:2] != fresh_k.shape[:2]:
            shape = (*fresh_k.shape[:2], total, fresh_k.shape[3])
            mask = None if fresh_m is None else torch.ones(fresh_m.shape[0], total, dtype=torch.bool,
                                                           device=fresh_m.device)
            buf = (fresh_k.new_zeros(shape), fresh_v.new_zeros(shape), mask)
            self.buffers[view.branch] = buf
        buf[0][:, :, view.tokens] = fresh_k
        buf[1][:, :, view.tokens] = fresh_v
        if fresh_m is not None:
            buf[2][:, view.tokens] = fresh_m
        return buf


class PipelineModel:
    """The hooks that make one stage's forward run on one patch (installed for a whole job): the family's token
    plan through a PatchView; on later stages the received activations replace the first block's inputs; the
    stage's last block ends the forward."""

    def __init__(self, adapter, pm, stage: Stage):
        self.adapter, self.pm, self.stage = adapter, pm, stage
        self.sp, self.sp_rank = pm.config.sp, pm.rank("sp")
        self.view = PatchView(self.sp, self.sp_rank, lambda t, sizes, dim: pm.comm.all_gather(
            t, sizes, pm.group("sp"), dim=dim, kind="gather"))
        model, plan = adapter.model, adapter.plan
        owned = [(m, streams) for m, streams in plan_mod.attention_modules(model, plan)
                 if any(m is sub for b in stage.modules for sub in b.modules())]
        self.layers = {id(m): _BufferedAttention(pm, self.view, streams) for m, streams in owned}
        # wrapped (and checked, agreed by every rank of every stage) before any hook is installed
        self.restore = wrap_attention(owned, lambda module, streams: (lambda layer=self.layers[id(module)]: layer),
                                      root=model, where=f"pipefusion stage {stage.index} of {stage.count}",
                                      collective=True)
        try:
            handles = plan_mod.install(model, plan, self.view, gathers=stage.last)
            if not stage.first:
                first = stage.blocks[0]
                handles.append(first.register_forward_pre_hook(self._inject(adapter.block_list(first)),
                                                               with_kwargs=True))
            if not stage.last:
                last = stage.blocks[-1]
                handles.append(last.register_forward_hook(self._end_stage(adapter.block_list(last))))
        except BaseException:
            self.restore()
            raise
        self.handles = handles

    def close(self) -> None:
        plan_mod.remove(self.handles)
        self.restore()

    def set_patch(self, tokens: slice, expected: dict[str, int], branch: int) -> None:
        self.view.set_patch(tokens, expected, branch)

    def local_tokens(self, stream: str) -> int:
        return self.view.sizes(stream)[self.sp_rank]

    # hooks
    def _inject(self, blocks):
        """Replace the block's stream inputs with the previous stage's activations (joined as this list takes
        them)."""
        positions = plan_mod.positions(self.stage.blocks[0])

        def hook(module, args, kwargs):
            got = self.view.received
            args = list(args)
            for key, streams in blocks.inputs:
                value = torch.cat([got[s] for s in streams], dim=1) if len(streams) > 1 else got[streams[0]]
                i = positions.get(key) if isinstance(key, str) else key
                if isinstance(key, str) and (key in kwargs or i is None or i >= len(args)):
                    kwargs[key] = value
                else:
                    args[i] = value
            return tuple(args), kwargs

        return hook

    def _end_stage(self, blocks):
        def hook(module, args, out):
            raise _StageDone(self.streams_of(blocks, out))

        return hook

    def streams_of(self, blocks, out) -> dict[str, torch.Tensor]:
        """A block's output per token stream (a joint stream cut at the local lengths)."""
        outputs = (out,) if blocks.outputs is None else tuple(out[blocks.outputs.index(i)]
                                                             for i in range(len(blocks.inputs)))
        found: dict[str, torch.Tensor] = {}
        for (_, streams), t in zip(blocks.inputs, outputs):
            parts = t.split([self.local_tokens(s) for s in streams], dim=1) if len(streams) > 1 else (t,)
            found.update(zip(streams, parts))
        return found


def _patch_rows(rows: int, patches: int) -> list[tuple[int, int]]:
    sizes = shard_sizes(rows, patches)
    starts = [sum(sizes[:i]) for i in range(patches)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def check_pipefusion(config, adapter, height: int, width: int, frames: int = 1) -> None:
    """`frames`: latent frames (their rows, frame after frame, are the rows patches split)."""
    side = adapter.latent.downscale * adapter.patch
    rows, cols = frames * (height // side), width // side
    if config.num_patches > rows:
        raise ConfigError(f"num_patches {config.num_patches} is larger than the latent height in patches ({rows})")
    if (rows // config.num_patches) * cols < config.sp:
        raise ConfigError(f"a patch of {rows // config.num_patches}x{cols} tokens has fewer tokens than the "
                          f"sequence-parallel degree {config.sp}")
    if config.warmup_steps < 1:
        raise ConfigError("pipefusion needs warmup_steps >= 1 to fill the K/V buffers")
    blocks = sum(len(getattr(adapter.model, bl.name)) for bl in adapter.plan.blocks if bl.pipelined)
    if getattr(adapter.model, "_xdit_stage", None) is None and config.pipefusion > blocks:
        raise ConfigError(f"pipefusion degree {config.pipefusion} is larger than the model's {blocks} "
                          "transformer blocks")


class PipelineStopped(Exception):
    """Stage 0 decided to stop (cancel); every stage of the pipeline raises it at the same step."""


def pipefusion_loop(adapter, job, pm, on_step, cfg_branches, stop_requested) -> torch.Tensor:
    """Run the job's steps through the pipeline; returns the final model-space latents on every rank.

    cfg_branches: the conditionings this pipeline computes ([positive] or [positive, negative], or this cfg
    half's branch); the last stage combines guidance (exchanging with the other cfg half when cfg parallel).
    stop_requested(): called on stage-0 ranks at each step start, the same answer on all of them; the decision
    travels down the pipeline ahead of the step's activations, so stages never wait on a per-step barrier.
    """
    cfg = pm.config
    stage = shard_stage(adapter, pm.rank("pipefusion"), cfg.pipefusion)
    group = pm.group("pipefusion")
    P, M = cfg.pipefusion, cfg.num_patches
    shape = job.x.shape  # [B, C, h, w] or a video's [B, C, T, h, w]
    x = job.x.clone().flatten(2, -2)  # frames folded into rows (the token order): [B, C, T h, w]
    device = x.device
    b, _, h, w = x.shape
    p = adapter.patch
    rows, cols = h // p, w // p
    total_tokens = rows * cols
    patches = _patch_rows(rows, M)
    sched = job.schedule.scheduler
    schedulers = [copy.deepcopy(sched) for _ in patches]
    hidden = adapter.hidden_size
    dtype = adapter.dtype
    # each branch's stream lengths (the CFG branches' text lengths may differ)
    expected = [adapter.stream_lengths(total_tokens, branch.cond.shape[1]) for branch in cfg_branches]
    # the token streams that cross a stage boundary, in a fixed order
    crossing = sorted({s for bl in adapter.plan.blocks if bl.pipelined for _, streams in bl.inputs for s in streams})

    def patch_tokens(r0: int, r1: int, k: int) -> slice:  # the last patch also takes any tail of the image stream
        return slice(r0 * cols, expected[k][IMAGE] if r1 == rows else r1 * cols)

    timesteps = job.schedule.timesteps
    model = PipelineModel(adapter, pm, stage)
    cache = None
    if job.cache is not None:  # the stage's blocks; stage 0 measures its first block(s); decided ahead per step
        first = min(job.cache.first_blocks, len(stage.blocks)) if stage.first else 0
        cache = BlockCache(adapter, stage.blocks, job.cache, first, contributes=pm.rank("cfg") == 0,
                           pipelined=True, warmup=cfg.warmup_steps + 1)
    outbox = _Outbox()
    latents_in = _Inbox(pm, P - 1, group, device)   # stage 0: latent rows from the last stage, in order
    acts_in = _Inbox(pm, stage.index - 1, group, device)  # later stages: activations from the previous one
    pending: list[tuple[int, int]] = []  # stage 0: latent rows the last stage will send, in order
    received_upto = rows  # stage 0 holds every row of the current step's input
    blocks_cached = contextlib.ExitStack()
    if cache is not None:
        blocks_cached.enter_context(cache.installed())
    try:
        for i, t in enumerate(timesteps):
            warm = i < cfg.warmup_steps
            work = [(0, rows)] if warm else patches
            if stage.first and i > 0:
                received_upto = 0
            stop = stage.first and stop_requested()
            reuse = stage.first and cache is not None and cache.decide_ahead(
                lambda v: pm.comm.all_reduce_sum(v, pm.group("stage")))
            stop, reuse = _pass_flags(stage, pm, group, device, stop, reuse, outbox)
            if cache is not None and not stage.first:
                cache.follow(reuse)
            if stop:
                if stage.first:  # take the rows the last stage still sends for the previous step
                    while latents_in.waiting():
                        latents_in.take()
                outbox.flush()
                raise PipelineStopped(f"stopped before step {i + 1}")
            if not stage.first:  # this step's activations will all come: post their receives ahead
                messages = []
                for r0, r1 in work:
                    for k in range(len(cfg_branches)):
                        model.set_patch(patch_tokens(r0, r1, k), expected[k], k)
                        messages.append([((b, model.local_tokens(s), hidden), dtype) for s in crossing])
                acts_in.expect(messages)
            for r0, r1 in work:
                if stage.first:  # latent rows of this patch from the previous step
                    while received_upto < r1:
                        a, z = pending.pop(0)
                        x[:, :, a * p:z * p] = latents_in.take()[0]
                        received_upto = z
                preds = []
                for k, branch in enumerate(cfg_branches):
                    model.set_patch(patch_tokens(r0, r1, k), expected[k], k)
                    if cache is not None:
                        cache.slot = (k, r0, r1)
                    if not stage.first:
                        model.view.received = dict(zip(crossing, acts_in.take()))
                    sched_in = schedulers[0]
                    x_in = x
                    if hasattr(sched_in, "scale_model_input"):
                        s_in = copy.copy(sched_in)
                        s_in._step_index = s_in.index_for_timestep(t)
                        x_in = s_in.scale_model_input(x, t)
                    try:
                        out = adapter.predict(x_in.view(shape), t, branch).flatten(2, -2)
                    except _StageDone as done:
                        acts = [done.streams[s] for s in crossing]
                        outbox.post(pm.comm.send(acts, stage.index + 1, group, kind="pipefusion"))
                        continue
                    preds.append(out[:, :, r0 * p:r1 * p].float())
                if not stage.last:
                    continue
                pred = _guide(preds, job, pm)
                # the sampler step, per scheduler patch covered by this work item
                for m, (a, z) in enumerate(patches):
                    if a >= r0 and z <= r1:
                        rs = slice((a - r0) * p, (z - r0) * p)
                        # a copy: a multistep scheduler (UniPC) keeps the sample it was given for its corrector
                        x[:, :, a * p:z * p] = schedulers[m].step(pred[:, :, rs], t, x[:, :, a * p:z * p].clone(),
                                                                  return_dict=False)[0].float()
                if i < len(timesteps) - 1:
                    outbox.post(pm.comm.send([x[:, :, r0 * p:r1 * p].clone()], 0, group, kind="pipefusion_latent"))
            if stage.first and i < len(timesteps) - 1:
                pending.extend(work)
                latents_in.expect([[((b, x.shape[1], (z - a) * p, w), torch.float32)] for a, z in work])
            if cache is not None:
                cache.end_step()
            on_step(i, x.view(shape), reuse)
        outbox.flush()
    finally:
        model.close()
        blocks_cached.close()
    # the final latents live on the last stage
    return pm.comm.broadcast(x, P - 1, group, kind="pipefusion_result").view(shape)


class _Inbox:
    """Receives from one peer in a known order, posted ahead (up to `depth` messages) so transfers overlap
    compute. Only messages the peer is sure to send are ever expected."""

    def __init__(self, pm, peer: int, group, device, depth: int = 2):
        self.pm, self.peer, self.group, self.device, self.depth = pm, peer, group, device, depth
        self.queue: list = []    # message layouts not yet posted
        self.posted: list = []   # posted receives, oldest first

    def expect(self, messages: list) -> None:
        self.queue += messages
        self._fill()

    def _fill(self) -> None:
        while self.queue and len(self.posted) < self.depth:
            self.posted.append(self.pm.comm.post_recv(self.queue.pop(0), self.peer, self.group, self.device))

    def waiting(self) -> bool:
        return bool(self.posted or self.queue)

    def take(self) -> list[torch.Tensor]:
        got = self.posted.pop(0).wait()
        self._fill()
        return got


class _Outbox:
    """Sends in flight: posted without waiting (a stage must not block on a peer that is itself sending), their
    tensors kept alive until done."""

    def __init__(self):
        self.works: list = []

    def post(self, works: list) -> None:
        self.works = [w for w in self.works if not w[0].is_completed()] + works

    def flush(self) -> None:
        for w, _ in self.works:
            w.wait()
        self.works = []


def _pass_flags(stage: Stage, pm, group, device, stop: bool, reuse: bool, outbox: _Outbox) -> tuple[bool, bool]:
    """Stage 0 sends its decisions for the step (stop; reuse the cached blocks) to stage 1, each stage forwards
    them; returns them."""
    if not stage.first:
        flags = pm.comm.recv([((2,), torch.float32)], stage.index - 1, group, device)[0].tolist()
        stop, reuse = flags[0] > 0, flags[1] > 0
    if not stage.last:
        flags = torch.tensor([float(stop), float(reuse)], device=device)
        outbox.post(pm.comm.send([flags], stage.index + 1, group, kind="control"))
    return stop, reuse


def _guide(preds: list[torch.Tensor], job, pm) -> torch.Tensor:
    """The guided prediction of one patch (whole rows of tokens, so per-token CFG rules apply to it as well)."""
    if pm.config.cfg == 2:
        both = pm.comm.all_gather(preds[0][None], [1, 1], pm.group("cfg"), dim=0, kind="cfg")
        pos, neg = both[0], both[1]
    elif len(preds) == 2:
        pos, neg = preds
    else:
        return preds[0]
    return job.guide(pos, neg)


