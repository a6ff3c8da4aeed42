"""Training data of any size: examples scanned without decoding, audio decoded by workers per batch.

`scan_examples` reads each example's transcript into label tokens and its audio file's header
into a length, and keeps a reference to the audio instead of its features: a clip costs a few
hundred bytes however long it is. `FeatureLoader` turns a batch of such examples into model
inputs when the batch is due: background threads read (and decode) the audio, a bounded queue
keeps a few batches ready, the log-mel features of the whole batch are computed in MLX on the
device (models/features.py), and with `--feature-cache` they (and frozen-encoder outputs) are
read from and written to an on-disk cache (cache.py) instead. The order of the batches never
depends on the workers: it is fixed by the seed, so resuming repeats it exactly.
"""

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..audio import CLIP_PADDING, N_FRAMES, N_SAMPLES, SAMPLE_RATE
from ..features import clip_features_batch
from ..tokenizer import Tokenizer
from .cache import ArrayCache, content_key
from .datasets import DropReport, Example
from .labels import (
    MAX_LABEL_TOKENS,
    DroppedExample,
    label_tokens,
    segment_windows,
    text_start,
    timed_clip,
    timed_segments,
)
from .sources import ClipAudio, NoSpeechAudio, PackedAudio, frames_of, read_samples, samples_in  # noqa: F401

MAX_PRINTED_PROBLEMS = 10
FEATURES_VERSION = 1  # bump when the features of the same audio change: old cache entries are then not read


# ---------------------------------------------------------------- scanning examples


def scan_examples(
    examples: Iterable[Example],
    tokenizer: Tokenizer,
    default_language: Optional[str],
    report: DropReport,
    max_label_tokens: int = MAX_LABEL_TOKENS,
    verbose: bool = True,
) -> Iterator["Features"]:  # noqa: F821 (batches.Features)
    """Features without mel (`audio` says where it comes from) of each usable example, lazily.

    Label problems and what an audio file's header shows (missing, empty, truncated, over 30 s)
    drop an example here, counted in `report`; damage found only by decoding drops it when its
    batch is loaded (FeatureLoader), counted in the same report.
    """
    printed = 0 if verbose else MAX_PRINTED_PROBLEMS
    for example in examples:
        report.total += 1
        try:
            language = example.language or default_language
            if example.segments is None:
                found = [_scan_clip(example, tokenizer, language, max_label_tokens)]
            else:
                found = _scan_windows(example, tokenizer, language, max_label_tokens)
        except DroppedExample as dropped:
            report.drop(dropped.reason, example.source, dropped.detail)
            if dropped.reason == "unreadable audio" and printed < MAX_PRINTED_PROBLEMS:
                printed += 1
                tqdm.write(f"Skipping {example.source}: {dropped.detail}")
            continue
        report.kept += 1
        yield from found


def _scan_clip(example: Example, tokenizer: Tokenizer, language, max_label_tokens: int):
    from .batches import Features

    labels = label_tokens(tokenizer, example.text, language, max_label_tokens)
    n = samples_in(example.audio)
    if n > N_SAMPLES:
        raise DroppedExample("audio longer than 30 s", f"{n / SAMPLE_RATE:.1f} s; give it segments")
    if len(labels) + 1 > max_label_tokens:  # the timestamped form is one token longer
        raise DroppedExample("transcript too long", f"{len(labels) + 1} tokens > {max_label_tokens}")
    timed = timed_clip(tokenizer, labels, n / SAMPLE_RATE)
    return Features(None, labels, example.source, timed, example.group, frames_of(n), ClipAudio(example.audio), n)


def _scan_windows(example: Example, tokenizer: Tokenizer, language, max_label_tokens: int) -> list:
    """A long recording with segments: one example per window of at most 30 s (labels.segment_windows)."""
    from .batches import Features

    n = samples_in(example.audio)
    duration, last_end = n / SAMPLE_RATE, example.segments[-1]["end"]
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
        first, last = int(round(start * SAMPLE_RATE)), min(int(round(end * SAMPLE_RATE)), n)
        source, group = f"{example.source}@{start:.2f}s", example.group or example.source
        audio = ClipAudio(example.audio, first, last)
        found.append(Features(None, labels, source, timed, group, frames_of(last - first), audio, last - first))
    return found


# ---------------------------------------------------------------- loading batches


@dataclass
class _Fetched:
    """What a worker found for one row: cached features, or samples to compute them from, or a drop."""

    mel: Optional[np.ndarray] = None  # (N_FRAMES, n_mels)
    encoded: Optional[np.ndarray] = None  # frozen encoder output
    samples: Optional[np.ndarray] = None
    key: Optional[str] = None
    dropped: Optional[DroppedExample] = None


@dataclass
class _Collated:
    """A batch's host side, made by the collating thread: the arrays the device needs, one copy each.

    `parts` maps a kind ("samples", "mel", "encoded") to (row indices, array); dropped rows are in none.
    """

    rows: list
    parts: dict
    lengths: List[int]  # of the "samples" rows
    keys: List[Optional[str]]


class FeatureLoader:
    """Model inputs of batches of (possibly lazy) Features, loaded `prefetch` batches ahead.

    `num_workers` threads read the audio (0: in the calling thread) and one more thread collates
    each batch's host arrays (padding, stacking, the copy into MLX), so that the training thread
    only queues device work. `cache_dir` keeps the log-mel features on disk; `encoder` (a model
    whose encoder is frozen) turns them into encoder outputs, kept in `encoder_cache_dir`.
    `report` counts the examples dropped on decoding (default: a report of its own).
    Counters: `waited` (seconds the consumer waited for data), `late` (batches it waited for).
    """

    def __init__(
        self,
        n_mels: int = 80,
        *,
        num_workers: int = 0,
        prefetch: Optional[int] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        encoder=None,
        encoder_cache_dir: Optional[Union[str, Path]] = None,
        report: Optional[DropReport] = None,
        verbose: bool = True,
    ):
        self.n_mels, self.num_workers = n_mels, num_workers
        self.prefetch = max(2, num_workers) if prefetch is None else prefetch
        settings = {"kind": "log-mel", "n_mels": n_mels, "padding": CLIP_PADDING, "version": FEATURES_VERSION}
        self.mel_cache = None if cache_dir is None else ArrayCache(cache_dir, settings, (N_FRAMES, n_mels))
        self.encoder, self.encoder_cache = encoder, None
        if encoder is not None and encoder_cache_dir is not None:
            shape = (encoder.dims.n_audio_ctx, encoder.dims.n_audio_state)
            encoder_settings = {**settings, "encoder": encoder_fingerprint(encoder)}
            self.encoder_cache = ArrayCache(encoder_cache_dir, encoder_settings, shape)
        self.report = DropReport() if report is None else report
        self.verbose = verbose
        self.dropped: set = set()
        self.waited, self.late = 0.0, 0
        self._unstored: list = []  # (cache, key, device row) computed for the batch before, written at the next
        threaded = num_workers > 0
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="audio") if threaded else None
        self._collator = ThreadPoolExecutor(1, thread_name_prefix="collate") if threaded else None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="cache") if threaded else None

    def close(self) -> None:
        """Stop reading ahead; cache entries still being written are finished."""
        self._flush_stores()
        if self._pool is not None:
            self._collator.shutdown(wait=True, cancel_futures=True)
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._writer.shutdown(wait=True)

    def cache_stats(self) -> str:
        parts = [f"features {c.stats()}" for c in (self.mel_cache,) if c is not None]
        parts += [f"encoder outputs {c.stats()}" for c in (self.encoder_cache,) if c is not None]
        return "; ".join(parts)

    # -- the consumer's side

    def batches(self, plans: Iterable[Tuple[List, bool]]) -> Iterator:
        """(rows, features, masked) of each plan (rows, masked), in order, prefetched by the workers;
        batches.collate pads their labels."""
        if self._pool is None:
            for rows, masked in plans:
                loaded = self._features(self._collate(rows, [self._fetch(r) for r in rows]))
                self._flush_stores()
                yield loaded + (masked,)
            return
        pending, first = deque(), True
        for rows, masked in plans:
            futures = [self._pool.submit(self._fetch, r) for r in rows]
            pending.append((self._collator.submit(self._collate, rows, futures), masked))
            if len(pending) > self.prefetch:
                yield self._finish_waiting(*pending.popleft(), first)
                first = False
        while pending:
            yield self._finish_waiting(*pending.popleft(), first)
            first = False

    def load(self, rows: Sequence) -> Tuple[List, mx.array]:
        """(rows, features) of a few rows at once: (B, N_FRAMES, n_mels), or encoder outputs."""
        fetched = [self._fetch(r) for r in rows] if self._pool is None else list(self._pool.map(self._fetch, rows))
        loaded = self._features(self._collate(rows, fetched))
        self._flush_stores()
        return loaded

    def _finish_waiting(self, collating, masked, first: bool):
        """The batch being collated, once ready; waiting for it is counted unless it is the first (nothing
        could be read ahead of that one)."""
        ready = collating.done()
        tic = time.perf_counter()
        collated = collating.result()
        if not (ready or first):
            self.late += 1
            self.waited += time.perf_counter() - tic
        return self._features(collated) + (masked,)

    # -- the workers' side

    def _fetch(self, row) -> _Fetched:
        if row.mel is not None:
            return _Fetched(mel=row.mel)
        try:
            key = row.audio.key() if self.mel_cache is not None or self.encoder_cache is not None else None
            if self.encoder_cache is not None:
                encoded = self.encoder_cache.get(key)
                if encoded is not None:
                    return _Fetched(encoded=encoded, key=key)
            mel = None if self.mel_cache is None else self.mel_cache.get(key)
            if mel is not None:
                return _Fetched(mel=mel, key=key)
            samples = row.audio.read()
            if len(samples) > N_SAMPLES:
                raise DroppedExample("audio longer than 30 s", f"{len(samples) / SAMPLE_RATE:.1f} s")
            return _Fetched(samples=samples, key=key)
        except DroppedExample as dropped:
            return _Fetched(dropped=dropped)

    def _collate(self, rows, fetched) -> _Collated:
        """The host arrays of a batch (`fetched` may be futures): clips padded into one array, cached rows
        stacked, each copied into MLX once. No device work is queued here."""
        fetched = [f.result() if hasattr(f, "result") else f for f in fetched]
        rows = [self._drop(row, f.dropped) if f.dropped is not None else row for row, f in zip(rows, fetched)]
        parts, lengths = {}, []
        clips = [i for i, f in enumerate(fetched) if f.samples is not None]
        if clips:
            lengths = [len(fetched[i].samples) for i in clips]
            padded = np.zeros((len(clips), max(max(lengths), 1)), np.float32)
            for row, i in enumerate(clips):
                padded[row, : lengths[row]] = fetched[i].samples
            parts["samples"] = (clips, mx.array(padded))
        for kind in ("mel", "encoded"):
            found = [i for i, f in enumerate(fetched) if getattr(f, kind) is not None]
            if found:
                arrays = [getattr(fetched[i], kind) for i in found]
                host = all(isinstance(a, np.ndarray) for a in arrays)  # else rows given as MLX arrays
                parts[kind] = (found, mx.array(np.stack(arrays)) if host else arrays)
        return _Collated(rows, parts, lengths, [f.key for f in fetched])

    # -- the device's side

    def _features(self, collated: _Collated) -> Tuple[List, mx.array]:
        """Rows and their features (B, ...) float32, queued on the device at once (behind the step before,
        while the caller reads ahead: trainer._Upcoming)."""
        self._flush_stores()
        parts = {k: (i, a if isinstance(a, mx.array) else mx.stack(a)) for k, (i, a) in collated.parts.items()}
        if "samples" in parts:
            clips, samples = parts.pop("samples")
            # float16, as the cache keeps them: the same numbers whether or not a cache is used
            mel = clip_features_batch(samples, collated.lengths, self.n_mels).astype(mx.float16)
            self._queue_stores(self.mel_cache, [collated.keys[i] for i in clips], mel)
            parts["mel"] = _joined(parts.get("mel"), (clips, mel))
        if self.encoder is None:
            shape = (N_FRAMES, self.n_mels)
        else:
            dims = self.encoder.dims
            shape = (dims.n_audio_ctx, dims.n_audio_state)
            if "mel" in parts:
                found, mel = parts.pop("mel")
                encoded = self.encoder.embed_audio(mel.astype(self.encoder.dtype)).astype(mx.float16)
                self._queue_stores(self.encoder_cache, [collated.keys[i] for i in found], encoded)
                parts["encoded"] = _joined(parts.get("encoded"), (found, encoded))
        features = _in_row_order(parts.get("mel" if self.encoder is None else "encoded"), len(collated.rows), shape)
        mx.async_eval(features)
        return collated.rows, features

    def _queue_stores(self, cache: Optional[ArrayCache], keys: list, computed: mx.array) -> None:
        if cache is not None:
            self._unstored += [(cache, key, computed[j]) for j, key in enumerate(keys) if key is not None]

    def _flush_stores(self) -> None:
        """Write the computed rows. Reading ahead, the rows of the batch before are written when the next is
        loaded: they are on the device by then, so the training thread does not wait for the step."""
        for cache, key, row in self._unstored:
            host = np.array(row)
            if self._writer is None:
                cache.put(key, host)
            else:
                self._writer.submit(cache.put, key, host)
        self._unstored = []

    def _drop(self, row, dropped: DroppedExample):
        """A row whose audio failed to decode: counted once, then trained on as a fully masked row."""
        if row.source not in self.dropped:
            self.dropped.add(row.source)
            self.report.drop(dropped.reason, row.source, dropped.detail)
            if self.report.total:  # a report of the scanned examples (a stream) no longer keeps it
                self.report.kept -= 1
            if self.verbose and len(self.dropped) <= MAX_PRINTED_PROBLEMS:
                tqdm.write(f"Skipping {row.source}: {dropped.detail}")
        return replace(row, labels=row.labels, dropped=True)


def _joined(first: Optional[tuple], second: tuple) -> tuple:
    """Two (row indices, rows) parts as one."""
    if first is None:
        return second
    return first[0] + second[0], mx.concatenate([first[1], second[1]])


def _in_row_order(part: Optional[tuple], n_rows: int, shape) -> mx.array:
    """(n_rows, *shape) float32: the part's rows at their indices, zeros for the rows it lacks (dropped)."""
    found, rows = part if part is not None else ([], mx.zeros((0, *shape), mx.float16))
    if found != list(range(n_rows)):
        missing = n_rows - len(found)
        if missing:
            rows = mx.concatenate([rows, mx.zeros((missing, *rows.shape[1:]), rows.dtype)])
        present = set(found)
        order = np.empty(n_rows, np.int32)
        order[found + [i for i in range(n_rows) if i not in present]] = np.arange(n_rows)
        rows = mx.take(rows, mx.array(order), axis=0)
    return rows.astype(mx.float32)


def encoder_fingerprint(model) -> str:
    """A key of the encoder's weights and dtype: cached encoder outputs of other weights are never read."""
    from mlx.utils import tree_flatten

    # every 97th weight of every tensor: enough to tell fine-tuned or other weights apart, and quick
    arrays = [np.array(v.reshape(-1)[::97].astype(mx.float32)) for _, v in tree_flatten(model.encoder.parameters())]
    return content_key(str(model.dtype), *[a.tobytes() for a in arrays])
