#!/bin/bash
# Base-model --test numbers on the GPU machine, for comparison with the fine-tunes.
# usage: bash benchmarks/base_eval_gpu.sh MODEL DATA_ROOT LANG...
set -uo pipefail
model=$1; data=$2; shift 2
out=${OUT:-/tmp/out}; mkdir -p "$out" "$HOME/runs/base"
for lang in "$@"; do
  folder=$data/$lang; language=$lang; [ "$lang" = en-read ] && language=en
  python3 lora.py --test --model "$model" --data "$folder" --language "$language" --adapter-path "$HOME/runs/base" \
      --batch-size 32 --test-output "$HOME/runs/base/${lang}_base.jsonl" 2>&1 | grep "^Test"
done
