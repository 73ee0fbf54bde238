"""PipeFusion: the transformer blocks split into pipeline stages, the image into M patches along height.

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
from .attention import ulysses_gather, ulysses_scatter
from .sequence import shard_range, shard_sizes, wrap_attention


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
    blocks: list[torch.nn.Module]  # this stage's blocks in execution order

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
    plan = adapter.sp_plan()
    flat = [(name, i, b) for name in plan.blocks for i, b in enumerate(getattr(model, name))]
    if stages > len(flat):
        raise ConfigError(f"pipefusion degree {stages} is larger than the model's {len(flat)} transformer blocks")
    sizes = [_param_bytes(b) for _, _, b in flat]
    starts = partition([per_token_bytes(b) for _, _, b in flat], stages, sizes,
                       cap=sum(sizes) / stages + max(sizes)) + [len(flat)]
    mine = flat[starts[stage]:starts[stage + 1]]
    for name in plan.blocks:
        keep = [b for n, _, b in mine if n == name]
        setattr(model, name, torch.nn.ModuleList(keep))
    result = Stage(stage, stages, [b for _, _, b in mine])
    model._xdit_stage = ((stage, stages), result)
    return result


def parameter_report(adapter) -> dict[str, int]:
    """Parameter bytes this process holds: transformer blocks and everything else (embedders, final layer)."""
    plan = adapter.sp_plan()
    blocks = sum(_param_bytes(getattr(adapter.model, n)) for n in plan.blocks)
    return {"blocks": blocks, "other": _param_bytes(adapter.model) - blocks}


class _StageDone(Exception):
    """Raised by the hook on a stage's last block to end the forward there (later stages do the rest)."""

    def __init__(self, image: torch.Tensor, text: torch.Tensor | None):
        self.image, self.text = image, text


@dataclass
class _PatchState:
    """What the hooks and attention need for the forward in progress."""

    tokens: slice = field(default_factory=lambda: slice(0, 0))  # the patch's image tokens in the full image
    image_sizes: list[int] = field(default_factory=list)  # patch tokens per sp rank
    text_sizes: list[int] = field(default_factory=list)   # text tokens per sp rank
    total_tokens: int = 0
    branch: int = 0
    received: tuple | None = None             # (image, text) activations from the previous stage


class _BufferedAttention:
    """SDPA replacement for one self-attention layer: attends the patch's queries to the full-image K/V buffer
    (freshly updated at the patch's tokens) plus the fresh text K/V."""

    def __init__(self, pm, state: _PatchState, joint: bool, text_first: bool):
        self.pm, self.state, self.joint, self.text_first = pm, state, joint, text_first
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _lengths(self) -> list[tuple[int, int]]:
        st = self.state
        return [(i, t if self.joint else 0) for i, t in zip(st.image_sizes, st.text_sizes)]

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        if attn_mask is not None or is_causal or dropout_p or enable_gqa:
            raise NotImplementedError("pipefusion attention supports unmasked, non-causal attention only")
        pm, cfg = self.pm, self.pm.config
        lengths = self._lengths()
        u = cfg.ulysses
        ring_idx, uly_idx = divmod(pm.rank("sp"), u)
        totals = [i + t for i, t in lengths]
        q, k, v = query, key, value
        members = list(range(len(lengths)))  # sp ranks whose tokens k and v hold, in order
        if u > 1:
            group_totals = totals[ring_idx * u:(ring_idx + 1) * u]
            q, k, v = ulysses_scatter(torch.stack([q, k, v]), group_totals, pm.group("ulysses"), pm.comm).unbind(0)
            members = members[ring_idx * u:(ring_idx + 1) * u]
        else:
            members = [pm.rank("sp")]
        if cfg.ring > 1:  # every ring member needs the patch's full fresh K/V for the buffer
            ring_totals = [sum(totals[r * u:(r + 1) * u]) for r in range(cfg.ring)]
            kv = pm.comm.all_gather(torch.stack([k, v]), ring_totals, pm.group("ring"), dim=3, kind="pipefusion_kv")
            k, v = kv.unbind(0)
            members = list(range(len(lengths)))
        # separate text and image tokens of each member's segment
        img_k, img_v, txt_k, txt_v = [], [], [], []
        pos = 0
        for m in members:
            n_img, n_txt = lengths[m]
            seg = slice(pos, pos + n_img + n_txt)
            ks, vs = k[:, :, seg], v[:, :, seg]
            cut = n_txt if self.text_first else n_img
            a_k, b_k, a_v, b_v = ks[:, :, :cut], ks[:, :, cut:], vs[:, :, :cut], vs[:, :, cut:]
            if self.text_first:
                txt_k.append(a_k), img_k.append(b_k), txt_v.append(a_v), img_v.append(b_v)
            else:
                img_k.append(a_k), txt_k.append(b_k), img_v.append(a_v), txt_v.append(b_v)
            pos = seg.stop
        fresh_k, fresh_v = torch.cat(img_k, dim=2), torch.cat(img_v, dim=2)
        st = self.state
        buf = self.buffers.get(st.branch)
        if buf is None or buf[0].shape[2] != st.total_tokens or buf[0].shape[:2] != fresh_k.shape[:2]:
            shape = (*fresh_k.shape[:2], st.total_tokens, fresh_k.shape[3])
            buf = (fresh_k.new_zeros(shape), fresh_v.new_zeros(shape))
            self.buffers[st.branch] = buf
        buf[0][:, :, st.tokens] = fresh_k
        buf[1][:, :, st.tokens] = fresh_v
        keys = torch.cat([*txt_k, buf[0]], dim=2)
        values = torch.cat([*txt_v, buf[1]], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values, scale=scale)
        if u > 1:
            out = ulysses_gather(out, totals[ring_idx * u:(ring_idx + 1) * u], uly_idx, pm.group("ulysses"),
                                 pm.comm)
        return out


class PipelineModel:
    """The hooks that make one stage's forward run on one patch (installed for a whole job)."""

    def __init__(self, adapter, pm, stage: Stage):
        self.adapter, self.pm, self.stage = adapter, pm, stage
        self.state = _PatchState()
        plan = adapter.sp_plan()
        self.plan = plan
        self.sp, self.sp_rank = pm.config.sp, pm.rank("sp")
        mine = {id(b) for b in stage.blocks}
        owned = [(m, j) for m, j in plan.attention if any(m is sub for b in stage.blocks for sub in b.modules())]
        assert mine  # a stage always has blocks
        self.layers = {id(m): _BufferedAttention(pm, self.state, j, plan.text_first) for m, j in owned}
        # wrapped (and checked, agreed by every rank of every stage) before any hook is installed
        self.restore = wrap_attention(owned, lambda module, joint: (lambda layer=self.layers[id(module)]: layer),
                                      root=adapter.model, where=f"pipefusion stage {stage.index} of {stage.count}",
                                      collective=True)
        handles = [plan.image.register_forward_hook(self._image)]
        if plan.text is not None:
            handles.append(plan.text.register_forward_hook(self._text))
        if plan.rope is not None:
            handles.append(plan.rope.register_forward_hook(self._rope))
        if stage.last:
            handles.append(plan.gather.register_forward_hook(self._gather))
        else:
            handles.append(stage.blocks[-1].register_forward_hook(self._end_stage))
        self.handles = handles

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.restore()

    def set_patch(self, tokens: slice, total_tokens: int, text_tokens: int, branch: int) -> None:
        st = self.state
        st.tokens, st.total_tokens, st.branch = tokens, total_tokens, branch
        st.image_sizes = shard_sizes(tokens.stop - tokens.start, self.sp)
        st.text_sizes = shard_sizes(text_tokens, self.sp)

    def local_image_tokens(self) -> int:
        return self.state.image_sizes[self.sp_rank]

    def local_text_tokens(self) -> int:
        return self.state.text_sizes[self.sp_rank]

    # hooks
    def _image(self, module, args, out):
        if not self.stage.first:
            return self.state.received[0]
        st = self.state
        return out[:, st.tokens][:, shard_range(st.image_sizes, self.sp_rank)]

    def _text(self, module, args, out):
        if not self.stage.first:
            return self.state.received[1]
        return out[:, shard_range(self.state.text_sizes, self.sp_rank)]

    def _rope(self, module, args, out):
        st = self.state
        n_txt = sum(st.text_sizes)
        txt = shard_range(st.text_sizes, self.sp_rank)
        img = shard_range(st.image_sizes, self.sp_rank)
        return tuple(torch.cat([t[txt], t[n_txt:][st.tokens][img]]) for t in out)

    def _end_stage(self, module, args, out):
        raise _StageDone(*self.adapter.block_streams(out))

    def _gather(self, module, args, out):
        st = self.state
        patch = self.pm.comm.all_gather(out, st.image_sizes, self.pm.group("sp"), dim=1, kind="gather") \
            if self.sp > 1 else out
        full = patch.new_zeros(out.shape[0], st.total_tokens, out.shape[2])
        full[:, st.tokens] = patch
        return full


def _patch_rows(rows: int, patches: int) -> list[tuple[int, int]]:
    sizes = shard_sizes(rows, patches)
    starts = [sum(sizes[:i]) for i in range(patches)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def check_pipefusion(config, adapter, height: int, width: int) -> None:
    rows, cols = height // (8 * adapter.patch), width // (8 * adapter.patch)
    if config.num_patches > rows:
        raise ConfigError(f"num_patches {config.num_patches} is larger than the latent height in patches ({rows})")
    if (rows // config.num_patches) * cols < config.sp:
        raise ConfigError(f"a patch of {rows // config.num_patches}x{cols} tokens has fewer tokens than the "
                          f"sequence-parallel degree {config.sp}")
    if config.warmup_steps < 1:
        raise ConfigError("pipefusion needs warmup_steps >= 1 to fill the K/V buffers")
    blocks = sum(len(getattr(adapter.model, n)) for n in adapter.sp_plan().blocks)
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
    x = job.x.clone()
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
    text_tokens = cfg_branches[0].cond.shape[1] if adapter.sp_plan().text is not None else 0
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
                    model.set_patch(slice(r0 * cols, r1 * cols), total_tokens, text_tokens, 0)
                    n_i, n_t = model.local_image_tokens(), model.local_text_tokens()
                    like = [((b, n_i, hidden), dtype)] + ([((b, n_t, hidden), dtype)] if text_tokens else [])
                    messages += [like] * len(cfg_branches)
                acts_in.expect(messages)
            for r0, r1 in work:
                if stage.first:  # latent rows of this patch from the previous step
                    while received_upto < r1:
                        a, z = pending.pop(0)
                        x[:, :, a * p:z * p] = latents_in.take()[0]
                        received_upto = z
                tokens = slice(r0 * cols, r1 * cols)
                preds = []
                for k, branch in enumerate(cfg_branches):
                    model.set_patch(tokens, total_tokens, text_tokens, k)
                    if cache is not None:
                        cache.slot = (k, r0, r1)
                    if not stage.first:
                        got = acts_in.take()
                        model.state.received = (got[0], got[1] if text_tokens else None)
                    sched_in = schedulers[0]
                    x_in = x
                    if hasattr(sched_in, "scale_model_input"):
                        s_in = copy.copy(sched_in)
                        s_in._step_index = s_in.index_for_timestep(t)
                        x_in = s_in.scale_model_input(x, t)
                    try:
                        out = adapter.predict(x_in, t, branch)
                    except _StageDone as done:
                        acts = [done.image] + ([done.text] if text_tokens else [])
                        outbox.post(pm.comm.send(acts, stage.index + 1, group, kind="pipefusion"))
                        continue
                    preds.append(out[:, :, r0 * p:r1 * p].float())
                if not stage.last:
                    continue
                pred = _guide(preds, job.cfg, pm)
                # the sampler step, per scheduler patch covered by this work item
                for m, (a, z) in enumerate(patches):
                    if a >= r0 and z <= r1:
                        rs = slice((a - r0) * p, (z - r0) * p)
                        x[:, :, a * p:z * p] = schedulers[m].step(pred[:, :, rs], t, x[:, :, a * p:z * p],
                                                                  return_dict=False)[0].float()
                if i < len(timesteps) - 1:
                    outbox.post(pm.comm.send([x[:, :, r0 * p:r1 * p].clone()], 0, group, kind="pipefusion_latent"))
            if stage.first and i < len(timesteps) - 1:
                pending.extend(work)
                latents_in.expect([[((b, x.shape[1], (z - a) * p, w), torch.float32)] for a, z in work])
            if cache is not None:
                cache.end_step()
            on_step(i, x, reuse)
        outbox.flush()
    finally:
        model.close()
        blocks_cached.close()
    # the final latents live on the last stage
    return pm.comm.broadcast(x, P - 1, group, kind="pipefusion_result")


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


def _guide(preds: list[torch.Tensor], scale: float, pm) -> torch.Tensor:
    if pm.config.cfg == 2:
        both = pm.comm.all_gather(preds[0][None], [1, 1], pm.group("cfg"), dim=0, kind="cfg")
        pos, neg = both[0], both[1]
    elif len(preds) == 2:
        pos, neg = preds
    else:
        return preds[0]
    return neg + scale * (pos - neg)


