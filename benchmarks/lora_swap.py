"""LoRA swap time against a full reload: a Flux-layout model written as a single-file checkpoint (fp32), two
diffusers-format LoRAs of rank 16 on the blocks' matrices (--targets: all attention and MLP ones, or q/k/v); the
times of A, A -> B and B -> none (apply_loras: read, check, restore, patch) against load_model of the checkpoint
(the reload the swap replaces), median and minimum of `--repeat` runs, in this process on the CPU. Each swap is
checked: none restores the base bit for bit.

usage: python benchmarks/lora_swap.py [--width 1024] [--double 2] [--single 4] [--rank 16] [--repeat 3]
                                      [--targets all|attn]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from comfyui_xdit.lora import LoraSpec, apply_loras  # noqa: E402
from comfyui_xdit.models import load_model  # noqa: E402
from comfyui_xdit.tiny import fill_deterministic  # noqa: E402
from tests import lora_files as lf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--targets", choices=("all", "attn"), default="all",
                    help="all: every attention and MLP matrix of the blocks (distillation LoRAs); attn: q, k, v only")
    a = ap.parse_args()
    from diffusers import FluxTransformer2DModel

    heads = a.width // 128
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=a.double, num_single_layers=a.single,
                                   attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    fill_deterministic(model, 7)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    params = sum(v.numel() for v in sd.values())
    del model
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "model.safetensors"
        save_file(sd, str(ckpt))
        include = ("attn.", "ff.", "ff_context.", "proj_mlp", "proj_out") if a.targets == "all" else \
            ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
        mods = lf.matrices(sd, include, exclude=("norm",))
        mods = [m for m in mods if "blocks." in m]
        paths = []
        for seed in (1, 2):
            p = Path(d) / f"lora{seed}.safetensors"
            save_file(lf.diffusers(lf.draw_pairs(sd, mods, a.rank, seed, alpha=float(a.rank))), str(p))
            paths.append(str(p))
        del sd
        reload, swaps = [], {"none -> A": [], "A -> B": [], "B -> none": []}
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            loaded = load_model(str(ckpt))
            reload.append(time.perf_counter() - t0)
            net = loaded.adapter.model
            base = {k: v.clone() for k, v in net.state_dict().items()}
            for name, spec in (("none -> A", [LoraSpec(paths[0], 0.8)]), ("A -> B", [LoraSpec(paths[1], 0.6)]),
                               ("B -> none", [])):
                t0 = time.perf_counter()
                apply_loras(net, loaded.family, spec)
                swaps[name].append(time.perf_counter() - t0)
                if name == "none -> A":
                    kept = sum(t.numel() * t.element_size() for t in net._xdit_lora.backups.values())
            assert all(torch.equal(v, base[k]) for k, v in net.state_dict().items())
            del loaded, net, base
    print(f"Flux layout, width {a.width}, {a.double} double + {a.single} single blocks, {params / 1e6:.0f} M "
          f"parameters fp32; LoRA rank {a.rank} on {len(mods)} matrices ({a.targets}), base values kept "
          f"{kept / 2**20:.0f} MiB; torch {torch.__version__}, {torch.get_num_threads()} threads; {a.repeat} runs\n")
    print("| operation | median s | min s |\n|---|---|---|")
    print(f"| full reload (load_model of the checkpoint) | {statistics.median(reload):.3f} | {min(reload):.3f} |")
    for name, t in swaps.items():
        print(f"| LoRA {name} | {statistics.median(t):.3f} | {min(t):.3f} |")


if __name__ == "__main__":
    main()
