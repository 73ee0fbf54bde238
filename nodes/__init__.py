"""ComfyUI nodes of comfyui-xdit. Imported only as the extension's subpackage (`.nodes`): ComfyUI has a top-level
module of its own called `nodes`."""
from . import lora_nodes, setup_check
from .xdit_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

NODE_CLASS_MAPPINGS = {**NODE_CLASS_MAPPINGS, **lora_nodes.NODE_CLASS_MAPPINGS,
                       **setup_check.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**NODE_DISPLAY_NAME_MAPPINGS, **lora_nodes.NODE_DISPLAY_NAME_MAPPINGS,
                              **setup_check.NODE_DISPLAY_NAME_MAPPINGS}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
