"""Parallel LoRA: a LoRA from ComfyUI's loras folder added to an XDIT_MODEL's set. The set travels with each
sample job to the pool, whose ranks patch the weights they hold (and restore them for another set)."""
from __future__ import annotations

import dataclasses
import os

from . import prompt_graph
from .pool import ModelHandle

SUFFIXES = (".safetensors", ".sft")  # the pool reads nothing it would have to unpickle


class LoraNodeError(Exception):
    """One clear message for ComfyUI's error dialog."""


def lora_names() -> list[str]:
    import folder_paths

    try:
        return [n for n in folder_paths.get_filename_list("loras") if n.lower().endswith(SUFFIXES)]
    except Exception:  # noqa: BLE001 - a ComfyUI without a loras folder kind
        return []


def resolve(name: str) -> str:
    """The file of `name` in ComfyUI's loras folders (ComfyUI's own lookup, which keeps names inside them)."""
    import folder_paths

    if not isinstance(name, str) or not name.lower().endswith(SUFFIXES):
        raise LoraNodeError(f"Parallel LoRA: {name!r} is not a .safetensors LoRA file")
    path = folder_paths.get_full_path("loras", name)
    if path is None or not os.path.isfile(path):
        raise LoraNodeError(f"Parallel LoRA: {name} is not in ComfyUI's loras folders")
    real = os.path.realpath(path)
    roots = [os.path.realpath(r) for r in folder_paths.get_folder_paths("loras")]
    if not any(os.path.commonpath([real, r]) == r for r in roots if os.path.isdir(r)) and \
            not any(os.path.commonpath([os.path.abspath(path), os.path.abspath(r)]) == os.path.abspath(r)
                    for r in folder_paths.get_folder_paths("loras")):
        raise LoraNodeError(f"Parallel LoRA: {name} resolves outside ComfyUI's loras folders")
    return os.path.abspath(path)


class ParallelLoRA:
    CATEGORY = "xDiT"
    RETURN_TYPES = ("XDIT_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = ("LoraLoaderModelOnly for a Parallel DiT: adds a LoRA (ComfyUI/kohya, diffusers/PEFT, ai-toolkit, "
                   "musubi/LightX2V formats) to the model's set; chain several. Each pool rank patches the weights "
                   "it holds before sampling and restores them when the set changes, without reloading the model.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("XDIT_MODEL",),
            "lora_name": (lora_names(), {"tooltip": "from models/loras (.safetensors)"}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
        }, "hidden": {prompt_graph.HIDDEN: "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, xdit_check=None):
        return prompt_graph.problem_for(xdit_check)

    def apply(self, model, lora_name, strength_model, xdit_check=None):
        if not isinstance(model, ModelHandle):
            raise LoraNodeError("Parallel LoRA: model must come from Load Parallel DiT")
        strength = float(strength_model)
        if strength == 0.0:  # as LoraLoaderModelOnly: the model unchanged
            return (model,)
        path = resolve(lora_name)
        return (dataclasses.replace(model, loras=(*model.loras, (path, strength))),)


NODE_CLASS_MAPPINGS = {"XDiTParallelLoRA": ParallelLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"XDiTParallelLoRA": "Parallel LoRA (xDiT)"}
