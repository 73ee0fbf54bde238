"""LoRA on the pool's models: formats against a reference that patches the checkpoint's own layout and converts it
with the loader's converter; strength 0, stacking, A -> B -> none restoring the base bit for bit, refusals that
change nothing, the wire, the node, and Ulysses 2 / PipeFusion 2 equal to serial with a LoRA set."""
from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import save_file

from comfyui_xdit import families
from comfyui_xdit.errors import WeightsError
from comfyui_xdit.lora import LoraSpec, apply_loras, applied
from comfyui_xdit.models import load_model
from comfyui_xdit.sampling import sample
from tests import lora_files as lf
from tests.cases import build_request, get_model
from tests.conftest import rel_l2
from tests.distributed import run_cases

# family -> (tiny model, diffusers -> original layout or None, original-layout modules, diffusers-layout modules)
FAMILIES = {
    "qwen-image": ("tiny-qwen-image", None, ("attn.", "mlp", "mod"), ("attn.", "mlp", "mod")),
    "wan": ("tiny-wan", "wan", ("self_attn", "cross_attn", "ffn"), ("attn1", "attn2", "ffn")),
    "flux": ("tiny-flux", "flux", None, ("attn.", "ff", "proj_mlp", "norm1")),  # kohya Flux: Flux.1 sizes only
    # SD3's MMDiT layout: fused qkv (x, context, dual attn2), the last block's context adaLN and the final layer's
    # (scale/shift halves swapped), the embedders
    "sd3": ("tiny-sd3", "sd3", ("attn", "mlp", "adaLN", "embedder", "final_layer"), ("attn", "ff", "norm1")),
}
FORMATS = ("kohya", "comfy", "comfy_peft", "diffusers")


def _to_original(kind):
    if kind == "sd3":
        from tests.test_weights import sd3_to_mmdit

        return sd3_to_mmdit
    if kind == "wan":
        from tests.test_wan import wan_to_original

        return wan_to_original
    from tests.test_weights import flux_to_bfl

    return flux_to_bfl


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _lora(tmp_path, family: str, fmt: str, seed: int, base: dict, alpha=2.0, rank=4):
    """(file, reference weights at strength 1 as a function of strength) for a LoRA of `fmt`."""
    tiny, orig_kind, orig_mods, diff_mods = FAMILIES[family]
    fam = families.get(family)
    if fmt == "diffusers" or orig_mods is None:
        pairs = lf.draw_pairs(base, lf.matrices(base, diff_mods), rank, seed, alpha)
        sd = lf.diffusers(pairs)

        def ref(loras):
            return lf.patched(base, loras)
    else:
        to_orig = _to_original(orig_kind) if orig_kind else None
        orig = to_orig(get_model({"model": tiny}, fresh=True).adapter.model) if to_orig else dict(base)
        pairs = lf.draw_pairs(orig, lf.matrices(orig, orig_mods), rank, seed, alpha)
        sd = {"kohya": lf.kohya, "comfy": lf.comfy, "comfy_peft": lambda p: lf.comfy(p, True)}[fmt](pairs)

        def ref(loras):
            out = lf.patched(orig, loras)
            return fam.convert(out, "ref")[0] if fam.convert is not None and fam.is_original(set(out)) else out
    path = tmp_path / f"{family}_{fmt}_{seed}.safetensors"
    save_file(sd, str(path))
    return str(path), pairs, ref


def _max_err(model, ref: dict) -> float:
    got = model.state_dict()
    return max(rel_l2(got[k], ref[k]) for k in ref)


CASES = [(f, fmt) for f in FAMILIES for fmt in FORMATS if FAMILIES[f][2] is not None or fmt == "diffusers"]


@pytest.mark.parametrize("family,fmt", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_format_matches_the_patched_checkpoint(tmp_path, family, fmt):
    """The engine's patch (diffusers' converter, then up @ down per diffusers parameter) equals patching the
    checkpoint's own layout and converting it as the loader does; then A -> B -> none restores the base exactly."""
    loaded = load_model(FAMILIES[family][0])
    model = loaded.adapter.model
    base = _state(model)
    path_a, pairs_a, ref = _lora(tmp_path, family, fmt, 1, base)
    info = apply_loras(model, family, [LoraSpec(path_a, 0.7)])
    assert info["patched"] > 10 and info["changed"]
    assert _max_err(model, ref([(pairs_a, 0.7)])) <= 1e-6
    assert _max_err(model, base) > 1e-3  # the LoRA moved the weights: the comparison can fail
    path_b, pairs_b, ref_b = _lora(tmp_path, family, fmt, 2, base, alpha=None)
    apply_loras(model, family, [LoraSpec(path_b, 1.3)])
    assert _max_err(model, ref_b([(pairs_b, 1.3)])) <= 1e-6
    apply_loras(model, family, [])
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert applied(model) == ()


def test_strength_zero_and_stacking(tmp_path):
    loaded = load_model("tiny-wan")
    model = loaded.adapter.model
    base = _state(model)
    path_a, pairs_a, ref = _lora(tmp_path, "wan", "kohya", 1, base)
    path_b, pairs_b, _ = _lora(tmp_path, "wan", "comfy", 2, base)
    info = apply_loras(model, "wan", [LoraSpec(path_a, 0.0)])
    assert info["patched"] == 0 and all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    apply_loras(model, "wan", [LoraSpec(path_a, 0.5), LoraSpec(path_b, -0.8)])
    assert _max_err(model, ref([(pairs_a, 0.5), (pairs_b, -0.8)])) <= 1e-6
    assert _max_err(model, ref([(pairs_a, 0.5)])) > 1e-3  # the second one counts
    again = apply_loras(model, "wan", [LoraSpec(path_a, 0.5), LoraSpec(path_b, -0.8)])
    assert not again["changed"]  # the same set: nothing read or patched
    apply_loras(model, "wan", [LoraSpec(path_a, 0.5), LoraSpec(path_b, 0.0)])  # strength 0 = left out
    assert _max_err(model, ref([(pairs_a, 0.5)])) <= 1e-6


def test_mismatched_lora_is_one_line_and_changes_nothing(tmp_path):
    loaded = load_model("tiny-qwen-image")
    model = loaded.adapter.model
    base = _state(model)
    path_a, pairs_a, ref = _lora(tmp_path, "qwen-image", "diffusers", 1, base)
    apply_loras(model, "qwen-image", [LoraSpec(path_a, 1.0)])
    with_a = _state(model)
    wan_base = _state(load_model("tiny-wan").adapter.model)
    wrong_family, _, _ = _lora(tmp_path, "wan", "diffusers", 3, wan_base)
    with pytest.raises(WeightsError) as e:
        apply_loras(model, "qwen-image", [LoraSpec(wrong_family, 1.0)])
    msg = str(e.value)
    assert "\n" not in msg and "wan_diffusers_3.safetensors" in msg and "no parameter blocks.0.attn1.to_k" in msg
    wider = load_model("tiny-qwen-image", num_attention_heads=6).adapter.model  # another width
    wrong_size, _, _ = _lora(tmp_path, "qwen-image", "diffusers", 4, _state(wider))
    with pytest.raises(WeightsError, match=r"qwen-image_diffusers_4\.safetensors does not match the qwen-image "
                                           r"model: transformer_blocks\.0\.attn\.add_k_proj\.weight is \(64, 64\) "
                                           r"in the model but the LoRA's delta is \(96, 96\)"):
        apply_loras(model, "qwen-image", [LoraSpec(path_a, 0.5), LoraSpec(wrong_size, 1.0)])
    assert all(torch.equal(v, with_a[k]) for k, v in model.state_dict().items())  # A still applied, nothing else


def test_refused_files(tmp_path):
    model = load_model("tiny-wan").adapter.model
    lokr = tmp_path / "lokr.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.lokr_w1": torch.zeros(2, 2),
               "lora_unet_blocks_0_self_attn_q.lokr_w2": torch.zeros(2, 2)}, str(lokr))
    with pytest.raises(WeightsError, match=r"^LoRA lokr\.safetensors: LoKr adapters are not supported"):
        apply_loras(model, "wan", [LoraSpec(str(lokr), 1.0)])
    pickle = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, str(pickle))
    with pytest.raises(WeightsError, match="only .safetensors"):
        apply_loras(model, "wan", [LoraSpec(str(pickle), 1.0)])
    with pytest.raises(WeightsError, match="file not found"):
        apply_loras(model, "wan", [LoraSpec(str(tmp_path / "gone.safetensors"), 1.0)])


def test_wire_carries_the_set():
    from runtime import messages

    msg = msgspec.json.encode({"type": "sample", "id": "j1", "key": "k", "loras": [{"path": "/m/a.safetensors",
                                                                                  "strength": 0.5}],
                               "request": {"height": 64, "width": 64, "steps": 2}})
    req = messages.request_decoder.decode(msg)
    assert req.loras == [messages.LoraFields("/m/a.safetensors", 0.5)]
    for bad in ({"path": "/m/a.pt", "strength": 1.0}, {"path": "/m/a.safetensors", "strength": 1e9},
                {"path": "/m/a.safetensors", "weight": 1.0}):
        with pytest.raises(msgspec.ValidationError):
            messages.request_decoder.decode(msg.replace(b'{"path":"/m/a.safetensors","strength":0.5}',
                                                        msgspec.json.encode(bad)))


def test_parallel_lora_node_chains(ext, tmp_path):
    nodes = ext.nodes
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for p in (a, b):
        save_file({"x.lora_A.weight": torch.zeros(1, 1)}, str(p))
    ext.rec.folders["loras"] = [str(a), str(b)]
    cls = nodes.NODE_CLASS_MAPPINGS["XDiTParallelLoRA"]
    assert cls.INPUT_TYPES()["required"]["lora_name"][1]["options"] == ["a.safetensors", "b.safetensors"]
    handle = nodes.pool.ModelHandle(nodes.pool.ParallelSettings(), "m", "fp32", "wan", "wan2.1-t2v-1.3b", "k")
    (one,) = cls.execute(handle, "a.safetensors", 0.5)
    (two,) = cls.execute(one, "b.safetensors", -1.0)
    assert two.loras == ((str(a), 0.5), (str(b), -1.0)) and handle.loras == ()
    assert two.lora_fields() == [{"path": str(a), "strength": 0.5}, {"path": str(b), "strength": -1.0}]
    assert cls.execute(one, "b.safetensors", 0.0)[0] is one
    with pytest.raises(Exception, match="not in ComfyUI's loras folders"):
        cls.execute(handle, "../c.safetensors", 1.0)
    with pytest.raises(Exception, match="must come from Load Parallel DiT"):
        cls.execute(object(), "a.safetensors", 1.0)


# ------------------------------------------------------------------------------------------------ parallel
ODD = dict(height=112, width=144, text_tokens=15)


@pytest.fixture(scope="module")
def lora_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    out = {}
    for family, fmt in (("flux", "diffusers"), ("wan", "kohya")):
        base = _state(get_model({"model": FAMILIES[family][0]}, fresh=True).adapter.model)
        out[family] = [_lora(d, family, fmt, s, base)[0] for s in (1, 2)]
    return out


def _parallel_cases(paths):
    cases = []
    for family, model, size in (("flux", "tiny-flux", ODD), ("wan", "tiny-wan", dict(height=48, width=80,
                                                                                        frames=9, text_tokens=15))):
        loras = [[paths[family][0], 0.8], [paths[family][1], -0.5]]
        for name, par in (("ulysses2", {"ulysses": 2}), ("pf2", {"pipefusion": 2, "num_patches": 2,
                                                                  "warmup_steps": 3})):
            cases.append({"id": f"{family}_{name}", "model": model, "seed": 5, "steps": 3, "parallel": par,
                          "cfg": 3.0 if family == "wan" else 1.0, **size, "loras": loras})
    return cases


@pytest.fixture(scope="module")
def world2(lora_paths, tmp_path_factory):
    return run_cases(2, _parallel_cases(lora_paths), tmp_path_factory.mktemp("lora_world2"))


@pytest.mark.parametrize("index", range(4), ids=["flux_ulysses2", "flux_pf2", "wan_ulysses2", "wan_pf2"])
def test_world2_with_loras_matches_serial(world2, lora_paths, index):
    case = _parallel_cases(lora_paths)[index]
    info = world2[case["id"]]
    assert info["ok"], info.get("error")
    loaded = get_model(case, fresh=True)
    family = loaded.family
    req = build_request(loaded, case)
    plain = sample(loaded.adapter, req, tiny=True)
    apply_loras(loaded.adapter.model, family, [LoraSpec(p, s) for p, s in case["loras"]])
    serial = sample(loaded.adapter, build_request(loaded, case), tiny=True)
    err = rel_l2(info["latents"], serial)
    print(f"{case['id']} with two LoRAs: rel L2 to serial {err:.2e} (LoRA vs none {rel_l2(serial, plain):.2e})")
    assert err <= 1e-4
    assert rel_l2(serial, plain) > 1e-3  # the LoRAs change the result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn], ids=str)
def test_low_precision_weights_upcast_patched_stored_back(tmp_path, dtype):
    """An fp16/bf16/fp8 parameter: base values upcast, patched in float32, stored in its dtype; the restore is
    bit for bit."""
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(16, 8)
    with torch.no_grad():
        model.proj.weight.copy_(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) * 0.3)
    model.proj.weight = torch.nn.Parameter(model.proj.weight.detach().to(dtype), requires_grad=False)
    base = model.proj.weight.detach().clone()
    pairs = lf.draw_pairs({"proj.weight": base.float()}, ["proj"], 2, 1, alpha=1.0)
    path = tmp_path / "l.safetensors"
    save_file(lf.diffusers(pairs), str(path))
    apply_loras(model, "", [LoraSpec(str(path), 2.0)])
    want = lf.patched({"proj.weight": base.float()}, [(pairs, 2.0)])["proj.weight"].to(dtype)
    got = model.proj.weight.detach()
    assert got.dtype == dtype and not torch.equal(got.float(), base.float())
    assert torch.equal(got.float(), want.float()) or rel_l2(got.float(), want.float()) < 1e-2
    apply_loras(model, "", [])
    assert torch.equal(model.proj.weight.detach().view(torch.uint8), base.view(torch.uint8))


def test_kohya_flux_of_another_width_is_refused(tmp_path):
    """diffusers' kohya Flux converter splits linear1 at Flux.1's sizes: a file for a narrower model is refused in
    one line rather than split wrongly."""
    from tests.test_weights import flux_to_bfl

    model = load_model("tiny-flux").adapter.model
    orig = flux_to_bfl(model)
    path = tmp_path / "k.safetensors"
    save_file(lf.kohya(lf.draw_pairs(orig, lf.matrices(orig, ("linear1",)), 2, 1)), str(path))
    with pytest.raises(WeightsError, match=r"^LoRA k\.safetensors: does not fit a flux model \(diffusers' flux LoRA "
                                           r"converter's fixed sizes do not fit this model\)$"):
        apply_loras(model, "flux", [LoraSpec(str(path), 1.0)])


def test_fit_problem_agrees_with_applying(tmp_path, monkeypatch):
    """The queue-time check (the file's header converted on the meta device, the model built there from its config)
    gives the line apply_loras refuses a file with, or None where it applies it; the pairs are read only when
    diffusers' converter fails on shapes alone (then the real conversion decides)."""
    import comfyui_xdit.lora as lora_mod
    from comfyui_xdit.weights import parameter_shapes
    from tests.test_weights import flux_to_bfl

    full_reads = []
    real_read = lora_mod.read_lora
    monkeypatch.setattr(lora_mod, "read_lora", lambda *a: (full_reads.append(a[0]), real_read(*a))[1])
    files = {}
    for family, fmt in (("qwen-image", "kohya"), ("wan", "comfy"), ("wan", "diffusers"), ("flux", "diffusers")):
        base = _state(load_model(FAMILIES[family][0]).adapter.model)
        files[family, fmt] = _lora(tmp_path, family, fmt, 1, base)[0]
    wider = _state(load_model("tiny-qwen-image", num_attention_heads=6).adapter.model)
    files["qwen-image", "wider"] = _lora(tmp_path, "qwen-image", "diffusers", 4, wider)[0]
    files["flux", "kohya"] = str(tmp_path / "k.safetensors")  # kohya Flux at a size diffusers' converter cannot split
    orig = flux_to_bfl(load_model("tiny-flux").adapter.model)
    save_file(lf.kohya(lf.draw_pairs(orig, lf.matrices(orig, ("linear1",)), 2, 1)), files["flux", "kohya"])
    verdicts = set()
    for family in ("qwen-image", "wan", "flux"):
        fam, kw = families.tiny_models()[FAMILIES[family][0]]
        shapes = parameter_shapes(fam, kw, tiny=True)
        model = load_model(FAMILIES[family][0]).adapter.model
        assert shapes == {n: tuple(p.shape) for n, p in model.named_parameters()}
        for (of, fmt), path in files.items():
            full_reads.clear()
            got = lora_mod.fit_problem(path, family, shapes)
            if (of == family and fmt not in ("wider", "kohya")) or (of != family and fmt == "diffusers"):
                assert not full_reads, (family, of, fmt)  # a fit, or a wrong family's diffusers names: shapes only
            try:
                apply_loras(model, family, [LoraSpec(path, 1.0)])
                want = None
            except WeightsError as e:
                want = str(e)
            assert got == want, (family, of, fmt)
            verdicts.add(want is None)
    assert verdicts == {True, False}
    assert "does not match the qwen-image model: transformer_blocks.0.attn.add_k_proj.weight is (64, 64)" in \
        lora_mod.fit_problem(files["qwen-image", "wider"], "qwen-image",
                             parameter_shapes(*families.tiny_models()["tiny-qwen-image"], tiny=True))


def test_queue_time_checks_through_parallel_lora(ext, rec, tmp_path):
    """On POST /prompt: the sampler's checks still reach the Load node through a chain of Parallel LoRA nodes, and
    a LoRA file that is not one the pool applies (LoKr, no pairs) is refused on its node, once."""
    from tests.test_nodes import _graph, _queue

    lokr, plain = (tmp_path / n for n in ("lokr.safetensors", "plain.safetensors"))
    good = Path(_lora(tmp_path, "flux", "diffusers", 1, _state(load_model("tiny-flux").adapter.model))[0])
    good = good.rename(good.with_name("good.safetensors"))
    wan = Path(_lora(tmp_path, "wan", "diffusers", 1, _state(load_model("tiny-wan").adapter.model))[0])
    save_file({"lora_unet_x.lokr_w1": torch.zeros(2, 2)}, str(lokr))
    save_file({"x.weight": torch.zeros(2, 2)}, str(plain))
    rec.folders["loras"] = [str(good), str(lokr), str(plain), str(wan)]

    def graph(names, **kw):
        g = _graph(**kw)
        prev = "6"
        for i, name in enumerate(names):
            g[f"9{i}"] = {"class_type": "XDiTParallelLoRA", "inputs": {"model": [prev, 0], "lora_name": name,
                                                                      "strength_model": 1.0}}
            prev = f"9{i}"
        g["8"]["inputs"]["model"] = [prev, 0]
        return g

    assert _queue(ext, rec, graph(["good.safetensors", "good.safetensors"])) == {}
    errors = _queue(ext, rec, graph(["good.safetensors", "good.safetensors"], config={"cfg_degree": 2}))
    assert list(errors) == ["8"] and "cfg_degree 2 runs" in errors["8"][0]  # the sampler, through 2 LoRAs
    errors = _queue(ext, rec, graph(["good.safetensors", "lokr.safetensors", "plain.safetensors"]))
    assert sorted(errors) == ["91", "92"] and all(len(v) == 1 for v in errors.values())
    assert "LoRA lokr.safetensors: LoKr adapters are not supported" in errors["91"][0]
    assert "LoRA plain.safetensors: no LoRA pairs in the file (first key: x.weight)" in errors["92"][0]
    errors = _queue(ext, rec, graph(["good.safetensors", wan.name]))  # another family's LoRA: the pool's line
    assert list(errors) == ["91"] and len(errors["91"]) == 1
    assert f"LoRA {wan.name} does not match the flux model: no parameter blocks.0.attn1.to_k.weight" in errors["91"][0]
    assert "90" not in _queue(ext, rec, graph([wan.name], checkpoint="tiny-wan"))  # on a Wan model it fits


@pytest.mark.parametrize("fmt", ["kohya", "comfy"])
def test_sd3_original_layout_checked_at_queue_time_as_applied(tmp_path, monkeypatch, fmt):
    """SD3's kohya and ComfyUI files on the queue-time check (header only, meta shapes): they fit without the pairs
    being read, and one drawn on a 3-block model (whose block 1 context MLP the 2-block model's last block lacks)
    is refused with the line apply_loras refuses it with, changing nothing."""
    import comfyui_xdit.lora as lora_mod
    from comfyui_xdit.weights import parameter_shapes
    from tests.test_weights import sd3_to_mmdit

    full_reads = []
    real_read = lora_mod.read_lora
    monkeypatch.setattr(lora_mod, "read_lora", lambda *a: (full_reads.append(a[0]), real_read(*a))[1])
    model = load_model("tiny-sd3").adapter.model
    base = _state(model)
    shapes = parameter_shapes(*families.tiny_models()["tiny-sd3"], tiny=True)
    path, _, _ = _lora(tmp_path, "sd3", fmt, 1, base)
    assert lora_mod.fit_problem(path, "sd3", shapes) is None and not full_reads
    deeper = sd3_to_mmdit(load_model("tiny-sd3", num_layers=3).adapter.model)
    other = tmp_path / f"deeper_{fmt}.safetensors"
    writer = lf.kohya if fmt == "kohya" else lf.comfy
    save_file(writer(lf.draw_pairs(deeper, lf.matrices(deeper, ("joint_blocks.1.context_block.mlp",)), 2, 1)),
              str(other))
    got = lora_mod.fit_problem(str(other), "sd3", shapes)
    with pytest.raises(WeightsError) as e:
        apply_loras(model, "sd3", [LoraSpec(str(other), 1.0)])
    name = "joint_blocks.1.context_block.mlp.fc1"
    name = "lora_unet_" + name.replace(".", "_") if fmt == "kohya" else name
    assert got == str(e.value) and "\n" not in got and f"no parameter {name}.weight" in got, got
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("tiny", ["tiny-sd3", "tiny-pixart", "tiny-z-image", "tiny-flux2"])
def test_other_families_take_diffusers_loras(tmp_path, tiny):
    loaded = load_model(tiny)
    model = loaded.adapter.model
    base = _state(model)
    pairs = lf.draw_pairs(base, lf.matrices(base, ("attn", "attention", "ff", "feed_forward"))[:20], 2, 1, 1.0)
    path = tmp_path / "l.safetensors"
    save_file(lf.diffusers(pairs), str(path))
    assert apply_loras(model, loaded.family, [LoraSpec(str(path), 0.5)])["patched"] > 5
    assert _max_err(model, lf.patched(base, [(pairs, 0.5)])) <= 1e-6 and _max_err(model, base) > 1e-3


def test_wan_bias_deltas_and_dropped_diffs(tmp_path):
    """LightX2V-style Wan files: a `diff_b` bias delta is added (times the strength, as ComfyUI does); a nonzero
    full-weight `diff`, which diffusers' converter leaves out, refuses the file instead of applying part of it."""
    from tests.test_wan import wan_to_original

    loaded = load_model("tiny-wan")
    model = loaded.adapter.model
    base = _state(model)
    orig = wan_to_original(model)
    pairs = lf.draw_pairs(orig, lf.matrices(orig, ("self_attn",)), 2, 1)
    sd = lf.comfy(pairs)
    bias = torch.randn(orig["blocks.0.self_attn.q.bias"].shape, generator=torch.Generator().manual_seed(2))
    sd["diffusion_model.blocks.0.self_attn.q.diff_b"] = bias
    path = tmp_path / "lightx2v.safetensors"
    save_file(sd, str(path))
    apply_loras(model, "wan", [LoraSpec(str(path), 0.5)])
    patched_bias = model.state_dict()["blocks.0.attn1.to_q.bias"].clone()
    assert torch.allclose(patched_bias, base["blocks.0.attn1.to_q.bias"] + 0.5 * bias, atol=1e-6)
    apply_loras(model, "wan", [])
    sd["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(orig["blocks.0.norm3.weight"].shape)  # zeroed: no effect
    save_file(sd, str(path))
    apply_loras(model, "wan", [LoraSpec(str(path), 0.5)])
    assert torch.equal(model.state_dict()["blocks.0.attn1.to_q.bias"], patched_bias)
    apply_loras(model, "wan", [])
    sd["diffusion_model.blocks.0.norm3.diff"] = torch.ones(orig["blocks.0.norm3.weight"].shape)
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"^LoRA lightx2v\.safetensors: has keys diffusers' wan LoRA conversion "
                                           r"drops"):
        apply_loras(model, "wan", [LoraSpec(str(path), 0.5)])
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
