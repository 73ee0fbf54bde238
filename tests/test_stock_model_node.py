"""Parallel DiT Model's proxy diffusion model without ComfyUI: what it sends the pool for ComfyUI's forward
arguments (timestep conventions, conditioning roles, guidance, parallel degrees) and what it refuses."""
import importlib

import pytest
import torch


class FakeClient:
    def __init__(self):
        self.calls, self.loads = [], []
        self.alive = True

    def load(self, *args):
        self.loads.append(args)
        return {"key": "k"}

    def pool_alive(self):
        return self.alive

    def forward(self, key, x, t, conds, guidance=None, parallel=None, hashes=None, restart=True, timeout=None,
                **more):
        self.calls.append(dict(key=key, x=x, t=t, conds=conds, guidance=guidance, parallel=parallel, hashes=hashes,
                               restart=restart, timeout=timeout, **more))
        return -x


@pytest.fixture
def proxy(ext, monkeypatch):
    stock = ext.nodes.stock_model
    pool = ext.nodes.pool
    client = FakeClient()
    monkeypatch.setattr(stock.MANAGER, "client_for", lambda settings: client)

    def make(variant, **degrees):
        settings = pool.ParallelSettings(device="cpu", **degrees)
        handle = pool.ModelHandle(settings, "/m.safetensors", "fp32", stock.spec(variant).family, variant,
                                  "/m.safetensors|auto|fp32")
        return stock.PoolDiffusionModel(handle, torch.nn.Linear(2, 3, device="meta")), client

    return make, stock


def test_flow_model_sends_sigma_times_1000_and_its_conditioning(proxy):
    make, _ = proxy
    model, client = make("flux-dev", ulysses=2)
    x = torch.randn(2, 16, 4, 6)
    ctx, y = torch.randn(2, 5, 4096), torch.randn(2, 768)
    sigmas = torch.tensor([0.75])  # ComfyUI's per-sample sigmas; the cond + uncond batch repeats them
    out = model(x, torch.tensor([0.75, 0.75]), context=ctx, y=y, guidance=torch.tensor([3.5, 3.5]),
                transformer_options={"sigmas": sigmas})
    assert torch.equal(out, -x) and client.loads == [("/m.safetensors", None, "fp32")]  # as Load Parallel DiT did
    (call,) = client.calls
    assert torch.equal(call["t"], torch.tensor([750.0, 750.0])) and call["guidance"] == 3.5
    assert set(call["conds"]) == {"cond", "pooled"} and torch.equal(call["conds"]["cond"], ctx)
    assert call["parallel"]["ulysses"] == 2
    assert model.in_features == 2  # ComfyUI's BaseModel reads its diffusion model's attributes: the meta model's
    model(x, torch.tensor([0.5, 0.5]), context=ctx, y=y, transformer_options={"sigmas": torch.tensor([0.5])})
    assert len(client.loads) == 1  # the same pool: loaded once


def test_conditioning_hashed_once_per_run_unless_its_values_change(proxy, ext, monkeypatch):
    make, _ = proxy
    model, client = make("sd3.5-large")
    cache_mod = importlib.import_module(ext.__name__ + ".runtime.cond_cache")
    hashed = []
    real = cache_mod.content_hash
    monkeypatch.setattr(cache_mod, "content_hash", lambda t: hashed.append(t.shape) or real(t))
    ctx, y = torch.randn(2, 5, 4096), torch.randn(2, 2048)
    opts = {"sigmas": torch.tensor([0.5]), "sample_sigmas": torch.tensor([1.0, 0.0]), "uuids": ["a", "b"],
            "cond_or_uncond": [0, 1]}

    def step(context):
        model(torch.randn(2, 16, 4, 4), torch.tensor([0.5, 0.5]), context=context, y=y.clone(),
              transformer_options=opts)

    for _ in range(3):  # ComfyUI's fresh copies of the same conds, every step
        step(ctx.clone())
    assert len(hashed) == 2  # cond and pooled, once
    assert all(c["hashes"] == {"cond": real(ctx), "pooled": real(y)} for c in client.calls)
    # and made into their wire form (on a GPU: copied to the host) once: later calls pass the first call's
    assert all(c["conds"][r] is client.calls[0]["conds"][r] for c in client.calls for r in ("cond", "pooled"))
    changed = ctx.clone()
    changed[1, 4, 4095] += 1  # the last value, which the guard samples
    step(changed)
    assert client.calls[-1]["hashes"]["cond"] == real(changed) != real(ctx) and len(hashed) == 3
    assert torch.equal(client.calls[-1]["conds"]["cond"], changed)
    step(changed.to(torch.bfloat16))  # another dtype is another tensor: converted (to fp32) and hashed
    assert client.calls[-1]["conds"]["cond"].dtype == torch.float32 and len(hashed) == 4
    opts["sample_sigmas"] = torch.tensor([1.0, 0.0])  # a new run hashes anew
    step(ctx.clone())
    assert len(hashed) == 6


def test_epsilon_model_sends_comfyuis_discrete_timestep(proxy):
    make, _ = proxy
    model, client = make("pixart-sigma")
    x = torch.randn(1, 4, 8, 8)
    model(x, torch.tensor([917.0]), context=torch.randn(1, 3, 4096), c_size=torch.ones(1, 2),
          transformer_options={"sigmas": torch.tensor([14.6])})
    assert torch.equal(client.calls[0]["t"], torch.tensor([917.0]))


@pytest.mark.parametrize("extra, reason", [
    ({"control": {"output": []}}, "control"), ({"ref_latents": [torch.zeros(1)]}, "ref_latents"),
    ({"guidance": torch.tensor([1.0, 2.0])}, "different Flux guidance"),
    ({"attention_mask": torch.ones(2, 5)}, "attention_mask"),
])
def test_refusals_are_one_line(proxy, extra, reason):
    make, stock = proxy
    model, client = make("flux-dev")
    with pytest.raises(stock.StockModelError, match=reason) as e:
        model(torch.randn(2, 16, 4, 4), torch.tensor([0.5, 0.5]), context=torch.randn(2, 5, 4096),
              y=torch.randn(2, 768), transformer_options={"sigmas": torch.tensor([0.5])}, **extra)
    assert "\n" not in str(e.value) and str(e.value).startswith("Parallel DiT Model: ") and not client.calls


def test_skip_layer_guidance_blocks_go_to_the_pool(proxy):
    """SkipLayerGuidance's block replacements hand their arguments back: the forward names those blocks."""
    make, stock = proxy
    model, client = make("flux-dev", ulysses=2)

    def skip(args, extra_args):  # ComfyUI's SkipLayerGuidanceDiT replacement
        return args

    dit = {("double_block", 3): skip, ("single_block", 7): skip, ("double_block", 1): skip}
    x = torch.randn(2, 16, 4, 4)
    model(x, torch.tensor([0.5, 0.5]), context=torch.randn(2, 5, 4096), y=torch.randn(2, 768),
          transformer_options={"sigmas": torch.tensor([0.5]), "patches_replace": {"dit": dit}})
    model(x, torch.tensor([0.5, 0.5]), context=torch.randn(2, 5, 4096), y=torch.randn(2, 768),
          transformer_options={"sigmas": torch.tensor([0.5])})
    assert client.calls[0]["skip_blocks"] == {"double_block": [1, 3], "single_block": [7]}
    assert "skip_blocks" not in client.calls[1]


@pytest.mark.parametrize("options, reason", [
    ({"patches_replace": {"dit": {("double_block", 3): lambda args, extra: extra["original_block"](args)}}},
     r"patches_replace dit: \('double_block', 3\)"),  # a block wrapper: the pool cannot run it
    ({"patches_replace": {"dit": {("double_block", 3): lambda args, extra: dict(args)}}},
     r"patches_replace dit: \('double_block', 3\)"),  # hands back other arguments
    ({"patches": {"attn1_patch": [lambda q, k, v, extra: (q, k, v)]}}, "patches attn1_patch"),
])
def test_model_patches_are_refused_not_dropped(proxy, options, reason):
    make, stock = proxy
    model, client = make("sd3.5-large")
    args = (torch.randn(2, 16, 4, 4), torch.tensor([0.5, 0.5]))
    kw = dict(context=torch.randn(2, 5, 4096), y=torch.randn(2, 2048))
    sigmas = {"sigmas": torch.tensor([0.5])}
    model(*args, **kw, transformer_options={**sigmas, "patches": {}, "patches_replace": {"dit": {}}})  # empty: fine
    with pytest.raises(stock.StockModelError, match=reason) as e:
        model(*args, **kw, transformer_options={**sigmas, **options})
    assert "\n" not in str(e.value) and "remove that node" in str(e.value) and len(client.calls) == 1


def test_pool_error_is_one_line_and_the_next_call_checks_the_pool_again(proxy, ext):
    make, stock = proxy
    model, client = make("sd3.5-large")
    # the extension's own runtime package, whose errors its pool client raises
    PoolDied = importlib.import_module(ext.__name__ + ".runtime.errors").PoolDied

    def die(*a, **k):
        raise PoolDied("the pool stopped during forward: rank 1 exited with signal 9", "died")

    client.forward = die
    args = (torch.randn(1, 16, 4, 4), torch.tensor([500.0]))
    kw = dict(context=torch.randn(1, 5, 4096), y=torch.randn(1, 2048),
              transformer_options={"sigmas": torch.tensor([0.5])})
    with pytest.raises(stock.StockModelError, match="Parallel DiT Model: the pool stopped during forward"):
        model(*args, **kw)
    del client.forward
    model(*args, **kw)
    assert len(client.loads) == 2  # loaded again on the (restarted) pool


def test_a_pool_that_stops_during_a_run_is_an_error_and_the_next_run_goes_on(proxy, monkeypatch):
    make, stock = proxy
    model, client = make("sd3.5-large")
    run, later = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])  # ComfyUI's sample_sigmas of two runs
    kw = dict(context=torch.randn(1, 5, 4096), y=torch.randn(1, 2048))
    args = (torch.randn(1, 16, 4, 4), torch.tensor([500.0]))
    model(*args, **kw, transformer_options={"sigmas": torch.tensor([0.5]), "sample_sigmas": run})
    model(*args, **kw, transformer_options={"sigmas": torch.tensor([0.45]), "sample_sigmas": run})
    client.alive = False  # a rank died between two forwards of the run
    with pytest.raises(stock.StockModelError, match="worker pool stopped during sampling"):
        model(*args, **kw, transformer_options={"sigmas": torch.tensor([0.4]), "sample_sigmas": run})
    model(*args, **kw, transformer_options={"sigmas": torch.tensor([0.5]), "sample_sigmas": later})
    assert len(client.calls) == 3 and len(client.loads) == 2
    # a run's first call may start the pool again; its later calls may not (a death is then an error)
    assert [c["restart"] for c in client.calls] == [True, False, True]
    # the pool died after the alive check and the manager started another: still this run's error
    monkeypatch.setattr(stock.MANAGER, "client_for", lambda settings: FakeClient())
    with pytest.raises(stock.StockModelError, match="worker pool stopped during sampling"):
        model(*args, **kw, transformer_options={"sigmas": torch.tensor([0.4]), "sample_sigmas": later})


def test_node_refuses_pipefusion_and_non_files(ext):
    stock, pool = ext.nodes.stock_model, ext.nodes.pool
    for settings, source, reason in ((pool.ParallelSettings(pipefusion=2), __file__, "PipeFusion"),
                                     (pool.ParallelSettings(), "/no/such/diffusers-folder", "single-file checkpoint")):
        handle = pool.ModelHandle(settings, source, "fp32", "flux", "flux-dev", "k")
        with pytest.raises(stock.StockModelError, match=reason):
            node = stock.ParallelDiTModel
            getattr(node, node.FUNCTION)(model=handle)  # as ComfyUI's executor calls a V3 node


def test_node_returns_comfyuis_v3_output(ext, monkeypatch):
    """The V3 node's result as ComfyUI's executor reads it (NodeOutput.result: the outputs' tuple); anything but a
    Load Parallel DiT handle is refused."""
    stock, pool = ext.nodes.stock_model, ext.nodes.pool
    handle = pool.ModelHandle(pool.ParallelSettings(), __file__, "fp32", "flux", "flux-dev", "k")
    monkeypatch.setattr(stock, "stock_model", lambda h, cache=None: ("patcher", h, cache))
    node = stock.ParallelDiTModel
    assert getattr(node, node.FUNCTION)(model=handle).result == (("patcher", handle, None),)
    cached = getattr(node, node.FUNCTION)(model=handle, cache="fbcache", cache_threshold=0.3, cache_warmup=2)
    assert cached.result == (("patcher", handle, {"threshold": 0.3, "warmup": 2, "max_consecutive": 0}),)
    spec = node.INPUT_TYPES()
    assert spec["required"] == {"model": ("XDIT_MODEL", {})}
    assert list(spec["optional"]) == ["cache", "cache_threshold", "cache_warmup", "cache_max_consecutive"]
    assert list(node.RETURN_TYPES) == ["MODEL"] and list(node.RETURN_NAMES) == ["model"]
    with pytest.raises(stock.StockModelError, match="Load Parallel DiT"):
        getattr(node, node.FUNCTION)(model="not a handle")


def test_forwards_have_a_deadline(proxy, monkeypatch):
    """Every forward carries a deadline (a frozen rank is then reported, not waited on): 300 s unless
    XDIT_FORWARD_TIMEOUT says otherwise; a value that is not a positive number is one line."""
    make, stock = proxy
    model, client = make("sd3.5-large")
    args = (torch.randn(1, 16, 4, 4), torch.tensor([500.0]))
    kw = dict(context=torch.randn(1, 5, 4096), y=torch.randn(1, 2048),
              transformer_options={"sigmas": torch.tensor([0.5])})
    monkeypatch.delenv(stock.FORWARD_TIMEOUT_ENV, raising=False)
    model(*args, **kw)
    monkeypatch.setenv(stock.FORWARD_TIMEOUT_ENV, "2.5")
    model(*args, **kw)
    assert [c["timeout"] for c in client.calls] == [300.0, 2.5]
    for bad in ("soon", "0", "inf"):
        monkeypatch.setenv(stock.FORWARD_TIMEOUT_ENV, bad)
        with pytest.raises(stock.StockModelError, match="XDIT_FORWARD_TIMEOUT=.* (is not|must be)"):
            model(*args, **kw)
    assert len(client.calls) == 2


def test_step_cache_positions_each_call_in_its_run(proxy):
    """With the step cache on, each forward names its run, its step (the index of its sigma in ComfyUI's schedule)
    and its measured rows (the cond chunk's); a new schedule tensor is a new run; a sigma between two steps, a
    step backwards and SkipLayerGuidance are refused in one line."""
    make, stock = proxy
    model, client = make("sd3.5-large", cfg=2)
    model.cache = {"threshold": 0.2}
    ctx, y = torch.randn(4, 5, 4096), torch.randn(4, 2048)
    schedule = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])

    def call(sigma, cond_or_uncond=(1, 0), run=schedule, **more):
        opts = {"sigmas": torch.tensor([sigma]), "sample_sigmas": run, "cond_or_uncond": list(cond_or_uncond),
                **more}
        model(torch.randn(4, 16, 4, 4), torch.tensor([sigma] * 4), context=ctx, y=y, transformer_options=opts)
        return client.calls[-1]

    first, second = call(1.0), call(0.5)
    assert first["cache"] == {"threshold": 0.2}
    assert first["run"] == {"id": first["run"]["id"], "step": 0, "steps": 4, "measured": [False, False, True, True]}
    assert second["run"]["step"] == 2 and second["run"]["id"] == first["run"]["id"]
    assert call(0.5, (0, 1))["run"]["measured"] == [True, True, False, False]  # a later call of the same step
    with pytest.raises(stock.StockModelError, match="between two steps"):
        call(0.6)
    with pytest.raises(stock.StockModelError, match="went back from step 2 to 1"):
        call(0.75)
    with pytest.raises(stock.StockModelError, match="do not compose"):
        call(0.25, patches_replace={"dit": {("double_block", 1): lambda args, extra: args}})
    other = call(1.0, run=schedule.clone())  # ComfyUI's next run: a new schedule tensor
    assert other["run"]["step"] == 0 and other["run"]["id"] != first["run"]["id"]
    model.cache = None
    plain = call(0.5, run=schedule.clone())  # the context cache still spans the run
    assert "cache" not in plain and set(plain["run"]) == {"id"}
