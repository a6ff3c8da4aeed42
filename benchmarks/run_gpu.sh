#!/bin/bash
# The GPU benchmarks in two device calls of < 10 minutes each, from the repository root:
#   source .device-wheels/b/mlx-env.sh && bash benchmarks/run_gpu.sh medium   # whisper-medium: target 1
#   source .device-wheels/b/mlx-env.sh && bash benchmarks/run_gpu.sh other    # other sizes, transcription
# $OUT receives one NAME.json per script run, tables.md (every table) and log.txt (all output,
# versions first). BUDGET (s, default 540): nothing starts within 30 s of it; a running
# configuration is stopped there and finished ones are already written.
# SMOKE=1 runs the same sequence on CPU with tiny shapes (a check of this script, no numbers).
set -u
cd "$(dirname "$0")/.."
PART=${1:-medium}
export OUT=${OUT:-/tmp/bench-out} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
BUDGET=${BUDGET:-540}
DEADLINE=$(( $(date +%s) + BUDGET ))
PY=${PYTHON:-python3}

# PEFT: the image lists it; .whl/peft (pip download peft==0.21.0) is the fallback when it is missing.
if ! $PY -c "import peft" 2>/dev/null && ls .whl/peft/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-peft .whl/peft/*.whl &&
    export PYTHONPATH=/tmp/site-peft:${PYTHONPATH:-}
fi
$PY - <<'EOF'
import importlib, platform
for name in ("mlx.core", "torch", "transformers", "peft", "numpy"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as error:
        print(name, "MISSING", error)
import mlx.core as mx
print("python", platform.python_version(), "| mlx device", mx.default_device())
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null

if [ "${SMOKE:-0}" = 1 ]; then
  MEDIUM=tiny; B1=1; B2=2,3; OTHER=tiny; STEPS="--warmup 1 --steps 1"; X="--smoke --dtype float32 --stage-steps 1"
  AB="--batch 1 --heads 2 --steps 1 --dtype float32"
  GT="--sizes tiny --tokens 5 --runs 1 --warmup 1 --smoke --dtype float32"; TORCHPY=${TORCH_PYTHON:-$PY}
else
  MEDIUM=medium; B1=8; B2=16,32,48; OTHER=tiny,base,small,large-v3; STEPS="--warmup 3 --steps 10"; X=""
  AB="--batch 8"; GT="--sizes base,medium --tokens 100 --runs 5"; TORCHPY=$PY
fi
T="$PY benchmarks/train_step.py --deadline $DEADLINE --timeout 170 --torch-python $TORCHPY $X"

if [ "$PART" = medium ]; then
  NAMES="attention_backward train_step_medium train_step_medium_batches"
  echo "== 1. attention backward: unfused fallback vs cuDNN fused (query padding)"
  $PY benchmarks/attention_backward.py $AB
  echo "== 2. $MEDIUM batch $B1: MLX, MLX without the padding, PyTorch+PEFT SDPA; stages and kernels"
  $T --sizes $MEDIUM --batch-sizes $B1 --frameworks mlx,mlx-unfused,torch-sdpa $STEPS --stages --kernels \
     --name train_step_medium
  echo "== 3. $MEDIUM batches $B2 (each side's best batch)"
  $T --sizes $MEDIUM --batch-sizes $B2 --frameworks mlx,torch-sdpa $STEPS --name train_step_medium_batches
else
  NAMES="train_step_sizes gpu_transcribe"
  echo "== 4. other sizes, batch 8"
  $T --sizes $OTHER --batch-sizes ${SMOKE_BATCH:-8} --frameworks mlx,torch-sdpa --warmup 2 --steps 6 \
     --name train_step_sizes
  echo "== 5. transcription: encoder and per-token decode, forced length"
  $PY benchmarks/gpu_transcribe.py --deadline $DEADLINE --torch-python $TORCHPY $GT
fi
echo "== finished with $(( DEADLINE - $(date +%s) )) s of the budget left"

# One tables.md instead of a .md per script keeps $OUT within the files a call brings back.
for name in $NAMES; do
  if [ -f "$OUT/$name.md" ]; then
    printf '\n### %s\n\n' "$name"; cat "$OUT/$name.md"; rm "$OUT/$name.md"
  fi
done > "$OUT/tables.md"
cat "$OUT/tables.md"
sleep 1  # let tee finish log.txt
