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
