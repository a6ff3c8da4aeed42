#!/bin/bash
# Variants of the fine-tuning recipe (skills_gpu.sh's recipe flags kept) for one language, each
# tested on the validation split and on en-read (benchmarks/finetune_gpu.sh). They differ in
# regularisation, rank, targets and steps; the validation CER of each is its result (the split's
# speakers are not in train/). One after the other: four MLX processes at once on one H200 ran out
# of device memory. Learning rates of 5e-4 (rank 32) and 1e-3 left the train loss at 4.5–4.9 near
# step 100, so the variants keep 2e-4.
# usage: bash benchmarks/recipe_sweep_gpu.sh MODEL DATA_ROOT LANG
set -uo pipefail
model=$1; data=$2; lang=$3
out=${OUT:-/tmp/out}; mkdir -p "$out"
base=(--lora-targets attn.query,attn.key,attn.value,attn.out,cross_attn.query,cross_attn.value,mlp1,mlp2
      --lora-rank 16 --lora-alpha 32 --learning-rate 2e-4 --warmup 20 --batch-size 16 --steps-per-eval 100
      --timestamp-prob 0.5 --prompt-prob 0.2 --no-speech-fraction 1.0 --pack-fraction 0.5)
declare -A variants=(
  [specaug_dropout_600]="--iters 600 --spec-augment --lora-dropout 0.1"
  [rank32_600]="--iters 600 --spec-augment --lora-rank 32 --lora-alpha 64"
  [specaug_1000]="--iters 1000 --spec-augment"
  [all_attention_600]="--iters 600 --spec-augment --lora-dropout 0.1 --lora-targets attn.query,attn.key,attn.value,attn.out,cross_attn.query,cross_attn.key,cross_attn.value,cross_attn.out,mlp1,mlp2"
)
for name in "${!variants[@]}"; do  # later flags win, so a variant's flags override the base ones
  TESTS=best bash benchmarks/finetune_gpu.sh "$model" "$data" "$lang" "${lang}_$name" "${base[@]}" \
      ${variants[$name]} > "$out/${lang}_$name.summary" 2>&1
  echo "== ${lang}_$name: ${variants[$name]}"
  grep -E "wall time|^Test|failed" "$out/${lang}_$name.summary"
done
