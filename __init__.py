"""ComfyUI entry point of comfyui-xdit: `comfy_entrypoint`, a ComfyExtension listing the V3 nodes. ComfyUI imports
this folder as a package; everything heavy (torch distributed, diffusers, the worker pool) is imported on first use,
not here. The engine and the runtime import as
the top-level `comfyui_xdit` and `comfyui_xdit_runtime` from this folder (runtime/bootstrap.py; no install needed,
and never this folder itself on sys.path: ComfyUI has a top-level `nodes` of its own)."""
if __package__:  # as ComfyUI's custom node package; pytest may import this file on its own, as `__init__`
    import importlib.util as _util
    from pathlib import Path as _Path

    _spec = _util.spec_from_file_location("comfyui_xdit_bootstrap", _Path(__file__).parent / "runtime" / "bootstrap.py")
    _bootstrap = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_bootstrap)  # by path: the runtime package itself (ZeroMQ) is imported on first use
    _bootstrap.register()
    try:
        import comfy_api.latest  # noqa: F401 - the V3 node schema the nodes are written in
    except ImportError as _e:  # not ComfyUI (pytest importing this checkout), or a ComfyUI older than 0.3.64
        import logging as _logging

        _logging.getLogger("comfyui_xdit").warning(
            "comfyui-xdit: no nodes: they use ComfyUI's V3 node schema (comfy_api.latest, ComfyUI 0.3.64 or newer), "
            "which this Python lacks (%s)", _e)
        __all__ = []
    else:
        # ComfyUI registers the nodes from the ComfyExtension (NODE_CLASS_MAPPINGS here would take precedence)
        from .nodes import comfy_entrypoint

        __all__ = ["comfy_entrypoint"]
