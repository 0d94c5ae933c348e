"""JupyterLab for real: start `jupyter lab` headless on loopback with a token, list the notebooks through the REST
API, run the explorer (notebooks/00_explore.ipynb) cell by cell in a kernel started through the API (messages
over the kernel's websocket channel, the way Lab itself talks to it), drive its widgets, stop the server by PID.

The run folder the explorer opens is built here: activations from an AR(1) process, PhiID from the project's
engine, rankings.csv with known scores; the explorer's ranks and synergy rows are compared with values computed
independently in the test.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib import REPO_ROOT

pytestmark = pytest.mark.slow(reason="starts JupyterLab and drives it with a browser")
TOKEN = "headinfo-test-" + uuid.uuid4().hex[:12]
N_LAYERS, N_HEADS = 3, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir():
    """A run folder with activations.npz, phiid_per_prompt.npz and rankings.csv for 3 layers x 4 heads."""
    from lib.estimators.phiid import phiid_all_pairs, save_phiid
    from lib.storage.store import save_npz
    out = Path(tempfile.mkdtemp(prefix="hi-explore-run-"))
    rng = np.random.default_rng(7)
    P, H, T = 5, N_LAYERS * N_HEADS, 40
    X = np.zeros((P, H, T))
    for t in range(1, T):
        X[:, :, t] = 0.6 * X[:, :, t - 1] + rng.standard_normal((P, H))
    X = (np.abs(X) + 1).astype(np.float32)
    head_layer, head_index = np.arange(H) // N_HEADS, np.arange(H) % N_HEADS
    save_npz(out / "activations.npz", activations=X, head_layer=head_layer, head_index=head_index,
             n_layers=np.int64(N_LAYERS), n_heads=np.int64(N_HEADS), model=np.str_("synthetic"),
             prompt_text=np.array([f"prompt {i}" for i in range(P)]))
    save_phiid(out / "phiid_per_prompt.npz", phiid_all_pairs(X, mode="per_prompt"), head_layer, head_index)
    df = pd.DataFrame({"head_idx": np.arange(H), "layer": head_layer, "head": head_index,
                       "alpha": rng.permutation(H) / (H - 1), "beta": rng.random(H),
                       "syn": rng.random(H), "red": rng.random(H)})
    df.to_csv(out / "rankings.csv", index=False)
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def lab():
    """A running JupyterLab server: (base url, token); stopped by its PID afterwards."""
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="hi-lab-"))    # not in pytest's basetemp: a concurrent session may prune it
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTER_CONFIG_DIR": str(home / "config"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = open(home / "lab.log", "w")
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=0", f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={REPO_ROOT}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=None"]
    if os.geteuid() == 0:                   # CI runs as root; Lab refuses without this flag
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}: {(home / 'lab.log').read_text()[-2000:]}")
            try:
                if api(url, "GET", "/api/status")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() > deadline:
                pytest.fail(f"jupyter lab did not answer within 90 s: {(home / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)           # jupyter_server shuts its kernels down on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def api(url: str, method: str, path: str, body: dict | None = None, token: str = TOKEN):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw and r.headers.get_content_type() == "application/json" else raw)
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class KernelChannel:
    """The kernel's websocket (/api/kernels/<id>/channels, legacy JSON protocol): execute code, collect its output."""

    def __init__(self, url: str, kernel_id: str):
        import websocket
        self.ws = websocket.create_connection(url.replace("http", "ws") + f"/api/kernels/{kernel_id}/channels",
                                              header=[f"Authorization: token {TOKEN}"], timeout=180)
        self.session = uuid.uuid4().hex

    def _recv(self) -> dict:
        frame = self.ws.recv()
        if isinstance(frame, bytes):        # a message with binary buffers: [n][offsets...][json][buffers...]
            n = struct.unpack("!I", frame[:4])[0]
            offsets = struct.unpack(f"!{n}I", frame[4:4 + 4 * n])
            end = offsets[1] if n > 1 else len(frame)
            return json.loads(frame[offsets[0]:end].decode())
        return json.loads(frame)

    def execute(self, code: str) -> tuple[dict, list[dict]]:
        """-> (execute_reply content, iopub messages of this request: stream, display_data, error, ...)."""
        msg_id = uuid.uuid4().hex
        self.ws.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "test", "session": self.session, "msg_type": "execute_request",
                       "version": "5.3", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        reply, idle, messages = None, False, []
        while reply is None or not idle:
            m = self._recv()
            if m.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = m["header"]["msg_type"]
            if m["channel"] == "shell" and kind == "execute_reply":
                reply = m["content"]
            elif m["channel"] == "iopub":
                if kind == "status" and m["content"]["execution_state"] == "idle":
                    idle = True
                elif kind not in ("status", "execute_input"):
                    messages.append(m)
        return reply, messages

    def close(self):
        self.ws.close()


def kinds(messages: list[dict]) -> set[str]:
    """Message types and the MIME types of displayed data."""
    out = set()
    for m in messages:
        out.add(m["header"]["msg_type"])
        out.update(m["content"].get("data", {}).keys())
    return out


def errors(messages: list[dict]) -> list[str]:
    return [f"{m['content']['ename']}: {m['content']['evalue']}" for m in messages if m["header"]["msg_type"] == "error"]


def stdout(messages: list[dict]) -> str:
    return "".join(m["content"]["text"] for m in messages
                   if m["header"]["msg_type"] == "stream" and m["content"]["name"] == "stdout")


def test_lab_lists_notebooks_and_runs_the_explorer_through_a_kernel(lab, run_dir):
    url, proc = lab
    status, page = api(url, "GET", "/lab")
    assert status == 200 and b"JupyterLab" in page                      # the Lab frontend itself is served
    assert api(url, "GET", "/api/contents/notebooks", token="wrong")[0] == 403   # the token is enforced
    status, listing = api(url, "GET", "/api/contents/notebooks")
    assert status == 200
    listed = {item["name"] for item in listing["content"] if item["type"] == "notebook"}
    assert listed == {p.name for p in (REPO_ROOT / "notebooks").glob("*.ipynb")}
    assert "00_explore.ipynb" in listed

    status, model = api(url, "GET", "/api/contents/notebooks/00_explore.ipynb?content=1")
    assert status == 200 and model["type"] == "notebook"
    cells = [c for c in model["content"]["cells"] if c["cell_type"] == "code"]
    assert "parameters" in cells[0]["metadata"].get("tags", [])

    status, kernel = api(url, "POST", "/api/kernels", {"name": "python3"})
    assert status == 201, kernel
    channel = KernelChannel(url, kernel["id"])
    try:
        # the parameters cell, then the override a runner would inject, then every other cell as stored
        layer, head = 1, 2
        overrides = f'out_dir = {str(run_dir)!r}\nlayer = {layer}\nhead = {head}\nvariant = "beta"\n'
        outputs = []
        for code in [cells[0]["source"], overrides] + [c["source"] for c in cells[1:]]:
            reply, messages = channel.execute(code)
            assert reply["status"] == "ok", (code, reply.get("ename"), reply.get("evalue"), errors(messages))
            assert not errors(messages), (code, errors(messages))
            outputs.append(messages)
        summary, panel, head_cell, variant_cell = outputs[2], outputs[3], outputs[4], outputs[5]
        assert "text/html" in kinds(summary) and "missing:" not in stdout(summary)
        # the widget panel is displayed, and its Output widgets drew both figures (published on iopub)
        assert "application/vnd.jupyter.widget-view+json" in kinds(panel)
        assert sum("image/png" in m["content"].get("data", {}) for m in panel) == 3     # head, variant, prompt
        assert {"image/png", "text/html"} <= kinds(head_cell) and {"image/png", "text/html"} <= kinds(variant_cell)

        # values shown for the selected head, against an independent computation from the files
        idx = layer * N_HEADS + head
        reply, messages = channel.execute(
            "import json\n"
            f"print(json.dumps({{'ranks': explore.head_ranks(run, {idx})[['variant', 'rank']].values.tolist(),"
            f" 'syn': explore.phiid_row(run, {idx}, 'per_prompt').synergy.tolist()}}))")
        shown = json.loads(stdout(messages))
        df = pd.read_csv(run_dir / "rankings.csv")
        expected = [[v, int((df[v] > df[v][idx]).sum()) + 1] for v in ("alpha", "beta")]
        assert shown["ranks"] == expected
        ph = np.load(run_dir / "phiid_per_prompt.npz")
        truth = np.where(ph["degenerate"][idx], np.nan, ph["sts"][idx])
        np.testing.assert_allclose(np.array(shown["syn"], dtype=float), truth, equal_nan=True)
        assert np.isnan(shown["syn"][idx])                                  # a head with itself is undefined

        # driving the widgets redraws through the callbacks, without errors
        for code in ('panel.controls["head"].value = "L2H0"', 'panel.controls["mode"].value = "per_prompt"',
                     'panel.controls["variant"].value = "alpha"', 'panel.controls["prompt"].value = 3'):
            reply, messages = channel.execute(code)
            assert reply["status"] == "ok" and not errors(messages), (code, errors(messages))
        reply, messages = channel.execute('panel.controls["next"].click(); panel.controls["next"].click()')
        assert "image/png" in kinds(messages) and not errors(messages)
        reply, messages = channel.execute("print(panel.controls['head'].value, panel.body.state['idx'], "
                                          "panel.body.state['errors'])")
        assert stdout(messages).split() == ["L2H2", str(2 * N_HEADS + 2), "[]"]
    finally:
        channel.close()
        assert api(url, "DELETE", f"/api/kernels/{kernel['id']}")[0] == 204
    assert api(url, "GET", "/api/kernels")[1] == []


def test_lab_server_stops_by_pid(lab):
    """Runs last in this module: the server started by the fixture ends on SIGTERM to its PID."""
    url, proc = lab
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode is not None
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        api(url, "GET", "/api/status")
