"""ComfyUI entry point of comfyui-xdit. ComfyUI imports this folder as a package; everything heavy (torch
distributed, diffusers, the worker pool) is imported on first use, not here. The engine and the runtime import as
the top-level `comfyui_xdit` and `comfyui_xdit_runtime` from this folder (runtime/bootstrap.py; no install needed,
and never this folder itself on sys.path: ComfyUI has a top-level `nodes` of its own)."""
if __package__:  # as ComfyUI's custom node package; pytest may import this file on its own, as `__init__`
    import importlib.util as _util
    from pathlib import Path as _Path

    _spec = _util.spec_from_file_location("comfyui_xdit_bootstrap", _Path(__file__).parent / "runtime" / "bootstrap.py")
    _bootstrap = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_bootstrap)  # by path: the runtime package itself (ZeroMQ) is imported on first use
    _bootstrap.register()
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
