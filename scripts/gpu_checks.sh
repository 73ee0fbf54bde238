#!/usr/bin/env bash
# Every GPU check of the single-GPU fast path and step-cache issues in one device call (about 8 minutes on an
# H100/H200; each part has its own time limit). Logs go to $OUT (one file per part).
#
# Once, here (diffusers is not installed on the device machine; pure Python):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# Then, with the device tool: run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh  # wheels, environment, $OUT/device.txt, part()

# bf16 tests with two ranks sharing the GPU (ulysses 2, ring 2, cfg 2, pipefusion 2), the CUDA kernel order test
part tests 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_bf16_ranks.py tests/test_bench.py
# one step of the full-size architectures: diffusers eager, ours eager and compiled, TFLOP/s, matmul ceiling
part bench_flux_1024 200 python3 -m comfyui_xdit bench --arch flux --size 1024 --device cuda --dtype bf16 --compile
part bench_flux_2048 60 python3 -m comfyui_xdit bench --arch flux --size 2048 --device cuda --dtype bf16 --repeats 5
part bench_pixart_2048 40 python3 -m comfyui_xdit bench --arch pixart --size 2048 --device cuda --dtype bf16
# time a first-block cache saves on full-size Flux.1 1024px (random weights), 28 steps, no true CFG
part cache_flux_1024 120 python3 benchmarks/cache_error.py --models flux --size 1024 --steps 28 --cfg 1 \
  --device cuda --dtype bf16 --thresholds 0.2,0.5,0.8 --repeats 2
