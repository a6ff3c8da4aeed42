#!/bin/bash
# All GPU benchmarks in one device call, in priority order, within ~8 minutes (BUDGET).
# From the repository root, in the device call that installs MLX:
#   source .device-wheels/b/mlx-env.sh && bash benchmarks/run_gpu.sh
# $OUT receives train_step_medium.json, gpu_transcribe.json, train_step_medium16.json,
# train_step_sizes.json, tables.md (every table) and log.txt (all output, versions first):
# 6 files, within the 8 a device call brings back.
# BUDGET (s, default 470; MLX's install before this takes ~30-60 s): nothing starts within 30 s
# of it and a running configuration is stopped there; finished ones are already written.
# SMOKE=1 runs the same sequence on CPU with tiny shapes (a check of this script, no numbers).
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/bench-out} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
BUDGET=${BUDGET:-470}
DEADLINE=$(( $(date +%s) + BUDGET ))
PY=${PYTHON:-python3}

# PEFT: the image lists it; .whl/peft (pip download peft==0.21.0) is the fallback when it is missing.
if ! $PY -c "import peft" 2>/dev/null && ls .whl/peft/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-peft .whl/peft/*.whl &&
    export PYTHONPATH=/tmp/site-peft:${PYTHONPATH:-}
fi
$PY - <<'EOF'
import importlib, platform
for name in ("mlx.core", "torch", "transformers", "peft", "accelerate", "numpy"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as error:
        print(name, "MISSING", error)
import mlx.core as mx
print("python", platform.python_version(), "| mlx device", mx.default_device())
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null

if [ "${SMOKE:-0}" = 1 ]; then
  MEDIUM=tiny; B1=1,2; B2=3; OTHER=base; STEPS="--warmup 1 --steps 1"; X="--smoke --dtype float32 --stage-steps 1"
  GT="--sizes tiny --tokens 5 --runs 1 --warmup 1 --smoke --dtype float32"; TORCHPY=${TORCH_PYTHON:-$PY}
else
  MEDIUM=medium; B1=8,32; B2=16; OTHER=tiny,base,small,large-v3; STEPS="--warmup 3 --steps 10"; X=""
  GT="--sizes base,medium --tokens 100 --runs 5"; TORCHPY=$PY
fi
T="$PY benchmarks/train_step.py --deadline $DEADLINE --timeout 170 --torch-python $TORCHPY $X"

echo "== 1. $MEDIUM LoRA step, batch $B1: MLX vs PyTorch+PEFT (SDPA and eager), with stages"
$T --sizes $MEDIUM --batch-sizes $B1 --frameworks mlx,torch-sdpa,torch-eager $STEPS --stages \
   --name train_step_medium
echo "== 2. transcription: encoder and per-token decode, forced length"
$PY benchmarks/gpu_transcribe.py --deadline $DEADLINE --torch-python $TORCHPY $GT
echo "== 3. $MEDIUM batch $B2 (each side's best batch)"
$T --sizes $MEDIUM --batch-sizes $B2 --frameworks mlx,torch-sdpa --warmup 2 --steps 6 --name train_step_medium16
echo "== 4. other sizes, batch 8"
$T --sizes $OTHER --batch-sizes ${SMOKE_BATCH:-8} --frameworks mlx,torch-sdpa --warmup 2 --steps 6 \
   --name train_step_sizes
echo "== finished with $(( DEADLINE - $(date +%s) )) s of the budget left"

# One tables.md instead of a .md per script keeps $OUT within the 8 files a call brings back.
for name in train_step_medium gpu_transcribe train_step_medium16 train_step_sizes; do
  if [ -f "$OUT/$name.md" ]; then
    printf '\n### %s\n\n' "$name"; cat "$OUT/$name.md"; rm "$OUT/$name.md"
  fi
done > "$OUT/tables.md"
cat "$OUT/tables.md"
sleep 1  # let tee finish log.txt
