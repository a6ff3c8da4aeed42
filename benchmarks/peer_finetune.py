"""The standard PyTorch recipe to compare our fine-tune with: transformers Whisper + PEFT LoRA.

`WhisperForConditionalGeneration` with PEFT LoRA adapters on the layers `lora.py --lora-targets`
names, trained by a plain PyTorch loop: AdamW (weight decay 0.01), linear warm-up then cosine
decay to 0 (our `build_schedule`), gradient clipping at 1.0, bfloat16 autocast on CUDA, float32
on CPU; the encoder runs every step (no cached encoder outputs, even with --freeze-encoder).

Inputs and scoring are ours, so both recipes see the same clips, features and labels: the
splits of `--data` read by `load_local_dataset`, features and labels by `prepare_examples`
(`load_audio`, `clip_features` stored as float16, `label_tokens`), batches in
the order our trainer draws them (`epoch_batches`, `--seed`, sort window 8, last short batch
dropped). The loss is cross-entropy on labels[1:] given labels[:-1], padding masked, averaged
over real tokens. Validation clips are decoded greedily without timestamps, the language forced
(prompt sot, language, transcribe, notimestamps), with our decoder's suppressed tokens (blank and
eot too at the first step), at most 224 tokens; WER/CER by `corpus_counts`. The base model is
scored before training (step 0).

transformers weights of our MLX model (needs MLX), then a run:
    python benchmarks/peer_finetune.py --model ../shared/models/whisper-base-mlx --export-base /tmp/whisper-base-hf
    python benchmarks/peer_finetune.py --model /tmp/whisper-base-hf --data ../shared/data/te --language te \\
        --lora-targets attn.query,attn.value,cross_attn.query,cross_attn.value --iters 300 --out te.json
"""

import argparse
import inspect
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np

import common  # noqa: F401  (puts the repository on sys.path before the imports below)
from lora import lora_targets
from models.tokenizer import Tokenizer, get_tokenizer
from models.tuner.batches import Features, epoch_batches, prepare_examples
from models.tuner.datasets import load_local_dataset
from models.tuner.evaluate import reference_text
from models.tuner.metrics import corpus_counts, rates_from_counts
from utils import number

# Our block Linear names -> transformers' (relative to a layer of model.encoder / model.decoder).
HF_LAYER = {
    "attn.query": "self_attn.q_proj",
    "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj",
    "attn.out": "self_attn.out_proj",
    "cross_attn.query": "encoder_attn.q_proj",
    "cross_attn.key": "encoder_attn.k_proj",
    "cross_attn.value": "encoder_attn.v_proj",
    "cross_attn.out": "encoder_attn.out_proj",
    "mlp1": "fc1",
    "mlp2": "fc2",
}
SORT_WINDOW = 8  # TrainingArgs.sort_window: the same batches as lora.py
PAD_TO_MULTIPLE = 8  # PyTorch needs no fixed shapes; 8 keeps tensor-core friendly widths
SAMPLE_LEN = 224  # n_text_ctx // 2: our decoder's default sample_len


@dataclass
class PeerSettings:
    lora_targets: List[str]
    freeze_encoder: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    learning_rate: float = 1e-4
    warmup: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    iters: int = 200
    batch_size: int = 8
    eval_batch_size: int = 32
    seed: int = 0
    steps_per_report: int = 10
    max_clips: Optional[int] = None


# ---------------------------------------------------------------- targets, schedule, data


def peft_target_regex(targets: Sequence[str], freeze_encoder: bool) -> str:
    """PEFT `target_modules` (a regex it full-matches against module names) for our target names:
    every decoder layer, and every encoder layer unless `freeze_encoder`; cross-attention is the
    decoder's only, so encoder and decoder, self- and cross-attention are never confused."""
    parts = []
    for stack in ("decoder",) if freeze_encoder else ("encoder", "decoder"):
        layers = [HF_LAYER[t] for t in targets if stack == "decoder" or not t.startswith("cross_attn.")]
        if layers:
            parts.append(rf"{stack}\.layers\.\d+\.(?:{'|'.join(re.escape(name) for name in layers)})")
    return r"model\.(?:" + "|".join(parts) + ")"


def lr_factor(step: int, warmup: int, iters: int) -> float:
    """Our `build_schedule` as a multiple of the peak rate at update `step` (0-based): linear from
    1/warmup to 1 over `warmup` updates, then cosine to 0 over the remaining ones."""
    if step < warmup:
        return (1 + (warmup - 1) * step / warmup) / warmup
    total = max(iters - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total) / total))


def model_tokenizer(n_vocab: int, language: Optional[str]) -> Tokenizer:
    """`tokenizer_for` of a model with `n_vocab` tokens (Whisper.is_multilingual / num_languages)."""
    multilingual = n_vocab >= 51865
    return get_tokenizer(multilingual, n_vocab - 51765 - int(multilingual), language=language, task="transcribe")


def load_features(data: str, tokenizer: Tokenizer, n_mels: int, language: Optional[str], max_clips: Optional[int]):
    """(train, validation) Features of a local data folder, as lora.py reads them."""
    splits = load_local_dataset(data)
    if not splits.get("train") or not splits.get("validation"):
        raise SystemExit(f"{data}: need train and validation clips, found splits {sorted(splits)}")
    out = []
    for name in ("train", "validation"):
        examples = splits[name][:max_clips] if max_clips is not None else splits[name]
        features, report = prepare_examples(examples, tokenizer, n_mels, language)
        print(f"{name}: {report}", flush=True)
        if not features:
            raise SystemExit(f"{data}: no usable {name} clips ({report})")
        out.append(features)
    return out


def training_order(lengths: Sequence[int], batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless clip-index batches, epoch after epoch, as our `training_batches` draws them."""
    if len(lengths) < batch_size:
        raise SystemExit(f"{len(lengths)} training clips cannot fill one batch of {batch_size}; lower --batch-size")
    epoch = 0
    while True:
        yield from epoch_batches(
            lengths, batch_size, shuffle=True, seed=seed, epoch=epoch, drop_last=True, sort_window=SORT_WINDOW
        )
        epoch += 1


def to_tensors(features: Sequence[Features], pad_id: int, device):
    """mel (B, n_mels, N_FRAMES) float32; inputs, targets (B, T) int64 padded with `pad_id`; mask (B, T)."""
    import torch

    width = -(-max(len(f.labels) - 1 for f in features) // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    inputs = np.full((len(features), width), pad_id, dtype=np.int64)
    targets = np.full((len(features), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(features), width), dtype=np.float32)
    for row, f in enumerate(features):
        n = len(f.labels) - 1
        inputs[row, :n], targets[row, :n], mask[row, :n] = f.labels[:-1], f.labels[1:], 1.0
    mel = torch.from_numpy(np.stack([f.mel for f in features])).to(device, torch.float32).transpose(1, 2)
    return mel, *(torch.from_numpy(a).to(device) for a in (inputs, targets, mask))


def masked_loss(logits, targets, mask):
    """Cross-entropy in float32 averaged over real target tokens."""
    import torch.nn.functional as F

    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * mask.flatten()).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------- decoding and scoring


def _cache_keyword(model) -> str:
    # transformers 5.24 calls the decoder cache `cache` (argument and output); older 5.x `past_key_values`.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_batch(model, mel, prompt: Sequence[int], tokenizer: Tokenizer, sample_len: int = SAMPLE_LEN):
    """Greedy tokens (eot and after dropped) of each clip of `mel` (B, n_mels, N_FRAMES) after `prompt`."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    device, eot, keyword = mel.device, tokenizer.eot, _cache_keyword(model)
    suppress = torch.tensor(tokenizer.suppressed_tokens(), device=device)
    at_start = torch.tensor(tokenizer.encode(" ") + [eot], device=device)  # suppress_blank, as OpenAI
    encoded = BaseModelOutput(last_hidden_state=model.get_encoder()(input_features=mel).last_hidden_state)
    step_input = torch.tensor([list(prompt)] * len(mel), device=device)
    finished = torch.zeros(len(mel), dtype=torch.bool, device=device)
    cache, sampled = None, []
    for step in range(sample_len):
        out = model(encoder_outputs=encoded, decoder_input_ids=step_input, use_cache=True, **{keyword: cache})
        cache, logits = getattr(out, keyword), out.logits[:, -1].float()
        logits[:, suppress] = -math.inf
        if step == 0:
            logits[:, at_start] = -math.inf
        next_tokens = torch.where(finished, eot, logits.argmax(-1))
        sampled.append(next_tokens)
        finished |= next_tokens == eot
        if bool(finished.all()):
            break
        step_input = next_tokens[:, None]
    rows = torch.stack(sampled, 1).tolist()
    return [row[: row.index(eot)] if eot in row else row for row in rows]


def prompt_of(tokenizer: Tokenizer, labels: np.ndarray) -> tuple:
    """The label's prefix up to notimestamps: [sot, language, transcribe, notimestamps] (multilingual)."""
    tokens = [int(t) for t in labels]
    return tuple(tokens[: tokens.index(tokenizer.no_timestamps) + 1])


def score(model, tokenizer: Tokenizer, features: Sequence[Features], batch_size: int, device, autocast) -> dict:
    """Greedy WER/CER of `features` (decoded in batches of one prompt, i.e. one language)."""
    import torch

    groups = {}
    for index, f in enumerate(features):
        groups.setdefault(prompt_of(tokenizer, f.labels), []).append(index)
    hyps = [""] * len(features)
    model.eval()
    with torch.no_grad(), autocast():
        for prompt, indices in groups.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                mel, *_ = to_tensors([features[i] for i in chunk], tokenizer.eot, device)
                for i, tokens in zip(chunk, greedy_batch(model, mel, prompt, tokenizer)):
                    hyps[i] = tokenizer.decode(tokens).strip()
    refs = [reference_text(tokenizer, f.labels) for f in features]
    wer, cer = rates_from_counts(corpus_counts(refs, hyps))
    return {"wer": wer, "cer": cer, "hyps": hyps}


# ---------------------------------------------------------------- model and training


def add_lora(model, settings: PeerSettings):
    """PEFT LoRA on the layers `settings` names (checked against the model's module names)."""
    from peft import LoraConfig, get_peft_model

    pattern = peft_target_regex(settings.lora_targets, settings.freeze_encoder)
    matched = [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]
    config = model.config
    expected = 0
    for layers, stack in ((config.encoder_layers, "encoder"), (config.decoder_layers, "decoder")):
        if stack == "decoder" or not settings.freeze_encoder:
            expected += layers * sum(stack == "decoder" or not t.startswith("cross_") for t in settings.lora_targets)
    if len(matched) != expected:
        raise RuntimeError(f"LoRA targets matched {len(matched)} modules, expected {expected}: {matched[:4]}...")
    lora = LoraConfig(
        r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules=pattern, bias="none"
    )
    peft_model = get_peft_model(model, lora)  # injects the LoRA layers into `model` itself
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    print(f"LoRA on {len(matched)} layers, trainable parameters {sum(p.numel() for p in trainable):,}", flush=True)
    return peft_model, trainable


def train(peft_model, trainable, train_set: Sequence[Features], settings: PeerSettings, device, autocast, sync):
    """Train the adapters in place; returns the loop's seconds (device synchronised at both ends) and
    the it/s of each report window."""
    import torch

    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, settings.warmup, settings.iters)
    )
    order = training_order([len(f.labels) for f in train_set], settings.batch_size, settings.seed)
    pad_id = int(train_set[0].labels[-1])
    peft_model.train()
    sync()
    start = window_start = time.perf_counter()
    window_rates = []
    window_loss, window_tokens = torch.zeros((), device=device), 0.0
    for step in range(1, settings.iters + 1):
        batch = [train_set[i] for i in next(order)]
        mel, inputs, targets, mask = to_tensors(batch, pad_id, device)
        n_tokens = sum(len(f.labels) - 1 for f in batch)  # counted on the host: no device sync
        lr = schedule.get_last_lr()[0]
        with autocast():
            logits = peft_model(input_features=mel, decoder_input_ids=inputs).logits
        loss = masked_loss(logits, targets, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
        optimizer.step()
        schedule.step()
        window_loss, window_tokens = window_loss + loss.detach() * n_tokens, window_tokens + n_tokens
        if step % settings.steps_per_report == 0 or step == settings.iters:
            sync()
            seconds, window = time.perf_counter() - window_start, (step - 1) % settings.steps_per_report + 1
            window_rates.append(window / seconds)
            print(
                f"Iter {step}: train loss {float(window_loss) / window_tokens:.3f}, lr {lr:.3g}, "
                f"it/s {window / seconds:.2f}, tokens/s {window_tokens / seconds:.0f}, "
                f"peak mem {format_gb(peak_memory_gb(device))}",
                flush=True,
            )
            window_start, window_loss, window_tokens = time.perf_counter(), torch.zeros((), device=device), 0.0
    sync()
    return time.perf_counter() - start, window_rates


def peak_memory_gb(device) -> Optional[float]:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None


def format_gb(value: Optional[float]) -> str:
    return "– (CPU)" if value is None else f"{value:.2f} GB"


def export_base(model_path: str, folder: str, language: Optional[str]) -> None:
    """Write our MLX model in the transformers layout (weights kept in their stored dtype)."""
    from models.export.hf import save_hf_folder
    from models.loading import load_model

    model = load_model(model_path, dtype=None)
    card = f"Whisper {model_path} in the transformers layout, written by benchmarks/peer_finetune.py.\n"
    save_hf_folder(model, Path(folder), card, language)
    print(f"wrote {folder}")


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="transformers-layout Whisper folder (or, with --export-base, ours)")
    p.add_argument("--export-base", metavar="DIR", help="write --model in the transformers layout to DIR and stop")
    p.add_argument("--data", help="local folder with train/ and validation/ (audiofolder metadata.csv)")
    p.add_argument("--language", help="language of rows without a language column, e.g. te")
    p.add_argument(
        "--lora-targets", type=lora_targets, default="attn.query,attn.value,cross_attn.query,cross_attn.value"
    )
    p.add_argument("--freeze-encoder", action="store_true", help="LoRA in the decoder only")
    p.add_argument("--lora-rank", type=number(int, 1), default=8)
    p.add_argument("--lora-alpha", type=number(float, 0, low_open=True), default=16.0, help="scale = alpha / rank")
    p.add_argument("--learning-rate", type=number(float, 0, low_open=True), default=1e-4)
    p.add_argument("--warmup", type=number(int, 0), default=0, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=number(float, 0), default=0.01)
    p.add_argument("--iters", type=number(int, 1), default=200)
    p.add_argument("--batch-size", type=number(int, 1), default=8)
    p.add_argument("--eval-batch-size", type=number(int, 1), default=32, help="clips per greedy-decoding batch")
    p.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=0)
    p.add_argument("--steps-per-report", type=number(int, 1), default=10)
    p.add_argument(
        "--max-clips", type=number(int, 1), help="use only the first N train and N validation clips (smoke runs)"
    )
    p.add_argument("--out", help="JSON result file")
    return p


def torch_device():
    """(device, autocast, sync): CUDA with bfloat16 autocast when there is one, else CPU in float32."""
    import contextlib

    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), lambda: torch.autocast("cuda", dtype=torch.bfloat16), torch.cuda.synchronize
    return torch.device("cpu"), contextlib.nullcontext, lambda: None


def run(args: argparse.Namespace, settings: PeerSettings) -> dict:
    """Score the base model, train, score again; the result dict of --out."""
    import peft
    import torch
    import transformers
    from transformers import WhisperForConditionalGeneration

    start = time.perf_counter()
    device, autocast, sync = torch_device()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(settings.seed)  # LoRA A matrices
    model = WhisperForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).to(device)
    tokenizer = model_tokenizer(model.config.vocab_size, args.language)
    train_set, val_set = load_features(
        args.data, tokenizer, model.config.num_mel_bins, args.language, settings.max_clips
    )
    base = score(model, tokenizer, val_set, settings.eval_batch_size, device, autocast)
    print(f"Step 0 (base): WER {100 * base['wer']:.1f}%, CER {100 * base['cer']:.1f}%", flush=True)
    peft_model, trainable = add_lora(model, settings)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_seconds, window_rates = train(peft_model, trainable, train_set, settings, device, autocast, sync)
    peak = peak_memory_gb(device)
    final = score(model, tokenizer, val_set, settings.eval_batch_size, device, autocast)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    return {
        "recipe": "pytorch-transformers-peft",
        "data": args.data,
        "language": args.language,
        "settings": {
            **asdict(settings),
            "model": args.model,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "precision": "bfloat16 autocast" if device.type == "cuda" else "float32",
            "train_clips": len(train_set),
            "validation_clips": len(val_set),
            "trainable_parameters": sum(p.numel() for p in trainable),
            **versions,
        },
        "base_cer": base["cer"],
        "base_wer": base["wer"],
        "cer": final["cer"],
        "wer": final["wer"],
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "steps_per_s": settings.iters / train_seconds,
        "median_window_steps_per_s": float(np.median(window_rates)),  # start-up costs left out
        "peak_mem_gb": peak,
        "hypotheses": {"base": base["hyps"], "final": final["hyps"]},
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.export_base is not None:
        export_base(args.model, args.export_base, args.language)
        return 0
    if args.data is None:
        raise SystemExit("--data is required (unless --export-base)")
    from_flags = {f.name: getattr(args, f.name) for f in fields(PeerSettings) if hasattr(args, f.name)}
    settings = PeerSettings(**{**from_flags, "lora_targets": args.lora_targets.split(",")})
    result = run(args, settings)
    if args.out is not None:
        from models.atomic import write_json_atomic

        write_json_atomic(Path(args.out), result)
    print(
        f"peer_finetune {args.language or ''} {args.data}: CER {100 * result['base_cer']:.1f}% -> "
        f"{100 * result['cer']:.1f}%, WER {100 * result['base_wer']:.1f}% -> {100 * result['wer']:.1f}%, "
        f"{settings.iters} iters in {result['train_seconds']:.1f} s ({result['steps_per_s']:.2f} it/s), "
        f"peak {format_gb(result['peak_mem_gb'])}, total {result['total_seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
