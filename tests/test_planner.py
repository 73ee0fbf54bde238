"""The auto-layout planner (comfyui_xdit/planner.py) on meta-device builds of published sizes: it never picks a
layout the engine refuses or one that does not fit the cards, picks cfg parallel only with true CFG, shards or
stores fp8 where the weights do not fit, and refuses in one line naming what would fit."""
import itertools

import pytest

from comfyui_xdit import planner as P
from comfyui_xdit.memory_estimate import OVERHEAD_GIB, memory_table
from comfyui_xdit.parallel import ParallelConfig

SPECS = ["1x24GB", "2x24GB,pcie", "4x24GB", "4x48GB", "2x80GB,nvlink", "4xH100", "8x80GB", "8xA100"]


@pytest.fixture(scope="module")
def facts():
    return {m: P.model_facts(m) for m in ("flux-dev", "qwen-image", "flux2-dev", "z-image-turbo",
                                          "wan2.2-t2v-a14b")}


JOBS = {"flux-dev": P.Job(1024, 1024, steps=28), "qwen-image": P.Job(1328, 1328, cfg=4.0, steps=50),
        "flux2-dev": P.Job(1024, 1024, steps=50), "z-image-turbo": P.Job(1024, 1024, steps=9),
        "wan2.2-t2v-a14b": P.Job(480, 832, frames=81, cfg=5.0, steps=40)}


def test_parse_gpus():
    g = P.parse_gpus("4x24GB,pcie")
    assert (g.count, g.memory_gib, g.link, g.kind.name) == (4, 24, "pcie", "4090")
    assert P.parse_gpus("8xH100").link == "nvlink" and P.parse_gpus("8xH100,pcie").link == "pcie"
    assert P.parse_gpus("2x80GB").kind.name == "H100" and P.parse_gpus("4x48GB").link == "pcie"
    assert P.parse_gpus("8xA100-40GB").memory_gib == 40
    assert P.parse_gpus("2xcpu").kind.name == "CPU"
    for bad in ("4", "x24GB", "4xfoo", "0x24GB", "4x24GB,infiniband"):
        with pytest.raises(P.ConfigError, match="--gpus"):
            P.parse_gpus(bad)


def test_flops_match_the_flop_counter(facts):
    # torch's FlopCounterMode on a meta forward of FluxTransformer2DModel at 1024px counts 74.38 TFLOP (this
    # module's author ran it once; docs/gpu figures: ~74 TFLOP); the analytic count must agree within 1%
    mm, attn = P.step_flops(facts["flux-dev"], 1024, 1024)
    assert (mm + attn) == pytest.approx(74.38e12, rel=0.01)
    assert attn == pytest.approx(4 * 4608**2 * 3072 * 57, rel=1e-6)


@pytest.mark.parametrize("model", list(JOBS))
def test_choice_is_valid_and_fits(facts, model):
    f = facts[model]
    for spec, cfg in itertools.product(SPECS, (1.0, 4.0)):
        job = P.Job(**{**JOBS[model].__dict__, "cfg": cfg})
        p = P.plan(f, spec, job)
        g = P.parse_gpus(spec)
        c = p.choice
        line = p.reason()
        assert "\n" not in line and line.startswith("auto: ")
        for o in p.options:  # every listed option is one the engine accepts, with product = the GPU count
            assert P.valid(f, o.config, job) is None
            assert o.config.world_size == g.count
            assert o.fits == (o.memory / 2**30 + OVERHEAD_GIB <= g.memory_gib)
        if c is None:
            assert "nothing fits" in line or "approximate" in line
            assert not any(o.fits and o.exact for o in p.options)
            continue
        assert c.fits and c.exact and P.valid(f, c.config, job) is None
        assert f.heads % c.config.ulysses == 0
        if cfg == 1.0 or not f.adapter.spec.cond.negative:
            assert c.config.cfg == 1 and all(o.config.cfg == 1 for o in p.options)
        if c.storage == "fp8":  # fp8 only when no bf16 layout fits
            assert not any(o.fits and o.storage == "bf16" and o.exact for o in p.options)
        if f.experts > 1:
            assert all(o.config.pipefusion == 1 for o in p.options)
        assert c.layout() in line and f"{c.memory / 2**30:.1f} GiB" in line


def test_flux2_on_four_24gb_cards_shards_or_fp8(facts):
    p = P.plan(facts["flux2-dev"], "4x24GB,pcie", JOBS["flux2-dev"])
    c = p.choice
    assert c is not None and (c.config.shard > 1 or c.storage == "fp8")
    assert c.memory / 2**30 + OVERHEAD_GIB <= 24
    # without sharding or fp8, no exact layout of FLUX.2 fits 24 GB
    assert not any(o.fits and o.exact and o.config.shard == 1 and o.storage == "bf16" for o in p.options)


def test_refusal_names_what_would_fit(facts):
    line = P.plan(facts["flux2-dev"], "1x24GB", JOBS["flux2-dev"]).reason()
    assert "\n" not in line
    assert "needs 64 GB of weights" in line and "nothing fits 1 x 24 GB" in line
    assert "2 x 24 GB fit with" in line and "4 x 24 GB fit with" in line
    line = P.plan(facts["qwen-image"], "1x16GB", JOBS["qwen-image"]).reason()
    assert "needs 41 GB of weights" in line and "x 16 GB fit with" in line


def test_cfg_parallel_only_with_true_cfg(facts):
    f = facts["qwen-image"]
    on = P.plan(f, "2xH100", P.Job(1328, 1328, cfg=4.0)).choice
    off = P.plan(f, "2xH100", P.Job(1328, 1328, cfg=1.0)).choice
    assert on.config.cfg == 2  # two branches on two halves: no communication inside a forward
    assert off.config.cfg == 1
    flux2 = P.plan(facts["flux2-dev"], "2xH100", P.Job(1024, 1024, cfg=4.0))  # no negative prompt: never cfg
    assert all(o.config.cfg == 1 for o in flux2.options)
    assert any("cfg parallel is not available" in why for _, why in flux2.refused)


def test_heads_and_dp_rules(facts):
    z = P.plan(facts["z-image-turbo"], "4xH100", JOBS["z-image-turbo"])  # 30 heads: no Ulysses 4
    assert all(o.config.ulysses in (1, 2) for o in z.options)
    assert any("not divisible by the Ulysses degree 4" in why for _, why in z.refused)
    one = P.plan(facts["flux-dev"], "2xH100", P.Job(1024, 1024, batch=1))
    assert all(o.config.dp == 1 for o in one.options)
    two = P.plan(facts["flux-dev"], "2xH100", P.Job(1024, 1024, batch=2))
    assert any(o.config.dp == 2 for o in two.options)


def test_memory_matches_the_memory_table(facts):
    f = facts["qwen-image"]
    rows = {(r.method, r.degree): r for r in memory_table(f.adapter, "1328", degrees=(1, 2, 4))}
    job = P.Job(1328, 1328, cfg=4.0)
    for d in (2, 4):
        w, act = P.memory(f, ParallelConfig(ulysses=d), job, "bf16")
        assert (w, act) == (rows[("usp", d)].weights, rows[("usp", d)].activations)
        w, _ = P.memory(f, ParallelConfig(ulysses=d, shard=d), job, "bf16")
        assert w == rows[("fsdp x usp", d)].weights
        w, act = P.memory(f, ParallelConfig(pipefusion=d, num_patches=d), job, "bf16")
        assert (w, act) == (rows[("pipefusion", d)].weights, rows[("pipefusion", d)].activations)
    fp8 = {(r.method, r.degree): r for r in memory_table(f.adapter, "1328", degrees=(2,), storage="fp8")}
    assert P.memory(f, ParallelConfig(ring=2), job, "fp8") == (fp8[("usp", 2)].weights, fp8[("usp", 2)].activations)


def test_predicted_time_falls_with_ranks_and_links(facts):
    f, job = facts["flux-dev"], JOBS["flux-dev"]
    one = P.step_seconds(f, ParallelConfig(), job, P.parse_gpus("1xH100"))[0]
    four = P.step_seconds(f, ParallelConfig(ulysses=4), job, P.parse_gpus("4xH100"))[0]
    pcie = P.step_seconds(f, ParallelConfig(ulysses=4), job, P.parse_gpus("4xH100,pcie"))[0]
    assert one / 4 < four < one / 2 and four < pcie
    # shard alone computes the whole step on every rank and gathers every block
    assert P.step_seconds(f, ParallelConfig(shard=4), job, P.parse_gpus("4xH100"))[0] > one


def test_rank_checks():
    assert P.check_ranks(4, "cuda", gpus_seen=2) == "4 ranks but 2 GPUs: one rank per GPU (lower the degrees or " \
        "add GPUs)"
    assert P.check_ranks(2, "cuda", gpus_seen=2) is None
    assert P.check_ranks(4, "cpu", cores=2).startswith("warning: 4 CPU ranks on 2 cores")
    assert P.check_ranks(2, "cpu", cores=2) is None


def test_format_plan(facts):
    text = P.format_plan(P.plan(facts["flux-dev"], "4xH100", JOBS["flux-dev"]), top=5)
    lines = text.splitlines()
    assert "s/step" in lines[1] and lines[-1].startswith("auto: ") and len(lines) == 2 + 5 + 2


def test_plan_cli(capsys):
    from comfyui_xdit.cli import main

    assert main(["plan", "--model", "qwen-image", "--gpus", "4x24GB,pcie", "--size", "1328x1328", "--cfg", "4",
                 "--top", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("qwen-image: 1328x1328, batch 1, cfg 4 on 4 x 24 GB 4090 over pcie")
    assert out[-1].startswith("auto: ") and "GiB per rank" in out[-1]
    rows = out[2:6]
    assert all(r.split()[0].isdigit() and r.rstrip().split()[-2] in ("yes", "no") for r in rows[:1])
    assert main(["plan", "--model", "flux2-dev", "--gpus", "1x24GB", "--size", "1024"]) == 1  # nothing fits
    assert "needs 64 GB of weights" in capsys.readouterr().out
    assert main(["plan", "--model", "flux-dev", "--gpus", "4xTPU", "--size", "1024"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --gpus '4xTPU': unknown kind")


def test_cpu_ranks_beyond_cores_take_turns():
    f = P.model_facts("bench-flux")
    job = P.Job(256, 256, cfg=3.0, text_tokens=16)
    c = ParallelConfig(ulysses=2, cfg=2)
    on4 = P.step_seconds(f, c, job, P.GPUs(4, P.KINDS["CPU"], 64, "gloo", cores=4))[0]
    on2 = P.step_seconds(f, c, job, P.GPUs(4, P.KINDS["CPU"], 64, "gloo", cores=2))[0]
    assert on2 > 1.5 * on4
    assert P.step_flops(f, 256, 256, text=16)[0] < P.step_flops(f, 256, 256, text=512)[0]
