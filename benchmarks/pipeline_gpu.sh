#!/bin/bash
# The training-data issue on the GPU machine: benchmarks/batch_costs.py, benchmarks/data_throughput.py (whisper-base, batch 32,
# audio decoded from files against batches held in memory, encoder trained and frozen), then README's
# Telugu command (benchmarks/finetune_gpu.sh, tag te_skills) whose metrics.jsonl gives the 10-step
# windows. Results (logs, JSON, tables) go to $OUT.
# usage: bash benchmarks/pipeline_gpu.sh MODEL DATA_ROOT
set -uo pipefail
model=$1; data=$2
out=${OUT:-/tmp/out}; mkdir -p "$out"
python3 benchmarks/batch_costs.py --audio "$data/te/train" --out-dir "$out" > "$out/batch_costs.log" 2>&1 \
    || tail -30 "$out/batch_costs.log"
cat "$out/batch_costs.md"
python3 benchmarks/data_throughput.py --model "$model" --data "$data/te" "$data/yo" "$data/sw" --batch-size 32 \
    --steps 100 --out-dir "$out" > "$out/data_throughput.log" 2>&1 || tail -30 "$out/data_throughput.log"
cat "$out/data_throughput.md"
TESTS=best bash benchmarks/finetune_gpu.sh "$model" "$data" te te_skills \
    --lora-targets attn.query,attn.key,attn.value,attn.out,cross_attn.query,cross_attn.value,mlp1,mlp2 \
    --lora-rank 16 --lora-alpha 32 --learning-rate 2e-4 --warmup 20 --iters 300 --batch-size 16 \
    --steps-per-eval 100 --timestamp-prob 0.5 --prompt-prob 0.2 --no-speech-fraction 1.0 --pack-fraction 0.5
python3 - "$HOME/runs/te_skills/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"it_per_s"' in line]
later = [r for r in rows if r["step"] > 10]
median = statistics.median(r["it_per_s"] for r in rows)
low = min(later, key=lambda r: r["it_per_s"])
print(f"windows {len(rows)}, median {median:.2f} it/s, lowest after step 10: {low['it_per_s']:.2f} it/s at step "
      f"{low['step']} ({low['it_per_s'] / median:.0%} of the median); first window {rows[0]['it_per_s']:.2f} it/s")
PY
