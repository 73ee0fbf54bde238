"""ComfyUI nodes of comfyui-xdit, V3 nodes (comfy_api.latest) offered through one ComfyExtension. Imported only as
the extension's subpackage (`.nodes`): ComfyUI has a top-level module of its own called `nodes`."""
from comfy_api.latest import ComfyExtension, io

from . import lora_nodes, setup_check, stock_model, xdit_nodes

NODES: tuple[type[io.ComfyNode], ...] = (*xdit_nodes.NODES, *stock_model.NODES, *lora_nodes.NODES,
                                         *setup_check.NODES)
# node id -> class and display name, from the schemas (what ComfyUI's loader registers from the extension)
NODE_CLASS_MAPPINGS = {cls.define_schema().node_id: cls for cls in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.define_schema().node_id: cls.define_schema().display_name for cls in NODES}


class XDiTExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> XDiTExtension:
    return XDiTExtension()


__all__ = ["comfy_entrypoint", "NODES", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
