"""The part of a node's /object_info entry that saved workflows depend on, in one normal form for V1 and V3 nodes:
per input section the input names in order, each with its type and options (a V1 list combo as "COMBO" with
`options`, as ComfyUI's V3 view gives it; a link input with no options as {}), plus the outputs, category, display
name, description and output_node. tests/data/node_inputs_main.json holds it as recorded from the V1 nodes before
they became V3 (commit aa26c49); test_nodes.py and the end-to-end files compare with it."""
from __future__ import annotations

import json
from pathlib import Path

RECORDED = Path(__file__).parent / "data" / "node_inputs_main.json"
# combos whose options are the machine's files or the running ComfyUI's lists: compared without their options
DYNAMIC = {"checkpoint", "checkpoint_2", "lora_name", "sampler_name", "scheduler"}


def _input(name: str, conf) -> list:
    kind = conf[0]
    opts = dict(conf[1]) if len(conf) > 1 and isinstance(conf[1], dict) else {}
    if isinstance(kind, list):
        kind, opts = "COMBO", {"options": list(kind), **opts}
    if kind == "STRING" and opts.get("multiline") is False:
        del opts["multiline"]  # V3's as_dict says False; a V1 entry without it is single-line too
    if kind == "COMBO":
        opts.pop("multiselect", None)  # V3's as_dict says False; V1 has no multi-select combos
        if name in DYNAMIC:
            opts["options"] = "<dynamic>"
    return [kind, json.loads(json.dumps(opts))]


def options(conf) -> list | None:
    """A combo input's choices, in V1's form (the list as the type) or V3's (COMBO with `options`); else None."""
    if isinstance(conf[0], list):
        return list(conf[0])
    if conf[0] == "COMBO":
        return list((conf[1] if len(conf) > 1 else {}).get("options", []))
    return None


def view(info: dict) -> dict:
    """The normal form of one node's /object_info entry (or the same fields built from a class)."""
    sections = {}
    for section in ("required", "optional"):
        entries = info["input"].get(section) or {}
        if entries:
            sections[section] = [[name, *_input(name, conf)] for name, conf in entries.items()]
    return {"input": sections, "output": list(info["output"]), "output_name": list(info["output_name"]),
            "category": info["category"], "display_name": info["display_name"], "description": info["description"],
            "output_node": bool(info.get("output_node", False))}


def class_info(cls, display_name: str) -> dict:
    """The /object_info fields of a node class as ComfyUI reads them (its V1 view)."""
    return {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
            "category": cls.CATEGORY, "display_name": display_name, "description": getattr(cls, "DESCRIPTION", ""),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}


def recorded() -> dict:
    return json.loads(RECORDED.read_text())
