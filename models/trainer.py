"""LoRA training loop: compiled steps, schedules, evaluation with real decoding, checkpoints, resume."""

import io
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .data import Features, training_batches
from .tokenizer import Tokenizer


# MLX's CUDA backend queues work in batches and frees an op's temporaries only once its batch has
# run. With its default batch size whisper-medium's training step (batch 8, H100) peaked at
# 15.6 GB; batches of at most 400 MB of arrays peak at 12.6 GB for ~3% of the speed
# (benchmarks/README.md). Read by MLX when it first touches the GPU.
CUDA_MAX_MB_PER_BUFFER = "400"


def limit_cuda_queue_memory() -> None:
    """Set MLX_MAX_MB_PER_BUFFER for training on Linux (CUDA) unless the user set it; call before any GPU work."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("MLX_MAX_MB_PER_BUFFER", CUDA_MAX_MB_PER_BUFFER)


@dataclass
class TrainingArgs:
    adapter_path: str = "adapters"
    iters: int = 200
    batch_size: int = 8
    learning_rate: float = 1e-4
    lr_schedule: str = "cosine"  # cosine | linear | constant, after warmup
    warmup: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    grad_clip: Optional[float] = 1.0
    grad_accumulation: int = 1
    grad_checkpoint: bool = False
    steps_per_report: int = 10
    steps_per_eval: int = 50
    val_batches: int = -1  # -1: the whole validation set
    eval_batch_size: Optional[int] = None
    save_every: int = 100
    seed: int = 0
    best_metric: str = "cer"  # wer | cer | loss: which validation number picks the best adapter
    sort_window: Optional[int] = 8  # length-bucketed batches (less padding)
    pad_to_multiple: int = 64  # few distinct token lengths, so the compiled step is rarely rebuilt
    # Stop after this step as Ctrl-C would (save a resumable checkpoint, return): tests use it to
    # interrupt a run at a known step; the schedule still follows `iters`.
    stop_after: Optional[int] = None


def build_schedule(args: TrainingArgs) -> Callable:
    total = max(args.iters - args.warmup, 1)
    end = args.learning_rate * args.min_lr_ratio
    if args.lr_schedule == "cosine":
        decay = optim.cosine_decay(args.learning_rate, total, end)
    elif args.lr_schedule == "linear":
        decay = optim.linear_schedule(args.learning_rate, end, total)
    elif args.lr_schedule == "constant":
        decay = lambda step: mx.array(args.learning_rate)  # noqa: E731
    else:
        raise ValueError(f"unknown lr schedule {args.lr_schedule!r}; use cosine, linear or constant")
    if args.warmup <= 0:
        return decay
    warmup = optim.linear_schedule(args.learning_rate / args.warmup, args.learning_rate, args.warmup)
    return optim.join_schedules([warmup, decay], [args.warmup])


def loss_fn(model: nn.Module, mel: mx.array, inputs: mx.array, targets: mx.array, mask: mx.array):
    """Cross-entropy in float32 averaged over real target tokens; also returns the token count.

    `mel` may be encoder outputs already (frozen-encoder cache): then the encoder is skipped.
    """
    if mel.shape[-1] == model.dims.n_audio_state:
        logits = model.logits(inputs, mel)
    else:
        logits = model(mel, inputs)
    losses = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * mask
    n_tokens = mask.sum()
    return losses.sum() / mx.maximum(n_tokens, 1), n_tokens


def _all_sum(tree, world: Optional[mx.distributed.Group]):
    """Sum the arrays of `tree` (as float32) over the ranks of `world` in one all_sum: one message
    per step rather than one per LoRA tensor, which would be latency-bound."""
    if world is None or world.size() == 1:
        return tree
    leaves = tree_flatten(tree)
    flat = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in leaves])
    flat = mx.distributed.all_sum(flat, group=world)
    offsets = np.cumsum([0] + [v.size for _, v in leaves]).tolist()
    return tree_unflatten([(k, flat[o : o + v.size].reshape(v.shape))
                           for (k, v), o in zip(leaves, offsets)])


class Trainer:
    """Holds the model, optimizer and compiled step; `train` runs the loop, `evaluate` scores."""

    def __init__(self, model, tokenizer: Tokenizer, args: TrainingArgs, world=None, log: Callable = print):
        self.model, self.tokenizer, self.args, self.log = model, tokenizer, args, log
        self.world = world if world is not None and world.size() > 1 else None
        self.rank = 0 if self.world is None else self.world.rank()
        self.dtype = model.decoder.ln.weight.dtype
        self.schedule = build_schedule(args)
        self.optimizer = optim.AdamW(learning_rate=self.schedule, weight_decay=args.weight_decay)
        if args.grad_checkpoint:
            _checkpoint_blocks(model)
        self.loss_and_grad = nn.value_and_grad(model, loss_fn)
        self._build_steps()

    def _build_steps(self):
        model, optimizer, args = self.model, self.optimizer, self.args
        state = [model.state, optimizer.state, mx.random.state]

        def token_weighted_grads(mel, inputs, targets, mask):
            (loss, n_tokens), grads = self.loss_and_grad(model, mel.astype(self.dtype), inputs, targets, mask)
            grads = tree_map(lambda g: g.astype(mx.float32) * n_tokens, grads)
            return loss * n_tokens, n_tokens, grads

        @partial(mx.compile, inputs=state, outputs=state)
        def accumulate(mel, inputs, targets, mask):
            return token_weighted_grads(mel, inputs, targets, mask)

        @partial(mx.compile, inputs=state, outputs=state)
        def apply(loss_sum, n_tokens, grads):
            total = _all_sum({"loss": loss_sum, "tokens": n_tokens, "grads": grads}, self.world)
            loss_sum, n_tokens = total["loss"], total["tokens"]
            grads = tree_map(lambda g: g / mx.maximum(n_tokens, 1), total["grads"])
            if args.grad_clip is not None:
                grads, _ = optim.clip_grad_norm(grads, args.grad_clip)
            optimizer.update(model, grads)
            return loss_sum / mx.maximum(n_tokens, 1), n_tokens

        @partial(mx.compile, inputs=state, outputs=state)
        def step(mel, inputs, targets, mask):
            return apply(*token_weighted_grads(mel, inputs, targets, mask))

        self._accumulate, self._apply, self._step = accumulate, apply, step

    def train_step(self, batches: Sequence) -> tuple:
        """One optimizer update over `grad_accumulation` micro-batches; returns (loss, n_tokens) arrays."""
        if len(batches) == 1:
            b = batches[0]
            return self._step(b.mel, b.inputs, b.targets, b.mask)
        total_loss, total_tokens, total_grads = None, None, None
        for b in batches:
            loss, n_tokens, grads = self._accumulate(b.mel, b.inputs, b.targets, b.mask)
            if total_grads is None:
                total_loss, total_tokens, total_grads = loss, n_tokens, grads
            else:
                total_loss, total_tokens = total_loss + loss, total_tokens + n_tokens
                total_grads = tree_map(mx.add, total_grads, grads)
            mx.eval(total_loss, total_tokens, total_grads)
        return self._apply(total_loss, total_tokens, total_grads)

    def lr_at(self, step: int) -> float:
        return float(self.schedule(mx.array(step)))


def _checkpoint_blocks(model):
    """Recompute each residual block in the backward pass instead of keeping its activations.

    The block class is patched once, but only blocks of `model` are checkpointed: other models
    (a decoding run, a test's reference model) keep the plain forward pass. Dropout is refused:
    the recomputation would draw other masks than the forward pass, and the gradients would be wrong.
    """
    if any(isinstance(m, nn.Dropout) and m._p_1 < 1 for _, m in model.named_modules()):
        raise ValueError("--grad-checkpoint cannot be combined with dropout (--lora-dropout > 0): the "
                         "recomputed forward pass would draw other dropout masks; drop one of the two")
    for blocks in (model.encoder.blocks, model.decoder.blocks):
        for block in blocks:
            block._grad_checkpoint = True
            block_class = type(block)
            if getattr(block_class, "_checkpointed", False):
                continue
            original = block_class.__call__

            def checkpointed(self, x, *args, _original=original, **kwargs):
                if (not getattr(self, "_grad_checkpoint", False) or not self.training
                        or kwargs.get("kv_cache") is not None or kwargs.get("return_qk")):
                    return _original(self, x, *args, **kwargs)

                def inner(params, x, *inner_args):
                    self.update(params)
                    return _original(self, x, *inner_args, **kwargs)[0]

                return mx.checkpoint(inner)(self.trainable_parameters(), x, *args), None, None

            block_class.__call__ = checkpointed
            block_class._checkpointed = True


class TrainingStopped(RuntimeError):
    """Training stopped early (non-finite loss); the message says which files are still good."""


RESUME_FILE = "resume.safetensors"


def save_resume_state(trainer: "Trainer", folder: Path, step: int, extra: dict) -> None:
    """Adapters, optimizer state and RNG in one file (atomic), so they can never disagree."""
    from utils import save_safetensors_atomic

    arrays = {f"model.{k}": v for k, v in tree_flatten(trainer.model.trainable_parameters())}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(trainer.optimizer.state)})
    arrays["rng"] = mx.random.state[0]
    metadata = {"step": str(step), "extra": json.dumps(extra)}
    save_safetensors_atomic(Path(folder) / RESUME_FILE, arrays, metadata)


def load_resume_state(trainer: "Trainer", folder: Path) -> tuple:
    """Restore what `save_resume_state` wrote; returns (step, extra).

    In a distributed run every rank loads rank 0's file (sent over the group), so other
    machines need no copy of the folder.
    """
    path = Path(folder) / RESUME_FILE
    data = _read_on_rank0(path, trainer.world)
    if data is None:
        raise FileNotFoundError(f"{path}: nothing to resume from; train without --resume first")
    arrays, metadata = mx.load(io.BytesIO(data), format="safetensors", return_metadata=True)
    mx.eval(arrays)
    model_weights = [(k[len("model."):], v) for k, v in arrays.items() if k.startswith("model.")]
    expected = {k for k, _ in tree_flatten(trainer.model.trainable_parameters())}
    if {k for k, _ in model_weights} != expected:
        raise ValueError(f"{path}: its adapters do not match the LoRA settings of this run; use the same flags")
    trainer.model.load_weights(model_weights, strict=False)
    optimizer_state = [(k[len("optimizer."):], v) for k, v in arrays.items() if k.startswith("optimizer.")]
    # In place: the compiled steps hold this very dict (a new one would be invisible to them).
    trainer.optimizer.state.clear()
    trainer.optimizer.state.update(tree_unflatten(optimizer_state))
    high, low = (int(v) for v in arrays["rng"].tolist())
    mx.random.seed((high << 32) | low)  # mx.random.state takes no assignment; this seed gives the same key
    mx.eval(trainer.model.parameters(), trainer.optimizer.state)
    return int(metadata["step"]), json.loads(metadata["extra"])


def _read_on_rank0(path: Path, world) -> Optional[bytes]:
    """The bytes of rank 0's `path`, on every rank; None when rank 0 has no such file."""
    mine = path.read_bytes() if (world is None or world.rank() == 0) and path.is_file() else b""
    if world is None:
        return mine or None
    size = mx.distributed.all_sum(mx.array(len(mine)), group=world).item()
    if size == 0:
        return None
    buffer = np.frombuffer(mine, dtype=np.uint8) if mine else np.zeros(size, dtype=np.uint8)
    return bytes(np.array(mx.distributed.all_sum(mx.array(buffer), group=world)))


def _any_rank(flag: bool, world) -> bool:
    """True on every rank when `flag` is true on any: ranks must leave the loop at the same step."""
    if world is None:
        return flag
    return mx.distributed.all_sum(mx.array(int(flag)), group=world).item() > 0


class MetricsLog:
    """metrics.jsonl in the adapter folder: one JSON object per report or evaluation."""

    def __init__(self, folder: Path, enabled: bool, resume_step: Optional[int]):
        self.path, self.enabled = Path(folder) / "metrics.jsonl", enabled
        if enabled and resume_step is not None and self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        elif enabled and resume_step is None:
            self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> List[dict]:
        if not self.path.exists():
            return []
        return [json.loads(l) for l in self.path.read_text().splitlines() if l]


def train(trainer: Trainer, train_set: Sequence[Features], val_set: Sequence[Features],
          save_adapters: Callable[[Path, str], None], resume: bool = False,
          batch_source: Optional[Callable[[int], Iterator]] = None) -> dict:
    """Run the training loop; returns the last evaluation's numbers.

    `save_adapters(folder, weights_name)` writes the adapter weights and config (rank 0 only).
    `batch_source(start)` yields (index, Batch) from micro-batch `start` on (default: shuffled
    epochs of `train_set`; streaming datasets pass their own).
    Ctrl-C saves a resumable checkpoint and returns; a non-finite loss stops without saving.
    """
    args, model, log = trainer.args, trainer.model, trainer.log
    folder, is_main = Path(args.adapter_path), trainer.rank == 0
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
    start_step, extra = (load_resume_state(trainer, folder) if resume else (0, {}))
    best = extra.get("best", math.inf)
    last_saved = start_step if resume else None  # the iteration whose adapters this run has on disk
    metrics = MetricsLog(folder, is_main, start_step if resume else None)
    world_size = 1 if trainer.world is None else trainer.world.size()
    if batch_source is None:
        batch_source = partial(training_batches, train_set, args.batch_size, seed=args.seed,
                               sort_window=args.sort_window, pad_to_multiple=args.pad_to_multiple,
                               rank=trainer.rank, world_size=world_size)
        batches = batch_source(start_step=start_step * args.grad_accumulation)
    else:
        batches = batch_source(start_step * args.grad_accumulation)
    eval_batch = args.eval_batch_size or args.batch_size
    val_subset = val_set if args.val_batches < 0 else val_set[: args.val_batches * eval_batch]

    def run_eval(step: int) -> Optional[dict]:
        nonlocal best
        if not val_subset:
            return None
        tic = time.perf_counter()
        result = evaluate_split(trainer, val_subset, eval_batch)
        record = {"step": step, "val_loss": result.loss, "val_wer": result.wer, "val_cer": result.cer,
                  "eval_time": time.perf_counter() - tic}
        log(f"Iter {step}: val {result.summary()}, took {record['eval_time']:.1f}s")
        metrics.write(record)
        score = {"loss": result.loss, "wer": result.wer, "cer": result.cer}[args.best_metric]
        if is_main and score is not None and score < best:
            best = score
            save_adapters(folder / "best", "adapters.safetensors")
            log(f"Iter {step}: new best val {args.best_metric} {score:.4f}, saved {folder / 'best'}")
        return record

    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    last_eval = None
    try:
        if start_step == 0 and args.steps_per_eval > 0:
            last_eval = run_eval(0)
        model.train()
        loss_sum, token_sum, steps_in_report, tic = mx.array(0.0), mx.array(0.0), 0, time.perf_counter()
        for step in range(start_step + 1, args.iters + 1):
            micro = [next(batches)[1] for _ in range(args.grad_accumulation)]
            loss, n_tokens = trainer.train_step(micro)
            loss_sum, token_sum = loss_sum + loss * n_tokens, token_sum + n_tokens
            mx.eval(loss_sum, token_sum, model.state, trainer.optimizer.state)
            steps_in_report += 1
            stopping = _any_rank(bool(interrupted), trainer.world)  # Ctrl-C reaches ranks at different steps
            stopping = stopping or step == args.stop_after
            due_save = step % args.save_every == 0 or step == args.iters or stopping
            due_eval = args.steps_per_eval > 0 and (step % args.steps_per_eval == 0 or step == args.iters)
            # Check the loss before every save and evaluation: non-finite weights must never be kept as best.
            if step % args.steps_per_report == 0 or due_save or due_eval:
                train_loss = float(loss_sum / mx.maximum(token_sum, 1))
                # A finite loss can still come with an update that overflowed the weights.
                weights = tree_flatten(model.trainable_parameters())
                weights_ok = mx.stack([mx.isfinite(v).all() for _, v in weights]).all().item()
                if not (math.isfinite(train_loss) and weights_ok):
                    problem = f"training loss is {train_loss}" + ("" if weights_ok else ", adapter weights not finite")
                    kept = ("no adapters were saved before it" if last_saved is None else f"the last good adapters "
                            f"(iter {last_saved}) are in {folder} (resume.safetensors / checkpoints)")
                    raise TrainingStopped(
                        f"Iter {step}: {problem}; stopped without saving; {kept}. Lower --learning-rate "
                        f"or use --dtype float32"
                    )
                elapsed = time.perf_counter() - tic
                record = {"step": step, "train_loss": train_loss, "lr": trainer.lr_at(step),
                          "it_per_s": steps_in_report / elapsed, "tokens_per_s": float(token_sum) / elapsed,
                          "peak_memory_gb": mx.get_peak_memory() / 1e9}
                log(f"Iter {step}: train loss {train_loss:.3f}, lr {record['lr']:.2e}, it/s {record['it_per_s']:.2f}, "
                    f"tokens/s {record['tokens_per_s']:.0f}, peak mem {record['peak_memory_gb']:.2f} GB")
                metrics.write(record)
                loss_sum, token_sum, steps_in_report, tic = mx.array(0.0), mx.array(0.0), 0, time.perf_counter()
            if due_eval:
                last_eval = run_eval(step)
                model.train()
            if due_save and is_main:
                save_adapters(folder, "adapters.safetensors")
                if step % args.save_every == 0:
                    save_adapters(folder / "checkpoints", f"{step:07d}_adapters.safetensors")
                save_resume_state(trainer, folder, step, {"best": best})
                last_saved = step
                if stopping:
                    how = "Interrupted" if interrupted else "Stopped"
                    log(f"{how} at iter {step}: saved adapters and resume state in {folder}; continue with --resume")
            if stopping:
                break
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        model.eval()
    if is_main:
        plot_metrics(metrics.records(), folder / "loss.png")
    return last_eval or {}


def evaluate_split(trainer: Trainer, features: Sequence[Features], batch_size: int):
    from .evaluate import evaluate

    return evaluate(trainer.model, trainer.tokenizer, features, batch_size, loss_fn, world=trainer.world)


def plot_metrics(records: List[dict], path: Path) -> Optional[Path]:
    """Loss (and validation CER) curves as a PNG; skipped when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    cers = [(r["step"], 100 * r["val_cer"]) for r in records if r.get("val_cer") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train loss"), (val, "validation loss")):
        if points:
            ax.plot(*zip(*points), label=label, marker="." if len(points) < 30 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (per token)")
    if cers:
        twin = ax.twinx()
        twin.plot(*zip(*cers), color="tab:red", linestyle="--", marker="o", label="validation CER %")
        twin.set_ylabel("CER %")
        twin.legend(loc="upper center")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
