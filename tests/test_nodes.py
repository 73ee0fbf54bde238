"""Node contract without ComfyUI: stand-ins for comfy.*, folder_paths and latent_preview (tests/comfy_standins.py),
the repository imported as an extension package the way ComfyUI's loader does."""
from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from . import comfy_standins as cs

ROOT = cs.ROOT


@pytest.fixture
def rec():
    return cs.Recorder()


@pytest.fixture
def ext(rec, monkeypatch):
    for name, module in cs.install(rec).items():
        monkeypatch.setitem(sys.modules, name, module)
    module = cs.load_extension()
    yield module
    module.nodes.xdit_nodes.MANAGER.stop()


def _node(ext, name):
    return ext.NODE_CLASS_MAPPINGS[name]


CONFIG_DEFAULTS = dict(device="cpu", ulysses_degree=1, ring_degree=1, pipefusion_degree=1, cfg_degree=1,
                       dp_degree=1, num_patches=0, warmup_steps=1, attention="auto", gpus="", pool_address="")


# ------------------------------------------------------------------------------------------------ registration
def test_mappings_and_node_definitions(ext):
    assert set(ext.NODE_CLASS_MAPPINGS) == {"XDiTConfigureHybridParallel", "XDiTLoadParallelDiT",
                                            "XDiTParallelSampler"}
    assert set(ext.NODE_DISPLAY_NAME_MAPPINGS) == set(ext.NODE_CLASS_MAPPINGS)
    returns = {"XDiTConfigureHybridParallel": ("XDIT_PARALLEL_CONFIG",), "XDiTLoadParallelDiT": ("XDIT_MODEL",),
               "XDiTParallelSampler": ("LATENT",)}
    for name, cls in ext.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "xDiT"
        assert cls.RETURN_TYPES == returns[name]
        spec = cls.INPUT_TYPES()
        fn = getattr(cls, cls.FUNCTION)
        params = inspect.signature(fn).parameters
        for section in ("required", "optional", "hidden"):
            for inp, conf in spec.get(section, {}).items():
                assert inp in params, f"{name}.{cls.FUNCTION} lacks parameter {inp}"
                if section == "required":
                    assert params[inp].default is inspect.Parameter.empty
                if section == "hidden":
                    assert conf == "UNIQUE_ID"
                else:
                    assert isinstance(conf, tuple) and conf and isinstance(conf[0], (str, list))
        json.dumps(spec)  # /object_info serialises it
    sampler = ext.NODE_CLASS_MAPPINGS["XDiTParallelSampler"].INPUT_TYPES()["required"]
    assert sampler["positive"][0] == sampler["negative"][0] == "CONDITIONING"
    assert sampler["latent_image"][0] == "LATENT" and sampler["model"][0] == "XDIT_MODEL"
    assert {"euler", "dpmpp_2m"} <= set(sampler["sampler_name"][0])
    assert sampler["scheduler"][0] == cs.SCHEDULER_NAMES  # every scheduler ComfyUI has, in its order
    assert {"exponential", "ddim_uniform", "linear_quadratic", "kl_optimal"} <= set(sampler["scheduler"][0])


def test_schedulers_are_comfyuis(ext):
    """The stand-in's list is the recorded KSampler's (ComfyUI 0.3.64); without ComfyUI the nodes offer the same."""
    core = json.loads((ROOT / "tests" / "data" / "comfyui_core_nodes.json").read_text())["nodes"]
    assert cs.SCHEDULER_NAMES == core["KSampler"]["input"]["required"]["scheduler"][0]
    assert list(ext.nodes.families.SCHEDULERS) == cs.SCHEDULER_NAMES
    for name in cs.SCHEDULER_NAMES:  # each goes to ComfyUI's own calculate_sigmas
        ext.nodes.convert.sigmas_for("pixart-sigma", "euler", name, 4, 1.0)


def test_own_nodes_package_only_as_subpackage(ext):
    assert sys.modules["nodes"].COMFY_OWN_NODES_MODULE  # ComfyUI's top-level `nodes` untouched
    assert ext.nodes.__name__ == f"{cs.EXTENSION_NAME}.nodes"
    for path in [ROOT / "__init__.py", *sorted((ROOT / "nodes").glob("*.py"))]:
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+nodes\b", text, re.M), path
        assert not re.search(r"^\s*(from|import)\s+runtime\b", text, re.M), path


def test_import_is_light_and_works_without_gpu():
    """A fresh interpreter: importing the extension loads neither diffusers nor ZeroMQ nor torch.distributed
    internals of the engine."""
    code = (
        "import sys; sys.path.insert(0, %r); from tests import comfy_standins as cs;"
        "rec = cs.Recorder(); sys.modules.update(cs.install(rec)); m = cs.load_extension();"
        "heavy = [k for k in ('diffusers', 'zmq', 'transformers', 'comfyui_xdit.engine', 'flash_attn') if k in sys.modules];"
        "print(len(m.NODE_CLASS_MAPPINGS), heavy)" % str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3 []"


# ------------------------------------------------------------------------------------------------ configure
def test_configure_valid_and_degrees(ext):
    node = _node(ext, "XDiTConfigureHybridParallel")
    kw = dict(CONFIG_DEFAULTS, ulysses_degree=2, ring_degree=2, pipefusion_degree=2, cfg_degree=2, num_patches=4)
    assert node.VALIDATE_INPUTS(**kw) is True
    (s,) = node().configure(**kw)
    assert s.world_size == 16
    assert s.degrees() == {"dp": 1, "cfg": 2, "pipefusion": 2, "ring": 2, "ulysses": 2, "num_patches": 4,
                           "warmup_steps": 1}
    (s1,) = node().configure(**dict(CONFIG_DEFAULTS, pipefusion_degree=3))
    assert s1.degrees()["num_patches"] == 3  # 0 = one patch per stage


@pytest.mark.parametrize("change, reason", [
    (dict(cfg_degree=3), "cfg parallel degree must be 1 or 2"),
    (dict(ulysses_degree=0), "ulysses degree must be >= 1"),
    (dict(pipefusion_degree=4, num_patches=2), "num_patches (2) must be at least the pipefusion degree (4)"),
    (dict(num_patches=3), "num_patches applies to PipeFusion only"),
    (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
    (dict(device="tpu"), "device must be one of auto, cuda, cpu"),
    (dict(attention="fast"), "attention must be one of"),
    (dict(gpus="0,1"), "gpus applies to device cuda only"),
    (dict(device="cuda", gpus="x"), None),
    (dict(pool_address="localhost:5555"), "pool address must look like tcp://HOST:PORT"),
])
def test_configure_rejects_at_queue_time(ext, change, reason):
    node = _node(ext, "XDiTConfigureHybridParallel")
    msg = node.VALIDATE_INPUTS(**dict(CONFIG_DEFAULTS, **change))
    assert isinstance(msg, str)
    if reason:
        assert reason in msg
    with pytest.raises(Exception, match=re.escape(msg[:30])):
        node().configure(**dict(CONFIG_DEFAULTS, **change))


def test_gpu_count_checks(ext):
    pool = ext.nodes.pool
    s = pool.ParallelSettings(device="cuda", ulysses=4)
    assert "need 4 GPUs" in pool.validation_error(s, cuda_count=lambda: 2)
    assert pool.validation_error(s, cuda_count=lambda: 4) is None
    assert "only 2 are available" in pool.validation_error(
        pool.ParallelSettings(device="cuda", ulysses=4, gpus="0,1"), cuda_count=lambda: 8)
    assert "does not exist" in pool.validation_error(pool.ParallelSettings(device="cuda", gpus="0,9"),
                                                     cuda_count=lambda: 8)
    assert "no CUDA GPU" in pool.validation_error(pool.ParallelSettings(device="cuda"), cuda_count=lambda: 0)
    assert pool.ParallelSettings(device="auto").resolved_device(lambda: 0) == "cpu"
    assert pool.ParallelSettings(device="auto").resolved_device(lambda: 2) == "cuda"


# ------------------------------------------------------------------------------------------------ pool manager
class FakePool:
    started: list = []

    def __init__(self, nproc=1, address=None, secret=None, *, device="cpu", env=None, attached=False,
                 die_with_parent=False):
        self.die_with_parent = die_with_parent
        self.nproc, self.device, self.env, self.address, self.attached = nproc, device, env, address, attached
        self.alive = False
        self.stopped = False

    @classmethod
    def attach(cls, address, secret=None):
        return cls(address=address, attached=True)

    def start(self):
        self.alive = True
        FakePool.started.append(self)

    def stop(self):
        self.stopped, self.alive = True, False

    def is_alive(self):
        return self.alive

    def client(self):
        return SimpleNamespace(pool=self, close=lambda: None)


def test_pool_manager_reuses_restarts_and_never_stops_foreign_pools(ext, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    pool = ext.nodes.pool
    FakePool.started = []
    mgr = pool.PoolManager(FakePool, FakePool.attach)
    a = pool.ParallelSettings(device="cpu", ulysses=2)
    c1 = mgr.client_for(a)
    assert c1.pool.nproc == 2 and c1.pool.device == "cpu" and c1.pool.env["XDIT_ATTENTION"] == "auto"
    assert c1.pool.die_with_parent  # a killed ComfyUI leaves no pool behind
    assert mgr.client_for(pool.ParallelSettings(device="cpu", cfg=2)) is c1  # same rank count: same pool
    c2 = mgr.client_for(pool.ParallelSettings(device="cpu", ulysses=4))
    assert c1.pool.stopped and c2 is not c1 and c2.pool.nproc == 4
    c2.pool.alive = False  # died: restarted on next use
    c3 = mgr.client_for(pool.ParallelSettings(device="cpu", ulysses=4))
    assert c3 is not c2 and c3.pool.alive
    c4 = mgr.client_for(pool.ParallelSettings(address="tcp://127.0.0.1:5999"))
    assert c4.pool.attached and c3.pool.stopped
    mgr.stop()
    assert not c4.pool.stopped  # started elsewhere: left running
    assert len(FakePool.started) == 4


def test_launcher_scrubs_cuda_allocator_setting():
    from comfyui_xdit_runtime import launcher

    assert "PYTORCH_CUDA_ALLOC_CONF" in launcher.SCRUBBED_ENV


# ------------------------------------------------------------------------------------------------ conversions
def _cond(tokens=8, dim=4096, batch=1, **extras):
    return [[torch.randn(batch, tokens, dim), extras]]


def test_conditioning_flux_pooled_and_guidance(ext):
    cv = ext.nodes.convert
    pooled = torch.randn(1, 768)
    tensors, guidance = cv.conditioning_tensors(_cond(pooled_output=pooled, guidance=2.5),
                                                _cond(pooled_output=pooled), "flux", use_cfg=False)
    assert set(tensors) == {"cond", "pooled"} and guidance == 2.5  # negative unused without CFG
    assert torch.equal(tensors["pooled"], pooled) and tensors["cond"].dtype == torch.float32
    _, guidance = cv.conditioning_tensors(_cond(pooled_output=pooled), None, "flux", use_cfg=False)
    assert guidance == 3.5  # ComfyUI's default for Flux without FluxGuidance
    tensors, guidance = cv.conditioning_tensors(_cond(pooled_output=torch.randn(1, 2048)),
                                                _cond(pooled_output=torch.randn(1, 2048), start_percent=0.0),
                                                "sd3", use_cfg=True)
    assert set(tensors) == {"cond", "pooled", "neg_cond", "neg_pooled"} and guidance is None


def test_conditioning_pixart_mask(ext):
    cv = ext.nodes.convert
    mask = torch.tensor([[1, 1, 1, 0]])
    tensors, _ = cv.conditioning_tensors(_cond(4, attention_mask=mask), _cond(4), "pixart", use_cfg=True)
    assert set(tensors) == {"cond", "cond_mask", "neg_cond"}
    assert tensors["cond_mask"].tolist() == [[1, 1, 1, 0]]


@pytest.mark.parametrize("positive, family, match", [
    (_cond(pooled_output=torch.zeros(1, 768), area=(64, 64, 0, 0)), "flux", "uses area"),
    (_cond(pooled_output=torch.zeros(1, 768), mask=torch.ones(1, 8, 8), control=object()), "flux",
     "uses control, mask"),
    (_cond(pooled_output=torch.zeros(1, 768), end_percent=0.5), "flux", "uses end_percent"),
    (_cond() + _cond(), "pixart", "has 2 entries"),
    (_cond(), "sd3", "no pooled_output"),
    ([], "pixart", "empty"),
    ([[torch.zeros(8, 4096), {}]], "pixart", "expected \\[batch, tokens, dim\\]"),
])
def test_conditioning_rejections(ext, positive, family, match):
    cv = ext.nodes.convert
    with pytest.raises(cv.ConversionError, match=match):
        cv.conditioning_tensors(positive, None, family, use_cfg=False)


def test_latent_widening_checks_and_output(ext):
    cv = ext.nodes.convert
    empty = {"samples": torch.zeros(2, 4, 16, 24)}  # EmptyLatentImage
    lat = cv.latent_input(empty, "flux-dev")
    assert lat["samples"].shape == (2, 16, 16, 24) and not lat["samples"].any()
    assert cv.latent_input(empty, "pixart-sigma")["samples"].shape == (2, 4, 16, 24)
    with pytest.raises(cv.ConversionError, match="has 4 channels but sd3-medium uses 16"):
        cv.latent_input({"samples": torch.ones(1, 4, 8, 8)}, "sd3-medium")
    with pytest.raises(cv.ConversionError, match="noise_mask"):
        cv.latent_input({"samples": torch.zeros(1, 16, 8, 8), "noise_mask": torch.ones(1, 1, 8, 8)}, "sd3-medium")
    with pytest.raises(cv.ConversionError, match="not a LATENT"):
        cv.latent_input(torch.zeros(1, 16, 8, 8), "sd3-medium")
    fields = cv.request_fields(lat["samples"], 7, 42, 4.5, None, "euler")
    assert fields == {"height": 128, "width": 192, "steps": 7, "seed": 42, "batch_size": 2, "cfg": 4.5,
                      "sampler": "euler", "denoise": 1.0}
    out = cv.output_latent({"samples": empty["samples"], "batch_index": [3, 4]}, torch.ones(2, 16, 16, 24))
    assert out["batch_index"] == [3, 4] and out["samples"].shape == (2, 16, 16, 24)
    noise = cv.noise_for(lat["samples"], 5)
    assert torch.equal(noise, torch.randn(2, 16, 16, 24, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("variant, model_type, settings", [
    ("flux-dev", "FLUX", {}), ("flux-schnell", "FLOW", {"multiplier": 1.0, "shift": 1.0}),
    ("sd3.5-large", "FLOW", {"shift": 3.0}), ("pixart-sigma", "EPS", {"beta_schedule": "sqrt_linear",
                                                                       "linear_start": 0.0001, "linear_end": 0.02,
                                                                       "timesteps": 1000}),
])
def test_sigmas_use_comfy_model_sampling_for_the_variant(ext, rec, variant, model_type, settings):
    cv = ext.nodes.convert
    sig = cv.sigmas_for(variant, "euler", "karras", 6, 1.0)
    ms, scheduler, steps = rec.sigma_calls[-1]
    assert (ms.model_type.name, ms.settings, scheduler, steps) == (model_type, settings, "karras", 6)
    assert sig.shape == (7,) and sig.dtype == torch.float32


def test_sigmas_denoise_as_ksampler(ext, rec):
    cv = ext.nodes.convert
    full = cv.sigmas_for("sd3-medium", "euler", "simple", 10, 1.0)
    part = cv.sigmas_for("sd3-medium", "euler", "simple", 4, 0.45)
    assert rec.sigma_calls[-1][2] == 8  # int(4 / 0.45)
    assert len(part) == 5 and part[-1] == 0 and part[0] < full[0]
    with pytest.raises(ValueError, match="invalid scheduler"):
        cv.sigmas_for("sd3-medium", "euler", "exponential_typo", 4, 1.0)


def test_epsilon_start_noise_as_comfy(ext):
    cv, fam = ext.nodes.convert, ext.nodes.families
    noise = torch.ones(1, 4, 2, 2)
    ms_eps = SimpleNamespace(sigma_max=14.6)
    full = torch.tensor([14.6, 3.0, 0.0])
    scaled = cv.engine_noise(noise, full, "pixart-sigma", ms_eps)
    assert torch.allclose(scaled * 14.6, torch.full_like(noise, (1 + 14.6 ** 2) ** 0.5))
    assert torch.equal(cv.engine_noise(noise, torch.tensor([3.0, 0.0]), "pixart-sigma", ms_eps), noise)  # denoise<1
    assert torch.equal(cv.engine_noise(noise, torch.tensor([1.0, 0.0]), "sd3-medium", SimpleNamespace(sigma_max=1.0)),
                       noise)  # flow models: unchanged
    assert fam.spec("pixart-alpha").model_type == "EPS"


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_listing_resolve_and_variant(ext, rec, tmp_path):
    ck = ext.nodes.checkpoints
    dev = tmp_path / "diffusion_models" / "flux-dev-mini.safetensors"
    schnell = tmp_path / "unet" / "flux-schnell-mini.safetensors"
    full = tmp_path / "checkpoints" / "sd3-all-in-one.safetensors"
    for p in (dev, schnell, full):
        p.parent.mkdir(parents=True, exist_ok=True)
    def t():
        return torch.zeros(1)

    save_file({"double_blocks.0.img_attn.qkv.weight": t(), "guidance_in.in_layer.weight": t()}, str(dev))
    save_file({"double_blocks.0.img_attn.qkv.weight": t(), "single_blocks.0.linear1.weight": t()}, str(schnell))
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": t()}, str(full))
    folder = tmp_path / "diffusion_models" / "pixart-diffusers"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel", "sample_size": 128}))
    (tmp_path / "diffusion_models" / "notes.txt").write_text("x")
    rec.folders = {"diffusion_models": [str(dev), str(schnell), str(tmp_path / "diffusion_models" / "notes.txt")],
                   "checkpoints": [str(full)]}
    names = ck.list_checkpoints()
    assert names == ["flux-dev-mini.safetensors", "flux-schnell-mini.safetensors", "pixart-diffusers/",
                     "sd3-all-in-one.safetensors", "tiny-flux", "tiny-sd3", "tiny-pixart"]
    assert ck.resolve("flux-dev-mini.safetensors") == str(dev)
    assert ck.resolve("pixart-diffusers/") == str(folder)
    assert ck.detect_variant(str(dev)) == "flux-dev"
    assert ck.detect_variant(str(schnell)) == "flux-schnell"
    assert ck.detect_variant(str(full)) == "sd3-medium"
    assert ck.detect_variant(str(full), "sd3.5-large") == "sd3.5-large"
    assert ck.detect_variant(str(folder)) == "pixart-alpha"
    assert ck.detect_variant("tiny-pixart") == "pixart-sigma"
    with pytest.raises(ValueError, match="looks like a sd3 model, not flux"):
        ck.detect_variant(str(full), "flux")
    with pytest.raises(FileNotFoundError, match="not in ComfyUI's"):
        ck.resolve("missing.safetensors")
    loader = _node(ext, "XDiTLoadParallelDiT")
    assert loader.INPUT_TYPES()["required"]["checkpoint"][0] == names
    with pytest.raises(ext.nodes.xdit_nodes.XDiTNodeError, match="^Load Parallel DiT: checkpoint 'missing"):
        loader().load(None, "missing.safetensors", "bf16", "auto")


def test_sampler_rejects_foreign_model_and_skips_zero_denoise(ext):
    node = _node(ext, "XDiTParallelSampler")()
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(ext.nodes.xdit_nodes.XDiTNodeError, match="must come from Load Parallel DiT"):
        node.sample(object(), _cond(), _cond(), lat, 0, 4, 1.0, "euler", "simple", 1.0)
