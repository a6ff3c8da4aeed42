"""Many recordings at once: their 30 s windows go through the encoder and decoder together.

`transcribe_many` keeps up to `batch_size` recordings open and advances them in lockstep, one
window each per round: each keeps its own seek, previous-text prompt and temperature fallback,
exactly as `Transcriber.run` would (transcribe.py); only the model calls are shared. Windows that
fail the thresholds are decoded again at the next temperature, batched among themselves. As
recordings finish, the next ones join.

With `chunked=True` a recording is instead cut into consecutive fixed 30 s windows, each decoded
on its own (no seeking by timestamps, no previous text), so one long file fills a whole batch.
"""

from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from ..audio import HOP_LENGTH, N_FRAMES, SAMPLE_RATE, TIME_PRECISION
from ..backend import cpu_buffer_cache
from ..whisper import Whisper
from .decoding import DecodingResult, DecodingTask, detect_language
from .options import TranscribeOptions
from .transcribe import Transcriber, _new_segment, split_segments

Source = Union[str, Path, np.ndarray]


@dataclass
class Transcribed:
    """One recording's outcome: its index in `sources`, and its result or what went wrong."""

    index: int
    source: Source
    result: Optional[dict] = None
    error: Optional[Exception] = None


def decode_windows(
    model: Whisper,
    features: mx.array,
    options: TranscribeOptions,
    prompts: Sequence[Optional[List[int]]],
    languages: Sequence[str],
) -> List[DecodingResult]:
    """`decode_with_fallback` for a batch (batch, n_audio_ctx, n_audio_state) of encoded windows,
    each with its own prompt and language: those that fail the thresholds at one temperature are
    decoded again together at the next."""
    results: List[Optional[DecodingResult]] = [None] * len(prompts)
    todo = list(range(len(prompts)))
    for temperature in options.temperature:
        task = DecodingTask(model, options.decoding_options(temperature, None))
        subset = features if len(todo) == len(prompts) else features[mx.array(todo)]
        decoded = task.run(subset, [prompts[i] or None for i in todo], [languages[i] for i in todo])
        for i, result in zip(todo, decoded):
            results[i] = result
        todo = [i for i in todo if options.needs_fallback(results[i])]
        if not todo:
            break
    return results


def chunk_segments(
    tokens: Sequence[int], timestamp_begin: int, time_offset: float, segment_frames: int
) -> List[Tuple[float, float, List[int]]]:
    """`split_segments` for a window decoded on its own: the text after the last complete segment
    is not decoded again by a next window, so it becomes a segment up to the window's end."""
    segments, _, single_ending = split_segments(tokens, timestamp_begin, time_offset, segment_frames)
    rest = list(tokens)[sum(len(piece) for _, _, piece in segments) :]
    if single_ending or len(rest) == 0:
        return segments
    start = time_offset + (rest[0] - timestamp_begin) * TIME_PRECISION if rest[0] >= timestamp_begin else time_offset
    return segments + [(start, time_offset + segment_frames * HOP_LENGTH / SAMPLE_RATE, rest)]


class _SeekJob(Transcriber):
    """One recording in the seek loop: one window per round, at its seek."""

    def __init__(self, model: Whisper, options: TranscribeOptions, index: int, source: Source):
        super().__init__(model, options)
        self.index, self.source = index, source
        self.label = None if isinstance(source, np.ndarray) else str(source)
        self.error: Optional[Exception] = None
        self.started = False  # False until the language is known (given or detected)

    def start(self, language: str) -> None:
        super().start(language)
        self.started = True

    def start_detected(self, language: str, features: mx.array) -> None:
        """Start in the `language` detected on the first window, whose encoder output is `features`."""
        self.start(self.detected(language, features))

    def take(self, limit: int) -> List[int]:
        """The seeks of the windows to decode this round (at most `limit`)."""
        self.skip_silence()
        return [] if self.done or limit < 1 else [self.state.seek]

    def available(self) -> int:
        """How many windows this recording could offer the next round."""
        return 1 if not self.started or not self.done else 0

    def keep_at(self, seek: int, result: DecodingResult, features: mx.array) -> None:
        assert seek == self.state.seek, (seek, self.state.seek)
        self.keep(result, features)

    def finished(self) -> bool:
        self.skip_silence()
        return self.done


class _ChunkJob(_SeekJob):
    """One recording cut into fixed 30 s windows, each decoded on its own (in any batch)."""

    def open(self, audio) -> None:
        super().open(audio)
        self.pending = deque(range(0, self.windows.content_frames, N_FRAMES))  # not yet handed out
        self.in_flight = 0

    def prompt(self) -> List[int]:
        return self.state.all_tokens[: self.state.prompt_length]  # the initial prompt only, every window

    def take(self, limit: int) -> List[int]:
        seeks = []
        while self.pending and len(seeks) < limit:
            seek = self.pending.popleft()
            if not self.windows.is_silent(seek):
                seeks.append(seek)
        self.in_flight += len(seeks)
        return seeks

    def available(self) -> int:
        return len(self.pending)

    def keep_at(self, seek: int, result: DecodingResult, features: mx.array) -> None:
        """Keep the segments of the window at `seek` (windows come back in order)."""
        self.in_flight -= 1
        segment_frames = min(N_FRAMES, self.windows.content_frames - seek)
        if self.options.is_silence(result):
            return
        begin, offset = self.tokenizer.timestamp_begin, seek * HOP_LENGTH / SAMPLE_RATE
        segments = [
            _new_segment(seek, start, end, tokens, result, self.tokenizer, self.windows.duration)
            for start, end, tokens in chunk_segments(result.tokens, begin, offset, segment_frames)
        ]
        segments = [s for s in segments if s["start"] < s["end"] and s["text"].strip()]
        if self.options.word_timestamps:
            self.time_words(segments, features, segment_frames)
        self.print_segments(segments)
        self.state.segments += segments
        self.state.all_tokens += [t for s in segments for t in s["tokens"]]

    def finished(self) -> bool:
        return not self.pending and self.in_flight == 0


def transcribe_many(
    model: Whisper,
    sources: Sequence[Source],
    options: TranscribeOptions = TranscribeOptions(),
    batch_size: int = 8,
    chunked: bool = False,
    languages: Optional[Sequence[Optional[str]]] = None,
) -> Iterator[Transcribed]:
    """Transcribe `sources` (paths or 16 kHz mono arrays), `batch_size` windows per model call.

    Yields a `Transcribed` per source as it finishes (not in order): its result is what
    `transcribe()` returns, or its error when it could not be read or transcribed; the others go
    on. Greedy results equal `transcribe()`'s file by file, up to float rounding of the batched
    model calls. `chunked`: fixed 30 s windows decoded independently (see the module docstring).
    `languages[i]`, when given, replaces `options.language` for source i.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    queue = deque(enumerate(sources))
    jobs: List[_SeekJob] = []
    try:
        with cpu_buffer_cache(model.dims, model.dtype, batch_size):
            while queue or jobs:
                yield from _refill(model, options, chunked, languages, queue, jobs, batch_size)
                work = []
                for job in jobs:
                    work += [(job, seek) for seek in _guarded(job, job.take, batch_size - len(work)) or []]
                _decode_round(model, options, work)
                for job in [j for j in jobs if j.error is not None or _guarded(j, j.finished)]:
                    jobs.remove(job)
                    yield _outcome(job)
    finally:
        for job in jobs:
            job.close()


def _guarded(job: _SeekJob, fn, *args):
    """fn(*args), or None with the error kept on `job` (one bad recording must not stop the others)."""
    if job.error is not None:
        return None
    try:
        return fn(*args)
    except Exception as error:
        job.error = error
        return None


def _outcome(job: _SeekJob) -> Transcribed:
    job.close()
    if job.error is not None:
        return Transcribed(job.index, job.source, error=job.error)
    try:
        return Transcribed(job.index, job.source, result=job.result())
    except Exception as error:
        return Transcribed(job.index, job.source, error=error)


def _open(model, options, chunked, index, source, language) -> _SeekJob:
    if language is not None:
        options = replace(options, language=language)
    job = (_ChunkJob if chunked else _SeekJob)(model, options, index, source)
    given = job.given_language()
    job.open(source)
    if given is not None:
        job.start(given)
    return job


def _refill(model, options, chunked, languages, queue, jobs, batch_size) -> Iterator[Transcribed]:
    """Open recordings while the open ones offer fewer than `batch_size` windows; detect the
    languages of the new ones in one batch."""
    new = []
    while queue and len(jobs) < batch_size and sum(job.available() for job in jobs if job.error is None) < batch_size:
        index, source = queue.popleft()
        try:
            job = _open(model, options, chunked, index, source, None if languages is None else languages[index])
        except Exception as error:  # unreadable, or a language this model does not know
            yield Transcribed(index, source, error=error)
            continue
        jobs.append(job)
        if not job.started:
            new.append(job)
    if new:
        _detect_languages(model, new)


def _detect_languages(model: Whisper, jobs: List[_SeekJob]) -> None:
    """Detect each job's language on its first window, all in one encoder and decoder call."""
    try:
        mels = np.stack([job.windows.window(0) for job in jobs])
        features = model.embed_audio(mx.array(mels).astype(model.dtype))
        mx.eval(features)
        codes = detect_language(model, features)[0]
    except Exception as error:
        for job in jobs:
            job.error = error
        return
    for i, (job, code) in enumerate(zip(jobs, codes)):
        _guarded(job, job.start_detected, code, features[i])


def _decode_round(model: Whisper, options: TranscribeOptions, work: List[Tuple[_SeekJob, int]]) -> None:
    """Encode the windows of `work` (those not already encoded) and decode them in one batch."""
    rows, mels = [], []
    for job, seek in work:
        cached = job.cached_features(seek)
        rows.append(cached)
        mels.append(_guarded(job, job.windows.window, seek) if cached is None else None)
    kept = [i for i, (job, _) in enumerate(work) if job.error is None]  # a window that could not be read
    work, rows, mels = [work[i] for i in kept], [rows[i] for i in kept], [mels[i] for i in kept]
    if not work:
        return
    try:
        fresh = [m for m in mels if m is not None]
        if fresh:
            encoded = iter(model.embed_audio(mx.array(np.stack(fresh)).astype(model.dtype)))
            rows = [row if row is not None else next(encoded) for row in rows]
        features = mx.stack(rows)
        mx.eval(features)
        prompts = [job.prompt() for job, _ in work]
        results = decode_windows(model, features, options, prompts, [job.options.language for job, _ in work])
    except Exception as error:  # the batch's model call failed: so did each of its recordings
        for job, _ in work:
            job.error = error
        return
    for i, ((job, seek), result) in enumerate(zip(work, results)):
        _guarded(job, job.keep_at, seek, result, features[i])
