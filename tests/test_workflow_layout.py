"""The UI-format workflows (workflows/*.json) as ComfyUI's editor draws them: no two node boxes overlap once each
node is at least the size the editor computes for it, every saved size is at least that minimum, and each workflow
has one Note saying how many GPUs it is set for and which models folder its files go in.

Minimum size: LiteGraph's LGraphNode.computeSize (litegraph.js as ComfyUI's frontend ships it). A node's body is
max(#input slots, #output slots, 1) slot rows of NODE_SLOT_HEIGHT, then each widget's height + 4, then 8 below the
widgets, then a 6 px margin; its width is at least NODE_WIDTH (1.5 x NODE_WIDTH with widgets). The title bar
(NODE_TITLE_HEIGHT) is drawn above `pos`. Slots that belong to a widget (inputs with a "widget" entry) are drawn
on the widget, not as rows. ComfyUI's multiline text box is a DOM widget with a minimum height of 50.

Widgets: our nodes' from INPUT_TYPES (every widget input, optional ones too, since the editor makes a widget for
each; plus the control_after_generate combo of a seed); ComfyUI's own nodes' from the saved file (the number of
widgets_values, the inputs/outputs arrays)."""
from __future__ import annotations

import json
import math
import re

import pytest

from . import comfy_standins as cs

WF = cs.ROOT / "workflows"

# LiteGraph constants (litegraph.js: LiteGraph.NODE_TITLE_HEIGHT, NODE_SLOT_HEIGHT, NODE_WIDGET_HEIGHT, NODE_WIDTH)
NODE_TITLE_HEIGHT = 30
NODE_SLOT_HEIGHT = 20
NODE_WIDGET_HEIGHT = 20
WIDGET_SPACING = 4      # computeSize adds 4 per widget
WIDGETS_BOTTOM = 8      # and 8 after the last widget
NODE_MARGIN = 6         # and a 6 px margin
NODE_WIDTH = 140        # minimum width; 1.5 x with widgets
MULTILINE_MIN_HEIGHT = 50  # ComfyUI's multiline STRING widget (a textarea DOM widget)
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# ComfyUI's own inputs declared multiline (0.3.64); tests/data keeps no widget options
CORE_MULTILINE = {("CLIPTextEncode", 0), ("TextEncodeQwenImageEditPlus", 0), ("Note", 0), ("MarkdownNote", 0)}
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "clip", "unet", "checkpoints", "loras")
DEGREES = ("ulysses_degree", "ring_degree", "pipefusion_degree", "cfg_degree", "dp_degree")


@pytest.fixture(scope="module")
def ours():
    with cs.extension() as ext:
        yield {name: json.loads(json.dumps(cls.INPUT_TYPES())) | {"_outputs": len(cls.RETURN_TYPES)}
               for name, cls in ext.nodes.NODE_CLASS_MAPPINGS.items()}


def _ui_files():
    return sorted(WF.glob("*.json"))


def _is_link(t) -> bool:
    return isinstance(t, str) and t not in WIDGET_TYPES


def _our_rows(spec: dict) -> tuple[int, int, list[int]]:
    """(input slots, output slots, widget heights) of one of our nodes, from INPUT_TYPES."""
    n_in, widgets = 0, []
    for section in ("required", "optional"):
        for name, conf in (spec.get(section) or {}).items():
            if _is_link(conf[0]):
                n_in += 1
                continue
            extra = conf[1] if len(conf) > 1 and isinstance(conf[1], dict) else {}
            widgets.append(MULTILINE_MIN_HEIGHT if extra.get("multiline") else NODE_WIDGET_HEIGHT)
            if extra.get("control_after_generate"):
                widgets.append(NODE_WIDGET_HEIGHT)
    return n_in, spec["_outputs"], widgets


def _saved_rows(node: dict) -> tuple[int, int, list[int]]:
    """(input slots, output slots, widget heights) of a ComfyUI node, from what the file holds."""
    n_in = sum(1 for i in node.get("inputs") or [] if "widget" not in i)
    n_out = len(node.get("outputs") or [])
    widgets = [MULTILINE_MIN_HEIGHT if (node["type"], k) in CORE_MULTILINE else NODE_WIDGET_HEIGHT
               for k in range(len(node.get("widgets_values") or []))]
    return n_in, n_out, widgets


def min_size(node: dict, ours: dict) -> tuple[int, int]:
    """LGraphNode.computeSize: the body's minimum [width, height] (title bar excluded)."""
    n_in, n_out, widgets = _our_rows(ours[node["type"]]) if node["type"] in ours else _saved_rows(node)
    height = max(n_in, n_out, 1) * NODE_SLOT_HEIGHT
    if widgets:
        height += sum(h + WIDGET_SPACING for h in widgets) + WIDGETS_BOTTOM
    width = NODE_WIDTH * 1.5 if widgets else NODE_WIDTH
    return math.ceil(width), height + NODE_MARGIN


def boxes(ui: dict, ours: dict) -> list[tuple[str, float, float, float, float]]:
    """(label, left, top, right, bottom) of each node as drawn: max(saved size, minimum), title bar included."""
    out = []
    for node in ui["nodes"]:
        mw, mh = min_size(node, ours)
        w, h = max(node["size"][0], mw), max(node["size"][1], mh)
        x, y = node["pos"]
        out.append((f"{node['id']} {node['type']}", x, y - NODE_TITLE_HEIGHT, x + w, y + h))
    return out


def overlaps(ui: dict, ours: dict) -> list[str]:
    bs = boxes(ui, ours)
    return [f"{a[0]} / {b[0]}" for i, a in enumerate(bs) for b in bs[i + 1:]
            if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]


@pytest.mark.parametrize("path", _ui_files(), ids=lambda p: p.stem)
def test_no_overlapping_nodes(path, ours):
    ui = json.loads(path.read_text())
    assert not overlaps(ui, ours), f"{path.name}: overlapping nodes: {overlaps(ui, ours)}"


@pytest.mark.parametrize("path", _ui_files(), ids=lambda p: p.stem)
def test_saved_sizes_at_least_the_minimum(path, ours):
    ui = json.loads(path.read_text())
    small = [(n["id"], n["type"], n["size"], min_size(n, ours)) for n in ui["nodes"]
             if n["size"][0] < min_size(n, ours)[0] or n["size"][1] < min_size(n, ours)[1]]
    assert not small, f"{path.name}: saved smaller than the editor draws them: {small}"


def test_minimum_counts_optional_widgets(ours):
    """The sampler's optional widgets (cache, shift) make it taller than its required inputs alone."""
    spec = ours["XDiTParallelSampler"]
    required_only = {"required": spec["required"], "_outputs": spec["_outputs"]}
    node = {"type": "XDiTParallelSampler"}
    assert min_size(node, ours)[1] > min_size(node, {"XDiTParallelSampler": required_only})[1]


def gpus_as_saved(name: str) -> str:
    """The GPU count the workflow is saved for: the product of its degrees, or "auto" (layout auto)."""
    api = json.loads((WF / "api" / f"{name}.json").read_text())
    conf = [n["inputs"] for n in api.values() if n["class_type"] == "XDiTConfigureHybridParallel"]
    # one, or (the setup check) the parallel one and a one-GPU reference with all degrees 1
    assert len(conf) == 1 or (len(conf) == 2 and name == "setup-check"), name
    # unsaved, the editor shows the widget's default (auto) while the API twin runs the degrees
    assert all("layout" in c for c in conf), f"{name}: Configure Hybrid Parallel saved without its layout"
    if any(c["layout"] == "auto" for c in conf):
        return "auto"
    gpus = sorted(math.prod(int(c.get(d, 1)) for d in DEGREES) for c in conf)
    assert gpus[:-1] in ([], [1]), f"{name}: the reference Configure is not one GPU: {gpus}"
    return str(gpus[-1])


@pytest.mark.parametrize("path", _ui_files(), ids=lambda p: p.stem)
def test_note_says_gpus_and_folders(path):
    ui = json.loads(path.read_text())
    notes = [n for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert len(notes) == 1, f"{path.name}: {len(notes)} Note nodes"
    text = notes[0]["widgets_values"][0]
    gpus = gpus_as_saved(path.stem)
    if gpus == "auto":
        assert re.search(r"\bauto\b", text), f"{path.name}: the Note does not say layout auto"
    else:
        assert re.search(rf"\b{gpus} GPUs?\b", text), f"{path.name}: the Note does not say {gpus} GPUs"
    assert "layout" in text and "auto" in text, f"{path.name}: the Note does not say how to change the GPU count"
    assert any(f"models/{f}" in text or f"{f}/" in text for f in MODEL_FOLDERS), \
        f"{path.name}: the Note names no models folder"
