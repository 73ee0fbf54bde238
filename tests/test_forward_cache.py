"""The step cache across the forwards of a sampling run that ComfyUI drives (Parallel DiT Model): an euler loop of
CFG-batched forward calls (positive row measured) reuses the same steps as the engine's own cached sampling (the
Parallel Sampler's path, serial CFG, positive branch measured) and lands on the same latents, in process and on a
2-rank pool with each exact method (relative L2 <= 1e-5 across processes)."""
import pytest
import torch

from comfyui_xdit.adapters import Conditioning
from comfyui_xdit.cache import CacheSettings
from comfyui_xdit.errors import XDiTError
from comfyui_xdit.forward_cache import RunStep
from comfyui_xdit.models import load_model
from comfyui_xdit.parallel.config import ParallelConfig
from comfyui_xdit.parallel.forward import forward_call, run_cache
from comfyui_xdit.sampling import SampleRequest, finish, prepare, sample
from comfyui_xdit_runtime import Pool
from tests.conftest import rel_l2

STEPS = 8
# thresholds at which the tiny models reuse some steps but not all (checked below)
CASES = {"tiny-sd3": (3.0, 0.8), "tiny-flux": (1.0, 0.8)}  # model: (cfg, threshold)


def _request(model: str, threshold: float | None = None) -> SampleRequest:
    cfg, thr = CASES[model]
    return SampleRequest(height=48, width=80, steps=STEPS, seed=3, cfg=cfg,
                         cache=CacheSettings(threshold=thr if threshold is None else threshold))


def _reference(model: str) -> tuple[torch.Tensor, list[int]]:
    """The engine's cached sampling (serial CFG) and the steps it reused."""
    a = load_model(model).adapter
    reused: list[int] = []
    x = sample(a, _request(model), tiny=True,
               callback=lambda i: reused.append(i.step - 1) if i.reused else None)
    assert 0 < len(reused) < STEPS - 1, reused  # the case exercises both reuse and compute
    return x, reused


def _batched(job) -> tuple[Conditioning, tuple[bool, ...]]:
    """The positive and negative rows in one batch, as ComfyUI batches cond and uncond, and which rows are measured."""
    p, n = job.positive, job.negative
    if n is None:
        return p, (True,)
    cat = (lambda a, b: None if a is None else torch.cat([a, b]))
    return Conditioning(torch.cat([p.cond, n.cond]), cat(p.pooled, n.pooled), cat(p.mask, n.mask), p.guidance), \
        (True, False)


def _euler_loop(model: str, forward, request: SampleRequest | None = None) -> torch.Tensor:
    """The engine's loop, each step one batched forward: `forward(x, t, c, step, measured)`."""
    a = load_model(model).adapter
    job = prepare(a, request or _request(model), True)
    sched, x = job.schedule.scheduler, job.x
    c, measured = _batched(job)
    for i, t in enumerate(job.schedule.timesteps):
        x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        xb = x_in.repeat(len(measured), *([1] * (x.ndim - 1)))
        out = forward(xb, t.reshape(1).float().repeat(len(measured)), c, i, measured)
        pred = out if job.negative is None else job.guide(out[:1], out[1:])
        x = sched.step(pred, t, x, return_dict=False)[0].float()
    return finish(a, job.schedule, x, job.positive)


@pytest.mark.parametrize("model", sorted(CASES))
def test_in_process_run_reuses_what_the_engine_reuses(model):
    ref, reused = _reference(model)
    a = load_model(model).adapter
    rc = run_cache(a, _request(model).cache, STEPS, ParallelConfig())
    got = _euler_loop(model, lambda x, t, c, i, m: forward_call(a, x, t, c, run=(rc, RunStep(i, STEPS, m))))
    assert rc.reused == reused
    assert rel_l2(got, ref) <= 1e-5
    plain = _euler_loop(model, lambda x, t, c, i, m: forward_call(a, x, t, c))  # the cache changes the result
    assert rel_l2(plain, ref) > 1e-3


def test_a_slot_with_another_batch_computes_and_bad_positions_are_refused():
    a = load_model("tiny-flux").adapter
    rc = run_cache(a, CacheSettings(threshold=100.0), 4, ParallelConfig())
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, a.latent_channels, 4, 6, generator=g), a.random_conditioning(2, 5, g)
    t = torch.tensor([900.0, 900.0])
    forward_call(a, x, t, c, run=(rc, RunStep(0, 4, (True, True))))
    forward_call(a, x, t - 100, c, run=(rc, RunStep(1, 4, (True, True))))
    assert rc.reused == [1]
    # step 2 would reuse, but its batch differs from the one slot 0 computed: it computes (and refreshes the slot)
    one = forward_call(a, x[:1], t[:1] - 200, c.select(slice(0, 1)), run=(rc, RunStep(2, 4, (True,))))
    assert rel_l2(one, forward_call(a, x[:1], t[:1] - 200, c.select(slice(0, 1)))) <= 1e-6
    for bad, match in [(RunStep(1, 4, (True,)), "after step 2"), (RunStep(3, 5, (True,)), "5-step run"),
                       (RunStep(4, 4, (True,)), "outside"), (RunStep(3, 4, (True, False)), "flags for a batch")]:
        with pytest.raises(XDiTError, match=match):
            forward_call(a, x[:1], t[:1], c.select(slice(0, 1)), run=(rc, bad))
    with pytest.raises(XDiTError, match="SkipLayerGuidance"):
        forward_call(a, x, t, c, skip={"double_block": [0]}, run=(rc, RunStep(3, 4, (True, True))))
    with pytest.raises(XDiTError, match="first_blocks"):
        run_cache(a, CacheSettings(threshold=1.0, first_blocks=9), 4, ParallelConfig())


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    p = Pool(2, log_path=tmp_path_factory.mktemp("fwdcache") / "p.log")
    p.start()
    c = p.client()
    yield c
    c.close()
    p.stop()


def _pool_loop(client, model: str, degrees: dict, run_id: str, request: SampleRequest | None = None):
    key = client.load_model(model)
    cache = {"threshold": (request or _request(model)).cache.threshold}
    reused, sent = [], {}

    def forward(x, t, c, i, measured):
        conds = {"cond": c.cond, **({"pooled": c.pooled} if c.pooled is not None else {})}
        out, info = client.forward_with_info(key, x, t, conds, guidance=c.guidance, parallel=degrees, cache=cache,
                                             run={"id": run_id, "step": i, "steps": STEPS,
                                                  "measured": list(measured)})
        if info["reused"]:
            reused.append(i)
        for k, v in info.get("comm", {}).items():
            sent[k] = sent.get(k, 0) + v
        return out

    return _euler_loop(model, forward, request), reused, sent


@pytest.mark.parametrize("model, degrees", [
    ("tiny-flux", {"ulysses": 2}), ("tiny-flux", {"ring": 2}), ("tiny-sd3", {"cfg": 2}), ("tiny-sd3", {"dp": 2}),
    ("tiny-flux", {"cfg": 2}), ("tiny-sd3", {"shard": 2}), ("tiny-flux", {"ulysses": 2, "shard": 2})])
def test_pool_run_reuses_what_the_engine_reuses(client, model, degrees):
    """tiny-flux at cfg 2 has one row per call: the other CFG rank runs nothing and only joins the decision."""
    ref, reused = _reference(model)
    got, pool_reused, sent = _pool_loop(client, model, degrees, f"run-{model}-{sorted(degrees.items())}")
    print(f"{model} {degrees}: reused {pool_reused} (engine {reused}), rel L2 {rel_l2(got, ref):.2e}, sent {sent}")
    assert pool_reused == reused
    assert rel_l2(got, ref) <= 1e-5
    kinds = {"ulysses": {"ulysses"}, "ring": {"ring"}, "cfg": {"cfg"}, "dp": {"dp_gather"}, "shard": {"fsdp_gather"}}
    expected = set().union(*(kinds[k] for k in degrees))
    assert expected <= {k for k, v in sent.items() if v > 0}, sent  # the run really ran in parallel


def test_pool_runs_are_kept_apart_by_run_id(client):
    """Runs one after another, each under its id and settings: each starts a cache of its own and reuses what its
    engine run reuses (one cache for both would refuse the second run's step 0 after step 7)."""
    model = "tiny-flux"
    ref, reused = _reference(model)
    never = _request(model, threshold=0.0)
    plain, plain_reused, _ = _pool_loop(client, model, {"ulysses": 2}, "no-reuse", never)
    again, again_reused, _ = _pool_loop(client, model, {"ulysses": 2}, "again")
    assert plain_reused == [] and again_reused == reused and rel_l2(again, ref) <= 1e-5
    assert rel_l2(plain, ref) > 1e-3


def test_context_cache_spans_the_calls_of_a_run():
    """PixArt's caption projection and cross-attention K/V: computed by the run's first call, answered from the
    cache by the later ones (the pool holds the run's conditioning as the same tensors), with the same output."""
    a = load_model("tiny-pixart").adapter
    rc = run_cache(a, None, 0, ParallelConfig())
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, a.latent_channels, 4, 6, generator=g), a.random_conditioning(2, 5, g)
    outs = [forward_call(a, x, torch.tensor([t, t]), c, run=(rc, None)) for t in (900.0, 500.0)]
    assert rc.context.modules > 0 and rc.context.misses == rc.context.modules and rc.context.hits == rc.context.misses
    for t, out in zip((900.0, 500.0), outs):
        assert rel_l2(out, forward_call(a, x, torch.tensor([t, t]), c)) <= 1e-6
    with pytest.raises(XDiTError, match="names its step"):
        forward_call(a, x, torch.tensor([1.0, 1.0]), c, run=(rc, RunStep(0, 4, (True, False))))
