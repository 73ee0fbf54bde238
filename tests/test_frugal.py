"""Frugal loading (comfyui_xdit/frugal.py): every layout loads bit for bit as `load_transformer` loads it whole; a
PipeFusion stage or a `keep` slice reads only its part; peak host RSS of a rank stays within its share of the
checkpoint plus one block (measured in fresh processes on a file of a few hundred MB)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from comfyui_xdit.errors import WeightsError  # noqa: E402
from comfyui_xdit.frugal import load_frugal, mesh_coordinates, open_checkpoint  # noqa: E402
from comfyui_xdit.parallel import ParallelConfig  # noqa: E402
from comfyui_xdit.weights import load_transformer  # noqa: E402

from .test_weights import (FP8, flux_to_bfl, make_flux, make_pixart, make_sd3, pixart_to_original,  # noqa: E402
                           sd3_to_mmdit)

ROOT = Path(__file__).resolve().parents[1]


def _save(path: Path, sd: dict) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def _sources(tmp: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, layout the frugal loader reads it in)."""
    from comfyui_xdit.tiny import build_tiny

    from .test_flux2 import flux2_to_bfl
    from .test_wan import _randomized, wan_to_original
    from .test_z_image import z_image_to_original

    out = {"flux-bfl": (_save(tmp / "flux.safetensors", flux_to_bfl(make_flux())), "converted"),
           "sd3-mmdit": (_save(tmp / "sd3.safetensors", sd3_to_mmdit(make_sd3())), "converted"),
           "pixart-original": (_save(tmp / "pixart.safetensors", pixart_to_original(make_pixart())), "converted"),
           "flux-diffusers-file": (_save(tmp / "fluxd.safetensors", make_flux().state_dict()), "diffusers"),
           "wan-comfyui": (_save(tmp / "wan.safetensors", {f"model.diffusion_model.{k}": v for k, v in
                                                             wan_to_original(_randomized()).items()}), "converted"),
           "flux2-bfl": (_save(tmp / "flux2.safetensors", flux2_to_bfl(build_tiny("tiny-flux2")[1])), "converted"),
           "z-image-original": (_save(tmp / "z.safetensors", z_image_to_original(build_tiny("tiny-z-image")[1])),
                                "converted")}
    make_sd3().save_pretrained(str(tmp / "sd3-folder"), max_shard_size="200KB")
    out["sd3-sharded-folder"] = (str(tmp / "sd3-folder"), "diffusers")
    out["flux-bfl-fp8"] = (_save(tmp / "flux-fp8.safetensors", {k: v.to(FP8) for k, v in
                                                                 flux_to_bfl(make_flux()).items()}), "converted")
    scaled = {"scaled_fp8": torch.zeros(0, dtype=FP8)}
    for k, v in sd3_to_mmdit(make_sd3()).items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448
            scaled[k], scaled[k[:-6] + "scale_weight"] = (v / scale).to(FP8), scale.reshape(1)
        else:
            scaled[k] = v
    out["sd3-scaled-fp8"] = (_save(tmp / "sd3-scaled.safetensors", scaled), "converted")
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return _sources(tmp_path_factory.mktemp("frugal"))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["flux-bfl", "sd3-mmdit", "pixart-original", "flux-diffusers-file", "wan-comfyui",
                                  "flux2-bfl", "z-image-original", "sd3-sharded-folder", "flux-bfl-fp8",
                                  "sd3-scaled-fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_layout_loads_as_the_whole_file_does(sources, name, dtype):
    path, layout = sources[name]
    whole = load_transformer(path, dtype=dtype)
    adapter, report = load_frugal(path, dtype=dtype)
    assert (adapter.family, adapter.variant) == (whole.family, whole.variant)
    assert _equal(adapter.model.state_dict(), whole.model.state_dict())
    assert report.frugal and report.layout == layout
    assert report.read_bytes == report.checkpoint_bytes == report.kept_bytes
    # the comparison can fail: one perturbed tensor differs
    sd = whole.model.state_dict()
    key = next(iter(sd))
    sd[key] = sd[key] + 1
    assert not _equal(adapter.model.state_dict(), sd)


@pytest.mark.parametrize("name", ["flux-bfl", "flux-diffusers-file"])
def test_pipefusion_stages_read_their_blocks_only(sources, name):
    """Each stage's model holds exactly the blocks shard_stage keeps of the whole model, with the same values, and
    reads only those (plus the embedders and final layer)."""
    from comfyui_xdit.adapters import make_adapter
    from comfyui_xdit.models import load_model
    from comfyui_xdit.parallel.pipefusion import shard_stage

    path, _ = sources[name]
    whole = load_transformer(path)
    config = ParallelConfig(pipefusion=2, ulysses=1)
    total = sum(t.numel() * t.element_size() for t in whole.model.state_dict().values())
    read = 0
    for rank in range(2):
        reference = make_adapter(whole.family, load_transformer(path).model, whole.variant)
        shard_stage(reference, rank, 2)
        loaded = load_model(path, layout=config, rank=rank)
        assert _equal(loaded.adapter.model.state_dict(), reference.model.state_dict())
        assert loaded.layout == config and loaded.report.read_bytes == loaded.report.kept_bytes < total
        read += loaded.report.read_bytes
    blocks = sum(t.numel() * t.element_size() for k, t in whole.model.state_dict().items()
                 if k.startswith(("transformer_blocks.", "single_transformer_blocks.")))
    assert read == total + (total - blocks)  # every block once; the rest on both stages


@pytest.mark.parametrize("name", ["flux-bfl", "flux-diffusers-file"])
def test_keep_reads_the_rows_asked_for(sources, name):
    """keep(name, shape) -> the first half of the rows of every matrix, nothing of the biases, the rest whole."""
    path, _ = sources[name]
    whole = load_transformer(path).model.state_dict()
    asked = []

    def keep(key, shape):
        asked.append(key)
        if len(shape) == 2:
            return (slice(0, shape[0] // 2),)
        return None if key.endswith(".bias") else True

    adapter, report = load_frugal(path, keep=keep)
    assert sorted(asked) == sorted(whole)
    got = adapter.model.state_dict()
    for key, t in whole.items():
        if t.ndim == 2:
            assert torch.equal(got[key], t[: t.shape[0] // 2]), key
        elif key.endswith(".bias"):
            assert got[key].device.type == "meta"
        else:
            assert torch.equal(got[key], t), key
    assert report.read_bytes == report.kept_bytes < report.checkpoint_bytes


def test_dim0_shards_are_torch_chunks_and_cover_the_model(sources):
    """dim0_shard_keep: what FSDP2's Shard(0) keeps per rank; three ranks' parts put together are the model."""
    from comfyui_xdit.frugal import dim0_shard_keep

    path, _ = sources["flux-diffusers-file"]
    whole = load_transformer(path).model.state_dict()
    parts = [load_frugal(path, keep=dim0_shard_keep(r, 3))[0].model.state_dict() for r in range(3)]
    for key, t in whole.items():
        chunks = torch.chunk(t, 3) if t.ndim else (t,)
        for r, part in enumerate(parts):
            want = chunks[r] if r < len(chunks) else t[:0]
            assert torch.equal(part[key], want) if t.ndim else torch.equal(part[key], t), key


def test_header_only_description_and_refusals(tmp_path, sources):
    ckpt = open_checkpoint(sources["flux-bfl"][0])
    assert ckpt.family.name == "flux" and ckpt.layout == "converted"
    assert all(t.device.type == "meta" for t in ckpt.tensors.values())
    torch.save(make_flux().state_dict(), str(tmp_path / "flux.pt"))
    with pytest.raises(WeightsError, match="cannot be read in part"):
        open_checkpoint(str(tmp_path / "flux.pt"))
    _, report = load_frugal(str(tmp_path / "flux.pt"))  # a pickle loads whole, and says so
    assert not report.frugal and report.layout == "whole"
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(Path(sources["flux-diffusers-file"][0]).read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_frugal(str(broken))


def test_mesh_coordinates_are_init_device_mesh_order():
    """Row-major over (dp, cfg, pipefusion, ring, ulysses): Ulysses partners are neighbouring ranks (one node)."""
    shape = ParallelConfig(pipefusion=2, ulysses=2).mesh_shape
    assert [mesh_coordinates(r, shape)[2] for r in range(4)] == [0, 0, 1, 1]
    assert [mesh_coordinates(r, shape)[4] for r in range(4)] == [0, 1, 0, 1]


# ------------------------------------------------------------------------------------------------ host memory
_RSS_CHILD = """
import json, sys, torch
from comfyui_xdit.models import load_model
from comfyui_xdit.parallel import ParallelConfig
path, stages, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
layout = ParallelConfig(pipefusion=stages) if stages > 1 else None
loaded = load_model(path, layout=layout, rank=rank)
print(json.dumps(loaded.report.to_dict()))
"""


def _bench_flux(path: Path, original: bool) -> tuple[int, int]:
    """A Flux of 768 width, 2 double and 6 single blocks in fp32 (about 390 MB): (file bytes, largest block)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=6,
                                   attention_head_dim=128, num_attention_heads=6, joint_attention_dim=256,
                                   pooled_projection_dim=128, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    sd = flux_to_bfl(model) if original else model.state_dict()
    _save(path, sd)
    block = max(sum(p.numel() * p.element_size() for p in b.parameters())
                for b in [*model.transformer_blocks, *model.single_transformer_blocks])
    return path.stat().st_size, block


@pytest.mark.parametrize("original", [False, True], ids=["diffusers", "bfl"])
def test_peak_host_rss_per_rank_is_its_share(tmp_path, original):
    """Each of two PipeFusion ranks, in a fresh process: peak RSS during the load minus RSS before it is at most
    half the checkpoint plus one block (+ 8 MiB for the meta model's Python objects). A whole load (one rank
    keeping everything) needs the whole file: it exceeds that bound, so the bound can fail."""
    path = tmp_path / "bench-flux.safetensors"
    size, block = _bench_flux(path, original)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    peaks = {}
    runs = {(stages, rank): subprocess.Popen([sys.executable, "-c", _RSS_CHILD, str(path), str(stages), str(rank)],
                                             env=env, stdout=subprocess.PIPE, text=True)
            for stages, rank in ((2, 0), (2, 1), (1, 0))}  # at once: each measures its own process
    for key, proc in runs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        report = json.loads(out.strip().splitlines()[-1])
        if report["peak_rss_bytes"] == 0:
            pytest.skip("no /proc/self/clear_refs here: peak RSS cannot be measured")
        peaks[key] = report["peak_rss_bytes"] - report["rss_before_bytes"]
        assert report["frugal"] and report["layout"] == ("converted" if original else "diffusers")
    bound = size / 2 + block + (8 << 20)
    print(f"\nfile {size / 2**20:.0f} MiB, largest block {block / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB; "
          + ", ".join(f"{'stage %d/2' % r if s > 1 else 'whole'} {p / 2**20:.0f} MiB" for (s, r), p in peaks.items()))
    assert peaks[(2, 0)] <= bound and peaks[(2, 1)] <= bound
    assert peaks[(1, 0)] > bound and peaks[(1, 0)] >= 0.95 * size
