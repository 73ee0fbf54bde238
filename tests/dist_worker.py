"""Runs parallel sampling cases on every rank of a torchrun group; rank 0 writes results for the tests.

usage: python -m torch.distributed.run --nproc-per-node W tests/dist_worker.py CASES.json OUT_DIR
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch_threads = int(os.environ.get("XDIT_TEST_THREADS", "1"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safetensors.torch import save_file  # noqa: E402

from comfyui_xdit.engine import Cancelled, run_job  # noqa: E402
from comfyui_xdit.errors import XDiTError  # noqa: E402
from comfyui_xdit.parallel import ParallelConfig  # noqa: E402
from comfyui_xdit.parallel.mesh import release_process_groups  # noqa: E402
from tests.cases import build_request, get_model  # noqa: E402


def main() -> None:
    torch.set_num_threads(torch_threads)
    cases = json.load(open(sys.argv[1]))
    out_dir = sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in cases:
        print(f"rank {rank}: case {case['id']}", file=sys.stderr, flush=True)  # names the case if a rank dies
        # pipefusion shards the model; attention backends and processors stay set on it
        fresh = case["parallel"].get("pipefusion", 1) > 1 or "attention_backend" in case or "processor" in case \
            or case["parallel"].get("shard", 1) > 1  # fully_shard changes the model
        loaded = get_model(case, fresh=fresh)
        req = build_request(loaded, case)
        config = ParallelConfig.from_dict(case["parallel"])
        _loras(loaded, config, case.get("loras", []))
        steps_seen = []
        cancel_after = case.get("cancel_after")
        should_cancel = (lambda: len(steps_seen) >= cancel_after) if cancel_after else None
        tensors = None  # other results than latents (the analyser's profile)
        compiled_before = _compile_counts()
        try:
            job = None
            if "attention_backend" in case or "processor" in case or case.get("analyze"):
                from tests.attn_cases import run_attention_case

                latents, tensors = run_attention_case(loaded, req, config, case)
            else:
                job = run_job(loaded, req, config, callback=lambda info: steps_seen.append(info.step),
                              should_cancel=should_cancel)
                latents = job.latents
            result = {"ok": True, "comm": job.comm if job is not None else []}
            if config.pipefusion > 1:
                from comfyui_xdit.parallel.pipefusion import parameter_report

                reports = [None] * dist.get_world_size()
                dist.all_gather_object(reports, parameter_report(loaded.adapter))
                result["params"] = reports
            if config.shard > 1:
                result["shard"] = _shard_report(loaded, case)
            if req.compile:  # what this job compiled on this rank: new graphs, graph breaks (tests/test_compile.py)
                after = _compile_counts()
                counts = [None] * dist.get_world_size()
                dist.all_gather_object(counts, {k: after[k] - compiled_before[k] for k in after})
                result["compiled"] = counts
        except XDiTError as e:
            job, latents, result = None, None, {"ok": False, "error": str(e)}
        except Cancelled as e:
            job, latents, result = None, None, {"ok": False, "cancelled": str(e), "steps_seen": steps_seen}
        if rank == 0:
            if latents is not None:
                save_file({**(tensors or {}), "latents": latents.cpu().contiguous()},
                          os.path.join(out_dir, case["id"] + ".safetensors"))
            json.dump(result, open(os.path.join(out_dir, case["id"] + ".json"), "w"))
        if "processor" in case:  # this rank's error, if any
            json.dump(result.get("error"), open(os.path.join(out_dir, f"{case['id']}.rank{rank}.error.json"), "w"))
        if "cache" in case:  # the steps this rank reused
            json.dump(job.reused_steps if job is not None else None,
                      open(os.path.join(out_dir, f"{case['id']}.rank{rank}.reused.json"), "w"))
        # per-rank comm reports (bytes sent by each rank)
        json.dump(job.comm if job is not None else [],
                  open(os.path.join(out_dir, f"{case['id']}.rank{rank}.comm.json"), "w"))
    release_process_groups()


def _compile_counts() -> dict[str, int]:
    """torch.compile's counters so far in this process: graphs made, graph breaks; compiled block forwards run."""
    from torch._dynamo.utils import counters

    from comfyui_xdit.compile import CALLS

    return {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values()),
            "calls": CALLS[0]}


def _loras(loaded, config, loras: list) -> None:
    """The case's LoRA set (none: the base weights of a cached model); on a PipeFusion stage it is patched after the
    stage dropped the other stages' blocks, as on a pool that sampled before."""
    from comfyui_xdit.lora import LoraSpec, apply_loras

    if loras and config.pipefusion > 1:
        from comfyui_xdit.parallel.mesh import get_mesh
        from comfyui_xdit.parallel.pipefusion import shard_stage

        shard_stage(loaded.adapter, get_mesh(config, "cpu").rank("pipefusion"), config.pipefusion)
    apply_loras(loaded.adapter.model, loaded.family, [LoraSpec(p, s) for p, s in loras])


def _shard_report(loaded, case: dict) -> list[dict]:
    """Every rank's parameter bytes and analytic gather volume, and whether its local shards hold the rows
    kept_slice names, as sharded and after fill_local_shards refilled them from zeros."""
    from comfyui_xdit.parallel.shard import fill_local_shards, gather_volume, local_parameter_bytes, sharded_layout

    model = loaded.adapter.model
    layout = sharded_layout(model)
    full = dict(get_model(case, fresh=True).adapter.model.named_parameters())

    def kept_ok() -> bool:
        for name, p in model.named_parameters():
            rows = layout.kept_slice(tuple(p.shape))
            if rows is not None and not torch.equal(p.to_local()[: rows.stop - rows.start], full[name][rows]):
                return False
        return True

    as_sharded = kept_ok()
    for p in model.parameters():
        p.to_local().view(torch.uint8).zero_()
    fill_local_shards(model, lambda name, rows: full[name][rows], layout)
    mine = {"params": local_parameter_bytes(model), "kept_slice_ok": as_sharded and kept_ok(),
            "gather_volume": sum(gather_volume(layout).values()), "ranks": list(layout.ranks),
            "prefetching": sum(len(m._get_fsdp_state()._states_to_forward_prefetch) > 0 for m in layout.groups),
            "blocks": len(layout.groups) - 1}
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    return reports


if __name__ == "__main__":
    main()
