"""The explorer in a real browser: JupyterLab started here, Chromium (Debian's, driven by playwright from PyPI; no
`playwright install`) opens notebooks/00_explore.ipynb on the shared tiny run, runs all cells, then types a head,
steps to the next one, clicks a top head, changes the variant and the prompt, and checks that every output
redraws with the right head and that neither the page nor the kernel shows an error.

The notebook is a copy of the stored one in a temporary Lab root with only `out_dir` (the tiny run), `layer` and
`head` changed in its parameters cell. Redraw times go to stdout (pytest -s) and, with EXPLORER_SHOTS=<folder>,
screenshots and times.json are written there; EXPLORER_RUN=<run folder> measures on another run (e.g. the SmolLM2
one) instead of the tiny run.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from lib import REPO_ROOT

pytestmark = pytest.mark.slow(reason="starts JupyterLab and drives it with Chromium")
TOKEN = "explorer-" + uuid.uuid4().hex[:12]
WAIT_MS = 30_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook_copy(root: Path, out_dir: Path, layer: int, head: int) -> Path:
    """notebooks/00_explore.ipynb with out_dir, layer and head set in its parameters cell (nothing else changed)."""
    nb = json.loads((REPO_ROOT / "notebooks" / "00_explore.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    lines = "".join(cell["source"]).split("\n")
    values = {"out_dir": repr(str(out_dir)), "layer": str(layer), "head": str(head)}
    lines = [f"{ln.split('=')[0].strip()} = {values[ln.split('=')[0].strip()]}"
             if ln.split("=")[0].strip() in values else ln for ln in lines]
    cell["source"] = "\n".join(lines)
    target = root / "explore.ipynb"
    target.write_text(json.dumps(nb))
    return target


@pytest.fixture
def lab_root(tiny_run):
    root = Path(tempfile.mkdtemp(prefix="hi-explorer-lab-"))
    _notebook_copy(root, Path(os.environ.get("EXPLORER_RUN") or tiny_run).resolve(), layer=1, head=2)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def lab(lab_root):
    """JupyterLab on loopback with a token, the app exposed to the page (window.jupyterapp); stopped by PID."""
    port, home = _free_port(), Path(tempfile.mkdtemp(prefix="hi-explorer-home-"))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTER_DATA_DIR": str(home / "data"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HEADINFO_NOTEBOOK", None)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=0", f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={lab_root}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(home / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, (home / "lab.log").read_text()[-2000:]
            try:
                req = urllib.request.Request(url + "/api/status", headers={"Authorization": f"token {TOKEN}"})
                with urllib.request.urlopen(req, timeout=5):
                    break
            except OSError:
                assert time.time() < deadline, (home / "lab.log").read_text()[-2000:]
                time.sleep(0.3)
        yield url, home / "lab.log"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def chromium():
    from tests.tools.browser import ensure_chromium
    path, why = ensure_chromium()
    if not path:
        pytest.skip(f"no chromium: {why}")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (make install does)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu",
                                                                "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


LIVE = ".jp-OutputArea-output .widget-vbox"      # the explorer panel (the static figures are outside it)


def _live_text(page, css: str) -> str:
    """Text of the first element matching `css` inside the live panel ('' when absent)."""
    return page.evaluate("""([live, css]) => { const p = document.querySelector(live);
        const e = p && p.querySelector(css); return e ? e.textContent : ""; }""", [LIVE, css])


def _wait_live(page, css: str, text: str) -> float:
    """Seconds until the live panel's `css` element contains `text`, its output shows a figure and the kernel is
    idle (the callbacks are done)."""
    t0 = time.perf_counter()
    page.wait_for_function("""([live, css, text]) => { const p = document.querySelector(live);
        const e = p && p.querySelector(css), out = e && e.closest('.widget-output');
        const imgs = out ? [...out.querySelectorAll('img')] : [];
        return !!out && e.textContent.includes(text) && imgs.length > 0 && imgs.every(i => i.complete && i.naturalHeight > 0)
            && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'; }""",
                           arg=[LIVE, css, text], timeout=WAIT_MS, polling=100)
    return time.perf_counter() - t0


def test_explorer_in_jupyterlab_redraws_the_selected_head(lab, chromium, tiny_run):
    url, lab_log = lab
    shots = Path(os.environ.get("EXPLORER_SHOTS") or tempfile.mkdtemp(prefix="hi-explorer-shots-"))
    shots.mkdir(parents=True, exist_ok=True)
    page = chromium.new_page(viewport={"width": 1400, "height": 2400})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    times = {}

    print("[explorer] opening the notebook", flush=True)
    t0 = time.perf_counter()
    page.goto(f"{url}/lab/tree/explore.ipynb?token={TOKEN}")
    page.wait_for_function("() => window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell')",
                           timeout=60_000, polling=250)
    ready = """() => { const w = window.jupyterapp.shell.currentWidget, s = w && w.sessionContext;
        const k = s && s.session && s.session.kernel;
        return !!k && s.isReady && k.connectionStatus === 'connected' && k.status === 'idle'
            && !document.querySelector('.jp-Dialog'); }"""
    deadline = time.time() + 60
    while not page.evaluate(ready):
        if page.locator(".jp-Dialog .jp-mod-accept").count():     # "Select Kernel" when Lab asks: the notebook's
            page.locator(".jp-Dialog .jp-mod-accept").first.click()    # own kernelspec (python3) is preselected
        assert time.time() < deadline, "the notebook's kernel did not start within 60 s"
        page.wait_for_timeout(250)
    times["lab_open_s"] = time.perf_counter() - t0

    print(f"[explorer] Lab open in {times['lab_open_s']:.1f} s; Run All", flush=True)
    t0 = time.perf_counter()
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); return true; }")
    try:
        _wait_live(page, ".hi-prompt", "head L1H2")
    finally:
        page.screenshot(path=str(shots / "0_after_run_all.png"))
    page.wait_for_function("""() => { const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
        return prompts.length && prompts.every(p => /\\[\\d+\\]/.test(p.textContent)); }""", timeout=60_000, polling=250)
    times["run_all_s"] = time.perf_counter() - t0
    page.screenshot(path=str(shots / "1_run_all.png"))
    assert "Head L1H2" in _live_text(page, ".hi-head")
    assert "selected head L1H2" in _live_text(page, ".hi-variant")
    static = page.evaluate("() => [...document.querySelectorAll('.hi-head')].map(e => e.textContent)")
    assert len(static) == 2 and all("L1H2" in s for s in static), static       # live and static views

    head_box = page.locator(f"{LIVE} .widget-text input").first
    head_box.fill("L3H1")
    t0 = time.perf_counter()
    head_box.press("Enter")
    times["head_typed_s"] = _wait_live(page, ".hi-head", "Head L3H1")
    _wait_live(page, ".hi-variant", "selected head L3H1")
    _wait_live(page, ".hi-prompt", "head L3H1")
    times["head_typed_all_s"] = time.perf_counter() - t0
    page.wait_for_timeout(1000)                               # (not timed) let the last frame paint
    page.screenshot(path=str(shots / "2_head_L3H1.png"), full_page=True)
    src = page.evaluate("""([live]) => document.querySelector(live).querySelector('.hi-head')
        .closest('.widget-output').querySelector('img').src""", [LIVE])
    (shots / "2_head_L3H1_figure.png").write_bytes(base64.b64decode(src.split(",", 1)[1]))    # as the kernel sent it
    from PIL import Image
    with Image.open(shots / "2_head_L3H1_figure.png") as im:
        pixels = np.asarray(im.convert("RGBA"))
    drawn = ((pixels[..., 3] > 0) & (pixels[..., :3].min(axis=2) < 200)).mean()
    assert drawn > 0.05, f"the redrawn head figure is nearly empty ({drawn:.1%} of its pixels drawn)"

    t0 = time.perf_counter()
    page.locator(f"{LIVE} button", has_text="next").first.click()
    times["next_s"] = _wait_live(page, ".hi-prompt", "head L3H2")
    assert head_box.input_value() == "L3H2" and "Head L3H2" in _live_text(page, ".hi-head")

    variant = page.locator(f"{LIVE} .widget-dropdown select").nth(2)          # run, PhiID mode, variant, prompt
    options = variant.locator("option").all_text_contents()
    other = next(o for o in options if o != variant.input_value())
    t0 = time.perf_counter()
    variant.select_option(label=other)
    times["variant_s"] = _wait_live(page, ".hi-variant", f"Variant {other}")
    assert "selected head L3H2" in _live_text(page, ".hi-variant")

    top = page.locator(f"{LIVE} .widget-gridbox button").first
    clicked = top.text_content().strip()
    t0 = time.perf_counter()
    top.click()
    times["top_head_click_s"] = _wait_live(page, ".hi-prompt", f"head {clicked}")
    assert head_box.input_value() == clicked and f"Head {clicked}" in _live_text(page, ".hi-head")

    prompt = page.locator(f"{LIVE} .widget-dropdown select").nth(3)
    t0 = time.perf_counter()
    prompt.select_option(value=prompt.locator("option").nth(3).get_attribute("value"))
    times["prompt_s"] = _wait_live(page, ".hi-prompt", f"Prompt 3, head {clicked}")
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots / "3_variant_prompt.png"), full_page=True)

    head_box.fill("L9H9")                                     # outside the tiny model: refused, nothing redrawn
    head_box.press("Enter")
    page.wait_for_function("([live]) => document.querySelector(live).textContent.includes('outside the model')",
                           arg=[LIVE], timeout=WAIT_MS)
    assert f"Head {clicked}" in _live_text(page, ".hi-head")

    errors = page.evaluate("""() => [...document.querySelectorAll(
        '[data-mime-type="application/vnd.jupyter.stderr"], .jp-RenderedText[data-mime-type*="error"]')]
        .map(e => e.textContent)""")
    assert not [e for e in errors if "Traceback" in e or "Error" in e], errors
    assert "Traceback" not in page.locator(LIVE).first.text_content()
    assert not problems, problems
    assert "Traceback" not in lab_log.read_text()
    (shots / "times.json").write_text(json.dumps({k: round(v, 2) for k, v in times.items()}, indent=1))
    print(f"[explorer] times (s): {json.dumps({k: round(v, 2) for k, v in times.items()})}; screenshots in {shots}")
