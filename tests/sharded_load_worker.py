"""Loads a checkpoint file sharded for each case's degrees (`load_model(..., layout=config, rank=r)`) on every rank
of a torchrun group, then samples the case (unless "load_only"; "file": another file than FILE); rank 0 writes the latents and every rank's load
report for tests/test_sharded_load.py.

usage: python -m torch.distributed.run --nproc-per-node W tests/sharded_load_worker.py FILE CASES.json OUT_DIR
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safetensors.torch import save_file  # noqa: E402

from comfyui_xdit.engine import run_job  # noqa: E402
from comfyui_xdit.models import load_model  # noqa: E402
from comfyui_xdit.parallel import ParallelConfig  # noqa: E402
from comfyui_xdit.parallel.mesh import release_process_groups  # noqa: E402
from comfyui_xdit.parallel.shard import local_parameter_bytes  # noqa: E402
from tests.cases import build_request  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    path, cases, out_dir = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in cases:
        config = ParallelConfig.from_dict(case["parallel"])
        loaded = load_model(case.get("file", path), dtype=case.get("dtype", "fp32"), layout=config, rank=rank,
                            weight_dtype=case.get("weight_dtype", "default"))
        mine = {**loaded.report.to_dict(), "params": local_parameter_bytes(loaded.adapter.model)}
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, mine)
        result = {"load": reports}
        if not case.get("load_only"):
            job = run_job(loaded, build_request(loaded, case), config)
            if rank == 0:
                save_file({"latents": job.latents.float().contiguous()}, os.path.join(out_dir, case["id"] + ".st"))
        if rank == 0:
            json.dump(result, open(os.path.join(out_dir, case["id"] + ".json"), "w"))
        del loaded
    release_process_groups()


if __name__ == "__main__":
    main()
