"""A notebook's name is spelled in one module of lib only (lib/storage/notebooks.py, its declaration); the rest of lib
refers to it through the constant (NB.ABLATION) or an artifact's producer, so renaming or adding a notebook is one
line there. Measured like `grep -rl <name> lib --include=*.py` over every notebook of notebooks/ (docstrings,
comments and messages count: they drift when a notebook is renamed). Tests and notebooks may spell names freely."""
from __future__ import annotations

from pathlib import Path

import pytest

from lib import REPO_ROOT
from lib.pipeline import stages
from lib.storage.notebooks import NB

DECLARATION = "lib/storage/notebooks.py"


def spelled_in(name: str, lib: Path, root: Path) -> set[str]:
    """The .py files under `lib` whose text contains `name`, relative to `root` (grep -rl name lib --include=*.py)."""
    return {p.relative_to(root).as_posix() for p in lib.rglob("*.py") if name in p.read_text(encoding="utf-8")}


def notebook_names(root: Path = REPO_ROOT) -> list[str]:
    return sorted(p.stem for p in (root / "notebooks").glob("*.ipynb"))


def test_the_count_sees_code_strings_docstrings_and_comments(tmp_path):
    (tmp_path / "lib" / "sub").mkdir(parents=True)
    files = {"lib/a.py": 'X = "05_ablation"\n', "lib/sub/b.py": '"""Notebook 05_ablation."""\n',
             "lib/sub/c.py": 'y = f"rerun {n} 05_ablation"  # 05\n', "lib/d.py": "# see notebook 05_ablation\n",
             "lib/e.py": "NAME = NB.ABLATION  # 05\n", "lib/f.txt": "05_ablation\n"}
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    assert spelled_in("05_ablation", tmp_path / "lib", tmp_path) == {"lib/a.py", "lib/sub/b.py", "lib/sub/c.py",
                                                                     "lib/d.py"}


def test_every_notebook_name_is_spelled_in_its_declaration_only():
    names = notebook_names()
    assert len(names) >= 13 and "05_ablation" in names          # the scan reads the real notebooks folder
    where = {n: spelled_in(n, REPO_ROOT / "lib", REPO_ROOT) for n in names}
    extra = {n: sorted(files - {DECLARATION}) for n, files in where.items() if files != {DECLARATION}}
    assert not extra, (f"notebook names spelled outside {DECLARATION} (refer to them as NB.<ROLE> from "
                       f"lib.storage.notebooks, or as artifacts.artifact(key).producer): {extra}")


def test_the_declaration_names_every_notebook_once_and_every_stage_by_it():
    declared = {v for k, v in vars(NB).items() if k.isupper()}
    assert declared == set(notebook_names())                    # one constant per notebook file, none stale
    assert len(declared) == len([k for k in vars(NB) if k.isupper()])
    assert set(stages.stages()) <= declared
    assert {NB.EXPLORE, NB.COMPARE}.isdisjoint(stages.stages())  # the explorer and the comparison are not stages


def _toy_box(out_dir, n=0):
    from lib.pipeline.conclusions import Conclusion
    return Conclusion("97_toy", findings=[f"{n} items in {Path(out_dir).name}"])


def test_a_stage_declaration_points_to_its_conclusions_generator(monkeypatch, tmp_path):
    from lib.pipeline import conclusions as cc
    assert cc.GENERATORS[NB.RANKING] is cc.rankings and cc.GENERATORS[NB.ABLATION] is cc.ablation
    assert set(cc.GENERATORS) == {n for n, s in stages.stages().items() if s.conclusions}
    monkeypatch.setitem(stages._DECLARED, "97_toy", stages.Stage("97_toy", conclusions=f"{__name__}:_toy_box"))
    assert cc.conclude("97_toy", tmp_path, n=3).findings == [f"3 items in {tmp_path.name}"]
    monkeypatch.setitem(stages._DECLARED, "96_toy", stages.Stage("96_toy"))
    with pytest.raises(KeyError, match="no conclusion generator for '96_toy'.*conclusions=<function>"):
        cc.conclude("96_toy", tmp_path)
