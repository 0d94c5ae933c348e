"""The 60 paper prompts, exactly as in the reference file (tests/data/paper_prompts.json, see tests/data/README.md)."""
import json
from pathlib import Path

import pytest

from lib.model.prompts import CATEGORIES, all_prompts, select_prompts

REFERENCE = Path(__file__).resolve().parent / "data" / "paper_prompts.json"


def test_prompts_equal_the_reference_file():
    reference = json.loads(REFERENCE.read_text())["categories"]
    assert [c["name"] for c in reference] == list(CATEGORIES)
    assert [p for c in reference for p in c["prompts"]] == [p.text for p in all_prompts()]


def test_counts_and_selection():
    assert len(all_prompts()) == 60 and all(len(v) == 10 for v in CATEGORIES.values())
    picked = select_prompts(12)
    assert [p.prompt_id for p in picked] == [0, 1, 10, 11, 20, 21, 30, 31, 40, 41, 50, 51]
    assert len(select_prompts(7)) == 7 and select_prompts(60) == all_prompts()
    assert {p.category for p in select_prompts(6)} == set(CATEGORIES)


@pytest.mark.parametrize("n, message", [(0, "positive integer"), (61, "hold only 60"), (2.5, "positive integer")])
def test_bad_selection(n, message):
    with pytest.raises(ValueError, match=message):
        select_prompts(n)


def test_unknown_category():
    with pytest.raises(ValueError, match="unknown prompt categories"):
        select_prompts(2, ["Poetry"])
