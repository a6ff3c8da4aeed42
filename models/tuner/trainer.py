"""LoRA training loop: compiled steps, schedules, evaluation with real decoding, checkpoints, resume."""

import math
import signal
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ..tokenizer import Tokenizer
from .adapters import AdapterFolder, MetricsLog, load_resume_state, save_resume_state
from .augment import SpecAugment
from .batches import Batch, Features, training_batches
from .distributed import all_sum_tree, any_rank
from .evaluate import evaluate
from .labels import Labeler
from .report import plot_metrics


@dataclass
class TrainingArgs:
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


class Trainer:
    """Holds the model, optimizer and compiled step; `train` runs the loop, `evaluate` scores."""

    def __init__(self, model, tokenizer: Tokenizer, args: TrainingArgs, world=None, log: Callable = print):
        self.model, self.tokenizer, self.args, self.log = model, tokenizer, args, log
        self.world = world if world is not None and world.size() > 1 else None
        self.rank = 0 if self.world is None else self.world.rank()
        self.dtype = model.dtype
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
            total = all_sum_tree({"loss": loss_sum, "tokens": n_tokens, "grads": grads}, self.world)
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
        raise ValueError(
            "--grad-checkpoint cannot be combined with dropout (--lora-dropout > 0): the "
            "recomputed forward pass would draw other dropout masks; drop one of the two"
        )
    for blocks in (model.encoder.blocks, model.decoder.blocks):
        for block in blocks:
            block._grad_checkpoint = True
            block_class = type(block)
            if getattr(block_class, "_checkpointed", False):
                continue
            original = block_class.__call__

            def checkpointed(self, x, *args, _original=original, **kwargs):
                if (
                    not getattr(self, "_grad_checkpoint", False)
                    or not self.training
                    or kwargs.get("kv_cache") is not None
                    or kwargs.get("return_qk")
                ):
                    return _original(self, x, *args, **kwargs)

                def inner(params, x, *inner_args):
                    self.update(params)
                    return _original(self, x, *inner_args, **kwargs)[0]

                return mx.checkpoint(inner)(self.trainable_parameters(), x, *args), None, None

            block_class.__call__ = checkpointed
            block_class._checkpointed = True


class TrainingStopped(RuntimeError):
    """Training stopped early (non-finite loss); the message says which files are still good."""


class _Run:
    """What one call of `train` keeps between steps: the folder, metrics, best score, last save."""

    def __init__(self, trainer: Trainer, val_set: Sequence[Features], folder: AdapterFolder, resume: bool):
        self.trainer, self.folder, self.is_main = trainer, folder, trainer.rank == 0
        args = trainer.args
        if self.is_main:
            folder.path.mkdir(parents=True, exist_ok=True)
        self.start_step, extra = (
            load_resume_state(folder, trainer.model, trainer.optimizer, trainer.world) if resume else (0, {})
        )
        self.best = extra.get("best", math.inf)
        self.last_saved = self.start_step if resume else None  # the iteration whose adapters are on disk
        self.metrics = MetricsLog(folder.metrics, self.is_main, self.start_step if resume else None)
        self.eval_batch = args.eval_batch_size or args.batch_size
        self.val_subset = val_set if args.val_batches < 0 else val_set[: args.val_batches * self.eval_batch]

    def evaluate(self, step: int) -> Optional[dict]:
        """Validation loss and greedy WER/CER; a new best score saves best/."""
        trainer, args = self.trainer, self.trainer.args
        if not self.val_subset:
            return None
        tic = time.perf_counter()
        result = evaluate(
            trainer.model, trainer.tokenizer, self.val_subset, self.eval_batch, loss_fn, world=trainer.world
        )
        record = {
            "step": step,
            "val_loss": result.loss,
            "val_wer": result.wer,
            "val_cer": result.cer,
            "val_wer_orthographic": result.wer_orthographic,
            "val_cer_orthographic": result.cer_orthographic,
            "eval_time": time.perf_counter() - tic,
        }
        trainer.log(f"Iter {step}: val {result.summary()}, took {record['eval_time']:.1f}s")
        self.metrics.write(record)
        score = {"loss": result.loss, "wer": result.wer, "cer": result.cer}[args.best_metric]
        if self.is_main and score is not None and score < self.best:
            self.best = score
            self.folder.save(trainer.model, "best")
            trainer.log(f"Iter {step}: new best val {args.best_metric} {score:.4f}, saved {self.folder.best}")
        return record

    def check_finite(self, step: int, train_loss: float) -> None:
        """Stop before any save or evaluation when the loss or the adapter weights are not finite."""
        weights = tree_flatten(self.trainer.model.trainable_parameters())
        weights_ok = mx.stack([mx.isfinite(v).all() for _, v in weights]).all().item()
        if math.isfinite(train_loss) and weights_ok:
            return
        problem = f"training loss is {train_loss}" + ("" if weights_ok else ", adapter weights not finite")
        kept = (
            "no adapters were saved before it"
            if self.last_saved is None
            else f"the last good adapters "
            f"(iter {self.last_saved}) are in {self.folder.path} (resume.safetensors / checkpoints)"
        )
        raise TrainingStopped(
            f"Iter {step}: {problem}; stopped without saving; {kept}. Lower --learning-rate or use --dtype float32"
        )

    def save(self, step: int) -> None:
        trainer, folder = self.trainer, self.folder
        folder.save(trainer.model)
        if step % trainer.args.save_every == 0:
            folder.save(trainer.model, "checkpoint", step)
        save_resume_state(folder, trainer.model, trainer.optimizer, step, {"best": self.best})
        self.last_saved = step


def train(
    trainer: Trainer,
    train_set: Sequence[Features],
    val_set: Sequence[Features],
    folder: AdapterFolder,
    resume: bool = False,
    batch_source: Optional[Callable[[int], Iterator[Batch]]] = None,
    labeler: Optional[Labeler] = None,
    spec_augment: Optional[SpecAugment] = None,
) -> dict:
    """Run the training loop, saving into `folder` (rank 0 only); returns the last evaluation's numbers.

    `batch_source(start)` yields batches from micro-batch `start` on (default: shuffled epochs
    of `train_set`, with labels drawn by `labeler` and features masked by `spec_augment`;
    streaming datasets pass their own).
    Ctrl-C saves a resumable checkpoint and returns; a non-finite loss stops without saving.
    """
    args, model, log = trainer.args, trainer.model, trainer.log
    run = _Run(trainer, val_set, folder, resume)
    if batch_source is None:
        world_size = 1 if trainer.world is None else trainer.world.size()

        def batch_source(start: int) -> Iterator[Batch]:
            return training_batches(
                train_set,
                args.batch_size,
                seed=args.seed,
                start_step=start,
                sort_window=args.sort_window,
                pad_to_multiple=args.pad_to_multiple,
                rank=trainer.rank,
                world_size=world_size,
                labeler=labeler,
                spec_augment=spec_augment,
            )

    batches = batch_source(run.start_step * args.grad_accumulation)
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    last_eval = None
    try:
        if run.start_step == 0 and args.steps_per_eval > 0:
            last_eval = run.evaluate(0)
        model.train()
        loss_sum, token_sum, steps_in_report, tic = mx.array(0.0), mx.array(0.0), 0, time.perf_counter()
        for step in range(run.start_step + 1, args.iters + 1):
            loss, n_tokens = trainer.train_step([next(batches) for _ in range(args.grad_accumulation)])
            loss_sum, token_sum = loss_sum + loss * n_tokens, token_sum + n_tokens
            mx.eval(loss_sum, token_sum, model.state, trainer.optimizer.state)
            steps_in_report += 1
            stopping = any_rank(bool(interrupted), trainer.world)  # Ctrl-C reaches ranks at different steps
            stopping = stopping or step == args.stop_after
            due_save = step % args.save_every == 0 or step == args.iters or stopping
            due_eval = args.steps_per_eval > 0 and (step % args.steps_per_eval == 0 or step == args.iters)
            if step % args.steps_per_report == 0 or due_save or due_eval:
                train_loss = float(loss_sum / mx.maximum(token_sum, 1))
                run.check_finite(step, train_loss)  # non-finite weights must never be kept as best
                elapsed = time.perf_counter() - tic
                record = {
                    "step": step,
                    "train_loss": train_loss,
                    "lr": trainer.lr_at(step),
                    "it_per_s": steps_in_report / elapsed,
                    "tokens_per_s": float(token_sum) / elapsed,
                    "peak_memory_gb": mx.get_peak_memory() / 1e9,
                }
                log(
                    f"Iter {step}: train loss {train_loss:.3f}, lr {record['lr']:.2e}, it/s {record['it_per_s']:.2f}, "
                    f"tokens/s {record['tokens_per_s']:.0f}, peak mem {record['peak_memory_gb']:.2f} GB"
                )
                run.metrics.write(record)
                loss_sum, token_sum, steps_in_report, tic = mx.array(0.0), mx.array(0.0), 0, time.perf_counter()
            if due_eval:
                last_eval = run.evaluate(step)
                model.train()
            if due_save and run.is_main:
                run.save(step)
                if stopping:
                    how = "Interrupted" if interrupted else "Stopped"
                    log(
                        f"{how} at iter {step}: saved adapters and resume state in {folder.path}; "
                        f"continue with --resume"
                    )
            if stopping:
                break
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        model.eval()
    if run.is_main:
        plot_metrics(run.metrics.records(), folder.loss_plot)
    return last_eval or {}
