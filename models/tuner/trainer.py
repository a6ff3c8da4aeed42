"""LoRA training loop: compiled steps, schedules, evaluation with real decoding, checkpoints, resume."""

import math
import signal
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ..tokenizer import Tokenizer
from .adapters import AdapterFolder, MetricsLog, load_resume_state, save_resume_state
from .augment import SpecAugment
from .batches import Batch, Features, batch_shapes, training_batches
from .checkpointing import checkpoint_blocks
from .distributed import all_sum_tree, any_rank
from .evaluate import evaluate
from .labels import Labeler
from .pipeline import FeatureLoader
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
    # Build the compiled step for every batch shape of the coming steps before step 1. None: on a GPU only,
    # where a new shape costs a compile many steps long; on the CPU a step outlasts its compile.
    precompile: Optional[bool] = None


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
            checkpoint_blocks(model)
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

    def precompile(self, shapes: Iterable[Tuple[int, int]], features_shape: Tuple[int, ...]) -> None:
        """Build the compiled step for each (rows, target width) of `shapes` before training, so no report
        window pays for a new shape; weights, optimizer state and random key are put back as they were.
        (Ranks of a distributed run would each need the same shapes: they compile as they go instead.)"""
        model, optimizer = self.model, self.optimizer
        optimizer.init(model.trainable_parameters())  # what the first update would do; a resumed state is kept
        params, state = tree_map(lambda x: x, model.parameters()), tree_map(lambda x: x, optimizer.state)
        high, low = (int(v) for v in mx.random.state[0].tolist())
        for rows, width in sorted(shapes):
            tokens, mask = mx.zeros((rows, width), mx.int32), mx.zeros((rows, width), mx.float32)
            batch = Batch(mx.zeros((rows, *features_shape)), tokens, tokens, mask, 0, [])
            mx.eval(Trainer.train_step(self, [batch] * self.args.grad_accumulation), model.state, optimizer.state)
        model.update(params)
        optimizer.state.clear()  # in place: the compiled steps hold this very dict
        optimizer.state.update(state)
        mx.random.seed((high << 32) | low)  # the same key (adapters.load_resume_state does the same)
        mx.eval(model.parameters(), optimizer.state)

    def lr_at(self, step: int) -> float:
        return float(self.schedule(mx.array(step)))


class TrainingStopped(RuntimeError):
    """Training stopped early (non-finite loss); the message says which files are still good."""


class _Run:
    """What one call of `train` keeps between steps: the folder, metrics, best score, last save."""

    def __init__(self, trainer: Trainer, val_set: Sequence[Features], folder: AdapterFolder, resume: bool, loader):
        self.trainer, self.folder, self.is_main, self.loader = trainer, folder, trainer.rank == 0, loader
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
            trainer.model, trainer.tokenizer, self.val_subset, self.eval_batch, loss_fn, world=trainer.world,
            loader=self.loader,
        )  # fmt: skip
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


PRECOMPILE_STEPS = 1000  # the shapes of this many steps' batches are compiled before the first


class _Upcoming:
    """The micro-batches of the next step, fetched ahead; the end of a stream is raised when they are taken."""

    def __init__(self, batches: Iterator[Batch], count: int):
        self.batches, self.count, self.ready = batches, count, None

    def fetch(self) -> None:
        try:
            self.ready = [next(self.batches) for _ in range(self.count)]
        except StopIteration:
            self.ready = None

    def take(self) -> list:
        if self.ready is None:
            self.fetch()
            if self.ready is None:
                raise StopIteration("the training batches ran out")
        ready, self.ready = self.ready, None
        return ready


def _late_note(record: dict, steps: int) -> str:
    """What the report line says when steps waited for data (the loader's queue ran empty)."""
    if not record["data_late"]:
        return ""
    return f", data late for {record['data_late']} of {steps} steps ({record['data_wait_s']:.1f} s waiting)"


def train(
    trainer: Trainer,
    train_set: Sequence[Features],
    val_set: Sequence[Features],
    folder: AdapterFolder,
    resume: bool = False,
    batch_source: Optional[Callable[[int], Iterator[Batch]]] = None,
    labeler: Optional[Labeler] = None,
    spec_augment: Optional[SpecAugment] = None,
    loader: Optional[FeatureLoader] = None,
) -> dict:
    """Run the training loop, saving into `folder` (rank 0 only); returns the last evaluation's numbers.

    `batch_source(start)` yields batches from micro-batch `start` on (default: shuffled epochs
    of `train_set`, with labels drawn by `labeler` and features masked by `spec_augment`;
    streaming datasets pass their own). `loader` computes the features of examples that hold
    only their audio (pipeline.py), for training and validation.
    Ctrl-C saves a resumable checkpoint and returns; a non-finite loss stops without saving.
    """
    args, model, log = trainer.args, trainer.model, trainer.log
    loader = FeatureLoader() if loader is None else loader
    run = _Run(trainer, val_set, folder, resume, loader)
    precompile = mx.default_device() == mx.gpu if args.precompile is None else args.precompile
    precompiled = precompile and batch_source is None and trainer.world is None
    if batch_source is None:
        world_size = 1 if trainer.world is None else trainer.world.size()
        plan = dict(
            seed=args.seed, sort_window=args.sort_window, pad_to_multiple=args.pad_to_multiple, rank=trainer.rank,
            world_size=world_size, labeler=labeler,
        )  # fmt: skip

        def batch_source(start: int) -> Iterator[Batch]:
            return training_batches(
                train_set, args.batch_size, start_step=start, spec_augment=spec_augment, loader=loader, **plan
            )

    batches = batch_source(run.start_step * args.grad_accumulation)
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    last_eval = None
    try:
        if run.start_step == 0 and args.steps_per_eval > 0:
            last_eval = run.evaluate(0)
        model.train()
        upcoming = _Upcoming(batches, args.grad_accumulation)
        if precompiled and run.start_step < args.iters:
            upcoming.fetch()
            steps = min(args.iters - run.start_step, PRECOMPILE_STEPS) * args.grad_accumulation
            start = run.start_step * args.grad_accumulation
            shapes, tic = batch_shapes(train_set, args.batch_size, steps, start_step=start, **plan), time.perf_counter()
            trainer.precompile(shapes, tuple(upcoming.ready[0].mel.shape[1:]))
            log(f"Compiled the training step for {len(shapes)} batch shapes in {time.perf_counter() - tic:.1f} s")
        loss_sum, token_sum, steps_in_report, tic = mx.array(0.0), mx.array(0.0), 0, time.perf_counter()
        waited, late = loader.waited, loader.late
        for step in range(run.start_step + 1, args.iters + 1):
            loss, n_tokens = trainer.train_step(upcoming.take())
            loss_sum, token_sum = loss_sum + loss * n_tokens, token_sum + n_tokens
            computed = (loss_sum, token_sum, model.state, trainer.optimizer.state)
            mx.async_eval(*computed)
            if step < args.iters:  # the next step's batches are read and padded while the device runs this one
                upcoming.fetch()
            mx.eval(*computed)
            steps_in_report += 1
            stopping = any_rank(bool(interrupted), trainer.world)  # Ctrl-C reaches ranks at different steps
            stopping = stopping or step == args.stop_after
            due_save = step % args.save_every == 0 or step == args.iters or stopping
            due_eval = args.steps_per_eval > 0 and (step % args.steps_per_eval == 0 or step == args.iters)
            reporting = step % args.steps_per_report == 0 or due_save or due_eval
            if reporting:
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
                    "data_wait_s": loader.waited - waited,  # the step waited for the data loader
                    "data_late": loader.late - late,
                }
                log(
                    f"Iter {step}: train loss {train_loss:.3f}, lr {record['lr']:.2e}, it/s {record['it_per_s']:.2f}, "
                    f"tokens/s {record['tokens_per_s']:.0f}, peak mem {record['peak_memory_gb']:.2f} GB"
                    + _late_note(record, steps_in_report)
                )
                run.metrics.write(record)
                loss_sum, token_sum, steps_in_report = mx.array(0.0), mx.array(0.0), 0
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
            if reporting:  # the next window times training steps only, not this evaluation or save
                tic, waited, late = time.perf_counter(), loader.waited, loader.late
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        model.eval()
    if run.is_main:
        plot_metrics(run.metrics.records(), folder.loss_plot)
    return last_eval or {}
