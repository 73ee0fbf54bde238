"""Skip-layer calls (ComfyUI's SkipLayerGuidance): named transformer blocks pass their token streams through
unchanged for one model call, as ComfyUI's block replacement that returns its arguments does.

A family names the block kinds ComfyUI's model of it honours (ComfySpec.skip_blocks: "double_block" -> our
BlockList of the same blocks in the same order). A skipped block's forward is not run; it returns its inputs in the
order its BlockList declares for its output, so under sequence parallelism each rank passes its own shard through.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

from .cache import _stream_in
from .errors import XDiTError
from .parallel.plan import positions


def skip_targets(adapter, skips: Mapping[str, Sequence[int]]) -> list[tuple]:
    """(block module, its BlockList) for each skipped block; one-line XDiTError for a kind or index the model
    does not have."""
    if not skips:
        return []
    comfy = adapter.spec.variant(adapter.variant).comfy if adapter.variant else None
    names = dict(comfy.skip_blocks) if comfy is not None else {}
    lists = {bl.name: bl for bl in adapter.plan.blocks}
    out = []
    for kind, indices in sorted(skips.items()):
        if kind not in names:
            have = ", ".join(names) or "none"
            raise XDiTError(f"skipping {kind} layers is not supported for {adapter.variant or adapter.family} "
                            f"(block kinds it can skip: {have})")
        blocks = getattr(adapter.model, names[kind])
        for i in sorted(set(indices)):
            if not 0 <= i < len(blocks):
                raise XDiTError(f"cannot skip {kind} {i}: the model has {len(blocks)} ({names[kind]})")
            out.append((blocks[i], lists[names[kind]]))
    return out


def _pass_through(block, blocks) -> Callable:
    names = [key for key, _ in blocks.inputs]
    pos = positions(block)

    def forward(*args, **kwargs):
        streams = [_stream_in(k, pos.get(k, i) if isinstance(k, str) else k, args, kwargs)
                   for i, k in enumerate(names)]
        return streams[0] if blocks.outputs is None else tuple(streams[i] for i in blocks.outputs)

    return forward


@contextlib.contextmanager
def skipped_blocks(adapter, skips: Mapping[str, Sequence[int]] | None) -> Iterator[None]:
    """The model with the named blocks passing their streams through, for the calls inside the block."""
    targets = skip_targets(adapter, skips or {})
    saved = [vars(block).get("forward") for block, _ in targets]
    for block, blocks in targets:
        block.forward = _pass_through(block, blocks)
    try:
        yield
    finally:
        for (block, _), before in zip(targets, saved):
            if before is None:
                del block.forward  # back to the class's forward
            else:
                block.forward = before
