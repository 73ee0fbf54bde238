"""Load Parallel DiT on a real 2-rank CPU pool with shard 2 x ulysses 2: the node loads for its degrees, so each
rank reads only its FSDP2 shards of the file (the load result's per-rank reports; also PipeFusion 2, each rank its stage), and Parallel Sampler on that
model gives the latent of the same file loaded whole by the node (rel. L2 <= 1e-4)."""
from __future__ import annotations

import pytest
import torch

from . import comfy_standins as cs
from .conftest import rel_l2
from .test_frugal import _save
from .test_nodes import CONFIG_DEFAULTS
from .test_weights import flux_to_bfl, make_flux


@pytest.fixture(scope="module")
def ext_mod():
    with cs.extension() as ext:
        yield ext


def test_load_parallel_dit_reads_only_each_ranks_shards(ext_mod, tmp_path):
    ext, rec = ext_mod, ext_mod.rec
    torch.manual_seed(4)
    path = _save(tmp_path / "flux-bfl.safetensors", flux_to_bfl(make_flux()))
    rec.folders["diffusion_models"] = [path]
    m = ext.nodes.NODE_CLASS_MAPPINGS
    (config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2,
                                                                    shard_degree=2))
    (model,) = m["XDiTLoadParallelDiT"].execute(config, "flux-bfl.safetensors", "fp32", "auto")
    assert model.family == "flux" and model.key.endswith("|shard 2")
    ranks = model.info["ranks"]
    assert len(ranks) == 2
    whole = ranks[0]["checkpoint_bytes"]
    for r in ranks:
        assert r["frugal"] and 0 < r["read_bytes"] < 0.6 * whole and r["kept_bytes"] < 0.6 * whole, r
    print(f"\nper rank read {[r['read_bytes'] for r in ranks]} of {whole} bytes")

    g = torch.Generator().manual_seed(9)
    pos = [[torch.randn(1, 7, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    latent = {"samples": torch.zeros(1, 16, 6, 10)}  # 3 x 5 = 15 image tokens, 7 text: neither divisible by 2
    sampler = m["XDiTParallelSampler"]()
    (out,) = sampler.execute(model, pos, pos, latent, 7, 3, 1.0, "euler", "simple", 1.0)

    # the same file loaded whole through the node (ulysses 2 alone: the same pool, its own key), the same job
    (plain_config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, ulysses_degree=2))
    (whole_model,) = m["XDiTLoadParallelDiT"].execute(plain_config, "flux-bfl.safetensors", "fp32", "auto")
    assert whole_model.key != model.key
    assert all(r["read_bytes"] == r["checkpoint_bytes"] for r in whole_model.info["ranks"])
    (ref,) = sampler.execute(whole_model, pos, pos, latent, 7, 3, 1.0, "euler", "simple", 1.0)
    (other,) = sampler.execute(model, pos, pos, latent, 8, 3, 1.0, "euler", "simple", 1.0)
    err = rel_l2(out["samples"], ref["samples"])
    print(f"loaded sharded vs loaded whole: rel L2 {err:.2e}")
    assert err <= 1e-4
    assert rel_l2(other["samples"], ref["samples"]) > 1e-2  # another seed differs: the comparison can fail

    # PipeFusion 2 through the node: loaded for its degrees, each rank reads its stage's blocks only
    (pf_config,) = m["XDiTConfigureHybridParallel"].execute(**dict(CONFIG_DEFAULTS, pipefusion_degree=2,
                                                                       warmup_steps=3))  # synchronous: exact
    (staged,) = m["XDiTLoadParallelDiT"].execute(pf_config, "flux-bfl.safetensors", "fp32", "auto")
    assert "|stages " in staged.key and all(r["read_bytes"] < whole for r in staged.info["ranks"])
    (pf_out,) = sampler.execute(staged, pos, pos, latent, 7, 3, 1.0, "euler", "simple", 1.0)
    assert rel_l2(pf_out["samples"], ref["samples"]) <= 1e-4

    client = ext.nodes.pool.MANAGER.client_for(config)
    keys = {x["key"] for x in client.status()["models"]}
    assert keys == {model.key, whole_model.key, staged.key}

    # the model loaded for shard 2 x ulysses 2 serves only those degrees: others get a one-line refusal
    req = {"height": 48, "width": 80, "steps": 1, "seed": 1}
    inputs = {"cond": pos[0][0], "pooled": pos[0][1]["pooled_output"]}
    for degrees in ({"ulysses": 2}, {"shard": 2}):
        with pytest.raises(Exception, match="loaded for shard 2 with degrees ulysses 2 x shard 2") as e:
            client.sample(model.key, req, inputs, parallel=degrees)
        assert "\n" not in str(e.value)
