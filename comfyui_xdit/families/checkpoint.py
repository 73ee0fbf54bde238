"""Helpers the family files use to convert single-file checkpoints and read configs from tensor shapes. They work
on real tensors and on anything with a `.shape` (the queue-time checks pass shapes only)."""
from __future__ import annotations

import re
from typing import Callable, Iterable

from ..errors import WeightsError


def count(sd, prefix: str) -> int:
    """Blocks of a numbered ModuleList: 1 + the largest index under `prefix`."""
    ids = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def head_dim(sd, norm_key: str, hidden: int, base_head_dim: int, min_heads: int = 4) -> int:
    """Head size: exact from a per-head q-norm weight when the model has one; else the published head size when
    `hidden` is a multiple of it giving at least `min_heads` heads (all published models); else 4 heads, the
    convention of this project's small test models. `config_overrides` covers anything else."""
    if norm_key in sd:
        return int(sd[norm_key].shape[0])
    if hidden % base_head_dim == 0 and hidden // base_head_dim >= min_heads:
        return base_head_dim
    if hidden % 4:
        raise WeightsError(f"cannot infer the attention head count of a {hidden}-wide model; "
                           "pass config_overrides={'num_attention_heads': ..., 'attention_head_dim': ...}")
    return hidden // 4


def require(sd, *keys: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise WeightsError(f"incomplete checkpoint: missing keys {', '.join(missing[:4])}")


def run_converter(convert: Callable[[dict], dict], sd: dict, name: str) -> dict:
    """Apply one of diffusers' single-file converters, which consume the keys they convert: any key left over is
    an error, as is a missing one."""
    remaining = dict(sd)
    try:
        converted = convert(remaining)
    except KeyError as e:
        raise WeightsError(f"{name}: incomplete checkpoint, missing key {e.args[0]!r}") from None
    except (RuntimeError, IndexError, ValueError) as e:
        raise WeightsError(f"{name}: cannot convert to diffusers layout: {first_line(e)}") from None
    if remaining:
        raise WeightsError(f"{name}: unexpected keys {few(remaining)}")
    return converted


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def few(keys: Iterable[str], n: int = 4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
