#!/bin/bash
# End-to-end LoRA fine-tunes on the GPU machine: train, then --test on the validation split
# (base and adapters) and on English en-read (forgetting check). Results go to $OUT.
# usage: bash benchmarks/finetune_gpu.sh MODEL DATA_ROOT LANG TAG [lora.py flags...]
set -uo pipefail
model=$1; data=$2; lang=$3; tag=$4; shift 4
out=${OUT:-/tmp/out}; runs=$HOME/runs/$tag; rm -rf "$runs"; mkdir -p "$out" "$runs"
start=$(date +%s.%N)
python3 lora.py --model "$model" --data "$data/$lang" --language "$lang" --adapter-path "$runs" --overwrite \
    "$@" > "$out/$tag.log" 2>&1 || { echo "training $tag failed"; tail -20 "$out/$tag.log"; exit 1; }
end=$(date +%s.%N)
echo "$tag: lora.py wall time $(python3 -c "print(round($end - $start, 1))") s" | tee -a "$out/$tag.log"
grep -E "^Iter|Trainable|kept" "$out/$tag.log" | tail -40
for which in ${TESTS:-best final}; do
  adapters=$runs; [ $which = best ] && adapters=$runs/best
  python3 lora.py --test --model "$model" --data "$data/$lang" --language "$lang" --adapter-path "$adapters" \
      --batch-size 32 --test-output "$runs/${lang}_val_$which.jsonl" 2>&1 | grep "^Test"
  python3 lora.py --test --model "$model" --data "$data/en-read" --language en --adapter-path "$adapters" \
      --batch-size 32 --no-report --test-output "$runs/en_$which.jsonl" 2>&1 | grep "^Test"
done
rm -rf "$runs/checkpoints" "$runs/resume.safetensors"
(cd "$HOME/runs" && tar czf "$out/$tag-results.tgz" --exclude="*.safetensors" "$tag")
