"""The pack's two top-level packages from its own folders, no install needed: `comfyui_xdit` (the engine, the folder
beside this one) and `comfyui_xdit_runtime` (this folder). Standard library only, no relative imports: the pack's
__init__ calls `register()` in ComfyUI's process, and a pool rank runs this file as its script
(`torchrun ... bootstrap.py WORKER-ARGS`), which registers both and runs comfyui_xdit_runtime.worker; the pool's
torchrun starts as `bootstrap.py --torchrun TORCHRUN-ARGS` the same way.

Only these two names are registered: ComfyUI has a top-level `nodes` of its own, so the pack's folder (which holds
our `nodes/`) must never be on sys.path. The same layout holds installed (site-packages/comfyui_xdit beside
site-packages/comfyui_xdit_runtime) and editable, so the ranks always run the engine beside the runtime that
started them."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = {"comfyui_xdit": HERE.parent / "comfyui_xdit", "comfyui_xdit_runtime": HERE}


class _Finder(importlib.abc.MetaPathFinder):
    """Finds exactly the two package names in their folders here; their submodules come from the packages' own
    paths as usual. Imports nothing until a package is first imported."""

    XDIT_PACK_FINDER = True
    folders = PACKAGES

    def find_spec(self, name, path=None, target=None):
        folder = PACKAGES.get(name)
        if folder is None or path is not None:
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def register() -> None:
    """Make `comfyui_xdit` and `comfyui_xdit_runtime` import from the folders here, ahead of an installed copy (the
    ranks run these folders too, so ComfyUI's process must as well). A package imported already, or a second copy of
    the pack registered first, stays as it is, with a warning: this process and its ranks would then differ."""
    for folder in PACKAGES.values():
        if not (folder / "__init__.py").is_file():
            raise ImportError(f"comfyui-xdit: {folder / '__init__.py'} is missing (an incomplete copy of the pack?)")
    finder = next((f for f in sys.meta_path if getattr(f, "XDIT_PACK_FINDER", False)), None)
    for name, folder in PACKAGES.items():
        module = sys.modules.get(name)
        first = getattr(finder, "folders", {}).get(name, folder)
        where = Path(getattr(module, "__file__", None) or first / "__init__.py").resolve().parent
        if where != folder:
            import logging

            logging.getLogger("comfyui_xdit").warning(
                "comfyui-xdit: %s comes from %s (imported or registered first), not from the pack in %s; its pool "
                "ranks run %s", name, where, HERE.parent, folder)
    if finder is None:
        sys.meta_path.insert(0, _Finder())


def main() -> None:
    """A pool rank, or with `--torchrun` first the pool's torchrun (comfyui_xdit_runtime.torchrun): this file's folder
    (the first path entry of a script) must not make the runtime's modules top-level names; register both packages,
    then run the worker (or torchrun) with the remaining arguments."""
    if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
        del sys.path[0]
    register()
    import runpy

    module = "comfyui_xdit_runtime.worker"
    if sys.argv[1:2] == ["--torchrun"]:
        del sys.argv[1]
        module = "comfyui_xdit_runtime.torchrun"
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
