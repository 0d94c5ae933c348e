"""Headless Chromium for the report tests: find or install it, dump a page's DOM after load, take a screenshot.

Debian's `chromium` is installed with apt-get when missing (root, ~40 s); `ensure_chromium()` returns
(path, None) or (None, reason) so that tests can skip with the reason when a browser is impossible here.
Every call gets its own throw-away profile directory; chromium runs as a child process with a timeout and is
never left running.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--disable-dev-shm-usage", "--mute-audio"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium(timeout: int = 600) -> tuple[str | None, str | None]:
    """-> (chromium path, None), installing Debian's chromium when missing; or (None, why not)."""
    path = find_chromium()
    if path:
        return path, None
    if os.geteuid() != 0:
        return None, "chromium is not installed and installing it needs root (apt-get install chromium)"
    if not shutil.which("apt-get"):
        return None, "chromium is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
    try:
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if r.returncode != 0:   # stale package lists: update once and retry
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
            r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"apt-get install chromium failed: {e}"
    path = find_chromium()
    if not path:
        return None, f"apt-get install chromium failed (exit {r.returncode}): {r.stderr.strip()[-500:]}"
    return path, None


def _run(chromium: str, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def dump_dom(chromium: str, url: str, budget_ms: int = 5000, timeout: int = 120) -> str:
    """The DOM after the page loaded and ran its scripts (virtual time budget lets load handlers finish)."""
    r = _run(chromium, [f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout)
    if r.returncode != 0 or "<html" not in r.stdout:
        raise RuntimeError(f"chromium --dump-dom {url} failed (exit {r.returncode}): {r.stderr[-800:]}")
    return r.stdout


def screenshot(chromium: str, url: str, out_png: str | Path, width: int = 1200, height: int = 2000,
               timeout: int = 120) -> Path:
    out_png = Path(out_png)
    r = _run(chromium, [f"--screenshot={out_png}", f"--window-size={width},{height}", "--virtual-time-budget=5000", url],
             timeout)
    if not out_png.exists() or out_png.stat().st_size == 0:
        raise RuntimeError(f"chromium --screenshot {url} wrote nothing (exit {r.returncode}): {r.stderr[-800:]}")
    return out_png


def html_attributes(dom: str) -> dict[str, str]:
    """Attributes of the <html> element of a dumped DOM."""
    m = re.search(r"<html([^>]*)>", dom)
    return dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1))) if m else {}


def image_stats(png: str | Path) -> dict:
    """Size and colour spread of a screenshot: a blank page has a single colour."""
    import numpy as np
    from PIL import Image
    with Image.open(png) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.int16)
    non_white = (a.min(axis=2) < 240).mean()
    return {"width": a.shape[1], "height": a.shape[0], "non_white_fraction": float(non_white),
            "colours": int(len(np.unique(a.reshape(-1, 3)[::97], axis=0)))}


# ----------------------------------------------------------------------------- the report check

CHECK_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var W = window.innerWidth, res = {width: W, doc_width: document.documentElement.scrollWidth, wide: [],
                                    images_total: document.images.length, images_broken: [], boxes: 0, text: ''};
  Array.prototype.forEach.call(document.querySelectorAll('table'), function (t, i) {
    var r = t.getBoundingClientRect();
    if (r.width > 0 && (t.scrollWidth > t.clientWidth + 1 || r.right > W + 1)) {
      res.wide.push({table: i, width: Math.max(t.scrollWidth, r.width), right: r.right,
                     head: (t.innerText || '').slice(0, 80)});
    }
  });
  Array.prototype.forEach.call(document.images, function (im, i) {
    if (!(im.complete && im.naturalWidth > 0)) { res.images_broken.push(i + ': ' + (im.alt || im.src.slice(0, 60))); }
  });
  res.boxes = document.querySelectorAll('section[id^="what-this-shows"]').length;
  var parts = [];
  Array.prototype.forEach.call(document.querySelectorAll('.jp-OutputArea-output, section.findings'), function (o) {
    parts.push(o.innerText);
  });
  res.text = parts.join('\\n');
  var pre = document.createElement('pre'); pre.id = 'report-check-result'; pre.textContent = JSON.stringify(res);
  document.body.appendChild(pre);
});
</script>
"""

BAD_TEXT = re.compile(r"\bNaN\b|\bnan\b|\bNone\b|(?<![\w.])-?inf\b|\bInfinity\b")
ARXIV = re.compile(r"arXiv[:\s]*\d{4}\.\d{4,5}")         # a paper id, not a measured number
NUMBER = re.compile(r"(?<![\w.])\d+\.\d+")


def long_numbers(text: str, max_digits: int = 6) -> list[str]:
    """Decimal numbers in `text` with more than `max_digits` significant digits ("0.1234567", not "0.000123")."""
    return [m for m in NUMBER.findall(text) if len(m.replace(".", "").lstrip("0")) > max_digits]


def page_facts(chromium: str, html: str | Path, width: int = 1300, timeout: int = 180) -> dict:
    """Load a copy of the report `html` (read-only original untouched) at `width` px in headless Chromium and
    measure it: {"width", "doc_width", "wide": tables wider than the page or scrolling inside it,
    "images_total", "images_broken", "boxes": "What this shows" boxes, "text": the text of every output}."""
    import json
    html = Path(html)
    text = html.read_text(errors="replace")
    text = text.replace("</body>", CHECK_SCRIPT + "</body>", 1) if "</body>" in text else text + CHECK_SCRIPT
    with tempfile.TemporaryDirectory(prefix="report-check-") as tmp:
        page = Path(tmp) / html.name
        page.write_text(text)
        if (html.parent / "figures").is_dir():           # the index's figure folder, referenced relatively
            shutil.copytree(html.parent / "figures", Path(tmp) / "figures")
        r = _run(chromium, [f"--window-size={width},1600", "--virtual-time-budget=8000", "--dump-dom", page.as_uri()],
                 timeout)
    m = re.search(r'<pre id="report-check-result">(.*?)</pre>', r.stdout, re.S)
    if not m:
        raise RuntimeError(f"chromium gave no report-check result for {html} (exit {r.returncode}): {r.stderr[-800:]}")
    import html as html_lib
    return json.loads(html_lib.unescape(m.group(1)))


def page_problems(facts: dict, need_box: bool) -> list[str]:
    """What a reviewer would stumble on, from page_facts: wide tables, NaN / None / inf, long floats, broken images,
    a missing 'What this shows' box."""
    problems = [f"table {w['table']} is {w['width']:.0f} px wide (page {facts['width']} px): {w['head']!r}"
                for w in facts["wide"]]
    if facts["doc_width"] > facts["width"] + 1:
        problems.append(f"the page scrolls sideways ({facts['doc_width']} px > {facts['width']} px)")
    text = ARXIV.sub("arXiv", facts["text"])
    for m in BAD_TEXT.finditer(text):
        problems.append(f"text shows {m.group(0)!r}: ...{text[max(0, m.start() - 60):m.end() + 30]!r}")
    problems += [f"number with more than 6 digits: {n}" for n in long_numbers(text)]
    problems += [f"broken image {b}" for b in facts["images_broken"]]
    if need_box and facts["boxes"] != 1:
        problems.append(f"{facts['boxes']} 'What this shows' boxes (expected 1)")
    return problems
