"""The token-plan interpreter's vocabulary on its own (parallel/plan.py): joint splits of several streams."""
import pytest
import torch

from comfyui_xdit.errors import ConfigError
from comfyui_xdit.families.spec import IMAGE, TEXT
from comfyui_xdit.parallel.pipefusion import PatchView
from comfyui_xdit.parallel.plan import ShardView


def _no_gather(t, sizes, dim):
    raise AssertionError("no collective expected")


def test_joint_split_keeps_each_streams_shard_in_order():
    """5 image + 3 text tokens over 2 ranks: image shards 3 | 2, text shards 2 | 1; rank 1 keeps image 3..4 and
    text 7."""
    views = [ShardView(2, r, _no_gather) for r in range(2)]
    joint = torch.arange(8.0)[None, :, None]  # [B, image 0..4 then text 5..7, 1]
    for view in views:
        view.begin()
        view.take(IMAGE, torch.zeros(1, 5), 1)
        view.take(TEXT, torch.zeros(1, 3), 1)
    assert views[0].take((IMAGE, TEXT), joint, 1).flatten().tolist() == [0, 1, 2, 5, 6]
    assert views[1].take((IMAGE, TEXT), joint, 1).flatten().tolist() == [3, 4, 7]
    assert views[1].take((TEXT, IMAGE), torch.arange(8.0)[None], 1).tolist() == [[2, 6, 7]]  # any order


def test_joint_split_needs_the_streams_lengths():
    view = ShardView(2, 0, _no_gather)
    view.begin()
    view.take(IMAGE, torch.zeros(1, 5), 1)
    with pytest.raises(ConfigError, match=r"joint image\+text tensor has 8 tokens, its streams hold image 5, text \?"):
        view.take((IMAGE, TEXT), torch.zeros(1, 8), 1)
    view.take(TEXT, torch.zeros(1, 3), 1)
    with pytest.raises(ConfigError, match="has 9 tokens, its streams hold image 5, text 3"):
        view.take((IMAGE, TEXT), torch.zeros(1, 9), 1)


def test_joint_split_under_pipefusion_takes_the_patch():
    """A patch of image tokens 2..3 (of 5), sp 1: the joint tensor keeps those and every text token."""
    view = PatchView(1, 0, _no_gather)
    view.set_patch(slice(2, 4), {IMAGE: 5, TEXT: 3}, 0)
    assert view.take((IMAGE, TEXT), torch.arange(8.0)[None], 1).tolist() == [[2, 3, 5, 6, 7]]
    with pytest.raises(ConfigError, match="has 7 tokens"):
        view.take((IMAGE, TEXT), torch.zeros(1, 7), 1)


def test_patterns_may_match_nothing_plain_paths_may_not():
    """"blocks.[0]" names the first block only; on a model (a PipeFusion stage) without those blocks a pattern
    installs nothing, a plain path that matches no module is an error."""
    from comfyui_xdit.families.spec import Split, TokenPlan
    from comfyui_xdit.parallel.plan import install, remove, resolve

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    model.empty = torch.nn.ModuleList()
    assert [n for n, _ in resolve(model, "blocks.[0]")] == ["blocks.0"]
    assert [n for n, _ in resolve(model, "blocks.*")] == ["blocks.0", "blocks.1", "blocks.2"]
    view = ShardView(1, 0, _no_gather)
    for path in ("empty.[0]", "empty.*", "empty.?"):
        remove(install(model, TokenPlan({path: {0: Split(IMAGE)}}, {}, {}, {}, ()), view))
    with pytest.raises(ConfigError, match="has no module 'empty.0'"):
        install(model, TokenPlan({"empty.0": {0: Split(IMAGE)}}, {}, {}, {}, ()), view)
