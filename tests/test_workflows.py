"""Every JSON under workflows/ is valid for its format, checked against the node definitions: ours from
INPUT_TYPES, ComfyUI's from a copy of their /object_info entries (tests/data/comfyui_core_nodes.json, ComfyUI
0.3.64). UI-format files are converted to API format here and must equal their API twins in workflows/api/."""
from __future__ import annotations

import json
import sys

import pytest

from . import comfy_standins as cs

ROOT = cs.ROOT
WF = ROOT / "workflows"
EXPECTED = {"flux1-dev", "flux1-schnell", "sd3.5-large", "pixart-sigma", "flux2-dev", "qwen-image", "z-image-turbo",
            "qwen-image-edit-2509",
            "wan2.2-t2v-a14b", "wan2.2-ti2v-5b", "wan2.1-t2v-1.3b", "wan2.2-i2v-a14b",
            "sd3.5-large-stock-ksampler", "flux1-dev-stock-custom-advanced",  # stock samplers on Parallel DiT Model
            "setup-check"}  # the built-in tiny-flux, parallel against one GPU: no downloads
EDITOR_ONLY = ("Note", "MarkdownNote")  # the editor's own nodes: never queued, so absent from the API twins
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
MODEL_FILE_INPUTS = {("XDiTLoadParallelDiT", "checkpoint")}
TINY_MODELS = ("tiny-flux", "tiny-flux2", "tiny-sd3", "tiny-pixart", "tiny-qwen-image", "tiny-z-image", "tiny-wan",
               "tiny-wan-a14b", "tiny-wan-ti2v")
IMAGE_FILE_INPUTS = {("LoadImage", "image")}  # a file of ComfyUI's input folder (example.png ships with it)


@pytest.fixture(scope="module")
def defs():
    with cs.extension() as ext:
        core = json.loads((ROOT / "tests" / "data" / "comfyui_core_nodes.json").read_text())["nodes"]
        out = dict(core)
        for name, cls in ext.nodes.NODE_CLASS_MAPPINGS.items():
            spec = json.loads(json.dumps(cls.INPUT_TYPES()))
            out[name] = {"input": spec, "output": list(cls.RETURN_TYPES), "cls": cls,
                         "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
                         "input_order": {s: list(spec.get(s, {})) for s in ("required", "optional")}}
        yield out


def _ordered(info):
    for section in ("required", "optional"):
        for name in (info.get("input_order") or {}).get(section) or []:
            yield section, name, info["input"][section][name]


def _is_link(t):
    return isinstance(t, str) and t not in WIDGET_TYPES


def _options(conf):
    if isinstance(conf[0], list):
        return conf[0]
    if conf[0] == "COMBO":
        return conf[1].get("options", [])
    return None


def check_value(class_type, name, conf, value):
    opts = _options(conf)
    extra = conf[1] if len(conf) > 1 and isinstance(conf[1], dict) else {}
    where = f"{class_type}.{name}={value!r}"
    if opts is not None:
        if (class_type, name) in IMAGE_FILE_INPUTS:
            assert isinstance(value, str) and value.endswith((".png", ".jpg", ".jpeg", ".webp")), where
        elif (class_type, name) in MODEL_FILE_INPUTS and value in TINY_MODELS:  # built in: every installation has it
            assert value in opts, where
        elif not opts or (class_type, name) in MODEL_FILE_INPUTS:  # file lists depend on the installation
            assert isinstance(value, str) and value.endswith((".safetensors", ".pth", ".sft", ".ckpt", "/")), where
        else:
            assert value in opts, where
    elif conf[0] == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif conf[0] == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif conf[0] == "STRING":
        assert isinstance(value, str), where
    if conf[0] in ("INT", "FLOAT"):
        assert extra.get("min", value) <= value <= extra.get("max", value), where


def check_api(graph: dict, defs: dict) -> None:
    assert graph and all(isinstance(k, str) and k.isdigit() for k in graph)
    for nid, node in graph.items():
        ct = node["class_type"]
        assert ct in defs, f"unknown node {ct}"
        info = defs[ct]
        declared = {name: (section, conf) for section, name, conf in _ordered(info)}
        assert set(node["inputs"]) <= set(declared), f"{ct} has unknown inputs {set(node['inputs']) - set(declared)}"
        for name, (section, conf) in declared.items():
            if section == "required":
                assert name in node["inputs"], f"node {nid} {ct} misses {name}"
            if name not in node["inputs"]:
                continue
            value = node["inputs"][name]
            if _is_link(conf[0]):
                assert isinstance(value, list) and len(value) == 2, f"{ct}.{name} must be a link"
                src = graph.get(value[0])
                assert src is not None, f"{ct}.{name} links to missing node {value[0]}"
                outputs = defs[src["class_type"]]["output"]
                assert 0 <= value[1] < len(outputs) and outputs[value[1]] == conf[0], f"{ct}.{name}: type mismatch"
            else:
                check_value(ct, name, conf, value)
    ours = [info["cls"] for info in defs.values() if info.get("cls") is not None]
    if ours:  # what our nodes refuse when the prompt is queued (the whole graph)
        problems = sys.modules[ours[0].__module__].queue_check.graph_problems(graph)
        files = [f"is not among {name}'s choices" for name in ("checkpoint", "checkpoint_2", "lora_name")]
        problems = {nid: [line for line in lines.split("; ") if not any(f in line for f in files)]
                    for nid, lines in problems.items()}  # model files: none installed here
        assert not any(problems.values()), problems
    # acyclic, and something is saved
    seen, done = set(), set()

    def visit(n):
        assert n not in seen or n in done, "cycle"
        if n in done:
            return
        seen.add(n)
        for v in graph[n]["inputs"].values():
            if isinstance(v, list):
                visit(v[0])
        done.add(n)

    for n in graph:
        visit(n)
    assert any(defs[n["class_type"]].get("output_node") for n in graph.values())


def ui_to_api(ui: dict, defs: dict) -> dict:
    """What ComfyUI's editor queues for a saved UI graph (widgets by position, links by id)."""
    links = {l[0]: l for l in ui["links"]}
    for l in ui["links"]:
        lid, src, src_slot, dst, dst_slot, typ = l
        s = next(n for n in ui["nodes"] if n["id"] == src)
        d = next(n for n in ui["nodes"] if n["id"] == dst)
        assert lid in s["outputs"][src_slot]["links"] and d["inputs"][dst_slot]["link"] == lid
        assert s["outputs"][src_slot]["type"] == d["inputs"][dst_slot]["type"] == typ
    api = {}
    for node in ui["nodes"]:
        if node["type"] in EDITOR_ONLY:
            assert not node["inputs"] and not node["outputs"], node["type"]
            continue
        info = defs[node["type"]]
        values = list(node["widgets_values"])
        inputs = {}
        for inp in node["inputs"]:
            if inp.get("link") is not None:
                l = links[inp["link"]]
                inputs[inp["name"]] = [str(l[1]), l[2]]
        for section, name, conf in _ordered(info):
            if _is_link(conf[0]):
                continue
            if not values:
                assert section == "optional", f"{node['type']}: no widget value for {name}"
                break
            inputs[name] = values.pop(0)
            if len(conf) > 1 and isinstance(conf[1], dict) and conf[1].get("control_after_generate"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert not values, f"{node['type']}: {len(values)} widget values left over"
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    assert ui["last_node_id"] >= max(n["id"] for n in ui["nodes"])
    assert ui["last_link_id"] >= max([l[0] for l in ui["links"]] or [0])
    return api


def _ui_files():
    return sorted(WF.glob("*.json"))


def test_every_example_exists_in_both_formats():
    assert {p.stem for p in _ui_files()} == EXPECTED
    assert {p.stem for p in (WF / "api").glob("*.json")} == EXPECTED
    assert not [p for p in WF.rglob("*.json") if p.parent not in (WF, WF / "api")]


@pytest.mark.parametrize("path", sorted((WF / "api").glob("*.json")), ids=lambda p: p.stem)
def test_api_workflow_valid(path, defs):
    graph = json.loads(path.read_text())
    check_api(graph, defs)
    types = {n["class_type"] for n in graph.values()}
    assert {"XDiTConfigureHybridParallel", "XDiTLoadParallelDiT"} <= types
    assert types & {"XDiTParallelSampler", "XDiTParallelSamplerAdvanced", "XDiTParallelDiTModel"}
    # decoded, or saved where ComfyUI has no VAE for the model (FLUX.2), or compared (the setup check)
    assert types & {"VAEDecode", "SaveLatent", "XDiTSetupCheck"}


def test_stock_sampler_examples_drive_the_parallel_model():
    """KSampler (behind ModelSamplingSD3) and SamplerCustomAdvanced + CFGGuider take Parallel DiT Model's MODEL."""
    for name, sampler, guider in (("sd3.5-large-stock-ksampler", "KSampler", None),
                                  ("flux1-dev-stock-custom-advanced", "SamplerCustomAdvanced", "CFGGuider")):
        graph = json.loads((WF / "api" / f"{name}.json").read_text())
        model = next(nid for nid, n in graph.items() if n["class_type"] == "XDiTParallelDiTModel")
        (samp,) = [n for n in graph.values() if n["class_type"] == sampler]
        src = samp["inputs"]["guider" if guider else "model"][0]
        while src != model:  # through the guider or the shift node, to the parallel model
            node = graph[src]
            src = node["inputs"]["model"][0]
        assert not any(n["class_type"] in ("XDiTParallelSampler", "XDiTParallelSamplerAdvanced")
                       for n in graph.values())


def test_wan_examples_are_comfyuis_own_graphs():
    """Wan: ComfyUI's loaders and a video save; Wan 2.2 A14B as ComfyUI's two-expert graph (two loaders of the
    high- and low-noise files, two advanced samplers splitting one schedule, the second continuing the first)."""
    for kind in ("wan2.2-t2v-a14b", "wan2.2-ti2v-5b", "wan2.1-t2v-1.3b"):
        graph = json.loads((WF / "api" / f"{kind}.json").read_text())
        by_type = {}
        for nid, n in graph.items():
            by_type.setdefault(n["class_type"], []).append((nid, n["inputs"]))
        assert by_type["CLIPLoader"][0][1]["type"] == "wan"
        assert by_type["CLIPLoader"][0][1]["clip_name"].startswith("umt5_xxl")
        vae = by_type["VAELoader"][0][1]["vae_name"]
        assert vae == ("wan2.2_vae.safetensors" if kind == "wan2.2-ti2v-5b" else "wan_2.1_vae.safetensors")
        assert {"VAEDecode", "CreateVideo", "SaveVideo"} <= set(by_type)
        latent = "Wan22ImageToVideoLatent" if kind == "wan2.2-ti2v-5b" else "EmptyHunyuanLatentVideo"
        assert (by_type[latent][0][1]["length"] - 1) % 4 == 0
    graph = json.loads((WF / "api" / "wan2.2-t2v-a14b.json").read_text())
    loads = {nid: n["inputs"]["checkpoint"] for nid, n in graph.items() if n["class_type"] == "XDiTLoadParallelDiT"}
    assert sorted(loads.values()) == ["wan2.2_t2v_high_noise_14B_fp16.safetensors",
                                      "wan2.2_t2v_low_noise_14B_fp16.safetensors"]
    adv = [n["inputs"] for n in graph.values() if n["class_type"] == "XDiTParallelSamplerAdvanced"]
    high = next(a for a in adv if a["add_noise"] == "enable")
    low = next(a for a in adv if a["add_noise"] == "disable")
    assert "high_noise" in loads[high["model"][0]] and "low_noise" in loads[low["model"][0]]
    assert high["return_with_leftover_noise"] == "enable" and low["return_with_leftover_noise"] == "disable"
    assert high["end_at_step"] == low["start_at_step"] and high["steps"] == low["steps"]
    assert graph[low["latent_image"][0]]["class_type"] == "XDiTParallelSamplerAdvanced"


def test_wan_i2v_example_is_comfyuis_image_to_video_graph():
    """Wan 2.2 I2V A14B: Load Image into WanImageToVideo (the Wan 2.1 VAE, no CLIP vision), whose positive,
    negative and latent feed the high-noise sampler; the low-noise one continues it on the same conditioning."""
    graph = json.loads((WF / "api" / "wan2.2-i2v-a14b.json").read_text())
    i2v = next(nid for nid, n in graph.items() if n["class_type"] == "WanImageToVideo")
    inputs = graph[i2v]["inputs"]
    assert graph[inputs["start_image"][0]]["class_type"] == "LoadImage" and "clip_vision_output" not in inputs
    assert graph[inputs["vae"][0]]["inputs"]["vae_name"] == "wan_2.1_vae.safetensors"
    assert (inputs["length"] - 1) % 4 == 0
    loads = {nid: n["inputs"]["checkpoint"] for nid, n in graph.items() if n["class_type"] == "XDiTLoadParallelDiT"}
    assert sorted(loads.values()) == ["wan2.2_i2v_high_noise_14B_fp16.safetensors",
                                      "wan2.2_i2v_low_noise_14B_fp16.safetensors"]
    adv = [n["inputs"] for n in graph.values() if n["class_type"] == "XDiTParallelSamplerAdvanced"]
    high = next(a for a in adv if a["add_noise"] == "enable")
    low = next(a for a in adv if a["add_noise"] == "disable")
    assert "high_noise" in loads[high["model"][0]] and "low_noise" in loads[low["model"][0]]
    for a in (high, low):
        assert a["positive"] == [i2v, 0] and a["negative"] == [i2v, 1]
    assert high["latent_image"] == [i2v, 2] and graph[low["latent_image"][0]]["class_type"] == \
        "XDiTParallelSamplerAdvanced"
    assert high["end_at_step"] == low["start_at_step"] and high["return_with_leftover_noise"] == "enable"


def test_flux2_example_says_what_the_sampler_takes():
    """ComfyUI 0.3.64 has no FLUX.2 text encoder or VAE: the example's note names the conditioning and latent."""
    notes = [n for n in json.loads((WF / "flux2-dev.json").read_text())["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    assert "[batch, tokens (512), 15360]" in text and "[batch, 32, H/8, W/8]" in text and "to_vae_space" in text


@pytest.mark.parametrize("path", _ui_files(), ids=lambda p: p.stem)
def test_ui_workflow_valid_and_matches_api_twin(path, defs):
    ui = json.loads(path.read_text())
    assert {"nodes", "links", "version"} <= set(ui)
    api = ui_to_api(ui, defs)
    check_api(api, defs)
    assert api == json.loads((WF / "api" / path.name).read_text())


def test_validator_catches_mistakes(defs):
    """The checks above can fail: a few broken copies of a good graph."""
    good = json.loads((WF / "api" / "flux1-dev.json").read_text())
    sampler = next(k for k, n in good.items() if n["class_type"] == "XDiTParallelSampler")
    config = next(k for k, n in good.items() if n["class_type"] == "XDiTConfigureHybridParallel")
    breakages = [
        lambda g: g[sampler]["inputs"].pop("steps"),
        lambda g: g[sampler]["inputs"].__setitem__("scheduler", "exponential_typo"),
        lambda g: g[sampler]["inputs"].__setitem__("latent_image", [config, 0]),  # wrong type
        lambda g: g[sampler]["inputs"].__setitem__("denoise", 1.5),
        lambda g: g[config]["inputs"].__setitem__("cfg_degree", 2) or g[config]["inputs"].__setitem__(
            "pipefusion_degree", 3) or g[config]["inputs"].__setitem__("num_patches", 2),
        lambda g: g[sampler].__setitem__("class_type", "NoSuchNode"),
    ]
    for i, breakage in enumerate(breakages):
        g = json.loads(json.dumps(good))
        breakage(g)
        with pytest.raises(AssertionError):
            check_api(g, defs)


# ------------------------------------------------------------------------------------------------ queue script
def _queue_script():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import queue_workflow
    finally:
        sys.path.pop(0)
    return queue_workflow


def test_queue_script_overrides_and_refuses_ui_format(tmp_path, capsys):
    qw = _queue_script()
    graph = json.loads((WF / "api" / "flux1-dev.json").read_text())
    qw.apply_overrides(graph, ["8.seed=7", "2.text=a cat", "8.cfg=1.5"])
    assert graph["8"]["inputs"]["seed"] == 7 and graph["2"]["inputs"]["text"] == "a cat"
    assert graph["8"]["inputs"]["cfg"] == 1.5
    with pytest.raises(qw.UsageError, match="NODE_ID.INPUT=VALUE"):
        qw.apply_overrides(graph, ["99.seed=1"])
    assert qw.main([str(WF / "flux1-dev.json")]) == 2
    assert "UI-format" in capsys.readouterr().err


def test_queue_script_bad_arguments_exit_2(tmp_path, capsys):
    """As its docstring says: 2 for bad arguments, with one line (no traceback), before anything is sent."""
    qw = _queue_script()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    server = ["--server", "http://127.0.0.1:9"]  # nothing listens: reaching it would exit 1
    for argv in ([str(WF / "api" / "flux1-dev.json"), "--set", "99.seed=1"],
                 [str(WF / "api" / "flux1-dev.json"), "--set", "8.seed"],
                 [str(tmp_path / "missing.json")], [str(tmp_path / "bad.json")], [str(tmp_path / "list.json")]):
        assert qw.main(argv + server) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as e:
        qw.main(["--no-such-option"])
    assert e.value.code == 2


def _fake_comfyui(status: int, body: dict):
    """A server with ComfyUI's /ws handshake that answers POST /prompt with `status` and `body`."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            import base64
            import hashlib

            key = self.headers["Sec-WebSocket-Key"].encode()
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_queue_script_prints_rejected_prompt_readably(capsys):
    """ComfyUI 0.3.64's answer to a graph with a bad parallel config (tests/data/comfyui_rejected_prompt.json)."""
    qw = _queue_script()
    recorded = json.loads((ROOT / "tests" / "data" / "comfyui_rejected_prompt.json").read_text())
    srv = _fake_comfyui(recorded["status"], recorded["body"])
    try:
        code = qw.main([str(WF / "api" / "flux1-dev.json"), "--server", f"http://127.0.0.1:{srv.server_port}"])
    finally:
        srv.shutdown()
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: ComfyUI rejected the prompt (400): Prompt outputs failed validation",
        "  node 5 (XDiTConfigureHybridParallel): Custom validation failed for node: xdit_check - num_patches (2) "
        "must be at least the pipefusion degree (4)",
        "  node 10 (CLIPLoader): Value not in list: clip_name: 't5.safetensors' not in []"]
    assert qw.format_rejection(500, "Internal Server Error\nmore") == \
        "ComfyUI rejected the prompt (500): Internal Server Error"


def test_queue_script_websocket_frames():
    """Handshake, a masked ping answered with a pong, a fragmented text frame, a binary frame, close."""
    import base64
    import hashlib
    import socket
    import struct
    import threading

    qw = _queue_script()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    got = {}

    def serve():
        conn, _ = srv.accept()
        req = b""
        while b"\r\n\r\n" not in req:
            req += conn.recv(1024)
        key = [l.split(b": ")[1] for l in req.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        conn.sendall(bytes([0x89, 2]) + b"hi")                      # ping
        conn.sendall(bytes([0x01, 5]) + b'{"a":')                    # text, not final
        conn.sendall(bytes([0x80, 3]) + b' 1}')                      # continuation, final
        big = bytes(range(256)) * 2
        conn.sendall(bytes([0x82, 126]) + struct.pack(">H", len(big)) + big)
        head = conn.recv(2)
        mask = conn.recv(4)
        payload = conn.recv(head[1] & 0x7F)
        got["pong"] = (head[0], bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        conn.sendall(bytes([0x88, 0]))
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ws = qw.WebSocket(f"ws://127.0.0.1:{port}/ws?clientId=x", timeout=10)
    assert ws.recv() == (1, b'{"a": 1}')
    assert ws.recv() == (2, bytes(range(256)) * 2)
    with pytest.raises(ConnectionError, match="closed"):
        ws.recv()
    t.join(5)
    assert got["pong"] == (0x8A, b"hi")
    ws.close()
    srv.close()


# ------------------------------------------------------------------------------------------------ layout
TITLE_HEIGHT = 30  # the editor draws a node's title bar above its pos


def _rect(node):
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def _overlaps(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("path", _ui_files(), ids=lambda p: p.stem)
def test_ui_nodes_do_not_overlap(path):
    nodes = json.loads(path.read_text())["nodes"]
    for node in nodes:  # at least what the editor needs: a 20 px row per slot and per widget
        rows = max(len(node["inputs"]), len(node["outputs"])) + len(node["widgets_values"])
        assert node["size"][1] >= 20 * rows, (node["type"], node["size"])
    clashes = [(a["type"], b["type"]) for i, a in enumerate(nodes) for b in nodes[i + 1:]
               if _overlaps(_rect(a), _rect(b))]
    assert not clashes


def test_overlap_check_can_fail():
    a = {"pos": [40, 60], "size": [320, 416]}
    assert _overlaps(_rect(a), _rect({"pos": [40, 360], "size": [320, 156]}))  # today's Configure over Load VAE
    assert not _overlaps(_rect(a), _rect({"pos": [40, 60 + 416 + TITLE_HEIGHT], "size": [320, 156]}))
    assert not _overlaps(_rect(a), _rect({"pos": [380, 60], "size": [320, 156]}))
