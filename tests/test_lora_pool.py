"""LoRA sets through a real 2-rank CPU/gloo pool: each job's set patched on every rank (PipeFusion stages after
they dropped the other stage's blocks), swapped between jobs without a reload, a LoRA that does not fit refused in
one line with the pool and the model left as they were."""
import pytest
import torch
from safetensors.torch import save_file

from comfyui_xdit.lora import LoraSpec, apply_loras
from comfyui_xdit.models import load_model
from comfyui_xdit.sampling import SampleRequest, sample
from comfyui_xdit_runtime import Pool, PoolError
from tests import lora_files as lf
from tests.conftest import forward_inputs, rel_l2

REQ = {"height": 128, "width": 112, "steps": 3, "seed": 3}  # 8 x 7 tokens
PIPE = {"pipefusion": 2, "num_patches": 2, "warmup_steps": 3}  # every step synchronous: exact


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool_loras")
    flux = {k: v.clone() for k, v in load_model("tiny-flux").adapter.model.state_dict().items()}
    wan = load_model("tiny-wan").adapter.model.state_dict()
    out = {}
    for name, sd, mods, seed in (("a", flux, ("attn.", "ff."), 1), ("b", flux, ("proj_mlp", "proj_out", "norm1"), 2),
                                 ("wan", wan, ("attn1",), 3)):
        out[name] = str(d / f"{name}.safetensors")
        save_file(lf.diffusers(lf.draw_pairs(sd, lf.matrices(sd, mods), 4, seed, 2.0)), out[name])
    return out


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    p = Pool(2, log_path=tmp_path_factory.mktemp("lora_pool") / "pool.log", heartbeat=1.0)
    p.start()
    c = p.client()
    yield c
    c.close()
    p.stop()


def _reference(specs: list[LoraSpec]) -> torch.Tensor:
    loaded = load_model("tiny-flux")
    apply_loras(loaded.adapter.model, loaded.family, specs)
    return sample(loaded.adapter, SampleRequest(**REQ), tiny=True)


@pytest.mark.parametrize("parallel", [{"ulysses": 2}, PIPE, {"ulysses": 2, "shard": 2}],
                         ids=["ulysses2", "pipefusion2", "shard2xulysses2"])
def test_sets_swap_between_jobs(client, loras, parallel):
    key = client.load("tiny-flux")["key"]
    base = client.sample(key, REQ, parallel=parallel)  # under PipeFusion: each rank now holds one stage
    assert rel_l2(base, _reference([])) <= 1e-5
    runs = [([LoraSpec(loras["a"], 0.8)], "A"), ([LoraSpec(loras["b"], -0.7), LoraSpec(loras["a"], 0.3)], "B+A"),
            ([], "none")]
    for specs, name in runs:
        out, info = client.sample_with_info(key, REQ, parallel=parallel,
                                            loras=[{"path": s.path, "strength": s.strength} for s in specs])
        ref = _reference(specs)
        err = rel_l2(out, ref)
        print(f"pool {parallel}: {name} rel L2 {err:.2e}, lora {info.get('lora_seconds')} s")
        assert err <= 1e-5, name
        if specs:
            assert rel_l2(out, base) > 1e-3 and info["lora_patched"] > 0 and len(info["lora_key"]) == 16
    assert torch.equal(out, base)  # none: the base weights, bit for bit
    models = {m["key"]: m for m in client.status()["models"]}
    assert models[key]["loras"] == [] and models[key]["lora_key"] == ""


def test_mismatch_is_one_line_and_the_pool_stays(client, loras):
    key = client.load("tiny-flux")["key"]
    with_a = client.sample(key, REQ, parallel=PIPE, loras=[{"path": loras["a"], "strength": 1.0}])
    with pytest.raises(PoolError) as e:
        client.sample(key, REQ, parallel=PIPE, loras=[{"path": loras["a"], "strength": 1.0},
                                                                {"path": loras["wan"], "strength": 1.0}])
    assert e.value.kind == "invalid" and "\n" not in str(e.value)
    assert "LoRA wan.safetensors does not match the flux model: no parameter blocks.0.attn1.to_k.weight" in str(e.value)
    again = client.sample(key, REQ, parallel=PIPE, loras=[{"path": loras["a"], "strength": 1.0}])
    assert torch.equal(again, with_a)
    with pytest.raises(PoolError, match="bad sample request"):
        client.sample(key, REQ, loras=[{"path": "/etc/passwd", "strength": 1.0}])


def test_forward_after_a_lora_job_runs_on_the_base_weights(client, loras):
    """The stock-sampler forward op carries no LoRA set: a set an earlier sample job patched in must not leak into
    it (the pool restores the base weights first). And a model a PipeFusion job cut down to one stage per rank is
    whole again for a later Ulysses job or forward (the pool reloads it)."""
    key = client.load("tiny-flux")["key"]
    loaded = load_model("tiny-flux")
    a = loaded.adapter
    x, t, c, conds = forward_inputs(a, 4)
    with torch.no_grad():
        base = a.predict(x, t, c).float()
        apply_loras(a.model, loaded.family, [LoraSpec(loras["a"], 0.8)])
        patched = a.predict(x, t, c).float()
    assert rel_l2(patched, base) > 1e-3  # the LoRA changes the forward: the check below can fail
    client.sample(key, REQ, parallel=PIPE)  # each rank now holds one stage; the jobs below need the whole model
    out = client.sample(key, REQ, parallel={"ulysses": 2}, loras=[{"path": loras["a"], "strength": 0.8}])
    assert rel_l2(out, _reference([LoraSpec(loras["a"], 0.8)])) <= 1e-5
    client.sample(key, REQ, parallel=PIPE)
    out = client.forward(key, x, t, conds, parallel={"ulysses": 2})
    assert rel_l2(out, base) <= 1e-5
