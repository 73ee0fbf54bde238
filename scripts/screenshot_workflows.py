"""Pictures of the example workflows as ComfyUI's own editor draws them: starts a real ComfyUI with this checkout in
its custom_nodes, opens the page in headless Chromium (driven over the DevTools protocol), loads each
workflows/<name>.json into the editor and captures the canvas. Writes workflows/<name>.jpg, the thumbnail ComfyUI's
Templates browser shows beside the template (square; its JPEG comment holds the sha256 of the workflow drawn, so
tests/test_workflow_thumbnails.py can tell a stale one), and the wider pictures the docs show (DOC_PICTURES).

    python scripts/screenshot_workflows.py --comfyui $COMFYUI_DIR [--python PY] [--chromium chromium] [NAME ...]

Needs a ComfyUI checkout with its venv (COMFYUI_DIR / COMFYUI_PYTHON, as the end-to-end tests) and Chromium or
Chrome (`apt-get install chromium`). No GPU, no model files: the graphs are only drawn, never run. With
--templates-shot FILE it also opens the Templates browser on this pack's templates and saves what it shows.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from queue_workflow import WebSocket  # noqa: E402  (the same small RFC 6455 client)

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
THUMB_VIEW, THUMB_PX = 1000, 512          # square viewport drawn, then scaled to THUMB_PX (the card is 256 CSS px)
DOC_VIEW, DOC_SCALE = (1800, 1000), 1.0   # docs: wide enough that the node text stays readable
DOC_PICTURES = {"flux1-dev": "docs/images/flux1-dev-workflow.jpg",
                "setup-check": "docs/images/setup-check-workflow.jpg",
                "wan2.2-t2v-a14b": "docs/images/wan2.2-t2v-a14b-workflow.jpg"}
QUALITY = 80
STAMP = "comfyui-xdit workflow sha256 "  # in each thumbnail's JPEG comment, the digest of the graph it shows


def workflow_digest(text: str) -> str:
    """sha256 of a workflow's JSON, independent of its formatting and line ends."""
    return hashlib.sha256(json.dumps(json.loads(text), sort_keys=True).encode()).hexdigest()


def with_comment(jpeg: bytes, comment: str) -> bytes:
    """The JPEG with a comment (COM) segment after its JFIF header (or after the start-of-image marker)."""
    assert jpeg[:2] == b"\xff\xd8", "not a JPEG"
    at = 2
    if jpeg[2:4] == b"\xff\xe0":  # APP0 (JFIF) stays first
        at = 4 + struct.unpack(">H", jpeg[4:6])[0]
    body = comment.encode()
    return jpeg[:at] + b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body + jpeg[at:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 300) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not answer {url} within {timeout:.0f} s")
            time.sleep(0.5)


def start_comfyui(comfyui: Path, python: str, base: Path) -> tuple[subprocess.Popen, str]:
    """ComfyUI on the CPU with `base` as its base directory and this checkout as custom_nodes/comfyui-xdit (its
    engine and runtime first on PYTHONPATH, as tests/comfy_server.py does)."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-xdit").symlink_to(ROOT)
    shim = base / "pythonpath"
    shim.mkdir()
    (shim / "comfyui_xdit").symlink_to(ROOT / "comfyui_xdit")
    (shim / "comfyui_xdit_runtime").symlink_to(ROOT / "runtime")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])]))
    port = free_port()
    log = open(base / "comfyui.log", "ab")
    proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base)], cwd=comfyui, stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    server = f"http://127.0.0.1:{port}"
    wait_http(server + "/system_stats", proc, f"ComfyUI (log: {base / 'comfyui.log'})")
    return proc, server


def start_chromium(binary: str, profile: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--no-first-run", f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                             "--window-size=1600,1000", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/json/version", proc, binary, timeout=60)
    pages = [t for t in json.loads(wait_http(f"http://127.0.0.1:{port}/json/list", proc, binary))
             if t.get("type") == "page"]
    return proc, pages[0]["webSocketDebuggerUrl"]


class Page:
    """One browser tab over the DevTools protocol: commands answered in order, events ignored."""

    def __init__(self, ws_url: str):
        self.ws, self.next_id = WebSocket(ws_url, timeout=120), 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        msg = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        assert len(msg) < 65536, f"{method}: a {len(msg)}-byte command is more than the client sends"
        self.ws._send(1, msg)
        while True:
            reply = json.loads(self.ws.recv()[1])
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expr: str):
        res = self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"in the page: {res['exceptionDetails'].get('exception', {}).get('description')}")
        return res["result"].get("value")

    def wait_js(self, expr: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.js(expr):
            if time.monotonic() > deadline:
                raise SystemExit(f"the page never satisfied: {expr}")
            time.sleep(0.5)

    def viewport(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)
        time.sleep(0.5)

    def jpeg(self, box: tuple[float, float, float, float], scale: float, path: Path, comment: str = "") -> None:
        """The page's region `box` (x, y, width, height in CSS px), scaled by `scale`, as a JPEG file (with
        `comment` in it, when given)."""
        import base64

        x, y, w, h = box
        data = self.call("Page.captureScreenshot", format="jpeg", quality=QUALITY,
                         clip={"x": x, "y": y, "width": w, "height": h, "scale": scale})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        image = base64.b64decode(data)
        path.write_bytes(with_comment(image, comment) if comment else image)
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
              f"({path.stat().st_size // 1024} KB)")


APP = "window.comfyAPI.app.app"
# the editor's settings for the pictures (ComfyUI frontend 1.27): no first-run dialogs, only the graph on the canvas
# (no minimap, canvas info, canvas menu or tab bar), and node text drawn at any zoom (the default drops it below
# about 0.6)
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
            "Comfy.Graph.CanvasMenu": False, "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",
            "LiteGraph.Canvas.MinFontSizeForLOD": 1}
READY = (f"!!(window.comfyAPI && {APP} && {APP}.graph && {APP}.canvas && "
         "window.LiteGraph && LiteGraph.registered_node_types.XDiTConfigureHybridParallel)")


FIT = """((W, H, M, center) => {
  const app = %s, c = app.canvas, ds = c.ds, T = LiteGraph.NODE_TITLE_HEIGHT;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of app.graph._nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - T);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const w = x1 - x0, h = y1 - y0, z = Math.min((W - 2 * M) / w, (H - 2 * M) / h);
  const left = center ? (W - w * z) / 2 : M, top = center ? (H - h * z) / 2 : M;
  ds.scale = z; ds.offset[0] = left / z - x0; ds.offset[1] = top / z - y0;
  c.setDirty(true, true); c.draw(true, true);
  return [w * z + 2 * M, h * z + 2 * M];
})(%d, %d, %d, %s)"""
MARGIN = 24  # CSS px around the graph


def draw(page: Page, name: str, width: int, height: int, center: bool) -> tuple[int, int]:
    """Loads workflows/<name>.json as the Templates browser does (app.loadGraphData), closes any dialog it opened,
    and scales the graph to fit a width x height box at the page's top left (centred in it, or at its top left);
    returns the size of the graph's own box, margin included. The viewport is larger than the box, so the editor's
    corner buttons stay out of the picture."""
    page.viewport(width + 120, height + 120)
    text = (WORKFLOWS / f"{name}.json").read_text()
    page.js(f"{APP}.loadGraphData(JSON.parse({json.dumps(text)}), true, true, {json.dumps(name)})")
    time.sleep(1.0)
    page.js(f"{APP}.extensionManager.dialog?.closeDialog?.(); true")
    fit = FIT % (APP, width, height, MARGIN, "true" if center else "false")
    page.js(fit)
    time.sleep(1.0)  # the canvas follows a new viewport size, DOM widgets (prompt boxes) the view, on later frames
    w, h = page.js(fit)  # again, on the canvas's settled size
    time.sleep(0.5)
    return round(w), round(h)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="workflow names (default: every workflows/*.json)")
    p.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_DIR"), help="ComfyUI checkout")
    p.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON"), help="ComfyUI's interpreter")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("google-chrome") or "chromium")
    p.add_argument("--no-docs", action="store_true", help="thumbnails only, not the docs' pictures")
    p.add_argument("--templates-shot", type=Path, help="also save the Templates browser showing this pack")
    args = p.parse_args(argv)
    if not args.comfyui or not (args.comfyui / "main.py").exists():
        p.error("--comfyui (or COMFYUI_DIR): a ComfyUI checkout with main.py")
    python = args.python or str(args.comfyui / ".venv" / "bin" / "python")
    names = args.names or sorted(f.stem for f in WORKFLOWS.glob("*.json"))
    unknown = [n for n in names if not (WORKFLOWS / f"{n}.json").exists()]
    if unknown:
        p.error(f"no such workflow: {', '.join(unknown)}")

    with tempfile.TemporaryDirectory(prefix="xdit-shots-") as tmp:
        comfy, server = start_comfyui(args.comfyui, python, Path(tmp) / "base")
        chrome = None
        try:
            for key, value in SETTINGS.items():
                urllib.request.urlopen(urllib.request.Request(
                    f"{server}/settings/{key}", data=json.dumps(value).encode(), method="POST",
                    headers={"Content-Type": "application/json"}), timeout=10).read()
            chrome, ws_url = start_chromium(args.chromium, Path(tmp) / "chrome")
            page = Page(ws_url)
            page.viewport(THUMB_VIEW, THUMB_VIEW)
            page.call("Page.navigate", url=server)
            page.wait_js(READY)
            page.js(f"{APP}.extensionManager.dialog?.closeDialog?.(); true")
            page.js(f"{APP}.extensionManager.command.execute('Workspace.ToggleFocusMode')")  # canvas only
            for name in names:
                draw(page, name, THUMB_VIEW, THUMB_VIEW, center=True)  # the card shows a square
                digest = workflow_digest((WORKFLOWS / f"{name}.json").read_text())
                page.jpeg((0, 0, THUMB_VIEW, THUMB_VIEW), THUMB_PX / THUMB_VIEW, WORKFLOWS / f"{name}.jpg",
                          comment=STAMP + digest)
                if name in DOC_PICTURES and not args.no_docs:
                    w, h = draw(page, name, *DOC_VIEW, center=False)
                    page.jpeg((0, 0, w, h), DOC_SCALE, ROOT / DOC_PICTURES[name])
            if args.templates_shot:
                listed = json.loads(urllib.request.urlopen(server + "/api/workflow_templates", timeout=10).read())
                print("GET /api/workflow_templates:", json.dumps(listed))
                page.js(f"{APP}.extensionManager.command.execute('Workspace.ToggleFocusMode')")
                page.viewport(1600, 1000)
                page.js(f"{APP}.extensionManager.command.execute('Comfy.BrowseTemplates')")
                time.sleep(2)
                # the pack's category in the dialog's sidebar
                page.js("(() => { const el = [...document.querySelectorAll('li, a, span, div')].find(e => "
                        "e.children.length === 0 && e.textContent.trim() === 'comfyui-xdit'); el?.click(); "
                        "return !!el; })()")
                time.sleep(3)
                page.jpeg((0, 0, 1600, 1000), 1.0, args.templates_shot.resolve())
                titles = page.js("[...document.querySelectorAll('[data-testid^=\"template-workflow-\"]')]"
                                 ".map(e => e.getAttribute('data-testid').slice(18))")
                broken = page.js("[...document.querySelectorAll('[data-testid^=\"template-workflow-\"] img')]"
                                 ".filter(i => i.src && i.complete && i.naturalWidth === 0).map(i => i.src)")
                print("Templates browser cards:", titles)
                print("thumbnails that failed to load (of those shown):", broken)
        finally:
            for proc in (chrome, comfy):
                if proc is not None and proc.poll() is None:
                    os.killpg(proc.pid, 15)
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, 9)
    return 0


if __name__ == "__main__":
    sys.exit(main())
