"""Weight loading: diffusers folders, original-layout single files (Flux/SD3/PixArt), fp8, errors.

Small diffusers models are written back into the original checkpoint layouts by the inverse key mappings below,
then loaded with `load_transformer`; the result must equal the source model exactly.
"""
from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from comfyui_xdit.errors import WeightsError  # noqa: E402
from comfyui_xdit.weights import LoadedTransformer, detect_family, load_transformer  # noqa: E402

FP8 = torch.float8_e4m3fn


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-zero values everywhere (diffusers zero-inits some layers), so every key mapping is checked."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) if p.ndim > 1 else 1 + 0.1 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


def make_flux(guidance: bool = True) -> FluxTransformer2DModel:
    return _randomize(FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6)), 1)


def make_sd3(sd35: bool = True) -> SD3Transformer2DModel:
    # SD3 without q/k-norm follows the MMDiT convention that ComfyUI also assumes: 64-wide heads, one per block
    heads = dict(qk_norm="rms_norm", dual_attention_layers=(0,), attention_head_dim=16, num_attention_heads=4,
                 caption_projection_dim=64) if sd35 else dict(attention_head_dim=64, num_attention_heads=2,
                                                              caption_projection_dim=128)
    return _randomize(SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, joint_attention_dim=4096,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=24, **heads), 2)


def make_pixart(alpha: bool = False) -> PixArtTransformer2DModel:
    head_dim = 12 if alpha else 8  # with micro-conditions diffusers needs a width divisible by 3
    return _randomize(PixArtTransformer2DModel(
        sample_size=32, num_layers=2, attention_head_dim=head_dim, num_attention_heads=4, in_channels=4,
        out_channels=8, caption_channels=4096, cross_attention_dim=4 * head_dim, use_additional_conditions=alpha,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1), 3)


# ---------------------------------------------------------------------------------------------------------------
# diffusers -> original layouts (inverse of the conversions under test)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2)
    return torch.cat([b, a])


def _take(sd: dict, *keys: str) -> torch.Tensor:
    return torch.cat([sd.pop(k) for k in keys])


def flux_to_bfl(model) -> dict:
    sd = dict(model.state_dict())
    out = {}
    top = {"time_text_embed.timestep_embedder": "time_in", "time_text_embed.text_embedder": "vector_in",
           "time_text_embed.guidance_embedder": "guidance_in"}
    for src, dst in top.items():
        for kind in ("weight", "bias"):
            if f"{src}.linear_1.{kind}" in sd:
                out[f"{dst}.in_layer.{kind}"] = sd.pop(f"{src}.linear_1.{kind}")
                out[f"{dst}.out_layer.{kind}"] = sd.pop(f"{src}.linear_2.{kind}")
    for kind in ("weight", "bias"):
        out[f"txt_in.{kind}"] = sd.pop(f"context_embedder.{kind}")
        out[f"img_in.{kind}"] = sd.pop(f"x_embedder.{kind}")
        out[f"final_layer.linear.{kind}"] = sd.pop(f"proj_out.{kind}")
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(sd.pop(f"norm_out.linear.{kind}"))
    for i in range(model.config.num_layers):
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{d}img_mod.lin.{kind}"] = sd.pop(f"{s}norm1.linear.{kind}")
            out[f"{d}txt_mod.lin.{kind}"] = sd.pop(f"{s}norm1_context.linear.{kind}")
            out[f"{d}img_attn.qkv.{kind}"] = _take(sd, *(f"{s}attn.to_{x}.{kind}" for x in "qkv"))
            out[f"{d}txt_attn.qkv.{kind}"] = _take(sd, *(f"{s}attn.add_{x}_proj.{kind}" for x in "qkv"))
            out[f"{d}img_attn.proj.{kind}"] = sd.pop(f"{s}attn.to_out.0.{kind}")
            out[f"{d}txt_attn.proj.{kind}"] = sd.pop(f"{s}attn.to_add_out.{kind}")
            for j in ("0", "2"):
                sfx = ".proj" if j == "0" else ""
                out[f"{d}img_mlp.{j}.{kind}"] = sd.pop(f"{s}ff.net.{j}{sfx}.{kind}")
                out[f"{d}txt_mlp.{j}.{kind}"] = sd.pop(f"{s}ff_context.net.{j}{sfx}.{kind}")
        out[f"{d}img_attn.norm.query_norm.scale"] = sd.pop(f"{s}attn.norm_q.weight")
        out[f"{d}img_attn.norm.key_norm.scale"] = sd.pop(f"{s}attn.norm_k.weight")
        out[f"{d}txt_attn.norm.query_norm.scale"] = sd.pop(f"{s}attn.norm_added_q.weight")
        out[f"{d}txt_attn.norm.key_norm.scale"] = sd.pop(f"{s}attn.norm_added_k.weight")
    for i in range(model.config.num_single_layers):
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{d}modulation.lin.{kind}"] = sd.pop(f"{s}norm.linear.{kind}")
            out[f"{d}linear1.{kind}"] = _take(sd, *(f"{s}attn.to_{x}.{kind}" for x in "qkv"), f"{s}proj_mlp.{kind}")
            out[f"{d}linear2.{kind}"] = sd.pop(f"{s}proj_out.{kind}")
        out[f"{d}norm.query_norm.scale"] = sd.pop(f"{s}attn.norm_q.weight")
        out[f"{d}norm.key_norm.scale"] = sd.pop(f"{s}attn.norm_k.weight")
    assert not sd, f"unmapped: {sorted(sd)[:5]}"
    return out


def sd3_to_mmdit(model) -> dict:
    sd = dict(model.state_dict())
    out = {"pos_embed": sd.pop("pos_embed.pos_embed")}
    for kind in ("weight", "bias"):
        out[f"x_embedder.proj.{kind}"] = sd.pop(f"pos_embed.proj.{kind}")
        out[f"context_embedder.{kind}"] = sd.pop(f"context_embedder.{kind}")
        for j, n in (("0", "1"), ("2", "2")):
            out[f"t_embedder.mlp.{j}.{kind}"] = sd.pop(f"time_text_embed.timestep_embedder.linear_{n}.{kind}")
            out[f"y_embedder.mlp.{j}.{kind}"] = sd.pop(f"time_text_embed.text_embedder.linear_{n}.{kind}")
        out[f"final_layer.linear.{kind}"] = sd.pop(f"proj_out.{kind}")
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(sd.pop(f"norm_out.linear.{kind}"))
    n = model.config.num_layers
    for i in range(n):
        s, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == n - 1
        for kind in ("weight", "bias"):
            out[f"{x}attn.qkv.{kind}"] = _take(sd, *(f"{s}attn.to_{q}.{kind}" for q in "qkv"))
            out[f"{c}attn.qkv.{kind}"] = _take(sd, *(f"{s}attn.add_{q}_proj.{kind}" for q in "qkv"))
            out[f"{x}attn.proj.{kind}"] = sd.pop(f"{s}attn.to_out.0.{kind}")
            out[f"{x}adaLN_modulation.1.{kind}"] = sd.pop(f"{s}norm1.linear.{kind}")
            ctx_mod = sd.pop(f"{s}norm1_context.linear.{kind}")
            out[f"{c}adaLN_modulation.1.{kind}"] = _swap_halves(ctx_mod) if last else ctx_mod
            out[f"{x}mlp.fc1.{kind}"] = sd.pop(f"{s}ff.net.0.proj.{kind}")
            out[f"{x}mlp.fc2.{kind}"] = sd.pop(f"{s}ff.net.2.{kind}")
            if not last:
                out[f"{c}attn.proj.{kind}"] = sd.pop(f"{s}attn.to_add_out.{kind}")
                out[f"{c}mlp.fc1.{kind}"] = sd.pop(f"{s}ff_context.net.0.proj.{kind}")
                out[f"{c}mlp.fc2.{kind}"] = sd.pop(f"{s}ff_context.net.2.{kind}")
            if f"{s}attn2.to_q.{kind}" in sd:
                out[f"{x}attn2.qkv.{kind}"] = _take(sd, *(f"{s}attn2.to_{q}.{kind}" for q in "qkv"))
                out[f"{x}attn2.proj.{kind}"] = sd.pop(f"{s}attn2.to_out.0.{kind}")
        for a, src in (("attn", "attn"), ("attn2", "attn2")):
            if f"{s}{src}.norm_q.weight" in sd:
                out[f"{x}{a}.ln_q.weight"] = sd.pop(f"{s}{src}.norm_q.weight")
                out[f"{x}{a}.ln_k.weight"] = sd.pop(f"{s}{src}.norm_k.weight")
        if f"{s}attn.norm_added_q.weight" in sd:
            out[f"{c}attn.ln_q.weight"] = sd.pop(f"{s}attn.norm_added_q.weight")
            out[f"{c}attn.ln_k.weight"] = sd.pop(f"{s}attn.norm_added_k.weight")
    assert not sd, f"unmapped: {sorted(sd)[:5]}"
    return out


def pixart_to_original(model, caption_tokens: int = 300) -> dict:
    sd = dict(model.state_dict())
    out = {"pos_embed": model.pos_embed.pos_embed.clone(),  # a persistent buffer in the original model
           "y_embedder.y_embedding": torch.randn(caption_tokens, model.config.caption_channels),
           "final_layer.scale_shift_table": sd.pop("scale_shift_table")}
    top = {"pos_embed.proj": "x_embedder.proj", "adaln_single.linear": "t_block.1", "proj_out": "final_layer.linear",
           "caption_projection.linear_1": "y_embedder.y_proj.fc1",
           "caption_projection.linear_2": "y_embedder.y_proj.fc2"}
    for emb, orig in (("timestep", "t"), ("resolution", "csize"), ("aspect_ratio", "ar")):
        top[f"adaln_single.emb.{emb}_embedder.linear_1"] = f"{orig}_embedder.mlp.0"
        top[f"adaln_single.emb.{emb}_embedder.linear_2"] = f"{orig}_embedder.mlp.2"
    for i in range(model.config.num_layers):
        s, d = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[f"{d}scale_shift_table"] = sd.pop(f"{s}scale_shift_table")
        for kind in ("weight", "bias"):
            out[f"{d}attn.qkv.{kind}"] = _take(sd, *(f"{s}attn1.to_{q}.{kind}" for q in "qkv"))
            out[f"{d}cross_attn.kv_linear.{kind}"] = _take(sd, f"{s}attn2.to_k.{kind}", f"{s}attn2.to_v.{kind}")
        top.update({f"{s}attn1.to_out.0": f"{d}attn.proj", f"{s}attn2.to_q": f"{d}cross_attn.q_linear",
                    f"{s}attn2.to_out.0": f"{d}cross_attn.proj", f"{s}ff.net.0.proj": f"{d}mlp.fc1",
                    f"{s}ff.net.2": f"{d}mlp.fc2"})
    for src, dst in top.items():
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in sd:
                out[f"{dst}.{kind}"] = sd.pop(f"{src}.{kind}")
    assert not sd, f"unmapped: {sorted(sd)[:5]}"
    return out


# ---------------------------------------------------------------------------------------------------------------
# checks


@torch.no_grad()
def forward(model, family: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    t = torch.tensor([500.0])
    if family == "flux":
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                             indexing="ij"), -1).reshape(-1, 3)
        kw = dict(guidance=torch.tensor([3.5])) if model.config.guidance_embeds else {}
        return model(hidden_states=rnd(1, 16, 64), encoder_hidden_states=rnd(1, 8, 4096),
                     pooled_projections=rnd(1, 768), timestep=t / 1000, img_ids=img_ids, txt_ids=torch.zeros(8, 3),
                     return_dict=False, **kw)[0]
    if family == "sd3":
        return model(hidden_states=rnd(1, 16, 16, 16), encoder_hidden_states=rnd(1, 8, 4096),
                     pooled_projections=rnd(1, 2048), timestep=t, return_dict=False)[0]
    cond = dict(resolution=torch.tensor([[256.0, 256.0]]), aspect_ratio=torch.tensor([[1.0]]))
    return model(hidden_states=rnd(1, 4, 32, 32), encoder_hidden_states=rnd(1, 8, 4096), timestep=t,
                 added_cond_kwargs=cond, return_dict=False)[0]


def assert_same_model(loaded: LoadedTransformer, source: torch.nn.Module, family: str, variant: str,
                      expected_sd: dict | None = None, check_forward: bool = True):
    assert isinstance(loaded, LoadedTransformer)
    assert (loaded.family, loaded.variant) == (family, variant)
    assert type(loaded.model) is type(source)
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    got = loaded.model.state_dict()
    want = expected_sd if expected_sd is not None else source.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], want[k].float()), k
    if check_forward:
        assert torch.equal(forward(loaded.model, family), forward(source, family))


@pytest.fixture(scope="module")
def models():
    return {"flux": make_flux(), "sd3": make_sd3(), "pixart": make_pixart()}


# ---------------------------------------------------------------------------------------------------------------
# single files in the original layouts


@pytest.mark.parametrize("guidance,variant", [(True, "flux-dev"), (False, "flux-schnell")])
def test_flux_single_file(tmp_path, models, guidance, variant):
    model = models["flux"] if guidance else make_flux(guidance=False)
    path = tmp_path / "flux1.safetensors"
    save_file(flux_to_bfl(model), str(path))
    loaded = load_transformer(str(path))
    assert_same_model(loaded, model, "flux", variant)
    assert list(loaded.model.config.axes_dims_rope) == [4, 6, 6]
    assert (loaded.model.config.num_layers, loaded.model.config.num_single_layers) == (1, 2)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_sd35_single_file(tmp_path, models, prefix):
    sd = {prefix + k: v for k, v in sd3_to_mmdit(models["sd3"]).items()}
    if prefix:  # all-in-one files also hold text encoders / VAE; they must be ignored
        sd["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
        sd["first_stage_model.decoder.conv_in.weight"] = torch.ones(2, 2)
    path = tmp_path / "sd3.5.safetensors"
    save_file(sd, str(path))
    loaded = load_transformer(str(path), family="sd3")
    assert_same_model(loaded, models["sd3"], "sd3", "sd3.5-medium")
    cfg = loaded.model.config
    assert (cfg.qk_norm, tuple(cfg.dual_attention_layers), cfg.pos_embed_max_size) == ("rms_norm", (0,), 24)
    assert (cfg.num_attention_heads, cfg.attention_head_dim) == (4, 16)


def test_sd3_medium_single_file(tmp_path):
    model = make_sd3(sd35=False)
    path = tmp_path / "sd3_medium.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in sd3_to_mmdit(model).items()}, str(path))
    loaded = load_transformer(str(path))
    assert_same_model(loaded, model, "sd3", "sd3-medium")
    assert loaded.model.config.qk_norm is None


@pytest.mark.parametrize("alpha", [False, True])
def test_pixart_single_file(tmp_path, models, alpha):
    model = make_pixart(alpha=True) if alpha else models["pixart"]
    path = tmp_path / "pixart.safetensors"
    save_file(pixart_to_original(model, caption_tokens=120 if alpha else 300), str(path))
    loaded = load_transformer(str(path), family="pixart")
    assert_same_model(loaded, model, "pixart", "pixart-alpha" if alpha else "pixart-sigma")
    cfg = loaded.model.config
    assert (cfg.sample_size, cfg.interpolation_scale, cfg.num_attention_heads) == (32, 1, 4)
    assert cfg.use_additional_conditions is alpha


def test_pixart_torch_checkpoint(tmp_path, models):
    path = tmp_path / "PixArt-Sigma-XL-2-256.pth"
    torch.save({"state_dict": pixart_to_original(models["pixart"])}, str(path))
    assert_same_model(load_transformer(str(path)), models["pixart"], "pixart", "pixart-sigma")


def test_fp8_single_file(tmp_path, models):
    bfl = flux_to_bfl(models["flux"])
    path = tmp_path / "flux1-dev-fp8.safetensors"
    save_file({k: v.to(FP8) for k, v in bfl.items()}, str(path))
    loaded = load_transformer(str(path), dtype=torch.float32)
    rounded = {k: v.to(FP8).float() for k, v in models["flux"].state_dict().items()}
    assert any(not torch.equal(rounded[k], v) for k, v in models["flux"].state_dict().items())  # fp8 did round
    assert_same_model(loaded, models["flux"], "flux", "flux-dev", expected_sd=rounded, check_forward=False)


def test_scaled_fp8_single_file(tmp_path, models):
    """ComfyUI "scaled fp8": fp8 weight plus a per-tensor `scale_weight` multiplier."""
    sd, expected_orig = {"scaled_fp8": torch.zeros(0, dtype=FP8)}, {}
    for k, v in sd3_to_mmdit(models["sd3"]).items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448
            sd[k], sd[k[:-6] + "scale_weight"] = (v / scale).to(FP8), scale.reshape(1)
            expected_orig[k] = sd[k].float() * scale
        else:
            sd[k] = expected_orig[k] = v
    path = tmp_path / "sd3.5_medium_fp8_scaled.safetensors"
    save_file(sd, str(path))
    loaded = load_transformer(str(path))
    ref = models["sd3"]
    conv = load_transformer(_save(tmp_path / "ref.safetensors", expected_orig)).model.state_dict()
    assert_same_model(loaded, ref, "sd3", "sd3.5-medium", expected_sd=conv, check_forward=False)
    assert not torch.equal(conv["transformer_blocks.0.attn.to_q.weight"],
                           ref.state_dict()["transformer_blocks.0.attn.to_q.weight"])


def _save(path, sd) -> str:
    save_file(sd, str(path))
    return str(path)


def test_bf16_load(tmp_path, models):
    path = _save(tmp_path / "flux.safetensors", flux_to_bfl(models["flux"]))
    loaded = load_transformer(path, dtype=torch.bfloat16)
    got, want = loaded.model.state_dict(), models["flux"].state_dict()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].bfloat16()) for k in want)


# ---------------------------------------------------------------------------------------------------------------
# diffusers folders and diffusers-layout single files


@pytest.mark.parametrize("family,variant", [("flux", "flux-dev"), ("sd3", "sd3.5-medium"), ("pixart", "pixart-sigma")])
def test_diffusers_folder(tmp_path, models, family, variant):
    models[family].save_pretrained(str(tmp_path / "model"))
    assert_same_model(load_transformer(str(tmp_path / "model")), models[family], family, variant)


def test_pipeline_folder(tmp_path, models):
    models["pixart"].save_pretrained(str(tmp_path / "pipe" / "transformer"))
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    loaded = load_transformer(str(tmp_path / "pipe"), family="pixart")
    assert_same_model(loaded, models["pixart"], "pixart", "pixart-alpha")


def test_sharded_folder(tmp_path, models):
    models["sd3"].save_pretrained(str(tmp_path / "m"), max_shard_size="200KB")
    assert len(list((tmp_path / "m").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert_same_model(load_transformer(str(tmp_path / "m")), models["sd3"], "sd3", "sd3.5-medium")


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart"])
def test_diffusers_layout_single_file(tmp_path, models, family):
    path = _save(tmp_path / "m.safetensors", models[family].state_dict())
    overrides = {"sample_size": 32, "interpolation_scale": 1} if family == "pixart" else None  # not in the keys
    loaded = load_transformer(path, config_overrides=overrides)
    variant = {"flux": "flux-dev", "sd3": "sd3.5-medium", "pixart": "pixart-sigma"}[family]
    assert_same_model(loaded, models[family], family, variant)


# ---------------------------------------------------------------------------------------------------------------
# detection and errors


def test_detect_family(models):
    assert detect_family(flux_to_bfl(models["flux"])) == "flux"
    assert detect_family(sd3_to_mmdit(models["sd3"])) == "sd3"
    assert detect_family(["model.diffusion_model." + k for k in sd3_to_mmdit(models["sd3"])]) == "sd3"
    assert detect_family(pixart_to_original(models["pixart"])) == "pixart"
    for family, model in models.items():
        assert detect_family(model.state_dict().keys()) == family
    with pytest.raises(WeightsError, match="match none"):
        detect_family(["encoder.layers.0.weight", "decoder.conv_in.bias"])


def test_missing_path(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_transformer(str(tmp_path / "nope.safetensors"))


def test_truncated_file(tmp_path, models):
    path = tmp_path / "broken-flux.safetensors"
    save_file(flux_to_bfl(models["flux"]), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"broken-flux\.safetensors.*truncated or corrupt") as err:
        load_transformer(str(path))
    assert "\n" not in str(err.value)


def test_truncated_folder_weights(tmp_path, models):
    models["pixart"].save_pretrained(str(tmp_path / "m"))
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_transformer(str(tmp_path / "m"))


def test_family_mismatch(tmp_path, models):
    path = _save(tmp_path / "flux.safetensors", flux_to_bfl(models["flux"]))
    with pytest.raises(WeightsError, match="family mismatch: .* looks like flux, not sd3"):
        load_transformer(path, family="sd3")
    models["sd3"].save_pretrained(str(tmp_path / "sd3"))
    with pytest.raises(WeightsError, match="looks like sd3, not pixart"):
        load_transformer(str(tmp_path / "sd3"), family="pixart")


def test_unknown_keys(tmp_path):
    path = _save(tmp_path / "vae.safetensors", {"encoder.conv_in.weight": torch.ones(2, 2)})
    with pytest.raises(WeightsError, match="match none of flux, sd3, pixart"):
        load_transformer(path)


def test_missing_and_extra_keys(tmp_path, models):
    sd = sd3_to_mmdit(models["sd3"])
    sd.pop("joint_blocks.0.x_block.mlp.fc2.bias")
    with pytest.raises(WeightsError, match="missing key 'joint_blocks.0.x_block.mlp.fc2.bias'"):
        load_transformer(_save(tmp_path / "a.safetensors", sd))
    sd = pixart_to_original(models["pixart"])
    sd["blocks.0.attn.extra.weight"] = torch.ones(2)
    with pytest.raises(WeightsError, match=r"unexpected keys blocks\.0\.attn\.extra\.weight"):
        load_transformer(_save(tmp_path / "b.safetensors", sd))
    sd = dict(models["flux"].state_dict())
    sd.pop("single_transformer_blocks.1.proj_out.bias")
    with pytest.raises(WeightsError, match=r"missing keys single_transformer_blocks\.1\.proj_out\.bias"):
        load_transformer(_save(tmp_path / "c.safetensors", sd))


def test_bad_folders(tmp_path, models):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        load_transformer(str(tmp_path / "empty"))
    models["flux"].save_pretrained(str(tmp_path / "noweights"))
    (tmp_path / "noweights" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no diffusion_pytorch_model"):
        load_transformer(str(tmp_path / "noweights"))
    with pytest.raises(WeightsError, match="unknown family"):
        load_transformer(str(tmp_path / "noweights"), family="sdxl")


# ---------------------------------------------------------------------------------------------------------------
# published sizes: shipped configs build, and config inference recovers them from full-size key shapes (meta tensors)


@pytest.mark.parametrize("variant,billions", [
    ("flux-dev", 11.90), ("flux-schnell", 11.90), ("sd3-medium", 2.03), ("sd3.5-medium", 2.24),
    ("sd3.5-large", 8.06), ("pixart-sigma", 0.61), ("pixart-alpha", 0.61)])
def test_published_configs_round_trip(variant, billions):
    from comfyui_xdit import families, weights

    fam, _ = families.variants()[variant]
    family = fam.name
    base = weights._base_config(fam, variant)
    with torch.device("meta"):
        model = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel,
                 "pixart": PixArtTransformer2DModel}[family].from_config(base)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)
    if family == "pixart":
        original = pixart_to_original(model, caption_tokens=120 if variant == "pixart-alpha" else 300)
        del original["pos_embed"]  # its values (not shapes) are read; meta tensors have none
    else:
        original = {"flux": flux_to_bfl, "sd3": sd3_to_mmdit}[family](model)
    assert fam.is_original(set(original))
    converted, hints = fam.convert(original, f"{variant}.safetensors")
    assert converted.keys() == model.state_dict().keys()
    assert all(converted[k].shape == v.shape for k, v in model.state_dict().items())
    inferred = fam.infer_config(converted, hints)
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    assert {k: norm(v) for k, v in inferred.items()} == {k: norm(base[k]) for k in inferred}
    assert fam.variant_of(inferred, hints.get("pipeline", "")) == variant
