"""Word timestamps: align text tokens to audio frames through the alignment heads' cross-attention.

The decoder is run once over the window's text; the cross-attention of `model.alignment_heads`
is normalised, smoothed and averaged into a (tokens, frames) matrix, and dynamic time warping
finds the monotonic path through it. Token boundaries on that path become word start/end times.
"""

import itertools
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..audio import HOP_LENGTH, SAMPLE_RATE, TOKENS_PER_SECOND
from ..tokenizer import Tokenizer
from ..whisper import Whisper
from .decoding import _as_features

PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
_SENTENCE_END_MARKS = ".。!！?？"


@dataclass
class WordTiming:
    word: str
    tokens: List[int]
    start: float  # seconds from the start of the window
    end: float
    probability: float


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a sliding window of odd `width` along the last axis, reflect-padded."""
    pad = width // 2
    if x.shape[-1] <= pad:  # too short to reflect; nothing sensible to smooth
        return x
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.sort(windows, axis=-1)[..., pad]


def dtw(cost: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Cheapest monotonic path from (0, 0) to (N-1, M-1) through a (N, M) cost matrix.

    Returns (row_indices, column_indices) of the path. Moves are diagonal, down or right;
    ties prefer right, then down, as OpenAI's implementation does. Cells on one anti-diagonal
    depend only on the two before it, so each anti-diagonal is one vectorised numpy step.
    """
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    total[0, 0] = 0
    for d in range(2, n + m + 1):  # anti-diagonal i + j = d over the padded table
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        diagonal, down, right = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
        step = np.where((diagonal < down) & (diagonal < right), 0, np.where((down < diagonal) & (down < right), 1, 2))
        total[i, j] = cost[i - 1, j - 1] + np.choose(step, [diagonal, down, right])
        trace[i, j] = step
    return _backtrace(trace)


def _backtrace(trace: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    trace = trace.copy()
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = trace.shape[0] - 1, trace.shape[1] - 1
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        move = trace[i, j]
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        elif move == 2:
            j -= 1
        else:
            raise AssertionError(f"unfilled DTW cell ({i}, {j})")
    path = np.array(path[::-1])
    return path[:, 0], path[:, 1]


def _attention_matrix(
    qks: Sequence[mx.array], heads: np.ndarray, num_frames: int, medfilt_width: int, qk_scale: float
) -> np.ndarray:
    """(tokens, audio positions) alignment strength, averaged over the alignment heads."""
    weights = np.stack([np.array(qks[layer][0, head], dtype=np.float32) for layer, head in heads])
    weights = weights[:, :, : num_frames // 2] * qk_scale  # (heads, tokens, positions of the speech)
    weights = np.exp(weights - weights.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    mean, std = weights.mean(axis=-2, keepdims=True), weights.std(axis=-2, keepdims=True)
    weights = (weights - mean) / np.maximum(std, 1e-10)
    return median_filter(weights, medfilt_width).mean(axis=0)


def find_alignment(
    model: Whisper,
    tokenizer: Tokenizer,
    text_tokens: List[int],
    mel_or_features: mx.array,
    num_frames: int,
    *,
    medfilt_width: int = 7,
    qk_scale: float = 1.0,
) -> List[WordTiming]:
    """Word timings (relative to the window) of `text_tokens` spoken in one 30 s window.

    `num_frames` is how many mel frames of the window hold audio (the rest is padding).
    """
    if len(text_tokens) == 0:
        return []
    features = _as_features(model, mel_or_features)
    tokens = [*tokenizer.sot_sequence, tokenizer.no_timestamps, *text_tokens, tokenizer.eot]
    logits, _, qks = model.decoder(mx.array([tokens], dtype=mx.int32), features, return_qk=True)
    start = len(tokenizer.sot_sequence)
    sampled = logits[0, start:, : tokenizer.eot].astype(mx.float32)  # position k predicts token k + 1
    probs = np.array(mx.softmax(sampled, axis=-1))
    text_token_probs = probs[np.arange(len(text_tokens)), text_tokens]

    heads = np.array(model.alignment_heads).reshape(-1, 2)
    matrix = _attention_matrix(qks, heads, num_frames, medfilt_width, qk_scale)[start:-1]
    text_indices, time_indices = dtw(-matrix.astype(np.float64))

    words, word_tokens = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot])
    if len(word_tokens) <= 1:  # end of text only
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND  # when the path first reaches each token
    return [
        WordTiming(word, tokens_, float(jump_times[i]), float(jump_times[j]), float(np.mean(text_token_probs[i:j])))
        for word, tokens_, i, j in zip(words, word_tokens, boundaries[:-1], boundaries[1:])
    ]


def merge_punctuations(alignment: List[WordTiming], prepended: str, appended: str) -> None:
    """Glue opening punctuation to the next word and closing punctuation to the previous one (in place)."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        previous, following = alignment[i], alignment[j]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            following.word = previous.word + following.word
            following.tokens = previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        previous, following = alignment[i], alignment[j]
        if not previous.word.endswith(" ") and following.word in appended:
            previous.word = previous.word + following.word
            previous.tokens = previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1


def _clip_long_words(alignment: List[WordTiming], max_duration: float) -> None:
    """Words at sentence boundaries may swallow the pause beside them: cap them at `max_duration`."""
    for i in range(1, len(alignment)):
        if alignment[i].end - alignment[i].start > max_duration:
            if alignment[i].word in _SENTENCE_END_MARKS:
                alignment[i].end = alignment[i].start + max_duration
            elif alignment[i - 1].word in _SENTENCE_END_MARKS:
                alignment[i].start = alignment[i].end - max_duration


def _segment_words(alignment: List[WordTiming], word_index: int, n_tokens: int, time_offset: float):
    """The words that cover a segment's `n_tokens` text tokens, starting at alignment[word_index]."""
    words, saved_tokens = [], 0
    while word_index < len(alignment) and saved_tokens < n_tokens:
        timing = alignment[word_index]
        if timing.word:
            words.append(
                dict(
                    word=timing.word,
                    start=round(time_offset + timing.start, 2),
                    end=round(time_offset + timing.end, 2),
                    probability=timing.probability,
                )
            )
        saved_tokens += len(timing.tokens)
        word_index += 1
    return words, word_index


def _fit_segment_edges(segment: dict, words: List[dict], last_speech: float, median: float) -> None:
    """Reconcile the first/last word with the segment's own timestamps (OpenAI's heuristics)."""
    longest = median * 2
    first_too_long = words[0]["end"] - words[0]["start"] > longest or (
        len(words) > 1 and words[1]["end"] - words[0]["start"] > longest * 2
    )
    if words[0]["end"] - last_speech > median * 4 and first_too_long:  # first words after a pause
        if len(words) > 1 and words[1]["end"] - words[1]["start"] > longest:
            boundary = max(words[1]["end"] / 2, words[1]["end"] - longest)
            words[0]["end"] = words[1]["start"] = boundary
        words[0]["start"] = max(0, words[0]["end"] - longest)
    if segment["start"] < words[0]["end"] and segment["start"] - 0.5 > words[0]["start"]:
        words[0]["start"] = max(0, min(words[0]["end"] - median, segment["start"]))
    else:
        segment["start"] = words[0]["start"]
    if segment["end"] > words[-1]["start"] and segment["end"] + 0.5 < words[-1]["end"]:
        words[-1]["end"] = max(words[-1]["start"] + median, segment["end"])
    else:
        segment["end"] = words[-1]["end"]


def make_monotonic(words: List[dict], lower: float, upper: float) -> None:
    """Keep word times inside [lower, upper] and never going back (in place)."""
    previous_end = lower
    for word in words:
        word["start"] = round(min(max(word["start"], previous_end), upper), 2)
        word["end"] = round(min(max(word["end"], word["start"]), upper), 2)
        previous_end = word["end"]


def add_word_timestamps(
    segments: List[dict],
    model: Whisper,
    tokenizer: Tokenizer,
    mel: mx.array,
    num_frames: int,
    *,
    prepend_punctuations: str = PREPEND_PUNCTUATIONS,
    append_punctuations: str = APPEND_PUNCTUATIONS,
    last_speech_timestamp: float = 0.0,
    end_time: float = float("inf"),
    **alignment_options,
) -> None:
    """Give each segment of one window a "words" list of {word, start, end, probability} (in place).

    `mel` is the window's mel (or its encoder output); segments hold "seek", "start", "end" and
    "tokens". Word times are absolute, non-decreasing and within [window start, `end_time`].
    """
    if len(segments) == 0:
        return
    text_tokens_per_segment = [[t for t in segment["tokens"] if t < tokenizer.eot] for segment in segments]
    text_tokens = list(itertools.chain.from_iterable(text_tokens_per_segment))
    alignment = find_alignment(model, tokenizer, text_tokens, mel, num_frames, **alignment_options)
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) > 0 else 0.0
    if len(durations) > 0:
        _clip_long_words(alignment, median * 2)
    merge_punctuations(alignment, prepend_punctuations, append_punctuations)

    time_offset = segments[0]["seek"] * HOP_LENGTH / SAMPLE_RATE
    word_index, lower = 0, time_offset
    for segment, tokens in zip(segments, text_tokens_per_segment):
        words, word_index = _segment_words(alignment, word_index, len(tokens), time_offset)
        if len(words) > 0:
            _fit_segment_edges(segment, words, last_speech_timestamp, median)
            make_monotonic(words, lower, end_time)
            segment["start"] = round(min(max(segment["start"], lower), end_time), 2)
            segment["end"] = round(min(max(segment["end"], segment["start"]), end_time), 2)
            last_speech_timestamp = lower = max(segment["end"], words[-1]["end"])
        segment["words"] = words
