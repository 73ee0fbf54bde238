"""The planner's predicted job time against published multi-GPU figures (models built on the meta device).

usage: python benchmarks/planner_vs_published.py

Published figures are whole jobs (text encoder and VAE included, which the planner does not count) with each
project's own kernels; the planner's are steps x its predicted seconds per step with the stated constants
(comfyui_xdit/planner.py, KINDS: eager rates measured on an H100). Sources: xDiT docs/performance/flux.md (Flux.1
tables), diffusers docs/source/en/training/distributed_inference.md (FLUX.1-dev context parallelism on 4 x L20:
time per denoising step and peak memory per GPU, whole pipeline resident), ../shared/models.md (the anchors gathered
for this project).
"""
from __future__ import annotations

from comfyui_xdit import planner as P
from comfyui_xdit.parallel import ParallelConfig as C

ROWS = [  # (source, model, job, gpus, layout, published seconds, note)
    ("xDiT Flux.1 table", "flux-dev", P.Job(1024, 1024, steps=28), "1xH100", C(), 6.71, "eager; 4.30 compiled"),
    ("xDiT Flux.1 table", "flux-dev", P.Job(1024, 1024, steps=28), "2xH100", C(ulysses=2), 4.38, "2.68 compiled"),
    ("xDiT Flux.1 table", "flux-dev", P.Job(1024, 1024, steps=28), "2xH100", C(ring=2), 5.31, "2.60 compiled"),
    ("xDiT Flux.1 table", "flux-dev", P.Job(1024, 1024, steps=28), "4xH100", C(ulysses=2, ring=2), 5.19,
     "1.80 compiled"),
    ("xDiT Flux.1 table", "flux-dev", P.Job(1024, 1024, steps=28), "4xH100", C(ulysses=4), 4.24, "1.63 compiled"),
    ("xDiT Flux.1 table", "flux-dev", P.Job(1024, 1024, steps=28), "4xH100", C(ring=4), 5.11, "1.98 compiled"),
    ("xDiT Flux.1 schnell", "flux-schnell", P.Job(1024, 1024, steps=4), "8xA100", C(ulysses=8), 0.82,
     "compiled, best of 8xA100"),
    ("xDiT Flux.1 schnell", "flux-schnell", P.Job(1024, 1024, steps=4), "4xL40,pcie", C(ulysses=2, ring=2), 1.41,
     "compiled, best on 4 L40s"),
    ("vLLM-Omni (models.md)", "qwen-image", P.Job(2048, 2048, cfg=4.0, steps=50), "8xH100", C(ulysses=8), 30.8,
     "8xH800; 112.5 s on one"),
    ("models.md anchor", "wan2.2-i2v-a14b", P.Job(720, 1280, frames=81, cfg=5.0, steps=40), "8xH100",
     C(ulysses=8, shard=8), 250.7, "Ulysses 8 + FSDP; 109 s with FA3 + cache + compile"),
    # diffusers' figures are seconds per denoising step (the transformer alone), so these jobs have one step
    ("diffusers CP, 4 x L20", "flux-dev", P.Job(1024, 1024, steps=1), "4xL20,pcie", C(ulysses=4), 0.28107,
     "per step; peak 37.11 GB per GPU"),
    ("diffusers CP, 4 x L20", "flux-dev", P.Job(1024, 1024, steps=1), "4xL20,pcie", C(ring=4), 0.35134,
     "per step; peak 37.01 GB per GPU"),
    ("diffusers CP, 4 x L20", "flux-dev", P.Job(1024, 1024, steps=1), "4xL20,pcie", C(ulysses=2, ring=2), 0.32437,
     "unified_balanced; per step; peak 37.16 GB per GPU"),
]


def main() -> None:
    print("| source | model, job | GPUs | layout | published s | predicted s | predicted / published | "
          "planner's pick (predicted s) | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for source, model, job, gpus, config, published, note in ROWS:
        facts = P.model_facts(model)
        g = P.parse_gpus(gpus)
        predicted = job.steps * P.step_seconds(facts, config, job, g)[0]
        choice = P.plan(facts, g, job).choice
        pick = f"{choice.layout()} ({job.steps * choice.seconds:.2f})" if choice else "none fits"
        size = f"{job.width}x{job.height}" + (f", {job.frames} frames" if job.frames > 1 else "")
        print(f"| {source} | {model} {size}, {job.steps} steps | {g.describe()} | {P.describe_config(config)} | "
              f"{published:g} | {predicted:.2f} | {predicted / published:.2f} | {pick} | {note} |")


if __name__ == "__main__":
    main()
