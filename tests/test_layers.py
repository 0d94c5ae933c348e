"""lib's imports only go down: no import cycle between lib's modules, counting every import (function-level ones
included, since hiding a cycle inside a function is still a cycle), parsed with `ast` and checked with networkx;
and no module imports a module of a higher layer (LAYERS, bottom first)."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

from lib import REPO_ROOT

LIB = REPO_ROOT / "lib"
# lib's layers, bottom first: a module may import its own layer and the layers below it, never one above. Each layer
# is a folder of lib; "commands" are the modules at lib's top (python -m lib.run, lib.claims, lib.report, lib.plan,
# lib.compare, lib.models).
LAYERS = ("storage", "model", "estimators", "plots", "experiments", "pipeline", "commands")


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _entry_points(tree: ast.Module) -> set[int]:
    """ids of the nodes inside a command-line entry point: a top-level `def main` or `if __name__ == "__main__"`.
    `python -m lib.x` runs the module as __main__, a module object of its own, so what its entry point imports
    makes no cycle with lib.x (the entry point is the top of the stack, like the runner)."""
    inside = set()
    for node in tree.body:
        is_main_def = isinstance(node, ast.FunctionDef) and node.name == "main"
        is_main_if = isinstance(node, ast.If) and "__main__" in ast.dump(node.test)
        if is_main_def or is_main_if:
            inside |= {id(n) for n in ast.walk(node)}
    return inside


def imported(path: Path, modules: set[str], root: Path = REPO_ROOT) -> set[str]:
    """The lib modules `path` imports anywhere in its body (command-line entry points aside, see _entry_points):
    `from lib.x import y` counts lib.x.y when that is a module, else lib.x; a package's own submodules imported by
    its __init__ count as edges too."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text())
    skip = _entry_points(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & modules
            found |= subs or {base}
    return {m for m in found if m in modules and m not in (name, "lib")}


def import_graph() -> nx.DiGraph:
    paths = sorted(LIB.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for p in paths:
        graph.add_edges_from((module_name(p), m) for m in imported(p, modules))
    return graph


def test_the_parser_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "lib" / "sub"
    pkg.mkdir(parents=True)
    mods = {"lib.a", "lib.b", "lib.c", "lib.sub", "lib.sub.d"}
    (tmp_path / "lib" / "a.py").write_text("import os\ndef f():\n    from lib.b import g\n    from . import c\n"
                                           "def main():\n    from lib.sub import d\n")
    (pkg / "__init__.py").write_text("from .d import x\n")
    (pkg / "d.py").write_text("from ..a import f\nfrom lib.sub import d\n")
    assert imported(tmp_path / "lib" / "a.py", mods, tmp_path) == {"lib.b", "lib.c"}
    assert imported(pkg / "__init__.py", mods, tmp_path) == {"lib.sub.d"}
    assert imported(pkg / "d.py", mods, tmp_path) == {"lib.a"}                # itself through its package: no edge


def layer_of(module: str) -> str | None:
    """The layer of a lib module: its folder under lib, "commands" for a module at lib's top, None for lib itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    if len(parts) == 2 and parts[1] not in LAYERS:
        return "commands"
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module} is in no layer: put it in one of the folders {LAYERS[:-1]} of lib "
                             f"(or at lib's top if it is a command) and add new folders to LAYERS")
    return parts[1]


def upward_imports(graph: nx.DiGraph) -> list[str]:
    """'a -> b (layer -> layer)' for every import from a lower layer to a higher one."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    found = []
    for a, b in sorted(graph.edges):
        la, lb = layer_of(a), layer_of(b)
        if la and lb and rank[la] < rank[lb]:
            found.append(f"{a} -> {b} ({la} -> {lb})")
    return found


def test_the_layer_check_sees_an_upward_import():
    graph = nx.DiGraph([("lib.experiments.x", "lib.storage.y"), ("lib.storage.y", "lib.pipeline.z"),
                        ("lib.run", "lib.pipeline.z"), ("lib.plots.p", "lib.experiments.x")])
    assert layer_of("lib.run") == "commands" and layer_of("lib.model") == "model" and layer_of("lib") is None
    assert upward_imports(graph) == ["lib.plots.p -> lib.experiments.x (plots -> experiments)",
                                     "lib.storage.y -> lib.pipeline.z (storage -> pipeline)"]


def test_every_module_of_lib_is_in_a_layer():
    assert all(layer_of(m) in LAYERS for m in import_graph() if m != "lib")


def test_lib_imports_only_go_down_the_layers():
    up = upward_imports(import_graph())
    assert not up, "imports from a lower layer of lib to a higher one (LAYERS, bottom first): " + "; ".join(up)


def test_lib_has_no_import_cycle():
    cycles = sorted(nx.simple_cycles(import_graph()), key=len)
    assert not cycles, "import cycles in lib (an arrow from a lower module back up): " + "; ".join(
        " -> ".join(c + [c[0]]) for c in cycles[:10])


def notebook_lib_names(path: Path) -> set[tuple[str, str]]:
    """(module, name) for every lib name a notebook's code uses: `from lib.m import n` and `alias.n` where alias
    is a lib module (`from lib import m as alias`, `import lib.m as alias`)."""
    import json
    code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    tree = ast.parse("\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!"))))
    aliases, used = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lib"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if (LIB.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                        (LIB.parent / Path(*sub.split(".")) / "__init__.py").exists():
                    aliases[a.asname or a.name] = sub
                else:
                    used.add((node.module, a.name))
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.name.startswith("lib.") and a.asname})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            used.add((aliases[node.value.id], node.attr))
    return used


def test_notebooks_use_only_the_public_names_of_lib():
    import importlib
    private = []
    for nb in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        for module, name in sorted(notebook_lib_names(nb)):
            public = getattr(importlib.import_module(module), "__all__", None)
            if name.startswith("_") or (public is not None and name not in public):
                private.append(f"{nb.name}: {module}.{name}")
    assert not private, "notebooks use names outside their module's __all__: " + "; ".join(private)


def test_every_name_in_an_all_exists():
    import importlib
    missing = []
    for p in sorted(LIB.rglob("*.py")):
        if p.name == "__main__.py":
            continue
        mod = importlib.import_module(module_name(p))
        missing += [f"{mod.__name__}.{n}" for n in getattr(mod, "__all__", []) if not hasattr(mod, n)]
    assert not missing, missing
