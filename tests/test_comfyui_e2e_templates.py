"""The pack's example workflows in a real ComfyUI's Templates browser (skipped unless COMFYUI_DIR is set): the
server lists every UI workflow (workflows/*.json, not the API twins in workflows/api/) under the pack's folder name,
and serves each one's JSON and its thumbnail at the addresses the frontend asks for
(/api/workflow_templates/<pack folder>/<name>.json and .jpg)."""
from __future__ import annotations

import json
import urllib.request

import pytest

from .comfy_server import COMFYUI_DIR, ROOT, make_base, running_comfyui

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
PACK = "comfyui-xdit"  # the folder name make_base links this checkout under


def get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.headers.get_content_type(), r.read()


def test_templates_browser_lists_every_workflow_with_its_thumbnail(tmp_path):
    names = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
    make_base(tmp_path, {})
    with running_comfyui(tmp_path) as server:
        kind, body = get(server + "/api/workflow_templates")
        listed = json.loads(body)
        assert sorted(listed.get(PACK, [])) == names, listed.get(PACK)
        print(f"\n/api/workflow_templates lists for {PACK}, in the server's order: {listed[PACK]}")
        for name in names:
            kind, body = get(f"{server}/api/workflow_templates/{PACK}/{name}.json")
            assert json.loads(body)["nodes"], name
            kind, body = get(f"{server}/api/workflow_templates/{PACK}/{name}.jpg")
            assert kind == "image/jpeg" and body[:2] == b"\xff\xd8", (name, kind)
