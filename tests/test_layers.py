"""The package's layering, read from its imports (ast), so it cannot erode silently.

Every module of src/ebslab has a layer (ARCHITECTURE.md); a module imports only from its own layer or lower ones,
no two modules import each other in a loop, and no module uses another module's private (`_name`) names.
Imports inside functions and under `if TYPE_CHECKING:` count: a deferred import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "ebslab"

# bottom (0) to top, one sub-package a layer (ARCHITECTURE.md); a module may import its own layer and those below
LAYER_NAMES = ["core", "inputs", "loop", "analysis", "experiments", "serving", "tools", "cli"]
LAYERS: dict[str, int] = {f"ebslab.{name}": i for i, name in enumerate(LAYER_NAMES[:-1])}
LAYERS.update({"ebslab.cli": 7, "ebslab.__main__": 7})


def _layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return LAYERS[name]
    raise KeyError(module)


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(known: dict[str, Path]) -> dict[str, dict[str, set[str]]]:
    """{module: {imported ebslab module: names taken from it (attributes used on it included)}}."""
    graph: dict[str, dict[str, set[str]]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: dict[str, set[str]] = {}
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("ebslab"):
                        edges.setdefault(a.name, set())
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, path.name == "__init__.py", node)
                if not target.startswith("ebslab"):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in known:  # `from ebslab import report as rp`: a module
                        edges.setdefault(sub, set())
                        aliases[a.asname or a.name] = sub
                    else:
                        edges.setdefault(target, set()).add(a.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                edges.setdefault(aliases[node.value.id], set()).add(node.attr)
        edges.pop(name, None)
        graph[name] = {m: names for m, names in edges.items() if m in known}
    return graph


def _is_face(child: str, parent: str) -> bool:
    """A package's __init__ handing on its own sub-modules' names (not a circle: the sub-modules never import the
    package back, which test_no_import_circle checks without this exception)."""
    return parent.startswith(child + ".")


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    found, index, low, stack, on_stack, counter = [], {}, {}, [], set(), [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m != "ebslab" and not any(m == k or m.startswith(k + ".") for k in LAYERS)]
    assert missing == [], f"give these modules a layer in LAYERS (and ARCHITECTURE.md): {missing}"


def test_no_import_circle():
    assert cycles(imports(modules())) == []


def test_no_import_runs_back_up_a_layer():
    upward = []
    for mod, edges in imports(modules()).items():
        if mod == "ebslab":
            continue
        for target in edges:
            if _is_face(mod, target):
                continue
            if _layer_of(target) > _layer_of(mod):
                upward.append(f"{mod} ({LAYER_NAMES[_layer_of(mod)]}) -> {target} ({LAYER_NAMES[_layer_of(target)]})")
    assert upward == []


def test_no_private_name_is_used_across_modules():
    used = [f"{mod} uses {target}.{n}" for mod, edges in imports(modules()).items() for target, names in edges.items()
            for n in sorted(names) if n.startswith("_") and not n.startswith("__") and not _is_face(mod, target)]
    assert used == []


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"x": {"y": set()}, "y": {"z": set()}, "z": {"x": set()}, "w": {"x": set()}}
    assert cycles(graph) == [["x", "y", "z"]]
    graph["z"] = {}
    assert cycles(graph) == []
