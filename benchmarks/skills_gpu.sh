#!/bin/bash
# Issue "fine-tunes that are good and stay good" on the GPU machine. Results (logs, JSON) go to $OUT.
#   padding: benchmarks/padding_policy.py: the base model on en-read and te, and te adapters trained
#            without timestamps, under each padding policy
#   recipe:  te and yo adapters with timestamps, prompts, no-speech and packed windows, then
#            routing on en-read, the long-form check (this adapter and the padding run's one, trained
#            without timestamps) and the silence/noise check of every adapter
#   plain:   yo adapters without those flags
# usage: bash benchmarks/skills_gpu.sh MODEL DATA_ROOT padding|recipe|plain
set -uo pipefail
model=$1; data=$2; part=$3
out=${OUT:-/tmp/out}; mkdir -p "$out"
flags=(--lora-targets attn.query,attn.key,attn.value,attn.out,cross_attn.query,cross_attn.value,mlp1,mlp2
       --lora-rank 16 --lora-alpha 32 --learning-rate 2e-4 --warmup 20 --iters 300 --batch-size 16
       --steps-per-eval 100)
recipe=(--timestamp-prob 0.5 --prompt-prob 0.2 --no-speech-fraction 1.0 --pack-fraction 0.5)
if [ "$part" = padding ]; then
  python3 benchmarks/padding_policy.py --model "$model" --eval "$data/en-read" --eval "$data/te/validation" \
      --data "$data/te" --language te --out "$HOME/runs/padding" --train-args "${flags[*]}" \
      > "$out/padding.log" 2>&1 || tail -20 "$out/padding.log"
  grep -E "^padding|lora.py wall|^Iter [0-9]+: val" "$out/padding.log"
  cp "$HOME/runs/padding/padding.json" "$out/"
elif [ "$part" = plain ]; then  # yo without the recipe's flags, as the padding run trains te
  TESTS=best bash benchmarks/finetune_gpu.sh "$model" "$data" yo yo_plain "${flags[@]}"
else
  for lang in ${LANGS:-te yo}; do  # LANGS=yo: te_skills from an earlier call (pipeline_gpu.sh) is kept
    TESTS=best bash benchmarks/finetune_gpu.sh "$model" "$data" $lang ${lang}_skills "${flags[@]}" "${recipe[@]}"
  done
  routes="te=$HOME/runs/te_skills/best,yo=$HOME/runs/yo_skills/best"
  python3 benchmarks/routed_wer.py --model "$model" --adapter-path "$routes" --data "$data/en-read" \
      --out "$out/routed_en-read.json" 2>&1 | tail -1
  python3 benchmarks/no_speech_check.py --model "$model" --adapter-path "$routes" --out "$out/no_speech.json" \
      2>&1 | tail -20
  for which in te_skills/best padding/adapters-mel/best; do
    tag=${which%%/*}
    [ -d "$HOME/runs/$which" ] || continue
    python3 benchmarks/longform_check.py --model "$model" --adapter-path "$HOME/runs/$which" --language te \
        --data "$data/te/validation" --output-dir "$HOME/runs/longform_$tag" > "$out/longform_$tag.log" 2>&1
    tail -30 "$out/longform_$tag.log"
    cp "$HOME/runs/longform_$tag/longform_check.json" "$out/longform_$tag.json"
  done
fi
