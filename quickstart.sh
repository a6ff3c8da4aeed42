#!/usr/bin/env bash
# From a fresh clone with ../shared beside it: install everything, then teach whisper-base some
# Telugu with a small LoRA fine-tune (frozen encoder), and transcribe a held-out clip with the
# result. Writes only into git-ignored folders (.venv/, adapters/, outputs/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ "$(uname)" = Linux ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  dpkg -s libopenblas0-pthread ffmpeg >/dev/null 2>&1 ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread ffmpeg >/dev/null; }
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -r requirements.txt
model=../shared/models/whisper-base-mlx
.venv/bin/python lora.py --model $model --data ../shared/data/te --language te \
    --freeze-encoder --lora-targets mlp1,mlp2 --lora-rank 16 --lora-alpha 32 \
    --learning-rate 3e-4 --warmup 10 --iters 80 --batch-size 8 --steps-per-eval 40 --val-batches 1 \
    --adapter-path adapters/te --overwrite
clip=../shared/data/te/validation/$(sed -n 2p ../shared/data/te/validation/metadata.csv | cut -d, -f1)
echo "Reference: $(sed -n 2p ../shared/data/te/validation/metadata.csv | tr -d '\r' | cut -d, -f2- | sed "s/,[a-z]*$//")"
.venv/bin/python transcribe.py --model $model --language te --without-timestamps --output-dir outputs/quickstart "$clip"
.venv/bin/python transcribe.py --model $model --adapter-path adapters/te/best --language te --without-timestamps \
    --output-dir outputs/quickstart-te "$clip"
