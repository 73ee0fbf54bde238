"""The model families: one module per family in this package declares a `FAMILY` (families/spec.py). Everything
else (weights, schedules, sampling, the nodes, bench, the CLI, the tiny models) reads this registry; adding a
family is adding a module here, its config in comfyui_xdit/configs/ and its tests."""
from __future__ import annotations

import functools
import importlib
import pkgutil

from .spec import Family, Variant

_NOT_FAMILIES = {"spec", "checkpoint"}


@functools.cache
def families() -> dict[str, Family]:
    """Every family, by name, in detection order."""
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _NOT_FAMILIES or info.name.startswith("_"):
            continue
        fam = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(fam, Family):
            found[fam.name] = fam
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


def names() -> list[str]:
    return list(families())


def get(name: str) -> Family:
    try:
        return families()[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}: expected one of {', '.join(families())}") from None


def variants() -> dict[str, tuple[Family, Variant]]:
    """Every published variant by name, with its family."""
    return {v.name: (f, v) for f in families().values() for v in f.variants}


def by_class(class_name: str, config: dict | None = None) -> Family | None:
    """The family of a diffusers transformer class name (from a config.json's _class_name, whose other fields
    `accepts` may look at)."""
    return next((f for f in families().values()
                 if class_name in (f.diffusers_class, *f.other_classes) and f.accepts(config or {})), None)


def detect(keys) -> Family | None:
    """The family whose key patterns a checkpoint's keys (prefix already stripped) match, or None."""
    keyset = set(keys)
    return next((f for f in families().values() if f.detect(keyset)), None)


def tiny_models() -> dict[str, tuple[Family, dict]]:
    """Built-in tiny models: name -> (family, constructor kwargs)."""
    return {name: (f, kw) for f in families().values() for name, kw in f.tiny.items()}


def parse(name: str | None) -> tuple[Family | None, Variant | None]:
    """A family or variant name (None, "" and "auto": neither)."""
    if name in (None, "", "auto"):
        return None, None
    if name in families():
        return families()[name], None
    if name in variants():
        return variants()[name]
    for f in families().values():
        if name in f.aliases:
            return f, f.variant(f.aliases[name])
    raise KeyError(f"unknown family {name!r}: expected one of {', '.join([*families(), *variants()])}")
