"""Explore a finished run (the explorer notebook, NB.EXPLORE): one head at a time, one ranking variant at a time.

`load_run(out_dir)` reads whatever the run folder has (activations from 01, PhiID per mode from 02, rankings
from 04; lib.storage.artifacts names the files) and records what is missing instead of failing, so the explorer opens on
a partial run.
The tables below are plain pandas; the figures are in lib/plots/explore.py; `explorer(...)` wires both to
ipywidgets (JupyterLab). Head index = layer * n_heads + head, as everywhere in the project.
Synergy is PhiID atom `sts`, redundancy atom `rtr` (nats); a head's "row" is the atom with the head as source
and every other head as target.
"""
from __future__ import annotations

import html
import io
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib import REPO_ROOT
from lib.storage import artifacts
from lib.storage.store import run_folder
from lib.storage.notebooks import NB

__all__ = ["OUTPUT_ROOT", "RunData", "load_run", "summary", "head_id", "label", "default_mode", "default_variant",
           "head_ranks", "phiid_row", "variant_grid", "variant_profile", "list_runs", "default_run", "message_html",
           "parse_head", "color_limits", "prompt_tokens", "show", "head_view", "variant_view", "prompt_view",
           "explorer", "head_explorer"]

OUTPUT_ROOT = REPO_ROOT / "outputs"
_DRAW_LOCK = threading.RLock()
CLIM_CHOICES = ("shared", "head")       # colour limits: shared by all heads (1-99th pct) or this head's row (2-98th)

SYNERGY_ATOM, REDUNDANCY_ATOM = "sts", "rtr"
PHIID_MODES = ("per_prompt", "concat", "pooled")
NOT_VARIANTS = {"head_idx", "layer", "head", "syn", "red"}     # rankings.csv columns that are not variant scores


@dataclass
class RunData:
    out_dir: Path
    n_layers: int = 0
    n_heads: int = 0
    model: str = ""
    activations: np.ndarray | None = None           # [prompts, heads, steps]
    prompt_text: list[str] = field(default_factory=list)
    tokens: np.ndarray | None = None                # [prompts, steps] generated token ids
    local: dict = field(default_factory=dict)       # notebook 11: {"sts": [heads, prompts, transitions], "token_ids": ...}
    phiid: dict = field(default_factory=dict)        # mode -> {"syn": [H, H], "red": [H, H], "degenerate": [H, H]}
    rankings: pd.DataFrame | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def n_total(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def modes(self) -> list[str]:
        return list(self.phiid)

    @property
    def variants(self) -> list[str]:
        if self.rankings is None:
            return []
        return [c for c in self.rankings.columns
                if c not in NOT_VARIANTS and pd.api.types.is_numeric_dtype(self.rankings[c])]

    # the tables of this module as methods, so that lib.plots.explore draws a RunData without importing lib.pipeline.explore
    def head_ranks(self, idx: int) -> pd.DataFrame:
        return head_ranks(self, idx)

    def phiid_row(self, idx: int, mode: str) -> pd.DataFrame:
        return phiid_row(self, idx, mode)

    def variant_grid(self, variant: str) -> np.ndarray:
        return variant_grid(self, variant)

    def variant_profile(self, variant: str) -> pd.DataFrame:
        return variant_profile(self, variant)

    def color_limits(self, mode: str, column: str, idx: int, how: str = "shared") -> tuple[float, float]:
        return color_limits(self, mode, column, idx, how)

    def label(self, idx: int) -> str:
        return label(self, idx)

    def token_text(self, ids) -> list[str]:
        return token_text(self, ids)


def load_run(out_dir: str | Path = "") -> RunData:
    """Everything the explorer shows, from a run folder ("": the newest finished run of outputs/, see
    default_run); missing pieces are listed in `.missing`."""
    if not str(out_dir).strip():
        found = default_run()
        if found is None:
            return RunData(out_dir=OUTPUT_ROOT, missing=[f"no run folder in {OUTPUT_ROOT} (a folder with a "
                                                         f"manifest.json): run `make run`, or set out_dir"])
        out_dir = found
    out_dir = run_folder(out_dir)
    run = RunData(out_dir=out_dir)
    _load_activations(run)
    _load_local(run)
    for mode in PHIID_MODES:
        if artifacts.path("phiid", out_dir, mode=mode).exists():
            _load_phiid(run, mode)
    if not run.phiid:
        run.missing.append(_absent("phiid"))
    if artifacts.path("rankings", out_dir).exists():
        run.rankings = artifacts.load("rankings", out_dir).sort_values("head_idx").reset_index(drop=True)
        if not run.n_layers:
            run.n_layers, run.n_heads = int(run.rankings["layer"].max()) + 1, int(run.rankings["head"].max()) + 1
    else:
        run.missing.append(_absent("rankings", out_dir))
    for what, n in [("phiid", next((len(v["syn"]) for v in run.phiid.values()), None)),
                    ("rankings", None if run.rankings is None else len(run.rankings)),
                    ("activations", None if run.activations is None else run.activations.shape[1])]:
        if n is not None and n != run.n_total:
            raise ValueError(f"{what} in {str(out_dir)!r} has {n} heads but the run has {run.n_layers} layers x "
                             f"{run.n_heads} heads: the files come from different runs; rerun the pipeline")
    return run


def _absent(name: str, out_dir=None) -> str:
    a = artifacts.artifact(name)
    return f"{artifacts.shown_name(a, with_tag=False)} (notebook {a.producer})" + (f" is not in {str(out_dir)!r}" if out_dir else "")


def _load_activations(run: RunData) -> None:
    if not artifacts.path("activations", run.out_dir).exists():
        run.missing.append(_absent("activations", run.out_dir))
        return
    a = artifacts.load("activations", run.out_dir, require=["activations", "head_layer", "head_index"])
    run.activations = a["activations"]
    run.n_layers = int(a["n_layers"]) if "n_layers" in a else int(a["head_layer"].max()) + 1
    run.n_heads = int(a["n_heads"]) if "n_heads" in a else int(a["head_index"].max()) + 1
    run.model = str(a["model"]) if "model" in a else ""
    run.prompt_text = [str(t) for t in a["prompt_text"]] if "prompt_text" in a else []
    run.tokens = a["tokens"] if "tokens" in a else None


def _load_local(run: RunData) -> None:
    """Notebook 11's local synergy, when it ran (optional: nothing is listed as missing)."""
    if artifacts.path("local_phiid", run.out_dir).exists():
        loc = artifacts.load("local_phiid", run.out_dir, require=["sts", "token_ids"])
        run.local = {"sts": loc["sts"], "token_ids": loc["token_ids"], "tau": int(loc.get("tau", 1))}


def _load_phiid(run: RunData, mode: str) -> None:
    p = artifacts.load("phiid", run.out_dir, mode=mode, require=[SYNERGY_ATOM, REDUNDANCY_ATOM])
    deg = p["degenerate"].astype(bool) if "degenerate" in p else np.zeros_like(p[SYNERGY_ATOM], bool)
    run.phiid[mode] = {"syn": p[SYNERGY_ATOM], "red": p[REDUNDANCY_ATOM], "degenerate": deg}
    if not run.n_layers and "head_layer" in p:
        run.n_layers, run.n_heads = int(p["head_layer"].max()) + 1, int(p["head_index"].max()) + 1


def summary(run: RunData) -> pd.DataFrame:
    """What the run folder holds (one row per artifact)."""
    acts = run.activations
    rows = [{"artifact": artifacts.path("activations", "").name, "present": acts is not None,
             "details": (f"{run.model}: {acts.shape[0]} prompts x {acts.shape[1]} heads x "
                         f"{acts.shape[2]} steps") if acts is not None else ""}]
    for mode in PHIID_MODES:
        rows.append({"artifact": artifacts.path("phiid", "", mode=mode).name, "present": mode in run.phiid,
                     "details": f"{run.n_total} x {run.n_total} sts and rtr (nats)" if mode in run.phiid else ""})
    rows.append({"artifact": artifacts.path("rankings", "").name, "present": run.rankings is not None,
                 "details": f"variants: {', '.join(run.variants)}" if run.rankings is not None else ""})
    return pd.DataFrame(rows)


def head_id(run: RunData, layer: int, head: int) -> int:
    if not (0 <= layer < run.n_layers and 0 <= head < run.n_heads):
        raise ValueError(f"layer {layer}, head {head} is outside the model ({run.n_layers} layers x "
                         f"{run.n_heads} heads)")
    return int(layer) * run.n_heads + int(head)


def label(run: RunData, idx: int) -> str:
    return f"L{idx // run.n_heads}H{idx % run.n_heads}"


def default_mode(run: RunData, mode: str = "per_prompt") -> str | None:
    return mode if mode in run.phiid else (run.modes[0] if run.modes else None)


def default_variant(run: RunData, variant: str = "") -> str | None:
    return variant if variant in run.variants else (run.variants[0] if run.variants else None)


def head_ranks(run: RunData, idx: int) -> pd.DataFrame:
    """The head's score and rank under every variant: rank 1 = most synergistic (highest score; ties share the
    best rank), percentile = share of heads ranked below it."""
    if run.rankings is None:
        return pd.DataFrame(columns=["variant", "score", "rank", "of", "percentile"])
    rows = []
    for v in run.variants:
        scores = run.rankings[v].to_numpy(float)
        s = scores[idx]
        finite = np.isfinite(scores)
        rank = int((scores[finite] > s).sum()) + 1 if np.isfinite(s) else None
        rows.append({"variant": v, "score": s, "rank": rank, "of": int(finite.sum()),
                     "percentile": 100.0 * (scores[finite] < s).sum() / max(finite.sum() - 1, 1) if rank else np.nan})
    return pd.DataFrame(rows)


def phiid_row(run: RunData, idx: int, mode: str) -> pd.DataFrame:
    """Synergy and redundancy of the head (as source) with every other head (target), nats; undefined pairs NaN."""
    p = run.phiid[mode]
    syn, red = p["syn"][idx].astype(float), p["red"][idx].astype(float)
    bad = p["degenerate"][idx]
    syn[bad], red[bad] = np.nan, np.nan
    targets = np.arange(run.n_total)
    return pd.DataFrame({"target": [label(run, t) for t in targets], "layer": targets // run.n_heads,
                         "head": targets % run.n_heads, "synergy": syn, "redundancy": red})


def variant_grid(run: RunData, variant: str) -> np.ndarray:
    """[layers, heads] grid of a variant's score."""
    grid = np.full((run.n_layers, run.n_heads), np.nan)
    r = run.rankings
    grid[r["layer"].to_numpy(int), r["head"].to_numpy(int)] = r[variant].to_numpy(float)
    return grid


def variant_profile(run: RunData, variant: str) -> pd.DataFrame:
    """Per-layer mean, sd and count of a variant's head scores."""
    g = run.rankings.groupby("layer")[variant]
    return pd.DataFrame({"layer": g.mean().index, "mean": g.mean().to_numpy(), "sd": g.std(ddof=0).to_numpy(),
                         "heads": g.count().to_numpy()})


def top_heads(run: RunData, variant: str, k: int = 10) -> pd.DataFrame:
    r = run.rankings[["head_idx", "layer", "head", variant]].sort_values(variant, ascending=False).head(k)
    return r.reset_index(drop=True)


# ----------------------------------------------------------------------------- runs of outputs/

def run_status(folder: Path) -> dict:
    """One run folder: status ("finished": every notebook of its manifest ok; "failed", "running", "by hand": no
    manifest but artifacts), when it last finished a notebook, and its notebooks ok / recorded."""
    manifest_path = Path(folder) / "manifest.json"
    if not manifest_path.exists():
        return {"status": "by hand", "last": "", "notebooks": "", "model": ""}
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return {"status": "unreadable manifest", "last": "", "notebooks": "", "model": ""}
    entries = manifest.get("notebooks", {})
    states = [e.get("status") for e in entries.values()]
    status = ("running" if "running" in states else "failed" if "failed" in states
              else "finished" if states else "empty")
    last = max((e.get("finished") or e.get("started") or "" for e in entries.values()), default="")
    model = manifest.get("sections", {}).get("run", {}).get("shared", {}).get("model", "")
    return {"status": status, "last": last.replace("T", " "), "model": model,
            "notebooks": f"{states.count('ok')}/{len(states)} ok"}


def list_runs(root: str | Path | None = None) -> pd.DataFrame:
    """Run folders under `root` (those with a manifest.json, and folders of notebooks run by hand that hold
    activations or rankings), finished runs first, newest first. Columns: run, path, status, last, notebooks, model."""
    rows, root = [], OUTPUT_ROOT if root is None else root
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []:
        explorable = any(artifacts.path(n, folder).exists() for n in ("activations", "rankings"))
        if (folder / "manifest.json").exists() or explorable:
            rows.append({"run": folder.name, "path": folder, **run_status(folder)})
    runs = pd.DataFrame(rows, columns=["run", "path", "status", "last", "notebooks", "model"])
    order = runs["status"].map({"finished": 0, "running": 1, "by hand": 2}).fillna(3)
    return runs.assign(_o=order).sort_values(["_o", "last"], ascending=[True, False]).drop(columns="_o") \
        .reset_index(drop=True)


def default_run(root: str | Path | None = None) -> Path | None:
    """The newest finished run of `root`, else the first listed; None when there is none."""
    runs = list_runs(root)
    return None if runs.empty else Path(runs["path"].iloc[0])


def run_label(row) -> str:
    return f"{row['run']}: {row['status']}" + (f", {row['last']}" if row["last"] else "") + \
        (f" ({row['notebooks']})" if row["notebooks"] else "")


def message_html(text: str, bold: str = "") -> str:
    """A message for an HTML widget, escaped (file names like phiid_<mode>.npz are shown as written)."""
    return (f"<b>{html.escape(bold)}</b> " if bold else "") + html.escape(text)


# ----------------------------------------------------------------------------- heads, colours, tokens

HEAD_PATTERN = re.compile(r"^\s*L?\s*(\d+)\s*[H,/ :.-]\s*(\d+)\s*$", re.I)


def parse_head(run: RunData, text: str) -> int:
    """'L14H6' (also 'l14h6', '14,6', '14 6') -> head index; ValueError naming the valid range otherwise."""
    m = HEAD_PATTERN.match(str(text))
    if m is None:
        raise ValueError(f"{text!r} is not a head: write L<layer>H<head>, e.g. L{run.n_layers // 2}H{run.n_heads // 2}")
    layer, head = int(m.group(1)), int(m.group(2))
    if not (0 <= layer < run.n_layers and 0 <= head < run.n_heads):
        raise ValueError(f"{text!r} is outside the model: layers 0-{run.n_layers - 1}, heads 0-{run.n_heads - 1}")
    return layer * run.n_heads + head


def color_limits(run: RunData, mode: str, column: str, idx: int, how: str = "shared") -> tuple[float, float]:
    """Colour limits of a synergy ("syn") or redundancy ("red") map: "shared" = 1st-99th percentile of every
    defined pair of the run (the same for all heads, so heads compare), "head" = 2nd-98th percentile of this
    head's row. Percentiles, so that one bright cell does not wash the map out."""
    if how not in CLIM_CHOICES:
        raise ValueError(f"colour limits {how!r}: use one of {CLIM_CHOICES}")
    p = run.phiid[mode]
    values, ok = p[column], ~p["degenerate"] & ~np.eye(run.n_total, dtype=bool)
    values = values[ok] if how == "shared" else values[idx][ok[idx]]
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    q = (1, 99) if how == "shared" else (2, 98)
    lo, hi = (float(v) for v in np.percentile(values, q))
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def _tokenizer_file(model: str) -> Path | None:
    """tokenizer.json of the run's model when it is on disk (no download); None for synthetic or unknown ones."""
    if model.startswith(("random:", "bundled:")):     # random tiny models use the bundled tokenizer (lib.model.loading)
        from lib.model.loading import cache_dir
        f = cache_dir() / "smollm2-135m-float32" / "tokenizer.json"
    elif model and Path(model).is_dir():
        f = Path(model) / "tokenizer.json"
    elif model.count("/") == 1 and ":" not in model:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(model, "tokenizer.json")
        f = Path(found) if isinstance(found, str) else None
    else:
        f = None
    return f if f is not None and f.is_file() else None


def token_text(run: RunData, ids) -> list[str]:
    """Decoded text of each token id (the run's tokenizer), or "#<id>" when the tokenizer is not on disk."""
    if "tokenizer" not in run.local:
        f = _tokenizer_file(run.model)
        if f is not None:
            from tokenizers import Tokenizer
            run.local["tokenizer"] = Tokenizer.from_file(str(f))
        else:
            run.local["tokenizer"] = None
    tok = run.local["tokenizer"]
    return [tok.decode([int(t)]) if tok is not None else f"#{int(t)}" for t in np.asarray(ids).ravel()]


def visible_text(tokens) -> str:
    """Generated tokens joined, line breaks shown as ⏎ (a reply of newlines would otherwise look empty)."""
    return "".join(tokens).replace("\n", "⏎")


def prompt_tokens(run: RunData, prompt: int, idx: int) -> pd.DataFrame:
    """The generated tokens of one prompt with the head's activation at each step and, when notebook 11 ran, its
    local synergy at the step that reads the token (sts, nats; NaN where undefined). Rows: steps."""
    acts = run.activations[prompt, idx]
    steps = np.arange(len(acts))
    ids = run.tokens[prompt] if run.tokens is not None else np.full(len(acts), -1)
    local = np.full(len(acts), np.nan)
    if run.local.get("sts") is not None:
        tau = run.local["tau"]
        values = run.local["sts"][idx, prompt]
        local[tau:tau + len(values)] = values[:len(acts) - tau]
    return pd.DataFrame({"step": steps, "token": run.token_text(ids) if run.tokens is not None else [""] * len(acts),
                         "activation": acts, "local_synergy": local})


# ----------------------------------------------------------------------------- views (live and static alike)

def show(items) -> None:
    """Display figures (then close them) and tables in order: the live panel and the static cells share it."""
    import matplotlib.pyplot as plt
    from IPython.display import HTML, Image, display
    with pd.option_context("display.max_colwidth", None, "display.width", 250):
        for item in items:
            if hasattr(item, "savefig"):       # rendered here, whole, under a lock: widget callbacks that overlap
                with _DRAW_LOCK:               # must not draw into each other's figures
                    buf = io.BytesIO()
                    item.savefig(buf, format="png", dpi=110, bbox_inches="tight")
                    plt.close(item)
                display(Image(data=buf.getvalue(), format="png"))
            else:
                display(HTML(item) if isinstance(item, str) else item)


def head_view(run: RunData, idx: int, mode: str | None, clim: str = "shared", prompt: int | None = None) -> list:
    """[caption, figure, ranks table] of one head."""
    from lib.plots import explore as plots
    items = [f"<span class='hi-head'><b>Head {label(run, idx)}</b> (index {idx}, "
             f"{html.escape(mode or 'no PhiID')}, colour limits: {clim})</span>", plots.head_panel(run, idx, mode, clim=clim, prompt=prompt)]
    if run.rankings is not None:
        items.append(head_ranks(run, idx).round(4))
    return items


def variant_view(run: RunData, variant: str | None, idx: int | None = None) -> list:
    """[caption, figure, top-10 table] of one ranking variant, the selected head marked."""
    from lib.plots import explore as plots
    if run.rankings is None or not variant:
        return [message_html(f"{_absent('rankings')} is missing: run it")]
    where = ""
    if idx is not None:
        r = head_ranks(run, idx).set_index("variant").loc[variant]
        rank = f"#{int(r['rank'])} of {int(r['of'])}" if pd.notna(r["rank"]) else "undefined score"
        where = f"; selected head {label(run, idx)}: {rank}"
    return [f"<span class='hi-variant'><b>Variant {html.escape(variant)}</b>{where}</span>", plots.variant_panel(run, variant, idx),
            top_heads(run, variant).assign(label=lambda d: [label(run, i) for i in d["head_idx"]])]


def prompt_view(run: RunData, prompt: int, idx: int) -> list:
    """[prompt and generated text, figure of the head over the generation] of one prompt."""
    from lib.plots import explore as plots
    if run.activations is None:
        return [message_html(f"{_absent('activations', run.out_dir)}: no prompts to show")]
    table = prompt_tokens(run, prompt, idx)
    text = run.prompt_text[prompt] if prompt < len(run.prompt_text) else "(prompt text not recorded)"
    local = ("local synergy from notebook 11" if run.local.get("sts") is not None
             else f"no local synergy: notebook {NB.LOCAL} has not run")
    return [f"<span class='hi-prompt'><b>Prompt {prompt}, head {label(run, idx)}</b> ({html.escape(local)})</span><br>"
            f"<i>prompt:</i> {html.escape(text)}<br><i>generated:</i> <code>{html.escape(visible_text(table['token']))}</code>",
            plots.prompt_panel(run, idx, prompt, table)]


# ----------------------------------------------------------------------------- widgets

def explorer(run: RunData | str | Path = "", layer: int = 0, head: int = 0, variant: str = "",
             mode: str = "per_prompt", prompt: int = 0, clim: str = "shared"):
    """The ipywidgets explorer: a run picker over list_runs() and, below it, the panel of the chosen run (see
    head_explorer). Returns the box (display it); .body is the current run's panel."""
    import ipywidgets as W
    run = run if isinstance(run, RunData) else load_run(run)
    runs = list_runs()
    options = [(run_label(r), str(Path(r["path"]).resolve())) for _, r in runs.iterrows()]
    shown = str(run.out_dir.resolve())
    if shown not in [o[1] for o in options]:
        options.insert(0, (f"{run.out_dir.name}: given out_dir ({shown})", shown))
    picker = W.Dropdown(options=options, value=shown, description="run",
                        layout=W.Layout(width="560px"), style={"description_width": "40px"})
    box = W.VBox([picker])

    def open_run(path, first=None):
        panel = head_explorer(first or load_run(path), layer, head, variant, mode, prompt, clim)
        box.children, box.body = [picker, panel], panel
        box.controls, box.outputs = {"run": picker, **getattr(panel, "controls", {})}, getattr(panel, "outputs", {})

    picker.observe(lambda change: open_run(change["new"]), names="value")
    open_run(run.out_dir, run)
    return box


def head_explorer(run: RunData, layer: int = 0, head: int = 0, variant: str = "", mode: str = "per_prompt",
                  prompt: int = 0, clim: str = "shared"):
    """One run: a head box ("L14H6", previous / next), PhiID mode and colour-limit switches -> the head panel;
    variant -> its profile, map and clickable top heads; prompt -> its text, tokens and the head over them."""
    import ipywidgets as W

    if not run.n_layers:
        return W.HTML(message_html("; ".join(run.missing), f"Nothing to explore in {run.out_dir}:"))
    idx0 = head_id(run, min(layer, run.n_layers - 1), min(head, run.n_heads - 1))
    head_w = W.Text(value=label(run, idx0), description="head", continuous_update=False,
                    layout=W.Layout(width="170px"), style={"description_width": "40px"})
    prev_w, next_w = W.Button(description="◀ previous", layout=W.Layout(width="100px")), \
        W.Button(description="next ▶", layout=W.Layout(width="90px"))
    note_w = W.HTML()
    mode_w = W.Dropdown(options=run.modes or ["(no PhiID)"], value=default_mode(run, mode) or "(no PhiID)",
                        description="PhiID mode", layout=W.Layout(width="230px"))
    clim_w = W.ToggleButtons(options=[("shared colour limits", "shared"), ("per head", "head")], value=clim,
                             style={"button_width": "150px"})
    variant_w = W.Dropdown(options=run.variants or ["(no rankings)"],
                           value=default_variant(run, variant) or "(no rankings)", description="variant")
    prompts = [(f"{i}: {t[:70]}", i) for i, t in enumerate(run.prompt_text)] or \
        [(str(i), i) for i in range(0 if run.activations is None else run.activations.shape[0])] or [("(none)", 0)]
    prompt_w = W.Dropdown(options=prompts, value=min(prompt, len(prompts) - 1), description="prompt",
                          layout=W.Layout(width="560px"))
    outs = {k: W.Output() for k in ("head", "variant", "top", "prompt")}
    state = {"idx": idx0, "errors": []}

    def guarded(draw):
        def call(*_):
            try:
                with _DRAW_LOCK:                    # one redraw at a time, whichever thread the kernel calls from
                    draw()
            except Exception as e:              # shown in the panel: a callback's traceback is otherwise lost
                state["errors"].append(f"{type(e).__name__}: {e}")
                note_w.value = f"<span style='color:#b00'>{message_html(f'{type(e).__name__}: {e}')}</span>"
        return call

    def redraw(key, items):
        with outs[key]:
            outs[key].clear_output(wait=True)
            show(items)

    def draw_head():
        redraw("head", head_view(run, state["idx"], mode_w.value if run.modes else None, clim_w.value, prompt_w.value))

    def draw_variant():
        if run.rankings is None:
            return redraw("variant", variant_view(run, None))
        items = variant_view(run, variant_w.value, state["idx"])
        redraw("variant", items[:2])
        with outs["top"]:
            outs["top"].clear_output(wait=True)
            from IPython.display import display
            display(_top_table(run, items[2], variant_w.value, select))

    def draw_prompt():
        redraw("prompt", prompt_view(run, prompt_w.value, state["idx"]))

    def select(idx):
        idx = int(idx) % run.n_total
        if label(run, idx) != head_w.value:
            head_w.value = label(run, idx)          # -> on_text -> redraws
        else:
            on_text()

    def on_text(*_):
        with _DRAW_LOCK:
            select_text()

    def select_text():
        try:
            state["idx"] = parse_head(run, head_w.value)
        except ValueError as e:
            note_w.value = f"<span style='color:#b00'>{message_html(str(e))}</span>"
            return
        note_w.value = ""
        for draw in (draw_head, draw_variant, draw_prompt):
            guarded(draw)()

    head_w.observe(on_text, names="value")
    prev_w.on_click(lambda _: select(state["idx"] - 1))
    next_w.on_click(lambda _: select(state["idx"] + 1))
    for w, draw in ((mode_w, draw_head), (clim_w, draw_head), (variant_w, draw_variant)):
        w.observe(guarded(draw), names="value")
    prompt_w.observe(lambda *_: (guarded(draw_prompt)(), guarded(draw_head)()), names="value")
    on_text()
    panel = W.VBox([W.HTML("<b>Head</b>: type L&lt;layer&gt;H&lt;head&gt; (Enter), or step through the heads"),
                    W.HBox([head_w, prev_w, next_w, mode_w, clim_w]), note_w, outs["head"],
                    W.HTML("<b>Ranking variant</b> (click a head in the table to select it)"), variant_w,
                    outs["variant"], outs["top"],
                    W.HTML("<b>Prompt</b>: its generated tokens and the selected head over them"), prompt_w,
                    outs["prompt"]])
    panel.controls = {"head": head_w, "previous": prev_w, "next": next_w, "mode": mode_w, "clim": clim_w,
                      "variant": variant_w, "prompt": prompt_w}
    panel.outputs, panel.state, panel.note = outs, state, note_w
    return panel


def _top_table(run: RunData, top: pd.DataFrame, variant: str, select):
    """The top-heads table as a grid whose head cells are buttons that select the head."""
    import ipywidgets as W
    cells = [W.HTML(f"<b>{h}</b>") for h in ("rank", "head", "layer", "head #", html.escape(variant))]
    for i, row in top.iterrows():
        button = W.Button(description=label(run, int(row["head_idx"])), layout=W.Layout(width="80px"),
                          tooltip="select this head")
        button.on_click(lambda _, h=int(row["head_idx"]): select(h))
        cells += [W.HTML(str(i + 1)), button, W.HTML(str(row["layer"])), W.HTML(str(row["head"])),
                  W.HTML(f"{row[variant]:.4f}")]
    grid = W.GridBox(cells, layout=W.Layout(grid_template_columns="50px 90px 60px 60px 100px", grid_gap="2px 8px"))
    grid.buttons = [c for c in cells if isinstance(c, W.Button)]
    return grid
