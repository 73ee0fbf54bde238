"""FLUX.2 through the ComfyUI nodes (stand-ins for comfy.*; ComfyUI 0.3.64 has no FLUX.2): a CONDITIONING of the
diffusers text encoder's shape [B, L, 15360] and a 32-channel LATENT, ComfyUI's Flux model sampling with
Flux2Pipeline's shift for the job, refusals at queue time, and a real 2-rank pool (Ulysses 2) equal to the engine.
With COMFYUI_DIR, ComfyUI's own scheduler code reproduces the pipeline's sigmas."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from comfyui_xdit.engine import run_job
from comfyui_xdit.families.flux2 import TEXT_WIDTH, empirical_mu
from comfyui_xdit.models import load_model
from comfyui_xdit.sampling import SampleRequest

from . import comfy_standins as cs
from .conftest import rel_l2
from .test_nodes import CONFIG_DEFAULTS, _graph, _queue


@pytest.fixture(scope="module")
def ext_mod():
    with cs.extension() as ext:
        yield ext


def _cond(tokens=12, seed=0, **extras):
    return [[torch.randn(1, tokens, TEXT_WIDTH, generator=torch.Generator().manual_seed(seed)), extras]]


def test_variant_conversions_and_model_sampling(ext_mod):
    ext = ext_mod
    cv, fam = ext.nodes.convert, ext.nodes.families
    assert ext.nodes.checkpoints.detect_variant("tiny-flux2") == "flux2-dev"
    assert "flux2" in ext.nodes.xdit_nodes.FAMILIES and "flux2-dev" in ext.nodes.xdit_nodes.FAMILIES
    tensors, guidance = cv.conditioning_tensors(_cond(guidance=2.5), _cond(), "flux2", use_cfg=False)
    assert set(tensors) == {"cond"} and tensors["cond"].shape == (1, 12, TEXT_WIDTH) and guidance == 2.5
    assert cv.conditioning_tensors(_cond(), None, "flux2", use_cfg=False)[1] == 4.0  # Flux2Pipeline's default
    lat = cv.latent_input({"samples": torch.zeros(2, 4, 16, 24)}, "flux2-dev")  # EmptyLatentImage, widened
    assert lat["samples"].shape == (2, 32, 16, 24) and not lat["samples"].any()
    with pytest.raises(cv.ConversionError, match="has 16 channels but flux2-dev uses 32"):
        cv.latent_input({"samples": torch.ones(1, 16, 16, 16)}, "flux2-dev")
    ms, latent_format = fam.comfy_objects("flux2-dev", (128, 128), 50)  # 1024 px: 4096 tokens
    assert ms.model_type.name == "FLUX" and ms.settings == {"shift": empirical_mu(4096, 50)}
    assert type(latent_format).__name__ == "LatentFormat"
    assert fam.comfy_objects("flux2-dev")[0].settings == {}  # no job: ComfyUI's Flux settings as they are


@pytest.mark.parametrize("config, graph, node, reason", [
    ({}, dict(cfg=3.0), "8", "flux2 takes no negative prompt (no true classifier-free guidance): set cfg 1"),
    (dict(cfg_degree=2), dict(cfg=3.0), "8", "cfg_degree 2 runs a negative branch, but flux2 takes no negative"),
    (dict(ulysses_degree=3), {}, "5", "ulysses_degree 3 does not divide the 4 attention heads of tiny-flux2"),
    (dict(pipefusion_degree=5), {}, "5", "pipefusion_degree 5 is larger than the 4 transformer blocks of tiny-flux2"),
    ({}, dict(width=264), "8", "264x256 is not a multiple of 16"),
    ({}, dict(width=264, latent="EmptyFlux2LatentImage"), "8", "264x256 is not a multiple of 16"),  # newer ComfyUI's
])
def test_flux2_graph_refused_at_queue_time(ext_mod, config, graph, node, reason):
    errors = _queue(ext_mod, ext_mod.rec, _graph(config, checkpoint="tiny-flux2", **graph))
    assert list(errors) == [node] and len(errors[node]) == 1, errors
    assert reason in errors[node][0]


def test_flux2_graph_valid_at_queue_time(ext_mod):
    config = dict(ulysses_degree=2, ring_degree=2, pipefusion_degree=2, num_patches=2)
    assert _queue(ext_mod, ext_mod.rec, _graph(config, checkpoint="tiny-flux2")) == {}


def test_sampler_on_pool_matches_engine(ext_mod):
    ext, rec = ext_mod, ext_mod.rec
    m = ext.nodes.NODE_CLASS_MAPPINGS
    (config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2))
    (model,) = m["XDiTLoadParallelDiT"].execute(config, "tiny-flux2", "fp32", "auto")
    assert (model.family, model.variant) == ("flux2", "flux2-dev")
    sampler = m["XDiTParallelSampler"]()
    pos = _cond(11, seed=1, guidance=3.0)  # an odd text length and FluxGuidance's extra
    latent = {"samples": torch.zeros(1, 16, 16, 16)}  # EmptySD3LatentImage: widened to 32 channels
    (out,) = cs.with_id(sampler, "3").execute(model, pos, pos, latent, 7, 4, 1.0, "euler", "simple", 1.0)
    ms = rec.sigma_calls[-1][0]
    assert ms.settings == {"shift": empirical_mu(64, 4)}  # 128 px: 8 x 8 tokens, 4 steps
    assert out["samples"].shape == (1, 32, 16, 16)
    assert [p[0] for p in rec.progress[-4:]] == [1, 2, 3, 4]
    sigmas = ext.nodes.convert.sigmas_for("flux2-dev", "euler", "simple", 4, 1.0, ms)
    inputs = {"cond": pos[0][0], "latent": torch.zeros(1, 32, 16, 16), "sigmas": sigmas,
              "noise": torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(7))}
    ref = run_job(load_model("tiny-flux2"), SampleRequest(128, 128, 4, seed=7, guidance=3.0, sampler="euler",
                                                          inputs=inputs)).latents
    assert rel_l2(out["samples"], ref) <= 1e-4 and rel_l2(out["samples"], inputs["noise"]) > 0.05
    # denoise < 1: the shift of the schedule it truncates (int(4 / 0.5) = 8 steps)
    sampler.execute(model, pos, pos, {"samples": out["samples"]}, 7, 4, 1.0, "euler", "simple", 0.5)
    assert rec.sigma_calls[-1][0].settings == {"shift": empirical_mu(64, 8)} and rec.sigma_calls[-1][2] == 8
    with pytest.raises(ext.nodes.xdit_nodes.XDiTNodeError, match="^Parallel Sampler: flux2 takes no negative"):
        sampler.execute(model, pos, pos, latent, 7, 2, 3.0, "euler", "simple", 1.0)


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout to run")
def test_comfyui_simple_scheduler_reproduces_the_pipeline_sigmas():
    """ComfyUI's own Flux model sampling with our shift and its `simple` scheduler: Flux2Pipeline's sigmas, exactly
    where 10000 (its table) divides by the steps, to its table's resolution otherwise."""
    from comfyui_xdit.schedules import make_schedule

    comfy_dir = os.environ["COMFYUI_DIR"]
    python = os.environ.get("COMFYUI_PYTHON") or next(
        (str(p) for p in [Path(comfy_dir) / ".venv" / "bin" / "python"] if p.exists()), sys.executable)
    cases = [{"size": s, "steps": n, "shift": empirical_mu((s // 16) ** 2, n)} for s, n in [(1024, 50), (512, 20),
                                                                                           (1024, 28)]]
    code = textwrap.dedent("""
        import json, sys
        from types import SimpleNamespace
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import comfy.model_base, comfy.samplers, comfy.supported_models
        out = []
        for case in json.load(sys.stdin):
            settings = dict(comfy.supported_models.Flux.sampling_settings, shift=case["shift"])
            ms = comfy.model_base.model_sampling(SimpleNamespace(sampling_settings=settings),
                                                 comfy.model_base.ModelType.FLUX)
            out.append(comfy.samplers.calculate_sigmas(ms, "simple", case["steps"]).tolist())
        print(json.dumps(out))
    """)
    res = subprocess.run([python, "-c", code], input=json.dumps(cases), capture_output=True, text=True,
                         cwd=comfy_dir, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-2000:]
    for case, sig in zip(cases, json.loads(res.stdout.strip().splitlines()[-1])):
        ours = make_schedule("flux2", "flux2-dev", "default", case["steps"], (case["size"] // 16) ** 2).scheduler
        diff = (torch.tensor(sig, dtype=torch.float64) - ours.sigmas.double()).abs().max().item()
        assert diff <= (1e-6 if 10000 % case["steps"] == 0 else 1e-3), (case, diff)
