"""ComfyUI nodes of comfyui-xdit. Imported only as the extension's subpackage (`.nodes`): ComfyUI has a top-level
module of its own called `nodes`."""
from . import lora_nodes, queue_check, setup_check
from .xdit_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

NODE_CLASS_MAPPINGS = {**NODE_CLASS_MAPPINGS, **lora_nodes.NODE_CLASS_MAPPINGS,
                       **setup_check.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**NODE_DISPLAY_NAME_MAPPINGS, **lora_nodes.NODE_DISPLAY_NAME_MAPPINGS,
                              **setup_check.NODE_DISPLAY_NAME_MAPPINGS}
queue_check.NODE_CLASSES.update(NODE_CLASS_MAPPINGS)  # the queue-time check reads their inputs (it imports no node)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
