"""Training examples as model inputs: features and label tokens, dropped examples, padded batches.

`Features` hold an example's label tokens and either its log-mel frames (`mel`) or where its
audio comes from (`audio`, see pipeline.py: decoded when its batch is due). `prepare_examples`
computes every example's features at once (small sets, tests); `iterate_batches` pads batches in an
order that depends only on (seed, epoch), loading lazy features through a `pipeline.FeatureLoader`.
"""

from dataclasses import dataclass, replace
from itertools import islice
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..audio import N_FRAMES, clip_features
from ..tokenizer import Tokenizer
from .augment import SpecAugment, apply_masks
from .datasets import DropReport, Example
from .labels import (  # noqa: F401  (DroppedExample and label_tokens are used from here too)
    MAX_LABEL_TOKENS,
    DroppedExample,
    Labeler,
    label_tokens,
)
from .pipeline import MAX_PRINTED_PROBLEMS, FeatureLoader, scan_examples


@dataclass
class Features:
    mel: Optional[np.ndarray]  # (N_FRAMES, n_mels) float16; None: computed from `audio` when needed
    labels: np.ndarray  # (n_tokens,) int32: sot, language, transcribe, notimestamps, text..., eot
    source: str
    timed: Optional[np.ndarray] = None  # the text with timestamps (labels.py); None for no speech
    group: Optional[str] = None  # speaker or recording: where a previous-text prompt comes from
    frames: int = N_FRAMES  # mel frames that hold audio
    audio: object = None  # pipeline.ClipAudio / PackedAudio / NoSpeechAudio: `read()` gives the samples
    n_samples: Optional[int] = None  # length of the audio (16 kHz samples)
    dropped: bool = False  # its audio could not be decoded: a fully masked row


@dataclass
class Batch:
    mel: mx.array  # (B, N_FRAMES, n_mels)
    inputs: mx.array  # (B, T) int32, labels[:-1] padded
    targets: mx.array  # (B, T) int32, labels[1:] padded
    mask: mx.array  # (B, T) float32, 1 on real targets
    n_tokens: int
    sources: List[str]


def prepare_examples(
    examples: Iterable[Example],
    tokenizer: Tokenizer,
    n_mels: int,
    default_language: Optional[str],
    max_label_tokens: int = MAX_LABEL_TOKENS,
    verbose: bool = True,
) -> Tuple[List[Features], DropReport]:
    """Log-mel features and label tokens of every usable example, and a report of the others.

    Dropped: empty or non-UTF-8 transcripts, unknown languages, labels over `max_label_tokens`, audio over
    30 s, and missing or unreadable audio files (each reported; loading carries on).
    `verbose=False` hides the progress bar and the messages (distributed ranks other than 0).
    """
    report = DropReport()
    total = len(examples) if hasattr(examples, "__len__") else None
    progress = tqdm(examples, total=total, desc="Preparing audio", unit="clip", leave=False, disable=not verbose)
    features = list(iter_features(progress, tokenizer, n_mels, default_language, report, max_label_tokens, verbose))
    return features, report


def iter_features(
    examples: Iterable[Example],
    tokenizer: Tokenizer,
    n_mels: int,
    default_language: Optional[str],
    report: DropReport,
    max_label_tokens: int = MAX_LABEL_TOKENS,
    verbose: bool = True,
) -> Iterator[Features]:
    """Features (mel computed) of each usable example, lazily; drops are counted in `report` (and the
    first unreadable files printed, when `verbose`)."""
    printed = 0 if verbose else MAX_PRINTED_PROBLEMS
    for f in scan_examples(examples, tokenizer, default_language, report, max_label_tokens, verbose):
        try:
            yield with_mel(f, n_mels)
        except DroppedExample as dropped:  # damage that only decoding shows
            report.drop(dropped.reason, f.source, dropped.detail)
            report.kept -= 1
            if printed < MAX_PRINTED_PROBLEMS:
                printed += 1
                tqdm.write(f"Skipping {f.source}: {dropped.detail}")


def with_mel(f: Features, n_mels: int) -> Features:
    """`f` with its log-mel features computed (numpy, as transcription computes them)."""
    if f.mel is not None:
        return f
    samples = f.audio.read()
    return replace(f, mel=mel_features(samples, n_mels), audio=None)


def mel_features(samples: np.ndarray, n_mels: int) -> np.ndarray:
    return clip_features(samples, n_mels).astype(np.float16)  # (N_FRAMES, n_mels), as transcribe() sees it


# ---------------------------------------------------------------- batching


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    sort_window: Optional[int] = None,
) -> List[np.ndarray]:
    """The global batches of one epoch as index arrays: a pure function of its arguments.

    With `sort_window`, each run of `sort_window` batches is sorted by label length before it is
    cut into batches (less padding); the batches are then shuffled as a whole when `shuffle`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if drop_last:
        order = order[: len(order) - len(order) % batch_size]
    if sort_window is not None:
        lengths, window = np.asarray(lengths), sort_window * batch_size
        chunks = [order[i : i + window] for i in range(0, len(order), window)]
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in chunks] or [order])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle and sort_window is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def iterate_batches(
    features: Sequence[Features],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    drop_last: bool = False,
    sort_window: Optional[int] = None,
    pad_to_multiple: int = 8,
    pad_id: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    labeler: Optional[Labeler] = None,
    spec_augment: Optional[SpecAugment] = None,
    loader: Optional[FeatureLoader] = None,
) -> Iterator[Batch]:
    """Padded batches of one epoch in an order fixed by (seed, epoch); `start_batch` skips ahead.

    `batch_size` is the global batch: with `world_size` > 1 each rank gets its slice of it.
    `labeler` (over `features`) draws each row's label sequence and `spec_augment` its masks,
    from a generator seeded by (seed, epoch, batch, row): a resumed run draws the same.
    `loader` computes the features of rows without mel (default: one without workers or cache).
    """
    _check_world(batch_size, rank, world_size)
    plans = _epoch_plans(
        features, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, start_batch=start_batch, drop_last=drop_last,
        sort_window=sort_window, rank=rank, world_size=world_size, labeler=labeler, spec_augment=spec_augment,
    )  # fmt: skip
    yield from _loaded(plans, loader, pad_to_multiple, pad_id)


def _epoch_plans(
    features, batch_size, *, shuffle, seed, epoch, start_batch, drop_last, sort_window=None, rank=0, world_size=1,
    labeler=None, spec_augment=None,
) -> Iterator[Tuple[List[Features], bool]]:  # fmt: skip
    """(rows, masked) of this rank for each batch of one epoch, labels drawn and masks chosen."""
    lengths = [len(f.labels) for f in features]
    order = epoch_batches(
        lengths, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last, sort_window=sort_window
    )
    drawn = labeler is not None and labeler.active or spec_augment is not None
    for number, indices in enumerate(order[start_batch:], start=start_batch):
        rows = [features[i] for i in indices]
        if drawn:
            rows = [
                _drawn_row(features, i, labeler, spec_augment, np.random.default_rng([seed, epoch, number, j]))
                for j, i in enumerate(indices)
            ]
        yield _rank_slice(rows, rank, world_size)


def _loaded(plans, loader: Optional[FeatureLoader], pad_to_multiple: int, pad_id) -> Iterator[Batch]:
    loader = FeatureLoader() if loader is None else loader
    for rows, features, masked in loader.batches(plans):
        yield collate(rows, mel=features, masked=masked, pad_to_multiple=pad_to_multiple, pad_id=pad_id)


def _drawn_row(features, index: int, labeler: Optional[Labeler], spec_augment, rng) -> Features:
    """Example `index` with its drawn label sequence (context tokens recorded) and SpecAugment masks."""
    f = features[index]
    labels, context = (f.labels, 0) if labeler is None else labeler.row(index, rng)
    masks = ()
    if spec_augment is not None:
        masks = spec_augment.draw(spec_augment.n_mels if f.mel is None else f.mel.shape[1], f.frames, rng)
    return _Row(f.mel, labels, f.source, f.timed, f.group, f.frames, f.audio, f.n_samples, f.dropped, context, masks)


@dataclass
class _Row(Features):
    context: int = 0  # leading targets that are a prompt: masked out of the loss
    masks: tuple = ()  # SpecAugment's (axis, start, width) masks


def training_batches(
    features: Sequence[Features],
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    drop_last: bool = True,
    pad_to_multiple: int = 8,
    pad_id: Optional[int] = None,
    loader: Optional[FeatureLoader] = None,
    **plan_options,
) -> Iterator[Batch]:
    """Endless shuffled batches, epoch after epoch, from micro-batch `start_step` on (for resuming).

    Step s is batch s % per_epoch of epoch s // per_epoch, so a resumed run sees the same data.
    The loader reads ahead across epoch boundaries. `plan_options` (sort_window, rank, world_size,
    labeler, spec_augment) are `iterate_batches`'.
    """
    _check_world(batch_size, plan_options.get("rank", 0), plan_options.get("world_size", 1))
    plans = _training_plans(features, batch_size, seed, start_step, drop_last, plan_options)
    yield from _loaded(plans, loader, pad_to_multiple, pad_id)


def _training_plans(features, batch_size: int, seed: int, start_step: int, drop_last: bool, plan_options: dict):
    per_epoch = len(features) // batch_size if drop_last else -(-len(features) // batch_size)
    if per_epoch == 0:
        n = len(features)
        raise ValueError(f"{n} training examples cannot fill one batch of {batch_size}; lower --batch-size")
    epoch, start = divmod(start_step, per_epoch)
    while True:
        yield from _epoch_plans(
            features, batch_size, shuffle=True, seed=seed, epoch=epoch, start_batch=start, drop_last=drop_last,
            **plan_options,
        )  # fmt: skip
        epoch, start = epoch + 1, 0


def batch_shapes(
    features: Sequence[Features], batch_size: int, steps: int, *, seed: int, start_step: int = 0,
    drop_last: bool = True, pad_to_multiple: int = 8, **plan_options,
) -> set:  # fmt: skip
    """The (rows, padded target width) of the next `steps` batches of `training_batches` with the same
    arguments: labels drawn, nothing loaded (the compiled step is built for each before training)."""
    plans = _training_plans(features, batch_size, seed, start_step, drop_last, plan_options)
    shapes = set()
    for rows, _ in islice(plans, steps):
        longest = max(len(f.labels) for f in rows) - 1
        shapes.add((len(rows), -(-longest // pad_to_multiple) * pad_to_multiple))
    return shapes


def collate(
    features: Sequence[Features],
    *,
    mel: Optional[mx.array] = None,
    pad_to_multiple: int = 8,
    pad_id: Optional[int] = None,
    masked: bool = False,
) -> Batch:
    """Stack mels (or take `mel`, loaded already); pad inputs/targets to the longest row, rounded up
    to `pad_to_multiple`.

    `pad_id` defaults to the end-of-text token every label sequence ends with; padding is
    masked out, so its value never reaches the loss. `masked` zeroes the whole mask, a dropped row's
    mask is zero too. Rows' SpecAugment masks are applied to the features.
    """
    longest = max(len(f.labels) for f in features) - 1
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    if longest <= MAX_LABEL_TOKENS < width:  # never pad past the decoder's context
        width = MAX_LABEL_TOKENS
    pad_id = int(features[0].labels[-1]) if pad_id is None else pad_id
    inputs = np.full((len(features), width), pad_id, dtype=np.int32)
    targets = np.full((len(features), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(features), width), dtype=np.float32)
    for row, f in enumerate(features):
        n = len(f.labels) - 1
        inputs[row, :n], targets[row, :n], mask[row, :n] = f.labels[:-1], f.labels[1:], 0.0 if masked else 1.0
        mask[row, : getattr(f, "context", 0)] = 0.0  # a previous-text prompt is context, not a target
        if f.dropped:
            mask[row] = 0.0
    if mel is None:
        mel = mx.array(np.stack([f.mel for f in features])).astype(mx.float32)  # (B, N_FRAMES, n_mels)
    if any(getattr(f, "masks", ()) for f in features):
        mel = mel * mx.array(_spec_keep(features, mel.shape[1:]))
    sources = [f.source for f in features]
    return Batch(mel, mx.array(inputs), mx.array(targets), mx.array(mask), int(mask.sum()), sources)


def _spec_keep(features: Sequence[Features], shape) -> np.ndarray:
    """(B, frames, n_mels) of 1 where features are kept and 0 under a row's SpecAugment masks."""
    ones = np.ones(shape, dtype=np.float32)
    return np.stack([apply_masks(ones, getattr(f, "masks", ())) for f in features])


def _check_world(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size % world_size != 0 or not 0 <= rank < world_size:
        raise ValueError(
            f"batch_size ({batch_size}) must be divisible by world_size ({world_size}), and rank ({rank}) below it"
        )


def _rank_slice(global_batch: List[Features], rank: int, world_size: int) -> Tuple[List[Features], bool]:
    """This rank's rows of a global batch, and whether they are to be masked. A rank left with nothing
    (a short last batch) gets a fully masked row, so every rank still runs the same number of steps."""
    part = np.array_split(np.arange(len(global_batch)), world_size)[rank]
    if len(part) == 0:
        return global_batch[:1], True
    return [global_batch[i] for i in part], False


# ---------------------------------------------------------------- streaming


def stream_batches(
    examples: Iterable[Example],
    tokenizer: Tokenizer,
    n_mels: int,
    default_language: Optional[str],
    batch_size: int,
    *,
    report: Optional[DropReport] = None,
    pad_to_multiple: int = 8,
    rank: int = 0,
    world_size: int = 1,
    max_label_tokens: int = MAX_LABEL_TOKENS,
    start_batch: int = 0,
    loader: Optional[FeatureLoader] = None,
) -> Iterator[Batch]:
    """Batches of a stream of examples, in stream order (shuffle a Hub stream with
    `HubExamples.shuffled`), from batch `start_batch` on: the batches before it are only scanned
    (transcripts and audio headers), not decoded. Every rank reads the whole stream and takes its
    slice of each global batch; a short last batch is kept. Drops are counted in `report`.
    """
    _check_world(batch_size, rank, world_size)
    report = DropReport() if report is None else report
    loader = FeatureLoader(n_mels, report=report) if loader is None else loader

    def plans():
        pending, number = [], 0
        for f in scan_examples(examples, tokenizer, default_language, report, max_label_tokens, verbose=rank == 0):
            pending.append(f)
            if len(pending) == batch_size:
                if number >= start_batch:
                    yield _rank_slice(pending, rank, world_size)
                pending, number = [], number + 1
        if pending and number >= start_batch:
            yield _rank_slice(pending, rank, world_size)

    yield from _loaded(plans(), loader, pad_to_multiple, None)
