"""ComfyUI entry point of comfyui-xdit. ComfyUI imports this folder as a package; everything heavy (torch
distributed, diffusers, the worker pool) is imported on first use, not here."""
if __package__:  # as ComfyUI's custom node package; pytest may import this file on its own, as `__init__`
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
