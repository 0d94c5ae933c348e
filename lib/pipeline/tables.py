"""One table formatter for every notebook report: `show(df)` -> an HTML table a reviewer can read.

- numbers at `digits` significant figures (default 3; integers stay integers, booleans read yes / no);
- missing values (None, NaN, +-inf, empty) as an en dash, with the reason in a note under the table (`missing=`);
- pairs such as CIs ([lo, hi]) as "[lo, hi]"; dicts and long lists are never dumped: they become "k = v" lines or
  are cut with "..." (and strings longer than `max_chars` too; file paths keep their last part);
- wide tables fit the 1,300 px report: a table with more than `max_cols` columns is transposed when it has at most
  `max_cols` rows, otherwise split into column blocks that each repeat the index.

    from lib.pipeline import tables
    display(tables.show(frame, missing="not defined: the random sets are at the floor", note="accuracy in %"))
"""
from __future__ import annotations

import html
import math
import numbers
import re
from pathlib import PurePath

import numpy as np
import pandas as pd

__all__ = ["MAX_COLS", "number", "cell", "blocks", "to_html", "show", "records", "thin"]

DASH = "\u2013"
MAX_COLS = 12
MAX_CHARS = 60
DEFAULT_MISSING = "not defined or not computed in this run"
MISSING_TEXT = re.compile(r"(?i)(nan|none|null|[+-]?inf)|\[\s*(nan|none|null)\s*(,\s*(nan|none|null)\s*)*\]")


def is_missing(x) -> bool:
    """True for None, NaN, +-inf and pd.NA (an empty string is a blank, not a missing value)."""
    if x is None or x is pd.NA:
        return True
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return not math.isfinite(float(x))
    return False


def number(x, digits: int = 3) -> str:
    """A number at `digits` significant figures ("0.0123", "1.23e+04" only beyond 1e6), integers as integers."""
    if is_missing(x):
        return DASH
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, numbers.Integral) or (float(x).is_integer() and abs(float(x)) < 1e6
                                           and not isinstance(x, (float, np.floating))):
        return f"{int(x):d}"
    x = float(x)
    if x == 0:
        return "0"
    if 1e-4 <= abs(x) < 1e6:
        text = f"{x:.{digits}g}"
        return text if "e" not in text else f"{round(x, digits - 1 - math.floor(math.log10(abs(x)))):.0f}"
    return f"{x:.{max(digits - 1, 0)}e}"


def cell(x, digits: int = 3, max_chars: int = MAX_CHARS) -> str:
    """Display text of one value (see the module docstring)."""
    if isinstance(x, (list, tuple, np.ndarray)) and not isinstance(x, str):
        items = list(np.asarray(x, dtype=object).ravel()) if isinstance(x, np.ndarray) else list(x)
        if all(is_missing(i) for i in items):                     # empty, or nothing but missing values
            return DASH
        text = "[" + ", ".join(cell(i, digits, max_chars) for i in items[:6]) + (", ...]" if len(items) > 6 else "]")
        return _cut(text, max_chars)
    if isinstance(x, dict):
        return _cut("; ".join(f"{k} = {cell(v, digits, max_chars)}" for k, v in x.items()), max_chars)
    if isinstance(x, PurePath):
        return _cut(x.name, max_chars)
    if isinstance(x, str):
        if MISSING_TEXT.fullmatch(x.strip()):                # pre-formatted "nan", "None", "[nan, nan]"
            return DASH
        if "/" in x and " " not in x and len(x) > 24:
            x = x.rstrip("/").rsplit("/", 1)[-1]
        return _cut(x, max_chars)
    if isinstance(x, (numbers.Number, np.bool_)) or x is None or x is pd.NA:
        return number(x, digits)
    return _cut(str(x), max_chars)


def label(x, digits: int = 3, max_chars: int = MAX_CHARS) -> str:
    """Display text of a column or row name: a name is never a missing value (a column called "null" stays)."""
    return _cut(x, max_chars) if isinstance(x, str) else cell(x, digits, max_chars)


def _cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars - 3].rstrip() + "..."


def text_frame(df: pd.DataFrame, digits: int = 3, max_chars: int = MAX_CHARS) -> tuple[pd.DataFrame, bool]:
    """-> (every cell of `df` as display text, whether any value was missing)."""
    out = df.astype(object).map(lambda v: cell(v, digits, max_chars)) if len(df.columns) else df.astype(object)
    out.index = [label(i, digits, max_chars) for i in df.index] if not isinstance(df.index, pd.MultiIndex) else \
        pd.MultiIndex.from_tuples([tuple(label(i, digits, max_chars) for i in t) for t in df.index], names=df.index.names)
    out.columns = [label(c, digits, max_chars) if not isinstance(c, tuple) else " / ".join(label(i, digits, max_chars)
                                                                                            for i in c) for c in df.columns]
    return out, bool((out == DASH).to_numpy().any())


PX_PER_CHAR, PX_PAD, WIDTH_PX = 6.6, 16, 1100          # 11 px report font; cell padding; room in a 1,300 px page


def width_px(text: pd.DataFrame) -> float:
    """Estimated rendered width of a table of display strings (index included), in px."""
    cols = [[str(c), *map(str, text[c])] for c in text.columns] + [["", *map(str, text.index)]]
    return sum(PX_PAD + PX_PER_CHAR * max((len(w) for v in col for w in v.split()), default=0) ** 0.5
               * max(len(v) for v in col) ** 0.5 for col in cols)


def _split(df: pd.DataFrame, max_cols: int) -> list[pd.DataFrame]:
    """Column blocks of (nearly) equal size, as few as keep each within max_cols columns and WIDTH_PX."""
    for n in range(-(-len(df.columns) // max_cols), len(df.columns) + 1):
        size = -(-len(df.columns) // n)
        parts = [df.iloc[:, i:i + size] for i in range(0, len(df.columns), size)]
        if all(width_px(p) <= WIDTH_PX for p in parts):
            return parts
    return [df.iloc[:, [i]] for i in range(len(df.columns))]


def blocks(df: pd.DataFrame, max_cols: int = MAX_COLS) -> list[pd.DataFrame]:
    """`df` as tables that fit the page: itself, its transpose (few rows), or column blocks (at most `max_cols`
    columns and about WIDTH_PX px each)."""
    if len(df.columns) <= max_cols and width_px(df) <= WIDTH_PX:
        return [df]
    if len(df) <= max_cols and width_px(df.T) <= WIDTH_PX:
        return [df.T]
    return _split(df, max_cols)


def to_html(df: pd.DataFrame | pd.Series, digits: int = 3, missing: str = DEFAULT_MISSING, note: str = "",
            index: bool | None = None, max_cols: int = MAX_COLS, max_chars: int = MAX_CHARS,
            max_rows: int = 40) -> str:
    """The HTML of `df` formatted for a report (module docstring); `index` None shows a non-default index only."""
    frame = df.to_frame() if isinstance(df, pd.Series) else df
    shown_rows = len(frame)
    if len(frame) > max_rows:
        frame = frame.head(max_rows)
    if index is None:
        index = not isinstance(frame.index, pd.RangeIndex)
    if len(frame.columns) > max_cols and not index:        # the first column names the rows of every block
        frame, index = frame.set_index(frame.columns[0]), True
    text, has_missing = text_frame(frame, digits, max_chars)
    parts = [b.to_html(index=index, border=0, escape=True, classes="hi-table") for b in blocks(text, max_cols)]
    notes = []
    if shown_rows > max_rows:
        notes.append(f"first {max_rows} of {shown_rows} rows")
    if has_missing:
        notes.append(f"{DASH} : {missing}")
    if note:
        notes.append(note)
    foot = f"<p class='hi-note'>{html.escape('; '.join(notes))}</p>" if notes else ""
    return "<div class='hi-tables'>" + "".join(parts) + foot + "</div>"


def show(df, **kwargs):
    """`to_html` wrapped for IPython.display.display (same keywords)."""
    from IPython.display import HTML
    return HTML(to_html(df, **kwargs))


def records(rows: list[dict], **kwargs):
    """A list of dicts (e.g. a claim's fields) as a formatted table: never a raw dict or JSON dump."""
    return show(pd.DataFrame(rows), **kwargs)


def thin(values, k: int = 10) -> np.ndarray:
    """At most `k` of `values` (measured points), evenly spread, first and last kept: [<= k]."""
    values = np.asarray(values)
    if len(values) <= k:
        return values
    return values[np.unique(np.linspace(0, len(values) - 1, k).round().astype(int))]
