"""Writes the example workflows: workflows/<name>.json (UI format, drag and drop into ComfyUI) and
workflows/api/<name>.json (API format, for POST /prompt), from one description per model and the node
definitions of a running ComfyUI (GET /object_info), which fix the order of each node's widget values.

    python scripts/make_workflows.py --server http://127.0.0.1:8188
"""
from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "workflows"
LINK_FREE = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def parallel(**deg):
    d = dict(device="auto", ulysses_degree=2, ring_degree=1, pipefusion_degree=1, cfg_degree=1, dp_degree=1,
             num_patches=0, warmup_steps=1, attention="auto", gpus="", pool_address="")
    d.update(deg)
    return d


def graph(kind: str) -> dict:
    """API-format graph for one example; links as [node_id, output_index]."""
    if kind in ("flux1-dev", "flux1-schnell"):
        dev = kind == "flux1-dev"
        g = {
            "1": ("DualCLIPLoader", {"clip_name1": "t5xxl_fp16.safetensors", "clip_name2": "clip_l.safetensors",
                                     "type": "flux", "device": "default"}),
            "2": ("CLIPTextEncode", {"text": "a red fox reading a newspaper in a sunlit cafe, photograph",
                                     "clip": ["1", 0]}),
            "3": ("CLIPTextEncode", {"text": "", "clip": ["1", 0]}),
            "5": ("XDiTConfigureHybridParallel", parallel()),
            "6": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0], "checkpoint": f"{kind}.safetensors",
                                          "weight_dtype": "bf16", "family": "auto"}),
            "7": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            "8": ("XDiTParallelSampler", {"model": ["6", 0], "positive": ["4", 0] if dev else ["2", 0],
                                          "negative": ["3", 0], "latent_image": ["7", 0], "seed": 42,
                                          "steps": 20 if dev else 4, "cfg": 1.0, "sampler_name": "euler",
                                          "scheduler": "simple", "denoise": 1.0}),
            "9": ("VAELoader", {"vae_name": "ae.safetensors"}),
            "10": ("VAEDecode", {"samples": ["8", 0], "vae": ["9", 0]}),
            "11": ("SaveImage", {"images": ["10", 0], "filename_prefix": f"xdit_{kind}"}),
        }
        if dev:
            g["4"] = ("FluxGuidance", {"conditioning": ["2", 0], "guidance": 3.5})
    elif kind == "sd3.5-large":
        g = {
            "1": ("TripleCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                       "clip_name3": "t5xxl_fp16.safetensors"}),
            "2": ("CLIPTextEncode", {"text": "a lighthouse on a cliff at dusk, oil painting", "clip": ["1", 0]}),
            "3": ("CLIPTextEncode", {"text": "blurry, low quality", "clip": ["1", 0]}),
            "5": ("XDiTConfigureHybridParallel", parallel(cfg_degree=2)),
            "6": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0], "checkpoint": "sd3.5_large.safetensors",
                                          "weight_dtype": "bf16", "family": "auto"}),
            "7": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            "8": ("XDiTParallelSampler", {"model": ["6", 0], "positive": ["2", 0], "negative": ["3", 0],
                                          "latent_image": ["7", 0], "seed": 42, "steps": 28, "cfg": 4.5,
                                          "sampler_name": "euler", "scheduler": "sgm_uniform", "denoise": 1.0}),
            "9": ("VAELoader", {"vae_name": "sd3.5_vae.safetensors"}),
            "10": ("VAEDecode", {"samples": ["8", 0], "vae": ["9", 0]}),
            "11": ("SaveImage", {"images": ["10", 0], "filename_prefix": "xdit_sd3.5"}),
        }
    elif kind == "pixart-sigma":
        g = {
            "1": ("CLIPLoader", {"clip_name": "t5xxl_fp16.safetensors", "type": "pixart", "device": "default"}),
            "2": ("CLIPTextEncode", {"text": "a small robot watering plants on a balcony, watercolor",
                                     "clip": ["1", 0]}),
            "3": ("CLIPTextEncode", {"text": "", "clip": ["1", 0]}),
            "5": ("XDiTConfigureHybridParallel", parallel(cfg_degree=2)),
            "6": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0],
                                          "checkpoint": "PixArt-Sigma-XL-2-1024-MS.pth",
                                          "weight_dtype": "fp16", "family": "auto"}),
            "7": ("EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            "8": ("XDiTParallelSampler", {"model": ["6", 0], "positive": ["2", 0], "negative": ["3", 0],
                                          "latent_image": ["7", 0], "seed": 42, "steps": 20, "cfg": 4.5,
                                          "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}),
            "9": ("VAELoader", {"vae_name": "sdxl_vae.safetensors"}),
            "10": ("VAEDecode", {"samples": ["8", 0], "vae": ["9", 0]}),
            "11": ("SaveImage", {"images": ["10", 0], "filename_prefix": "xdit_pixart_sigma"}),
        }
    elif kind == "z-image-turbo":
        g = {
            # how ComfyUI versions with Z-Image load its Qwen3-4B text encoder (see the note: 0.3.64 has none)
            "1": ("CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2", "device": "default"}),
            "2": ("CLIPTextEncode", {"text": "a lantern-lit street market in the rain at night, photograph",
                                     "clip": ["1", 0]}),
            "3": ("CLIPTextEncode", {"text": "", "clip": ["1", 0]}),
            "5": ("XDiTConfigureHybridParallel", parallel()),  # 30 heads: Ulysses 2, 3, 5, 6, 10 or 15
            "6": ("XDiTLoadParallelDiT", {"parallel_config": ["5", 0], "checkpoint": "z_image_turbo_bf16.safetensors",
                                          "weight_dtype": "bf16", "family": "auto"}),
            "7": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            "8": ("XDiTParallelSampler", {"model": ["6", 0], "positive": ["2", 0], "negative": ["3", 0],
                                          "latent_image": ["7", 0], "seed": 42, "steps": 9, "cfg": 1.0,
                                          "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}),
            "9": ("VAELoader", {"vae_name": "ae.safetensors"}),
            "10": ("VAEDecode", {"samples": ["8", 0], "vae": ["9", 0]}),
            "11": ("SaveImage", {"images": ["10", 0], "filename_prefix": "xdit_z_image_turbo"}),
        }
    else:
        raise ValueError(kind)
    return {nid: {"class_type": ct, "inputs": inputs} for nid, (ct, inputs) in sorted(g.items(), key=lambda x: int(x[0]))}


EXAMPLES = ("flux1-dev", "flux1-schnell", "sd3.5-large", "pixart-sigma", "z-image-turbo")
# Notes (the editor's Note nodes, not part of the API graph): example -> [(node placed under, text)]
NOTES = {
    "z-image-turbo": [("1", (
        "Parallel Sampler expects the conditioning ZImagePipeline's text encoder makes: Qwen3-4B hidden states "
        "of its second-to-last layer for the chat-templated prompt, [batch, tokens, 2560], the prompt's real "
        "tokens only (or an attention_mask marking them). ComfyUI 0.3.64 has no Qwen3-4B text encoder: this "
        "CLIPLoader (type lumina2, qwen_3_4b.safetensors) is how later ComfyUI versions load it; on 0.3.64 feed "
        "such a CONDITIONING from another node. Turbo is distilled: cfg 1 (the negative is unused), 8-9 steps; "
        "the VAE is the Flux VAE (ae.safetensors)."))],
}


def is_link_type(t) -> bool:
    return isinstance(t, str) and t not in LINK_FREE


def ordered_inputs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order") or {s: list(info["input"].get(s) or {}) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section) or []:
            out.append((name, info["input"][section][name]))
    return out


def has_control(conf: list) -> bool:
    return len(conf) > 1 and isinstance(conf[1], dict) and bool(conf[1].get("control_after_generate"))


NODE_WIDTH, COLUMN_GAP, ROW_GAP, TITLE = 320, 60, 40, 30
SLOT_ROW, WIDGET_ROW, MULTILINE_ROWS = 24, 26, 4


def node_height(info: dict, values: dict, n_inputs: int, n_outputs: int) -> int:
    """Body height (the title bar is above `pos`), generous against what the editor computes: a row per slot, a row
    per widget (four for a multiline text box), a seed's control widget, margins."""
    rows = 0
    for name, conf in ordered_inputs(info):
        if is_link_type(conf[0]) or name not in values:
            continue
        extra = conf[1] if len(conf) > 1 and isinstance(conf[1], dict) else {}
        rows += MULTILINE_ROWS if extra.get("multiline") else 1
        rows += 1 if has_control(conf) else 0
    return 40 + SLOT_ROW * max(n_inputs, n_outputs) + WIDGET_ROW * rows


def columns(api: dict) -> dict[str, int]:
    """Column of each node: its longest path from a node without inputs; such nodes sit just left of their first
    consumer (a VAE loader next to VAE Decode, not beside the text encoders)."""
    deps = {nid: [v[0] for v in n["inputs"].values() if isinstance(v, list)] for nid, n in api.items()}
    col: dict[str, int] = {}

    def depth(nid: str) -> int:
        if nid not in col:
            col[nid] = 1 + max((depth(d) for d in deps[nid]), default=-1)
        return col[nid]

    for nid in api:
        depth(nid)
    for nid in api:
        consumers = [c for c, ds in deps.items() if nid in ds]
        if not deps[nid] and consumers:
            col[nid] = min(col[c] for c in consumers) - 1
    return col


def layout(api: dict, nodes: list[dict]) -> None:
    """Positions in place: one column per dependency depth, nodes stacked in it with their title bars and a gap
    between them, so that no two node rectangles overlap."""
    col = columns(api)
    bottom: dict[int, int] = {}
    for node in nodes:
        c = col[str(node["id"])]
        y = bottom.get(c, 60)
        node["pos"] = [40 + (NODE_WIDTH + COLUMN_GAP) * c, y]
        bottom[c] = y + node["size"][1] + TITLE + ROW_GAP


def to_ui(api: dict, object_info: dict, notes: list[tuple[str, str]] = ()) -> dict:
    """UI-format graph (what ComfyUI's editor saves) for an API-format graph, with Note nodes (text, each below
    the node it names)."""
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                links.append([len(links) + 1, int(value[0]), value[1], int(nid), None, None, name])
                out_links.setdefault((value[0], value[1]), []).append(len(links))
    for order, (nid, node) in enumerate(api.items()):
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, conf in ordered_inputs(info):
            if is_link_type(conf[0]):
                link = next((l for l in links if l[3] == int(nid) and l[6] == name), None)
                slot = len(inputs)
                inputs.append({"name": name, "type": conf[0], "link": link[0] if link else None})
                if link:
                    link[4], link[5] = slot, conf[0]
            elif name in node["inputs"]:
                widgets.append(node["inputs"][name])
                if has_control(conf):
                    widgets.append("fixed")
        outputs = [{"name": n, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, (t, n) in enumerate(zip(info["output"], info.get("output_name", info["output"])))]
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [0, 0],
                      "size": [NODE_WIDTH, node_height(info, node["inputs"], len(inputs), len(outputs))],
                      "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    layout(api, nodes)
    last = max(int(n) for n in api)
    for anchor, text in notes:
        x = next(n["pos"][0] for n in nodes if n["id"] == int(anchor))
        y = max(n["pos"][1] + n["size"][1] for n in nodes if n["pos"][0] == x) + TITLE + ROW_GAP
        last += 1
        rows = 2 + len(text) // 40  # the editor wraps the text at about 40 characters per 320 px
        nodes.append({"id": last, "type": "Note", "pos": [x, y], "size": [NODE_WIDTH, 20 * rows], "flags": {},
                      "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {"text": ""},
                      "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": last, "last_link_id": len(links), "nodes": nodes,
            "links": [l[:6] for l in links], "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default="http://127.0.0.1:8188")
    p.add_argument("--object-info", default=None, help="a saved GET /object_info answer instead of a server")
    args = p.parse_args()
    if args.object_info:
        object_info = json.loads(Path(args.object_info).read_text())
    else:
        with urllib.request.urlopen(args.server.rstrip("/") + "/object_info", timeout=60) as r:
            object_info = json.load(r)
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    for kind in EXAMPLES:
        api = graph(kind)
        (OUT / "api" / f"{kind}.json").write_text(json.dumps(api, indent=2) + "\n")
        (OUT / f"{kind}.json").write_text(json.dumps(to_ui(api, object_info, NOTES.get(kind, [])), indent=2) + "\n")
        print("wrote", kind)


if __name__ == "__main__":
    main()
