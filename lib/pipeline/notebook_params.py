"""A notebook's declared parameters: the `parameters` cell read with papermill and checked with `ast` (names,
inferred types, default source text), cached per file version. Used by the runner (lib.run) and the cost table
(lib.pipeline.cost); imports nothing of lib but the package root.
"""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path

__all__ = ["ParamsError", "declared_parameters", "assigned_names", "default_value", "parse_python"]

_PARSE_LOCK = threading.Lock()


def parse_python(source: str):
    """ast.parse under a lock: CPython 3.11's parser is not thread-safe (two runner threads fingerprinting notebooks
    at once (--jobs) raised "SystemError: AST constructor recursion depth mismatch")."""
    import ast
    with _PARSE_LOCK:
        return ast.parse(source)


class ParamsError(ValueError):
    """A params file, key or value that the pipeline cannot run with."""


_DECLARED: dict[tuple, dict] = {}     # (path, mtime_ns, size) -> declared_parameters (inspecting takes ~1 s)


def declared_parameters(path: Path) -> dict[str, dict]:
    """name -> {"type": inferred type name, "default": default source text} from the `parameters` cell."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _DECLARED:
        _DECLARED[key] = _inspect_parameters(Path(path))
    return {name: dict(info) for name, info in _DECLARED[key].items()}


def _inspect_parameters(path: Path) -> dict[str, dict]:
    import papermill
    import logging
    import warnings
    logging.getLogger("papermill").setLevel(logging.ERROR)
    with warnings.catch_warnings():                  # nbformat's cell-id notice is about the file, not the run
        warnings.simplefilter("ignore")
        declared = papermill.inspect_notebook(str(path))
    if not declared:
        raise ParamsError(f"{path.name} has no cell tagged 'parameters'")
    missed = sorted(assigned_names(path) - set(declared))
    if missed:
        raise ParamsError(f"{path.name}: papermill cannot parse the parameter line(s) of {missed} (it drops lines "
                          f"whose comment contains '=' or ';'); rewrite those comments")
    untyped = [n for n, info in declared.items() if info["default"] == "None" and _base_type(info["inferred_type_name"]) is None]
    if untyped:
        raise ParamsError(f"{path.name}: parameter(s) {untyped} default to None without a declared type; declare it in "
                          f"the parameters cell, e.g. `{untyped[0]} = None  # type: int  what it holds`")
    return {name: {"type": info["inferred_type_name"], "default": info["default"]} for name, info in declared.items()}


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}


def _base_type(type_name) -> type | None:
    """'int', 'Optional[int]', 'int|None', 'list[int]', 'typing.List[str]' -> the Python type (None if not declared)."""
    name = str(type_name or "None").replace("typing.", "").replace(" ", "")
    name = re.sub(r"^Optional\[(.*)\]$", r"\1", name)
    name = "|".join(t for t in name.split("|") if t != "None")
    return _TYPES.get(name.split("[", 1)[0].lower())


def assigned_names(path: Path) -> set[str]:
    """Names assigned at top level in the notebook's `parameters` cell (parsed with ast, independent of papermill)."""
    import ast
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ParamsError(f"{path.name} must have exactly one cell tagged 'parameters' (has {len(cells)})")
    tree = parse_python("".join(cells[0]["source"]))
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def default_value(source: str):
    """The value of a default's source text (None when it is not a literal)."""
    try:
        import ast
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return None
