"""Queue an API-format workflow on a running ComfyUI, follow its progress on the websocket, save its images.

    python scripts/queue_workflow.py workflows/api/flux1-dev.json --server http://127.0.0.1:8188 --out out/
    python scripts/queue_workflow.py wf.json --set 8.seed=7 --set 2.text="a cat"

Standard library only. Exit code 0 on success, 1 when ComfyUI reports an error while running (or cannot be
reached), 2 on bad arguments or a prompt ComfyUI rejects (its errors are printed, one line per node error)."""
from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


class WebSocket:
    """Just enough of RFC 6455 for ComfyUI's /ws: text and binary frames from the server, close, ping."""

    def __init__(self, url: str, timeout: float = 30.0):
        u = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = u.path + ("?" + u.query if u.query else "")
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake failed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head.splitlines()[0]!r}")

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("websocket closed")
            buf += chunk
        return buf

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next data frame: 1 text, 2 binary; raises ConnectionError on close."""
        data, opcode = b"", None
        while True:
            b0, b1 = self._read(2)
            op, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if op == 8:
                raise ConnectionError("websocket closed by the server")
            if op == 9:
                self._send(10, payload)
                continue
            if op in (1, 2):
                opcode = op
            data += payload
            if b0 & 0x80 and opcode is not None:
                return opcode, data

    def close(self) -> None:
        try:
            self._send(8, b"")
        except OSError:
            pass
        self.sock.close()


def http(server: str, path: str, body: dict | None = None, timeout: float = 30.0):
    req = urllib.request.Request(server.rstrip("/") + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data = r.read()
        return json.loads(data) if r.headers.get_content_type() == "application/json" else data


class UsageError(ValueError):
    """Bad arguments: exit code 2."""


class Rejected(ValueError):
    """ComfyUI refused the prompt (POST /prompt answered 400): exit code 2."""


def apply_overrides(graph: dict, overrides: list[str]) -> None:
    for item in overrides:
        target, _, raw = item.partition("=")
        nid, _, name = target.partition(".")
        if not raw or nid not in graph or not name:
            raise UsageError(f"--set {item!r}: expected NODE_ID.INPUT=VALUE with an existing node id")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        graph[nid]["inputs"][name] = value


def format_rejection(code: int, body: str) -> str:
    """POST /prompt's error answer as lines: the error, then one line per node error."""
    try:
        data = json.loads(body)
    except ValueError:
        return f"ComfyUI rejected the prompt ({code}): {body.strip().splitlines()[0] if body.strip() else 'no detail'}"
    err = data.get("error") if isinstance(data, dict) else None
    node_errors = (data.get("node_errors") or {}) if isinstance(data, dict) else {}
    head = err.get("message", "") if isinstance(err, dict) else str(err or "")
    if isinstance(err, dict) and err.get("details") and not node_errors:
        head += f": {err['details']}"
    lines = [f"ComfyUI rejected the prompt ({code}): {head or 'no detail'}"]
    for nid, entry in sorted(node_errors.items(), key=lambda kv: (len(kv[0]), kv[0])):
        for e in entry.get("errors", []):
            detail = f"{e.get('message', '')}: {e.get('details', '')}".strip(": ")
            lines.append(f"  node {nid} ({entry.get('class_type', '?')}): {detail}")
    return "\n".join(lines)


def queue_and_wait(server: str, graph: dict, timeout: float = 3600.0, log=print) -> tuple[str, dict]:
    """Queue `graph`, print progress, return (prompt_id, history entry). Raises RuntimeError on failure."""
    client_id = uuid.uuid4().hex
    u = urllib.parse.urlsplit(server)
    ws = WebSocket(f"ws://{u.hostname}:{u.port or 80}/ws?clientId={client_id}", timeout=timeout)
    try:
        try:
            reply = http(server, "/prompt", {"prompt": graph, "client_id": client_id})
        except urllib.error.HTTPError as e:
            raise Rejected(format_rejection(e.code, e.read().decode("utf-8", "replace"))) from None
        pid = reply["prompt_id"]
        log(f"queued {pid}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            op, data = ws.recv()
            if op != 1:
                continue  # binary: preview image
            msg = json.loads(data)
            kind, d = msg.get("type"), msg.get("data") or {}
            if d.get("prompt_id") not in (None, pid):
                continue
            if kind == "progress":
                log(f"node {d.get('node')}: step {d.get('value')}/{d.get('max')}")
            elif kind == "executing" and d.get("node") is not None:
                log(f"running node {d['node']}")
            elif kind == "execution_error":
                raise RuntimeError(f"node {d.get('node_id')} ({d.get('node_type')}) failed: "
                                   f"{d.get('exception_message', '').strip()}")
            elif kind == "execution_interrupted":
                raise RuntimeError("the prompt was interrupted")
            elif kind == "executing" and d.get("node") is None or kind == "execution_success":
                break
        else:
            raise RuntimeError(f"no result within {timeout:.0f} s")
        for _ in range(100):  # history is written just after the final websocket message
            hist = http(server, f"/history/{pid}")
            if pid in hist:
                return pid, hist[pid]
            time.sleep(0.1)
        raise RuntimeError("the prompt finished but has no history entry")
    finally:
        ws.close()


def save_outputs(server: str, entry: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    saved = []
    for node_out in entry.get("outputs", {}).values():
        for kind in ("images", "latents"):
            for item in node_out.get(kind, []):
                q = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                            "type": item.get("type", "output")})
                path = out / item["filename"]
                path.write_bytes(http(server, f"/view?{q}"))
                saved.append(path)
    return saved


def read_workflow(path: Path) -> dict:
    """An API-format graph from a file; UsageError (one line) for anything else."""
    try:
        graph = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"{path} is not JSON: {e}") from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise UsageError(f"{path} is a UI-format workflow; queue its API twin (workflows/api/)")
    if not isinstance(graph, dict) or not all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise UsageError(f"{path} is not an API-format workflow ({{node id: {{class_type, inputs}}}})")
    return graph


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Queue an API-format workflow on ComfyUI and save its images.")
    p.add_argument("workflow", type=Path, help="API-format JSON (workflows/api/*.json)")
    p.add_argument("--server", default="http://127.0.0.1:8188")
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override an input (VALUE parsed as JSON when it can be)")
    p.add_argument("--timeout", type=float, default=3600.0)
    args = p.parse_args(argv)
    try:
        graph = read_workflow(args.workflow)
        apply_overrides(graph, args.set)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        pid, entry = queue_and_wait(args.server, graph, args.timeout)
    except Rejected as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, ConnectionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in save_outputs(args.server, entry, args.out):
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
