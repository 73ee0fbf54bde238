"""Reading ComfyUI's API-format prompt (the graph POST /prompt carries): which node feeds an input, the loader behind
a sampler's model, an empty-latent node's size. Shared by the queue-time checks (queue_check.py) and layout = auto
(auto_layout.py), so that neither imports the other's helpers."""
from __future__ import annotations

from .schemas import LOAD, LORA

VIDEO_LATENTS = {"EmptyHunyuanLatentVideo": 4, "Wan22ImageToVideoLatent": 4}  # pixel frames per latent frame
EMPTY_LATENTS = ("EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo", "Wan22ImageToVideoLatent",
                 "EmptyFlux2LatentImage")  # the newer ComfyUI's FLUX.2 empty latent: width and height in pixels too


def source(prompt: dict, node: dict, name: str, kind: str | tuple) -> tuple[str, dict] | None:
    link = (node.get("inputs") or {}).get(name)
    if not (isinstance(link, list) and len(link) == 2):
        return None
    src = prompt.get(str(link[0]))
    kinds = (kind,) if isinstance(kind, str) else kind
    return (str(link[0]), src) if isinstance(src, dict) and src.get("class_type") in kinds else None


def model_source(prompt: dict, node: dict) -> tuple[str, dict] | None:
    """The Load Parallel DiT behind a node's model input, through any chain of Parallel LoRA nodes."""
    for _ in range(64):  # a chain (a cycle is ComfyUI's to report)
        src = source(prompt, node, "model", (LOAD, LORA))
        if src is None or src[1].get("class_type") == LOAD:
            return src
        node = src[1]
    return None


def latent_frames(node: dict) -> int:
    """Latent frames T of an empty-latent node: a video node's `length` pixel frames make (length - 1) // k + 1
    (ComfyUI floors a length that is not k n + 1); an image node makes one."""
    k = VIDEO_LATENTS.get(node.get("class_type"))
    length = (node.get("inputs") or {}).get("length")
    if k is None or not isinstance(length, int) or isinstance(length, bool) or length < 1:
        return 1
    return (length - 1) // k + 1


def latent_size(node: dict) -> tuple[int, int, int] | None:
    inputs = node.get("inputs") or {}
    vals = [inputs.get(k) for k in ("height", "width", "batch_size")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals):
        return None
    return (*vals, latent_frames(node))
