"""The nodes end to end on a real 2-rank CPU worker pool (Ulysses 2) with the built-in tiny SD3 model:
same result as the engine's serial sampling, progress per step with previews, cancel, and the pool reused."""
from __future__ import annotations

import sys
import time

import pytest
import torch

from comfyui_xdit.cache import CacheSettings
from comfyui_xdit.engine import run_job
from comfyui_xdit.models import load_model
from comfyui_xdit.sampling import SampleRequest

from . import comfy_standins as cs
from .conftest import rel_l2
from .test_nodes import CONFIG_DEFAULTS


@pytest.fixture(scope="module")
def ext_mod():
    with cs.extension() as ext:
        yield ext


def _conditioning(seed: int, tokens: int = 12):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]


def test_sampler_on_pool_matches_serial_with_progress_and_cancel(ext_mod):
    ext, rec = ext_mod, ext_mod.rec
    m = ext.nodes.NODE_CLASS_MAPPINGS
    (config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2))
    (model,) = m["XDiTLoadParallelDiT"].execute(config, "tiny-sd3", "fp32", "auto")
    assert model.family == "sd3" and model.variant == "sd3-medium"
    sampler = m["XDiTParallelSampler"]()
    pos, neg = _conditioning(1), _conditioning(2)

    # Cancel: ComfyUI's interrupt flag set after the first step.
    rec.interrupt_after = 1
    with pytest.raises(cs.InterruptProcessingException):
        cs.with_id(sampler, "9").execute(model, pos, neg, {"samples": torch.zeros(1, 4, 64, 64)}, 3, 200, 4.0,
                                          "euler", "simple", 1.0)
    stopped = time.monotonic() - rec.interrupted_at
    print(f"the node returned {stopped:.3f} s after the interrupt")
    assert 1 <= len(rec.progress) < 200
    # the node waits for the pool's end of the job: the pool stopped it, not after the 200 steps (about 10 s here)
    assert stopped < 1.0, stopped
    assert ext.nodes.pool.MANAGER.client_for(config).status()["queue_length"] == 0
    rec.interrupt_after, rec.interrupted_at, rec.progress[:] = None, None, []

    # A normal run on the same pool.
    latent = {"samples": torch.zeros(1, 4, 16, 16)}  # EmptyLatentImage: widened to 16 channels
    (out,) = cs.with_id(sampler, "9").execute(model, pos, neg, latent, 7, 5, 4.0, "euler", "simple", 1.0)
    assert out["samples"].shape == (1, 16, 16, 16)
    assert [p[0] for p in rec.progress] == [1, 2, 3, 4, 5] and {p[2] for p in rec.progress} == {"9"}
    assert all(p[3] is not None and p[3][0] == "JPEG" for p in rec.progress)  # previews reached the previewer

    # The same job serially in this process.
    sigmas = ext.nodes.convert.sigmas_for("sd3-medium", "euler", "simple", 5, 1.0)
    z = torch.zeros(1, 16, 16, 16)
    inputs = {"cond": pos[0][0], "pooled": pos[0][1]["pooled_output"], "neg_cond": neg[0][0],
              "neg_pooled": neg[0][1]["pooled_output"], "latent": z, "sigmas": sigmas,
              "noise": torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(7))}
    ref = run_job(load_model("tiny-sd3"), SampleRequest(128, 128, 5, seed=7, cfg=4.0, sampler="euler",
                                                         inputs=inputs)).latents
    assert rel_l2(out["samples"], ref) <= 1e-4
    assert rel_l2(out["samples"], z + inputs["noise"]) > 0.05  # it did denoise

    # The step cache through the node and the pool: the same steps reused as the engine's serial run.
    cache = dict(cache="fbcache", cache_threshold=0.9, cache_warmup=1, cache_max_consecutive=0)
    (cached,) = sampler.execute(model, pos, neg, latent, 7, 5, 4.0, "euler", "simple", 1.0, **cache)
    seen = []
    ref_cached = run_job(load_model("tiny-sd3"), SampleRequest(
        128, 128, 5, seed=7, cfg=4.0, sampler="euler", inputs=inputs,
        cache=CacheSettings(threshold=0.9)), callback=lambda info: seen.append(info.reused)).latents
    assert any(seen)
    assert rel_l2(cached["samples"], ref_cached) <= 1e-4 and rel_l2(cached["samples"], ref) > 1e-3

    # Errors from the pool come back as one line naming the node.
    bad = [[torch.zeros(1, 12, 1000), {"pooled_output": torch.zeros(1, 2048)}]]  # wrong text width
    with pytest.raises(ext.nodes.xdit_nodes.XDiTNodeError) as e:
        sampler.execute(model, bad, neg, latent, 7, 2, 4.0, "euler", "simple", 1.0)
    assert str(e.value).startswith("Parallel Sampler: ") and "\n" not in str(e.value)
    assert "1000" in str(e.value) or "4096" in str(e.value)

    # Every run used the model Load Parallel DiT loaded ("auto" family): one copy on the pool, not a second one
    # under the detected family's key.
    models = ext.nodes.pool.MANAGER.client_for(config).status()["models"]
    assert [m["key"] for m in models] == [model.key]


def _pixart_conditioning(seed: int, tokens: int = 10):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 4096, generator=g), {}]]


@pytest.mark.parametrize("checkpoint", ["tiny-sd3", "tiny-pixart"])
def test_advanced_sampler_on_pool_single_and_two_stages(ext_mod, checkpoint):
    """Parallel Sampler (Advanced) on the 2-rank pool: 0..steps with noise is Parallel Sampler; two stages (noise
    added, steps 0..3 with leftover noise; then no noise, 3..end, fully denoised) give the one-run latent (Euler:
    no state between steps), for a flow model (SD3) and an epsilon model (PixArt)."""
    ext, rec = ext_mod, ext_mod.rec
    m = ext.nodes.NODE_CLASS_MAPPINGS
    (config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2))
    (model,) = m["XDiTLoadParallelDiT"].execute(config, checkpoint, "fp32", "auto")
    plain, adv = m["XDiTParallelSampler"](), m["XDiTParallelSamplerAdvanced"]()
    if checkpoint == "tiny-sd3":
        pos, neg = _conditioning(1), _conditioning(2)
    else:
        pos, neg = _pixart_conditioning(1), _pixart_conditioning(2)
    latent = {"samples": torch.zeros(1, 4, 16, 16)}  # EmptyLatentImage
    steps, split = 6, 3
    (full,) = plain.execute(model, pos, neg, latent, 7, steps, 4.0, "euler", "simple", 1.0)
    for end in (steps, 10000):
        (same,) = adv.execute(model, "enable", 7, steps, 4.0, "euler", "simple", pos, neg, latent, 0, end, "disable")
        assert rel_l2(same["samples"], full["samples"]) <= 1e-6

    rec.progress[:] = []
    (first,) = cs.with_id(adv, "21").execute(model, "enable", 7, steps, 4.0, "euler", "simple", pos, neg, latent, 0,
                                             split, "enable")
    assert [p[0] for p in rec.progress] == [1, 2, 3] and {p[1] for p in rec.progress} == {split}
    rec.progress[:] = []
    (second,) = cs.with_id(adv, "22").execute(model, "disable", 12345, steps, 4.0, "euler", "simple", pos, neg, first,
                                              split, 10000, "disable")
    assert [p[0] for p in rec.progress] == [1, 2, 3]
    err = rel_l2(second["samples"], full["samples"])
    print(f"{checkpoint}: two stages vs one run, rel L2 {err:.2e}")
    assert err <= 1e-5, err
    assert rel_l2(first["samples"], full["samples"]) > 1e-2  # the first stage left noise: the check can fail
    # leftover disabled: the first stage is fully denoised at its last level (sigma 0), a different latent
    (denoised,) = adv.execute(model, "enable", 7, steps, 4.0, "euler", "simple", pos, neg, latent, 0, split,
                             "disable")
    assert rel_l2(denoised["samples"], first["samples"]) > 1e-2
    # add_noise disabled on the first stage: zero noise (sampling the empty latent), not the seed's
    (quiet,) = adv.execute(model, "disable", 7, steps, 4.0, "euler", "simple", pos, neg, latent, 0, split, "enable")
    assert rel_l2(quiet["samples"], first["samples"]) > 1e-2


def test_pool_started_by_nodes_dies_with_the_comfyui_process(tmp_path):
    """ComfyUI killed outright (no atexit): the pool it started must not be left running."""
    import os
    import signal
    import subprocess
    import time

    code = ("import sys, json; from comfyui_xdit_runtime.launcher import Pool;"
            "p = Pool(1, die_with_parent=True); p.start();"
            "print(json.dumps([p._proc.pid] + p.rank_pids), flush=True); sys.stdin.read()")
    host = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pids = __import__("json").loads(host.stdout.readline())
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        host.send_signal(signal.SIGKILL)
        host.wait(10)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids)
    finally:
        if host.poll() is None:
            host.kill()
        for p in locals().get("pids", []):
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
