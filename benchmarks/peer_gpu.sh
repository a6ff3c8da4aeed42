#!/bin/bash
# This project's fine-tune and the PyTorch + PEFT recipe on the same data, settings and GPU, for
# te and yo, plus per-language routing on English and Telugu. Results (logs, JSON) go to $OUT.
# usage: bash benchmarks/peer_gpu.sh MODEL DATA_ROOT ours|peer   (MODEL: our MLX whisper-base folder)
set -uo pipefail
model=$1; data=$2; part=$3
out=${OUT:-/tmp/out}; mkdir -p "$out"
flags=(--lora-targets attn.query,attn.key,attn.value,attn.out,cross_attn.query,cross_attn.value,mlp1,mlp2
       --lora-rank 16 --lora-alpha 32 --learning-rate 2e-4 --warmup 20 --iters 300 --batch-size 16)
if [ "$part" = ours ]; then
  for lang in te yo; do  # scored at step 0 and after the last step, as the peer scores base and result
    TESTS=best bash benchmarks/finetune_gpu.sh "$model" "$data" $lang ${lang}_all "${flags[@]}" --steps-per-eval 300
  done
  routes="te=$HOME/runs/te_all/best,yo=$HOME/runs/yo_all/best"
  for set in en-read te/validation yo/validation; do
    python3 benchmarks/routed_wer.py --model "$model" --adapter-path "$routes" --data "$data/$set" \
        --out "$out/routed_${set//\//_}.json" 2>&1 | tail -1
  done
else
  python3 benchmarks/peer_finetune.py --model "$model" --export-base /tmp/whisper-base-hf > "$out/export.log" 2>&1 ||
    { tail -5 "$out/export.log"; exit 1; }
  for lang in te yo; do
    python3 benchmarks/peer_finetune.py --model /tmp/whisper-base-hf --data "$data/$lang" --language $lang \
        "${flags[@]}" --out "$out/peer_$lang.json" > "$out/peer_$lang.log" 2>&1 || tail -20 "$out/peer_$lang.log"
    tail -2 "$out/peer_$lang.log"
  done
fi
