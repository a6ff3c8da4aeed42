"""Long-form transcription: 30 s windows advanced by the predicted timestamps.

`transcribe` walks a recording window by window (the "seek" loop), decodes each window with
temperature fallback, cuts the tokens into timestamped segments and optionally times every
word. Features are computed one window at a time, so a two-hour file never becomes one
huge mel array; long 16 kHz files are also read lazily. `transcribe_batch` is the fast
path for many short clips (evaluation): several windows per forward pass, no timestamps.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from ..audio import (
    FRAMES_PER_SECOND,
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES_PER_TOKEN,
    SAMPLE_RATE,
    TIME_PRECISION,
    ArraySource,
    AudioError,
    MelWindows,
    load_audio,
    open_audio,
)
from ..backend import cpu_buffer_cache
from ..tokenizer import LANGUAGES, tokenizer_for
from ..whisper import Whisper
from .decoding import DecodingOptions, DecodingResult, decode, decode_batches, detect_language
from .options import TranscribeOptions
from .timing import add_word_timestamps
from .writers import format_timestamp

INPUT_STRIDE = N_SAMPLES_PER_TOKEN // HOP_LENGTH  # mel frames per audio position of the encoder


# --- One window's decoding ------------------------------------------------------------------


def decode_with_fallback(
    model: Whisper, features: mx.array, options: TranscribeOptions, prompt: Optional[List[int]] = None
) -> DecodingResult:
    """Decode one window at each temperature in turn until the result passes the thresholds."""
    result = None
    for temperature in options.temperature:
        result = decode(model, features, options.decoding_options(temperature, prompt))
        if not options.needs_fallback(result):
            break
    return result


# --- Segments from timestamp tokens ---------------------------------------------------------


def split_segments(
    tokens: Sequence[int], timestamp_begin: int, time_offset: float, segment_frames: int
) -> Tuple[List[Tuple[float, float, List[int]]], int, bool]:
    """Cut one window's tokens into (start, end, tokens) segments at consecutive timestamp pairs.

    Returns the segments, how many mel frames to advance, and whether the tokens end with a
    single timestamp (then nothing was left unfinished and the whole window is consumed).
    """
    tokens = list(tokens)
    is_stamp = [t >= timestamp_begin for t in tokens]
    single_ending = is_stamp[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_stamp[i] and is_stamp[i + 1]]
    if not cuts:  # one segment for the window; its end is the last timestamp if there is one
        duration = segment_frames * HOP_LENGTH / SAMPLE_RATE
        stamps = [t for t in tokens if t >= timestamp_begin]
        if len(stamps) > 0 and stamps[-1] != timestamp_begin:
            duration = (stamps[-1] - timestamp_begin) * TIME_PRECISION
        return [(time_offset, time_offset + duration, tokens)], segment_frames, single_ending
    if single_ending:
        cuts.append(len(tokens))
    segments, last = [], 0
    for cut in cuts:
        piece = tokens[last:cut]
        start = time_offset + (piece[0] - timestamp_begin) * TIME_PRECISION
        end = time_offset + (piece[-1] - timestamp_begin) * TIME_PRECISION
        segments.append((start, end, piece))
        last = cut
    if single_ending:
        return segments, segment_frames, True
    # The text after the last complete segment is unfinished: decode it again in the next window.
    return segments, (tokens[last - 1] - timestamp_begin) * INPUT_STRIDE, False


# --- The seek loop ----------------------------------------------------------------------------


@dataclass
class _LoopState:
    seek: int = 0
    all_tokens: List[int] = field(default_factory=list)
    prompt_reset_since: int = 0
    prompt_length: int = 0  # tokens of the initial prompt at the start of all_tokens
    last_speech_timestamp: float = 0.0
    segments: List[dict] = field(default_factory=list)


class Transcriber:
    """Runs the seek loop over one recording; `encode` and `decode_window` are the model calls.

    `run` does it all. The pieces (`open`, `start`, `skip_silence`, `prompt`, `keep`, `result`)
    let batched.py advance many recordings in lockstep, with the decoding done for all at once.
    """

    def __init__(self, model: Whisper, options: TranscribeOptions):
        self.model, self.requested, self.options = model, options, options
        self._cached = (None, None)  # (seek, features) of the window language detection encoded
        self.label = None  # printed before each --verbose segment line when set (batched runs)

    def encode(self, mel_window: np.ndarray) -> mx.array:
        """(N_FRAMES, n_mels) -> (n_audio_ctx, n_audio_state) encoder output."""
        mel = mx.array(mel_window)[None].astype(self.model.dtype)
        features = self.model.embed_audio(mel)[0]
        mx.eval(features)
        return features

    def decode_window(self, features: mx.array, prompt: Optional[List[int]]) -> DecodingResult:
        return decode_with_fallback(self.model, features, self.options, prompt)

    def features_at(self, windows: MelWindows, seek: int) -> mx.array:
        cached = self.cached_features(seek)
        return cached if cached is not None else self.encode(windows.window(seek))

    def cached_features(self, seek: int) -> Optional[mx.array]:
        """The encoder output of the window at `seek` if language detection already made it."""
        return self._cached[1] if self._cached[0] == seek else None

    def given_language(self) -> Optional[str]:
        """The language to transcribe in without detection, or None when it must be detected."""
        if self.requested.task == "translate" and not self.model.is_multilingual:
            raise ValueError("this model is English-only; it cannot translate")
        requested = self.requested.language
        if requested is not None:
            if not self.model.is_multilingual and requested != "en":
                raise ValueError(f"this model is English-only; it cannot transcribe {requested!r}")
            return requested
        return None if self.model.is_multilingual else "en"

    def language(self, windows: MelWindows) -> str:
        """The given language, or the one detected on the first window."""
        language = self.given_language()
        if language is not None:
            return language
        features = self.encode(windows.window(0))
        return self.detected(detect_language(self.model, features)[0][0], features)

    def detected(self, language: str, features: mx.array) -> str:
        """Keep the first window's `features` (language detection encoded them) and say what was heard."""
        self._cached = (0, features)
        if self.requested.verbose:
            print(f"Detected language: {LANGUAGES[language].title()}")
        return language

    def run(self, audio, progress: bool = False) -> dict:
        """Transcribe `audio` (a path or a 16 kHz mono array): {"text", "segments", "language"}.

        `progress` shows a tqdm bar over the audio (on stderr).
        """
        self.given_language()
        self.open(audio)
        try:
            with cpu_buffer_cache(self.model.dims, self.model.dtype):
                self.start(self.language(self.windows))
                self._seek_loop(progress)
        finally:
            self.close()
        return self.result()

    def open(self, audio) -> None:
        """Open `audio` for reading one window at a time."""
        source = open_audio(audio)
        try:
            self.windows = MelWindows(source, self.model.dims.n_mels)
        except BaseException:
            source.close()
            raise
        self._source, self._cached = source, (None, None)

    def close(self) -> None:
        self._source.close()

    def start(self, language: str) -> None:
        """Begin at the first window, transcribing in `language`."""
        self.options = replace(self.requested, language=language)
        self.tokenizer = tokenizer_for(self.model, language, self.options.task)
        self.state = _LoopState()
        if self.options.initial_prompt is not None:
            self.state.all_tokens = self.tokenizer.encode(" " + self.options.initial_prompt.strip())
        self.state.prompt_length = len(self.state.all_tokens)

    @property
    def done(self) -> bool:
        return self.state.seek >= self.windows.content_frames

    def skip_silence(self) -> None:
        """Move past digitally silent windows: nothing to hear, decoding would only invent words."""
        while not self.done and self.windows.is_silent(self.state.seek):
            self.state.seek += min(N_FRAMES, self.windows.content_frames - self.state.seek)

    def prompt(self) -> List[int]:
        """The previous text the window at the seek is conditioned on."""
        return self.state.all_tokens[self.state.prompt_reset_since :]

    def result(self) -> dict:
        state = self.state
        for i, segment in enumerate(state.segments):
            segment["id"] = i
        text = self.tokenizer.decode(state.all_tokens[state.prompt_length :]).strip()
        return {"text": text, "segments": state.segments, "language": self.options.language}

    def _seek_loop(self, progress: bool) -> None:
        from tqdm import tqdm

        frames = self.windows.content_frames
        with tqdm(total=frames, unit="frames", disable=not progress, leave=False) as bar:
            while not self.done:
                previous = self.state.seek
                self._step()
                bar.update(min(self.state.seek, frames) - previous)

    def _step(self) -> None:
        """Decode the window at the seek, keep its segments and move the seek forward."""
        self.skip_silence()
        if self.done:
            return
        features = self.features_at(self.windows, self.state.seek)
        self.keep(self.decode_window(features, self.prompt()), features)

    def keep(self, result: DecodingResult, features: mx.array) -> None:
        """Keep the segments of the window at the seek, decoded as `result`, and move the seek forward."""
        options, state, tokenizer, windows = self.options, self.state, self.tokenizer, self.windows
        seek = state.seek
        segment_frames = min(N_FRAMES, windows.content_frames - seek)
        time_offset = seek * HOP_LENGTH / SAMPLE_RATE
        if options.is_silence(result):
            state.seek = seek + segment_frames
            return
        pieces, advance, single_ending = split_segments(
            result.tokens, tokenizer.timestamp_begin, time_offset, segment_frames
        )
        segments = [
            _new_segment(seek, start, end, tokens, result, tokenizer, windows.duration) for start, end, tokens in pieces
        ]
        # Instantaneous segments (or ones past the end of the audio) and empty ones carry no speech.
        segments = [s for s in segments if s["start"] < s["end"] and s["text"].strip()]
        new_seek = seek + advance
        if options.word_timestamps:
            last_word_end = self.time_words(segments, features, segment_frames)
            if not single_ending and last_word_end is not None and last_word_end > time_offset:
                new_seek = round(last_word_end * FRAMES_PER_SECOND)  # resume right after the last word
                segments = _drop_after(segments, last_word_end)
        state.seek = new_seek if new_seek > seek else seek + segment_frames  # always move forward
        self.print_segments(segments)
        state.segments += segments
        state.all_tokens += [t for s in segments for t in s["tokens"]]
        if not options.condition_on_previous_text or result.temperature > 0.5:
            state.prompt_reset_since = len(state.all_tokens)  # a high-temperature text is no good prompt

    def print_segments(self, segments: List[dict]) -> None:
        if not self.options.verbose:
            return
        label = "" if self.label is None else f"{self.label}: "
        for s in segments:
            print(f"{label}[{format_timestamp(s['start'])} --> {format_timestamp(s['end'])}] {s['text'].strip()}")

    def time_words(self, segments: List[dict], features: mx.array, segment_frames: int) -> Optional[float]:
        """Add word timestamps to one window's segments; the end of its last word, if any."""
        add_word_timestamps(
            segments,
            self.model,
            self.tokenizer,
            features,
            segment_frames,
            prepend_punctuations=self.options.prepend_punctuations,
            append_punctuations=self.options.append_punctuations,
            last_speech_timestamp=self.state.last_speech_timestamp,
            end_time=self.windows.duration,
        )
        ends = [w["end"] for s in segments for w in s["words"]]
        if len(ends) == 0:
            return None
        self.state.last_speech_timestamp = ends[-1]
        return ends[-1]


def _drop_after(segments: List[dict], time: float) -> List[dict]:
    """Drop wordless segments from `time` on (the next window decodes that audio again); cut the rest there."""
    kept = []
    for segment in segments:
        if segment["words"]:
            kept.append(segment)
        elif segment["start"] < time:
            segment["end"] = min(segment["end"], time)
            kept.append(segment)
    return kept


def _new_segment(
    seek: int, start: float, end: float, tokens: List[int], result: DecodingResult, tokenizer, duration: float
) -> dict:
    return {
        "id": 0,
        "seek": seek,
        "start": round(min(start, duration), 3),
        "end": round(min(end, duration), 3),
        "text": tokenizer.decode([t for t in tokens if t < tokenizer.eot]),
        "tokens": list(tokens),
        "temperature": result.temperature,
        "avg_logprob": result.avg_logprob,
        "compression_ratio": result.compression_ratio,
        "no_speech_prob": result.no_speech_prob,
    }


def transcribe(model: Whisper, audio: Union[str, Path, np.ndarray], **options) -> dict:
    """Transcribe (or translate) a recording of any length.

    `audio` is a file path or a 16 kHz mono float32 array; `options` are `TranscribeOptions`
    fields (language, task, temperature, beam_size, word_timestamps, ...). Returns {"text",
    "language", "segments"}; each segment has id, seek, start, end (seconds), text, tokens,
    temperature, avg_logprob, compression_ratio, no_speech_prob, and "words" when `word_timestamps`.
    """
    return Transcriber(model, TranscribeOptions(**options)).run(audio)


# --- Many short clips at once ------------------------------------------------------------------


def _clip_window(clip: Union[str, Path, np.ndarray], n_mels: int) -> Tuple[np.ndarray, float]:
    windows = MelWindows(ArraySource(clip if isinstance(clip, np.ndarray) else load_audio(clip)), n_mels)
    if windows.content_frames > N_FRAMES:
        name = "clip" if isinstance(clip, np.ndarray) else str(clip)
        raise AudioError(f"{name}: {windows.duration:.1f} s is longer than 30 s; use transcribe() for long audio")
    return windows.window(0), windows.duration


def transcribe_batch(
    model: Whisper,
    clips: Sequence[Union[str, Path, np.ndarray]],
    options: DecodingOptions = DecodingOptions(),
    batch_size: int = 8,
) -> List[dict]:
    """Transcribe clips of at most 30 s each, `batch_size` windows per forward pass.

    One decode per clip with `options` (no temperature fallback, no timestamps): the fast
    path for evaluation. Returns one {"text", "language", "segments"} result per clip.
    """
    options = replace(options, without_timestamps=True)
    mels, durations = zip(*(_clip_window(clip, model.dims.n_mels) for clip in clips)) if clips else ((), ())
    with cpu_buffer_cache(model.dims, model.dtype, batch_size):
        decoded = decode_batches(model, list(mels), options, batch_size)
    results = []
    for result, duration in zip(decoded, durations):
        tokenizer = tokenizer_for(model, result.language, options.task)
        segment = _new_segment(0, 0.0, duration, result.tokens, result, tokenizer, duration)
        results.append({"text": result.text, "segments": [segment], "language": result.language})
    return results
