"""The pictures of the example workflows: each UI workflow (workflows/<name>.json) has its thumbnail beside it
(workflows/<name>.jpg: ComfyUI's Templates browser asks the pack for exactly that name, and shows a blank card
without it), a real square JPEG big enough for the 256 px card, drawn from the workflow as it is now (the JPEG's
comment holds the sha256 of the graph drawn; a workflow changed since fails until its thumbnail is redrawn); no
thumbnail without its workflow; and the pictures stay small (each under 300 KB, all of them under 3 MB).
scripts/screenshot_workflows.py makes them."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WF = ROOT / "workflows"
# ComfyUI 0.3.64 (app/custom_node_manager.py) serves a pack's templates from the first of these folders it finds
SERVED_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")
CARD_PX = 256  # the Templates browser's card (frontend 1.27: w-64 h-64)
MAX_PICTURE, MAX_ALL = 300 * 1024, 3 * 1024 * 1024
STAMP = "comfyui-xdit workflow sha256 "
SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # start-of-frame markers


def jpeg_segments(data: bytes):
    """(marker, payload) of each segment of a JPEG up to its image data; ValueError when `data` is no JPEG."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("no JPEG start-of-image marker")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        yield marker, data[i + 4:i + 2 + length]
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return
        i += 2 + length


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's start-of-frame segment."""
    for marker, payload in jpeg_segments(data):
        if marker in SOF:
            height, width = struct.unpack(">HH", payload[1:5])
            return width, height
    raise ValueError("no JPEG start-of-frame segment")


def jpeg_comments(data: bytes) -> list[str]:
    return [payload.decode(errors="replace") for marker, payload in jpeg_segments(data) if marker == 0xFE]


def ui_workflows() -> list[Path]:
    return sorted(WF.glob("*.json"))


def test_the_folder_is_one_comfyui_serves():
    assert WF.name in SERVED_FOLDERS
    assert ui_workflows(), "no UI workflows found"


@pytest.mark.parametrize("path", ui_workflows(), ids=lambda p: p.stem)
def test_every_ui_workflow_has_its_thumbnail(path):
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), (f"{thumb.relative_to(ROOT)} is missing (the Templates browser shows a blank card): "
                             "run scripts/screenshot_workflows.py " + path.stem)
    width, height = jpeg_size(thumb.read_bytes())
    assert width == height, f"{thumb.name} is {width}x{height}; the card is square"
    assert width >= CARD_PX, f"{thumb.name} is {width} px wide, under the card's {CARD_PX}"
    digest = hashlib.sha256(json.dumps(json.loads(path.read_text()), sort_keys=True).encode()).hexdigest()
    stamps = [c[len(STAMP):] for c in jpeg_comments(thumb.read_bytes()) if c.startswith(STAMP)]
    assert stamps == [digest], (f"{thumb.name} was drawn from another version of {path.name} (or by hand): redraw "
                                f"it with scripts/screenshot_workflows.py {path.stem}")


def test_no_thumbnail_without_its_workflow():
    orphans = sorted(p.name for p in WF.iterdir() if p.suffix in (".jpg", ".jpeg", ".png", ".webp")
                     and not p.with_suffix(".json").exists())
    assert not orphans, f"pictures in workflows/ without a workflow of the same name: {orphans}"


def test_pictures_stay_small():
    pictures = [p for p in [*WF.glob("*.jpg"), *(ROOT / "docs").rglob("*.jpg"), *(ROOT / "docs").rglob("*.png")]]
    big = sorted(f"{p.relative_to(ROOT)} ({p.stat().st_size // 1024} KB)" for p in pictures
                 if p.stat().st_size > MAX_PICTURE)
    assert not big, f"pictures over {MAX_PICTURE // 1024} KB: {big}"
    total = sum(p.stat().st_size for p in pictures)
    assert total <= MAX_ALL, f"the pictures add up to {total // 1024} KB, over {MAX_ALL // 1024} KB"


def test_jpeg_size_reads_a_frame_and_refuses_other_files():
    # SOI, an APP0 segment of 16 bytes, then SOF0 for a 40 x 30 image
    jpeg = b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"\0" * 14 + b"\xff\xc0" + struct.pack(
        ">HBHH", 17, 8, 30, 40) + b"\0" * 10
    assert jpeg_size(jpeg) == (40, 30)
    with_comment = jpeg[:2] + b"\xff\xfe" + struct.pack(">H", 7) + b"hello" + jpeg[2:]
    assert jpeg_comments(with_comment) == ["hello"] and jpeg_size(with_comment) == (40, 30)
    with pytest.raises(ValueError):
        jpeg_size(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
