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

from .audio import (
    FRAMES_PER_SECOND, HOP_LENGTH, N_FFT, N_FRAMES, SAMPLE_RATE, AudioError, _hann_window, load_audio, mel_filters,
    pad_or_trim,
)
from .decoding import DecodingOptions, DecodingResult, cpu_buffer_cache, decode, detect_language
from .timing import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS, add_word_timestamps
from .tokenizer import LANGUAGES, get_tokenizer, language_code
from .whisper import Whisper
from .writers import format_timestamp

INPUT_STRIDE = 2  # mel frames per audio position of the encoder
TIME_PRECISION = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # 0.02 s per timestamp token
LAZY_AFTER_SECONDS = 600.0  # longer 16 kHz files are read block by block instead of at once


# --- Audio, one window at a time ----------------------------------------------------------

class ArraySource:
    """Audio already in memory (16 kHz mono float32)."""

    def __init__(self, audio: np.ndarray):
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"expected mono 16 kHz audio as a 1-D array, got shape {audio.shape}")
        self.audio, self.n_samples = audio, len(audio)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.audio[start:stop]

    def close(self) -> None:
        pass


class SoundFileSource:
    """A 16 kHz file read lazily in blocks with soundfile (channels are averaged)."""

    def __init__(self, path: Union[str, Path]):
        import soundfile

        self.file = soundfile.SoundFile(str(path))
        if self.file.samplerate != SAMPLE_RATE:
            raise ValueError(f"{path}: lazy reading needs {SAMPLE_RATE} Hz audio, got {self.file.samplerate} Hz")
        self.n_samples = self.file.frames

    def read(self, start: int, stop: int) -> np.ndarray:
        self.file.seek(start)
        return self.file.read(max(stop - start, 0), dtype="float32", always_2d=True).mean(axis=1)

    def close(self) -> None:
        self.file.close()


def open_audio(audio: Union[str, Path, np.ndarray], lazy_after_s: float = LAZY_AFTER_SECONDS):
    """An audio source with `n_samples` and `read(start, stop)`: an array, or a long 16 kHz file read lazily."""
    if isinstance(audio, np.ndarray):
        return ArraySource(audio)
    try:
        import soundfile

        info = soundfile.info(str(audio))
        if info.samplerate == SAMPLE_RATE and info.frames > 0 and info.duration > lazy_after_s:
            return SoundFileSource(audio)
    except Exception:  # not readable by soundfile (or missing): load_audio reports it or uses ffmpeg
        pass
    return ArraySource(load_audio(audio))


class MelWindows:
    """Log-mel features of a recording, computed one 30 s window at a time.

    They equal faster-whisper's whole-file features (the reference implementation's): the
    log-mel of the audio plus one hop of zeros, floored 8 (log10) below the loudest frame of
    the whole file; frames past the audio are zeros in the log-mel domain.
    """

    def __init__(self, source, n_mels: int = 80):
        self.source, self.n_mels = source, n_mels
        self.n_samples = source.n_samples
        self.content_frames = self.n_samples // HOP_LENGTH
        self.duration = self.n_samples / SAMPLE_RATE
        n_frames = self.content_frames + 1  # the hop of zeros adds one frame
        self.log_max = max(  # a first streaming pass: the floor depends on the loudest frame
            np.log10(np.maximum(self._power(start, min(start + N_FRAMES, n_frames)).max(), np.float32(1e-10)))
            for start in range(0, n_frames, N_FRAMES)
        )

    def window(self, seek: int) -> np.ndarray:
        """(N_FRAMES, n_mels) features of frames [seek, seek + N_FRAMES), zero-padded past the audio."""
        stop = min(seek + N_FRAMES, self.content_frames)
        if stop <= seek:
            return np.zeros((N_FRAMES, self.n_mels), dtype=np.float32)
        log_spec = np.log10(np.maximum(self._power(seek, stop), np.float32(1e-10)))
        log_spec = (np.maximum(log_spec, self.log_max - 8.0) + 4.0) / 4.0
        return pad_or_trim(log_spec, N_FRAMES)

    def _samples(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) of the audio plus one hop of zeros, reflect-padded by N_FFT // 2."""
        n = self.n_samples + HOP_LENGTH
        index = np.arange(start, stop) - N_FFT // 2
        period = 2 * (n - 1)
        index = np.abs(index) % period  # reflection at both ends, as np.pad(mode="reflect")
        index = np.where(index >= n, period - index, index)
        lo, hi = int(index.min()), int(index.max()) + 1
        block = np.zeros(hi - lo, dtype=np.float32)
        audio = self.source.read(min(lo, self.n_samples), min(hi, self.n_samples))
        block[: len(audio)] = audio
        return block[index - lo]

    def _power(self, start: int, stop: int) -> np.ndarray:
        """Mel power (stop - start, n_mels) of frames [start, stop), with audio.py's numerics."""
        samples = self._samples(start * HOP_LENGTH, (stop - 1) * HOP_LENGTH + N_FFT)
        frames = np.lib.stride_tricks.sliding_window_view(samples, N_FFT)[::HOP_LENGTH] * _hann_window()
        power = np.abs(np.fft.rfft(frames, axis=-1)).astype(np.float32) ** 2
        return power @ mel_filters(self.n_mels).T


# --- Options and one window's decoding ------------------------------------------------------

@dataclass(frozen=True)
class TranscribeOptions:
    language: Optional[str] = None  # None: detect it on the first window
    task: str = "transcribe"
    temperature: Tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # tried in turn until one passes
    compression_ratio_threshold: Optional[float] = 2.4  # above: too repetitive, fall back
    logprob_threshold: Optional[float] = -1.0  # average log-probability below: fall back
    no_speech_threshold: Optional[float] = 0.6  # with a low log-probability too: skip as silence
    condition_on_previous_text: bool = True
    initial_prompt: Optional[str] = None
    word_timestamps: bool = False
    beam_size: Optional[int] = None
    best_of: Optional[int] = 5
    patience: Optional[float] = None
    length_penalty: Optional[float] = None
    without_timestamps: bool = False
    prepend_punctuations: str = PREPEND_PUNCTUATIONS
    append_punctuations: str = APPEND_PUNCTUATIONS
    verbose: bool = False

    def __post_init__(self):
        temperature = self.temperature
        temperature = (temperature,) if isinstance(temperature, (int, float)) else tuple(temperature)
        if len(temperature) == 0 or any(t < 0 for t in temperature):
            raise ValueError(f"temperature must be one or more values >= 0, got {self.temperature!r}")
        object.__setattr__(self, "temperature", tuple(float(t) for t in temperature))
        if self.task not in ("transcribe", "translate"):
            raise ValueError(f"task must be 'transcribe' or 'translate', got {self.task!r}")
        if self.language is not None:
            object.__setattr__(self, "language", language_code(self.language))
        if self.patience is not None and self.beam_size is None:
            raise ValueError("patience needs beam_size")
        for name in ("beam_size", "best_of"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.length_penalty is not None and not 0 <= self.length_penalty <= 1:
            raise ValueError(f"length_penalty must be between 0 and 1, got {self.length_penalty}")

    def decoding_options(self, temperature: float, prompt: Optional[List[int]]) -> DecodingOptions:
        """Beam search only at temperature 0, best-of sampling only above it (as OpenAI does)."""
        greedy = temperature == 0
        return DecodingOptions(
            task=self.task, language=self.language, temperature=temperature,
            beam_size=self.beam_size if greedy else None, patience=self.patience if greedy else None,
            best_of=None if greedy else self.best_of, length_penalty=self.length_penalty,
            prompt=prompt or None,  # an empty prompt must not add <|startofprev|>
            without_timestamps=self.without_timestamps,
        )

    def needs_fallback(self, result: DecodingResult) -> bool:
        """Too repetitive or too unlikely, unless the window is silence anyway."""
        too_repetitive = (self.compression_ratio_threshold is not None
                          and result.compression_ratio > self.compression_ratio_threshold)
        too_unlikely = self.logprob_threshold is not None and result.avg_logprob < self.logprob_threshold
        silent = (self.no_speech_threshold is not None and result.no_speech_prob > self.no_speech_threshold
                  and too_unlikely)
        return (too_repetitive or too_unlikely) and not silent

    def is_silence(self, result: DecodingResult) -> bool:
        """Skip the window: no speech is likely and the text is not confident enough to keep."""
        if self.no_speech_threshold is None or result.no_speech_prob <= self.no_speech_threshold:
            return False
        return self.logprob_threshold is None or result.avg_logprob <= self.logprob_threshold


def decode_with_fallback(model: Whisper, features: mx.array, options: TranscribeOptions,
                         prompt: Optional[List[int]] = None) -> DecodingResult:
    """Decode one window at each temperature in turn until the result passes the thresholds."""
    result = None
    for temperature in options.temperature:
        result = decode(model, features, options.decoding_options(temperature, prompt))
        if not options.needs_fallback(result):
            break
    return result


# --- Segments from timestamp tokens ---------------------------------------------------------

def split_segments(tokens: Sequence[int], timestamp_begin: int, time_offset: float,
                   segment_frames: int) -> Tuple[List[Tuple[float, float, List[int]]], int, bool]:
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
    """Runs the seek loop over one recording; `encode` and `decode_window` are the model calls."""

    def __init__(self, model: Whisper, options: TranscribeOptions):
        self.model, self.requested, self.options = model, options, options
        self._cached = (None, None)  # (seek, features) of the window language detection encoded

    def encode(self, mel_window: np.ndarray) -> mx.array:
        """(N_FRAMES, n_mels) -> (n_audio_ctx, n_audio_state) encoder output."""
        mel = mx.array(mel_window)[None].astype(self.model.decoder.ln.weight.dtype)
        features = self.model.embed_audio(mel)[0]
        mx.eval(features)
        return features

    def decode_window(self, features: mx.array, prompt: Optional[List[int]]) -> DecodingResult:
        return decode_with_fallback(self.model, features, self.options, prompt)

    def features_at(self, windows: MelWindows, seek: int) -> mx.array:
        if self._cached[0] == seek:
            return self._cached[1]
        return self.encode(windows.window(seek))

    def language(self, windows: MelWindows) -> str:
        """The given language, or the one detected on the first window."""
        requested = self.requested.language
        if requested is not None:
            if not self.model.is_multilingual and requested != "en":
                raise ValueError(f"this model is English-only; it cannot transcribe {requested!r}")
            return requested
        if not self.model.is_multilingual:
            return "en"
        features = self.encode(windows.window(0))
        self._cached = (0, features)
        language = detect_language(self.model, features)[0][0]
        if self.requested.verbose:
            print(f"Detected language: {LANGUAGES[language].title()}")
        return language

    def run(self, audio, progress: bool = False) -> dict:
        """Transcribe `audio` (a path or a 16 kHz mono array): {"text", "segments", "language"}.

        `progress` shows a tqdm bar over the audio (on stderr).
        """
        if self.requested.task == "translate" and not self.model.is_multilingual:
            raise ValueError("this model is English-only; it cannot translate")
        source = open_audio(audio)
        try:
            with cpu_buffer_cache(self.model):
                windows = MelWindows(source, self.model.dims.n_mels)
                self._cached = (None, None)
                language = self.language(windows)
                self.options = replace(self.requested, language=language)
                state = self._seek_loop(windows, language, progress)
        finally:
            source.close()
        tokenizer = get_tokenizer(self.model.is_multilingual, self.model.num_languages, language, self.options.task)
        text = tokenizer.decode(state.all_tokens[state.prompt_length:]).strip()
        return {"text": text, "segments": state.segments, "language": language}

    def _seek_loop(self, windows: MelWindows, language: str, progress: bool) -> _LoopState:
        from tqdm import tqdm

        tokenizer = get_tokenizer(self.model.is_multilingual, self.model.num_languages, language, self.options.task)
        state = _LoopState()
        if self.options.initial_prompt is not None:
            state.all_tokens = tokenizer.encode(" " + self.options.initial_prompt.strip())
        state.prompt_length = len(state.all_tokens)
        with tqdm(total=windows.content_frames, unit="frames", disable=not progress, leave=False) as bar:
            while state.seek < windows.content_frames:
                previous = state.seek
                self._step(windows, tokenizer, state)
                bar.update(min(state.seek, windows.content_frames) - previous)
        for i, segment in enumerate(state.segments):
            segment["id"] = i
        return state

    def _step(self, windows: MelWindows, tokenizer, state: _LoopState) -> None:
        """Decode the window at `state.seek`, keep its segments and move the seek forward."""
        options, seek = self.options, state.seek
        segment_frames = min(N_FRAMES, windows.content_frames - seek)
        time_offset = seek * HOP_LENGTH / SAMPLE_RATE
        features = self.features_at(windows, seek)
        prompt = state.all_tokens[state.prompt_reset_since:]
        result = self.decode_window(features, prompt)
        if options.is_silence(result):
            state.seek = seek + segment_frames
            return
        pieces, advance, single_ending = split_segments(
            result.tokens, tokenizer.timestamp_begin, time_offset, segment_frames)
        segments = [_new_segment(seek, start, end, tokens, result, tokenizer, windows.duration)
                    for start, end, tokens in pieces]
        # Instantaneous segments (or ones past the end of the audio) and empty ones carry no speech.
        segments = [s for s in segments if s["start"] < s["end"] and s["text"].strip()]
        new_seek = seek + advance
        if options.word_timestamps:
            last_word_end = self._time_words(segments, tokenizer, features, segment_frames, windows, state)
            if not single_ending and last_word_end is not None and last_word_end > time_offset:
                new_seek = round(last_word_end * FRAMES_PER_SECOND)  # resume right after the last word
                segments = _drop_after(segments, last_word_end)
        state.seek = new_seek if new_seek > seek else seek + segment_frames  # always move forward
        if options.verbose:
            for s in segments:
                print(f"[{format_timestamp(s['start'])} --> {format_timestamp(s['end'])}] {s['text'].strip()}")
        state.segments += segments
        state.all_tokens += [t for s in segments for t in s["tokens"]]
        if not options.condition_on_previous_text or result.temperature > 0.5:
            state.prompt_reset_since = len(state.all_tokens)  # a high-temperature text is no good prompt

    def _time_words(self, segments, tokenizer, features, segment_frames, windows, state) -> Optional[float]:
        add_word_timestamps(
            segments, self.model, tokenizer, features, segment_frames,
            prepend_punctuations=self.options.prepend_punctuations,
            append_punctuations=self.options.append_punctuations,
            last_speech_timestamp=state.last_speech_timestamp, end_time=windows.duration,
        )
        ends = [w["end"] for s in segments for w in s["words"]]
        if len(ends) == 0:
            return None
        state.last_speech_timestamp = ends[-1]
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


def _new_segment(seek: int, start: float, end: float, tokens: List[int], result: DecodingResult,
                 tokenizer, duration: float) -> dict:
    return {
        "id": 0, "seek": seek,
        "start": round(min(start, duration), 3), "end": round(min(end, duration), 3),
        "text": tokenizer.decode([t for t in tokens if t < tokenizer.eot]), "tokens": list(tokens),
        "temperature": result.temperature, "avg_logprob": result.avg_logprob,
        "compression_ratio": result.compression_ratio, "no_speech_prob": result.no_speech_prob,
    }


def transcribe(
    model: Whisper,
    audio: Union[str, Path, np.ndarray],
    *,
    language: Optional[str] = None,
    task: str = "transcribe",
    temperature: Union[float, Tuple[float, ...]] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    compression_ratio_threshold: Optional[float] = 2.4,
    logprob_threshold: Optional[float] = -1.0,
    no_speech_threshold: Optional[float] = 0.6,
    condition_on_previous_text: bool = True,
    initial_prompt: Optional[str] = None,
    word_timestamps: bool = False,
    beam_size: Optional[int] = None,
    best_of: Optional[int] = 5,
    patience: Optional[float] = None,
    length_penalty: Optional[float] = None,
    without_timestamps: bool = False,
    prepend_punctuations: str = PREPEND_PUNCTUATIONS,
    append_punctuations: str = APPEND_PUNCTUATIONS,
    verbose: bool = False,
) -> dict:
    """Transcribe (or translate) a recording of any length.

    `audio` is a file path or a 16 kHz mono float32 array. Returns {"text", "language",
    "segments"}; each segment has id, seek, start, end (seconds), text, tokens, temperature,
    avg_logprob, compression_ratio, no_speech_prob, and "words" when `word_timestamps`.
    """
    options = TranscribeOptions(
        language=language, task=task, temperature=temperature,
        compression_ratio_threshold=compression_ratio_threshold, logprob_threshold=logprob_threshold,
        no_speech_threshold=no_speech_threshold, condition_on_previous_text=condition_on_previous_text,
        initial_prompt=initial_prompt, word_timestamps=word_timestamps, beam_size=beam_size, best_of=best_of,
        patience=patience, length_penalty=length_penalty, without_timestamps=without_timestamps,
        prepend_punctuations=prepend_punctuations, append_punctuations=append_punctuations, verbose=verbose,
    )
    return Transcriber(model, options).run(audio)


# --- Many short clips at once ------------------------------------------------------------------

def _clip_window(clip: Union[str, Path, np.ndarray], n_mels: int) -> Tuple[np.ndarray, float]:
    windows = MelWindows(ArraySource(clip if isinstance(clip, np.ndarray) else load_audio(clip)), n_mels)
    if windows.content_frames > N_FRAMES:
        name = "clip" if isinstance(clip, np.ndarray) else str(clip)
        raise AudioError(f"{name}: {windows.duration:.1f} s is longer than 30 s; use transcribe() for long audio")
    return windows.window(0), windows.duration


def transcribe_batch(model: Whisper, clips: Sequence[Union[str, Path, np.ndarray]],
                     options: DecodingOptions = DecodingOptions(), batch_size: int = 8) -> List[dict]:
    """Transcribe clips of at most 30 s each, `batch_size` windows per forward pass.

    One decode per clip with `options` (no temperature fallback, no timestamps): the fast
    path for evaluation. Returns one {"text", "language", "segments"} result per clip.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    options = replace(options, without_timestamps=True)
    results = []
    with cpu_buffer_cache(model, batch_size):
        for first in range(0, len(clips), batch_size):
            batch = clips[first : first + batch_size]
            mels, durations = zip(*(_clip_window(clip, model.dims.n_mels) for clip in batch))
            for decoded, duration in zip(decode(model, mx.array(np.stack(mels)), options), durations):
                segment = _new_segment(0, 0.0, duration, decoded.tokens, decoded,
                                       _tokenizer_for(model, decoded, options), duration)
                results.append({"text": decoded.text, "segments": [segment], "language": decoded.language})
    return results


def _tokenizer_for(model: Whisper, decoded: DecodingResult, options: DecodingOptions):
    return get_tokenizer(model.is_multilingual, model.num_languages, decoded.language, options.task)
