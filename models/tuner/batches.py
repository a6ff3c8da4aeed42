"""Training examples as model inputs: features and label tokens, dropped examples, padded batches.

`prepare_examples` turns `Example`s into `Features` (30 s of log-mel frames and the label
tokens Whisper is trained on), which `iterate_batches` pads into `Batch`es in an order that
depends only on (seed, epoch).
"""

from dataclasses import dataclass, replace
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, clip_features, load_audio
from ..tokenizer import Tokenizer
from .augment import SpecAugment
from .datasets import DropReport, Example
from .labels import (  # noqa: F401  (DroppedExample and label_tokens are used from here too)
    MAX_LABEL_TOKENS,
    DroppedExample,
    Labeler,
    label_tokens,
    segment_windows,
    text_start,
    timed_clip,
    timed_segments,
)

MAX_PRINTED_PROBLEMS = 10


@dataclass
class Features:
    mel: np.ndarray  # (N_FRAMES, n_mels) float16
    labels: np.ndarray  # (n_tokens,) int32: sot, language, transcribe, notimestamps, text..., eot
    source: str
    timed: Optional[np.ndarray] = None  # the text with timestamps (labels.py); None for no speech
    group: Optional[str] = None  # speaker or recording: where a previous-text prompt comes from
    frames: int = N_FRAMES  # mel frames that hold audio


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
    """Features of each usable example, lazily; drops are counted in `report` (and the first
    unreadable files printed, when `verbose`)."""
    printed = 0 if verbose else MAX_PRINTED_PROBLEMS
    for example in examples:
        report.total += 1
        try:
            language = example.language or default_language
            if example.segments is None:
                found = [_clip_example(example, tokenizer, language, n_mels, max_label_tokens)]
            else:
                found = _recording_windows(example, tokenizer, language, n_mels, max_label_tokens)
        except DroppedExample as dropped:
            report.drop(dropped.reason, example.source, dropped.detail)
            if dropped.reason == "unreadable audio" and printed < MAX_PRINTED_PROBLEMS:
                printed += 1
                tqdm.write(f"Skipping {example.source}: {dropped.detail}")
            continue
        report.kept += 1
        yield from found


def _clip_example(example: Example, tokenizer: Tokenizer, language, n_mels: int, max_label_tokens: int) -> Features:
    labels = label_tokens(tokenizer, example.text, language, max_label_tokens)
    samples = read_samples(example.audio)
    if len(samples) > N_SAMPLES:
        raise DroppedExample("audio longer than 30 s", f"{len(samples) / SAMPLE_RATE:.1f} s; give it segments")
    timed = timed_clip(tokenizer, labels, len(samples) / SAMPLE_RATE)
    if len(labels) + 1 > max_label_tokens:  # the timestamped form is one token longer
        raise DroppedExample("transcript too long", f"{len(labels) + 1} tokens > {max_label_tokens}")
    return Features(mel_features(samples, n_mels), labels, example.source, timed, example.group, audio_frames(samples))


def _recording_windows(example: Example, tokenizer: Tokenizer, language, n_mels: int, max_label_tokens: int):
    """A long recording with segments: one example per window of at most 30 s (labels.segment_windows)."""
    samples = read_samples(example.audio)
    duration = len(samples) / SAMPLE_RATE
    last_end = example.segments[-1]["end"]
    if last_end > duration + 0.05:
        raise DroppedExample("segments past the audio", f"the last ends at {last_end:.2f} s of {duration:.2f} s")
    try:
        windows = segment_windows(example.segments)
    except ValueError as e:
        raise DroppedExample("segment longer than 30 s", str(e)) from None
    found = []
    for k, (start, end, segments) in enumerate(windows):
        text = " ".join(s["text"].strip() for s in segments)
        labels = label_tokens(tokenizer, text, language, max_label_tokens)
        timed = timed_segments(tokenizer, segments, start)
        if text_start(tokenizer, labels) + len(timed) > max_label_tokens:  # the timestamped form
            raise DroppedExample("transcript too long", f"window {k} at {start:.2f} s")
        clip = samples[int(round(start * SAMPLE_RATE)) : int(round(end * SAMPLE_RATE))]
        source, group = f"{example.source}@{start:.2f}s", example.group or example.source
        found.append(Features(mel_features(clip, n_mels), labels, source, timed, group, audio_frames(clip)))
    return found


def read_samples(audio: Union[str, bytes, np.ndarray]) -> np.ndarray:
    if isinstance(audio, np.ndarray):  # joined in memory (packed_examples)
        return audio
    try:
        return load_audio(audio)
    except Exception as e:  # decoders raise many types; the message names the file
        raise DroppedExample("unreadable audio", str(e)) from None


def mel_features(samples: np.ndarray, n_mels: int) -> np.ndarray:
    return clip_features(samples, n_mels).astype(np.float16)  # (N_FRAMES, n_mels), as transcribe() sees it


def audio_frames(samples: np.ndarray) -> int:
    return min(len(samples) // HOP_LENGTH, N_FRAMES)


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
) -> Iterator[Batch]:
    """Padded batches of one epoch in an order fixed by (seed, epoch); `start_batch` skips ahead.

    `batch_size` is the global batch: with `world_size` > 1 each rank gets its slice of it.
    `labeler` (over `features`) draws each row's label sequence and `spec_augment` masks its
    features, from a generator seeded by (seed, epoch, batch, row): a resumed run draws the same.
    """
    _check_world(batch_size, rank, world_size)
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
        yield _rank_slice(rows, rank, world_size, pad_to_multiple, pad_id)


def _drawn_row(features, index: int, labeler: Optional[Labeler], spec_augment, rng) -> Features:
    """Example `index` with its drawn label sequence (context tokens recorded) and masked features."""
    f = features[index]
    labels, context = (f.labels, 0) if labeler is None else labeler.row(index, rng)
    mel = f.mel if spec_augment is None else spec_augment(f.mel, f.frames, rng)
    return _Row(mel, labels, f.source, f.timed, f.group, f.frames, context)


@dataclass
class _Row(Features):
    context: int = 0  # leading targets that are a prompt: masked out of the loss


def training_batches(
    features: Sequence[Features], batch_size: int, *, seed: int, start_step: int = 0, drop_last: bool = True, **kwargs
) -> Iterator[Batch]:
    """Endless shuffled batches, epoch after epoch, from micro-batch `start_step` on (for resuming).

    Step s is batch s % per_epoch of epoch s // per_epoch, so a resumed run sees the same data.
    `kwargs` go to `iterate_batches`.
    """
    per_epoch = len(features) // batch_size if drop_last else -(-len(features) // batch_size)
    if per_epoch == 0:
        n = len(features)
        raise ValueError(f"{n} training examples cannot fill one batch of {batch_size}; lower --batch-size")
    epoch, start = divmod(start_step, per_epoch)
    while True:
        yield from iterate_batches(
            features, batch_size, shuffle=True, seed=seed, epoch=epoch, start_batch=start, drop_last=drop_last, **kwargs
        )
        epoch, start = epoch + 1, 0


def collate(
    features: Sequence[Features], *, pad_to_multiple: int = 8, pad_id: Optional[int] = None, masked: bool = False
) -> Batch:
    """Stack mels; pad inputs/targets to the longest row, rounded up to `pad_to_multiple`.

    `pad_id` defaults to the end-of-text token every label sequence ends with; padding is
    masked out, so its value never reaches the loss. `masked` zeroes the whole mask.
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
    mel = mx.array(np.stack([f.mel for f in features])).astype(mx.float32)  # (B, N_FRAMES, n_mels)
    sources = [f.source for f in features]
    return Batch(mel, mx.array(inputs), mx.array(targets), mx.array(mask), int(mask.sum()), sources)


def _check_world(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size % world_size != 0 or not 0 <= rank < world_size:
        raise ValueError(
            f"batch_size ({batch_size}) must be divisible by world_size ({world_size}), and rank ({rank}) below it"
        )


def _rank_slice(global_batch: List[Features], rank: int, world_size: int, pad_to_multiple: int, pad_id) -> Batch:
    """This rank's part of a global batch. A rank left with nothing (a short last batch) gets a
    fully masked row, so every rank still runs the same number of steps."""
    part = np.array_split(np.arange(len(global_batch)), world_size)[rank]
    if len(part) == 0:
        return collate(global_batch[:1], pad_to_multiple=pad_to_multiple, pad_id=pad_id, masked=True)
    return collate([global_batch[i] for i in part], pad_to_multiple=pad_to_multiple, pad_id=pad_id)


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
) -> Iterator[Batch]:
    """Batches computed on the fly from a stream of examples, in stream order (shuffle a Hub stream
    with `HubExamples.shuffled`). Every rank reads the whole stream and takes its slice of each
    global batch; a short last batch is kept. Drops are counted in `report`.
    """
    _check_world(batch_size, rank, world_size)
    report = DropReport() if report is None else report
    pending: List[Features] = []
    for feature in iter_features(
        examples, tokenizer, n_mels, default_language, report, max_label_tokens, verbose=rank == 0
    ):
        pending.append(feature)
        if len(pending) == batch_size:
            yield _rank_slice(pending, rank, world_size, pad_to_multiple, None)
            pending = []
    if pending:
        yield _rank_slice(pending, rank, world_size, pad_to_multiple, None)


def encode_features(model, features: Sequence[Features], batch_size: int) -> List[Features]:
    """Frozen encoder: each clip's mel replaced by its encoder output (float16), computed once."""
    out = []
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        mel = mx.array(np.stack([f.mel for f in chunk])).astype(model.dtype)
        encoded = np.array(model.embed_audio(mel).astype(mx.float16))
        out += [replace(f, mel=e) for e, f in zip(encoded, chunk)]
    return out
