"""Qwen-Image-Edit's token layout under the Qwen-Image token plan, on every rank of a torchrun group: one
transformer forward with the reference image's tokens appended to the image stream (two img_shapes entries, as
QwenImageEditPipeline calls it), under sequence parallelism, against the same forward on one process.

usage: python -m torch.distributed.run --nproc-per-node W tests/qwen_edit_worker.py OUT.json
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comfyui_xdit.models import load_model  # noqa: E402
from comfyui_xdit.parallel import ParallelConfig  # noqa: E402
from comfyui_xdit.parallel.mesh import get_mesh, release_process_groups  # noqa: E402
from comfyui_xdit.parallel.sequence import sequence_parallel  # noqa: E402

# (image token rows, cols), (reference rows, cols): 7x9 + 5x6 = 93 tokens, no degree divides them
TARGET, REFERENCE = (7, 9), (5, 6)


def forward(model, zero_cond_t: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    n = TARGET[0] * TARGET[1] + REFERENCE[0] * REFERENCE[1]
    text = torch.randn(2, 15, 3584, generator=g)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[0, 3:6] = mask[0, 12:] = mask[1, 7:11] = False
    kwargs = dict(hidden_states=torch.randn(2, n, 64, generator=g), encoder_hidden_states=text,
                  encoder_hidden_states_mask=mask, timestep=torch.tensor([0.7, 0.7]),
                  img_shapes=[[(1, *TARGET), (1, *REFERENCE)]] * 2, return_dict=False)
    with torch.no_grad():
        return model(**kwargs)[0]


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    configs = {"ulysses": ParallelConfig(ulysses=world), "ring": ParallelConfig(ring=world)}
    if world == 4:
        configs["usp"] = ParallelConfig(ulysses=2, ring=2)
    out = {}
    for zero_cond_t in (False, True):  # True: Edit-2511's per-token modulation (modulate_index, split as image)
        loaded = load_model("tiny-qwen-image", zero_cond_t=zero_cond_t)
        ref = forward(loaded.adapter.model, zero_cond_t)
        for name, config in configs.items():
            pm = get_mesh(config, "cpu")
            with sequence_parallel(loaded.adapter, pm):
                got = forward(loaded.adapter.model, zero_cond_t)
            key = f"{name}{world}{'_zero_cond_t' if zero_cond_t else ''}"
            out[key] = ((got - ref).norm() / ref.norm()).item()
            sent = pm.comm.reset()
            out[key + "_bytes"] = sum(sent.values())
    if dist.get_rank() == 0:
        json.dump(out, open(sys.argv[1], "w"))
    release_process_groups()


if __name__ == "__main__":
    main()
