"""No import cycles in the engine (comfyui_xdit/), the runtime (runtime/, imported as comfyui_xdit_runtime) and the
nodes (nodes/), and each part imports only the parts below it (docs/architecture.md#what-each-part-may-import).

The rule, read from the source with `ast` (nothing is imported):
- Every `import` counts, at module level and inside functions alike. A function-level import only defers a
  dependency; the two files still need each other, and a cycle hidden that way is still a cycle to untangle.
- Imports under `if TYPE_CHECKING:` do not count (they never run), nor `importlib.import_module` calls (the
  family registry and adapters name their modules by string, by design).
- An import names the module it reads: `from pkg import mod` is an edge to `pkg.mod` when that is a module,
  else to `pkg`; the packages above a module are not counted as imported by it.
- The parts: the engine imports neither the runtime nor the nodes (nor ComfyUI, nor ZeroMQ); the runtime does not
  import the nodes.

On failure the test prints each cycle as a chain of files with the line of each import.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package name its modules have
PARTS = {"comfyui_xdit": "comfyui_xdit", "runtime": "comfyui_xdit_runtime", "nodes": "nodes"}
# part -> top-level names it must not import (ComfyUI's own modules are comfy, comfy_api, folder_paths, ...)
FORBIDDEN = {
    "comfyui_xdit": {"comfyui_xdit_runtime", "nodes", "zmq", "comfy", "comfy_api", "comfy_extras", "folder_paths",
                     "server", "execution"},
    "comfyui_xdit_runtime": {"nodes", "comfy", "comfy_api", "folder_paths"},
}
# Upward imports not moved yet (module -> part), each with its reason. The test fails when one is gone as well, so
# this list only shrinks.
KNOWN_UPWARD = {
    ("comfyui_xdit.cli", "comfyui_xdit_runtime"): "the command line's demo, serve and generate --pool start or "
                                                  "reach a pool; the CLI is a tool above both parts (issue 31)",
}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PARTS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import node that can run (skipping `if TYPE_CHECKING:` bodies)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _absolute(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom reads. `..runtime` from nodes/ is the runtime package (the extension's
    sibling of nodes/, comfyui_xdit_runtime once installed)."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    if not base:  # above the part: the extension's folder, whose subfolders are the parts
        rest = (node.module or "").split(".")
        return ".".join([PARTS.get(rest[0], rest[0]), *rest[1:]])
    return ".".join([*base, node.module] if node.module else base)


def graph() -> dict[str, dict[str, int]]:
    """module -> {imported module of this tree: line of the first import}, and the part violations."""
    mods = modules()
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    for name, path in mods.items():
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = _absolute(name, path, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods and "." in target:
                    target = target.rsplit(".", 1)[0]  # a name inside a module: the module
                edges[name][target] = min(node.lineno, edges[name].get(target, node.lineno))
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself), by Tarjan."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _describe(component: list[str], edges, paths) -> str:
    inside = set(component)
    lines = [f"cycle of {len(component)} modules:"]
    for m in component:
        for w, line in sorted(edges[m].items()):
            if w in inside:
                lines.append(f"  {paths[m].relative_to(ROOT)}:{line} imports {w}")
    return "\n".join(lines)


def test_no_import_cycles():
    edges, paths = graph(), modules()
    found = cycles(edges)
    assert not found, "import cycles (tests/test_import_cycles.py states the rule):\n" + "\n".join(
        _describe(c, edges, paths) for c in found)


def test_parts_import_only_the_parts_below():
    edges, paths = graph(), modules()
    upward = {(m, w.split(".")[0]): f"{paths[m].relative_to(ROOT)}:{line} imports {w}"
              for m, targets in edges.items() for w, line in sorted(targets.items(), key=lambda kv: -kv[1])
              if w.split(".")[0] in FORBIDDEN.get(m.split(".")[0], ())}
    bad = [line for key, line in sorted(upward.items()) if key not in KNOWN_UPWARD]
    assert not bad, "a part imports a part above it (docs/architecture.md):\n" + "\n".join(bad)
    gone = sorted(set(KNOWN_UPWARD) - set(upward))
    assert not gone, f"no longer imported: remove {gone} from KNOWN_UPWARD"


def test_the_walker_sees_cycles_and_deferred_imports():
    """The walker itself: a function-level import closes a cycle, a TYPE_CHECKING one does not, and relative
    imports resolve (so a passing test above is not an empty graph)."""
    edges = graph()
    assert sum(map(len, edges.values())) > 200
    assert "comfyui_xdit.parallel.config" in edges["comfyui_xdit.parallel"]
    assert "comfyui_xdit_runtime.launcher" in edges["nodes.pool"]  # `from ..runtime.launcher import Pool`, deferred
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\ndef f():\n    import y\n")
    assert {a.name for n in _imports(tree) for a in n.names} == {"TYPE_CHECKING", "y"}  # not x
