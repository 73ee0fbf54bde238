#!/usr/bin/env bash
# The GPU checks of regional torch.compile under the parallel methods (issue 34) in one device call: at most about
# 6 minutes on an H200 (each part has its own time limit). Logs go to $OUT (one file per part).
#
#   1. tests/test_compile.py's compiled == eager cases (Ulysses, Ring, CFG, PipeFusion, FSDP shard, step cache;
#      fp32, 1e-5) with CUDA tensors: two ranks share the one GPU, so they talk over gloo, not nccl (gloo takes
#      CUDA tensors in collectives; the comm layer stages Ring's point-to-point through host memory), and the
#      second job of the same shape must compile nothing.
#   2. full-size Flux.1 at 1024x1024, world 1, bf16, random weights: one step diffusers eager, ours eager and ours
#      compiled (the engine's compiled blocks), with the compile time and compiled vs diffusers difference.
#
# Once, here (diffusers is not installed on the device machine; pure Python):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# Then, with the device tool: run(command="bash scripts/gpu_compile_checks.sh", carry=[".whl"], timeout_s=420)
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh  # wheels, environment, $OUT/device.txt, part()
export TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/xdit-inductor"  # fresh per machine: the times include compiling

# 1. compiled == eager, CUDA tensors, 2 ranks on the one GPU over gloo (one torchrun for the cases of each part;
#    FSDP shard on its own, so that a failure of FSDP's collectives over gloo on CUDA leaves the others' results)
export XDIT_COMPILE_TEST_DEVICE=cuda XDIT_TEST_THREADS=4
XDIT_COMPILE_TEST_METHODS=ulysses2,ring2,cfg2,pipefusion2,ulysses2_cache part compile_methods_cuda 160 \
  python3 -m pytest -q -rs -p no:cacheprovider tests/test_compile.py -k "(matches or nothing) and not serial"
XDIT_COMPILE_TEST_METHODS=shard2 part compile_shard_cuda 60 \
  python3 -m pytest -q -rs -p no:cacheprovider tests/test_compile.py -k "matches and not serial"
# 2. full-size Flux.1 1024px, world 1, bf16: eager vs compiled step time
part compile_flux_1024 120 python3 -m comfyui_xdit bench --arch flux --size 1024 --device cuda --dtype bf16 \
  --compile --repeats 5
