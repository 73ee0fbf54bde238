"""Skip-layer calls (ComfyUI's SkipLayerGuidance on Parallel DiT Model): the named blocks pass their streams through,
against the diffusers model with plain forward hooks that return each block's inputs; refusals."""
import pytest
import torch

from comfyui_xdit.errors import XDiTError
from comfyui_xdit.models import load_model
from comfyui_xdit.parallel.forward import forward_call
from tests.conftest import forward_inputs, rel_l2


def _hooked_reference(adapter, x, t, c, lists: dict[str, list[int]]) -> torch.Tensor:
    """The blocks' outputs replaced by their (encoder_hidden_states, hidden_states) inputs, as diffusers' Flux and
    SD3 models call their blocks (keywords) and take their outputs back."""
    def passthrough(module, args, kwargs, out):
        return kwargs["encoder_hidden_states"], kwargs["hidden_states"]

    handles = [getattr(adapter.model, name)[i].register_forward_hook(passthrough, with_kwargs=True)
               for name, indices in lists.items() for i in indices]
    try:
        with torch.no_grad():
            return adapter.predict(x, t, c).float()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("model, skip, lists", [
    ("tiny-flux", {"double_block": [1], "single_block": [0]},
     {"transformer_blocks": [1], "single_transformer_blocks": [0]}),
    ("tiny-sd3", {"double_block": [0]}, {"transformer_blocks": [0]}),
])
def test_skipped_blocks_pass_their_streams_through(model, skip, lists):
    a = load_model(model).adapter
    x, t, c, _ = forward_inputs(a, 3)
    ref = _hooked_reference(a, x, t, c, lists)
    out = forward_call(a, x, t, c, skip=skip)
    assert rel_l2(out, ref) <= 1e-6
    assert rel_l2(out, forward_call(a, x, t, c)) > 1e-3  # the skip changes the output: the check can fail
    assert "forward" not in vars(getattr(a.model, next(iter(lists)))[0])  # the blocks are themselves again


def test_wan_and_qwen_image_blocks_pass_their_streams_through():
    """Wan's blocks take the video tokens first (positionally) and return them; Qwen-Image's take both streams by
    keyword and return (text, image): a plain forward hook handing the inputs back is the reference."""
    def wan_passthrough(module, args, kwargs, out):
        return kwargs.get("hidden_states", args[0] if args else None)

    def qwen_passthrough(module, args, kwargs, out):
        return kwargs["encoder_hidden_states"], kwargs["hidden_states"]

    for model, hook in (("tiny-wan", wan_passthrough), ("tiny-qwen-image", qwen_passthrough)):
        a = load_model(model).adapter
        g = torch.Generator().manual_seed(3)
        shape = (1, a.latent_channels, *((3,) if a.latent.dims == 3 else ()), 6, 10)
        x, c, t = torch.randn(shape, generator=g), a.random_conditioning(1, 7, g), torch.tensor([600.0])
        blocks = a.model.blocks if model == "tiny-wan" else a.model.transformer_blocks
        h = blocks[0].register_forward_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                ref = a.predict(x, t, c).float()
        finally:
            h.remove()
        out = forward_call(a, x, t, c, skip={"double_block": [0]})
        assert rel_l2(out, ref) <= 1e-6, model
        assert rel_l2(out, forward_call(a, x, t, c)) > 1e-3, model


@pytest.mark.parametrize("model, skip, message", [
    ("tiny-pixart", {"double_block": [0]}, "skipping double_block layers is not supported for pixart"),
    ("tiny-sd3", {"single_block": [0]}, r"block kinds it can skip: double_block\)"),
    ("tiny-flux", {"double_block": [2]}, r"cannot skip double_block 2: the model has 2 \(transformer_blocks\)"),
])
def test_skips_the_model_cannot_take_are_refused(model, skip, message):
    a = load_model(model).adapter
    x, t, c, _ = forward_inputs(a, 3)
    with pytest.raises(XDiTError, match=message):
        forward_call(a, x, t, c, skip=skip)
