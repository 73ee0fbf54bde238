# Sourced by the device-call scripts (gpu_checks.sh, gpu_compile_checks.sh): from the repository root, installs the
# carried wheels (.whl/: diffusers and what the device machine lacks), exports the environment, records the device
# in $OUT/device.txt, and defines `part NAME SECONDS COMMAND...` (one part under its time limit, logged to
# $OUT/NAME.log with its exit status and seconds).
OUT=${OUT:-/tmp/xdit-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "carry .whl with the diffusers wheel (see the top of the calling script)"; exit 2; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"; } \
  | tee "$OUT/device.txt"

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name ($limit s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
}
