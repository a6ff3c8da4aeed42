"""The options of transcription: one set, its defaults and its checks, for the CLI and the library."""

from dataclasses import dataclass, fields
from typing import List, Optional, Tuple

from ..tokenizer import language_code
from .decoding import DecodingOptions, DecodingResult
from .timing import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def temperature_schedule(start: float, increment: Optional[float]) -> Tuple[float, ...]:
    """start, start + increment, ... up to 1.0 (only `start` when there is no increment)."""
    if not 0 <= start <= 1:
        raise ValueError(f"temperature must be between 0 and 1, got {start}")
    if increment is None or increment <= 0:
        if increment is not None and increment < 0:
            raise ValueError(f"temperature increment must be positive (or none), got {increment}")
        return (start,)
    count = int((1.0 - start) / increment + 1e-6) + 1
    return tuple(round(start + i * increment, 6) for i in range(max(count, 1)))


def default(name: str):
    """The default of TranscribeOptions field `name` (the CLI's defaults come from here)."""
    return next(f.default for f in fields(TranscribeOptions) if f.name == name)


@dataclass(frozen=True)
class TranscribeOptions:
    language: Optional[str] = None  # None: detect it on the first window
    task: str = "transcribe"
    temperature: Tuple[float, ...] = DEFAULT_TEMPERATURES  # tried in turn until one passes
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
        if len(temperature) == 0 or any(not 0 <= t <= 1 for t in temperature):
            raise ValueError(f"temperature must be one or more values between 0 and 1, got {self.temperature!r}")
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
            task=self.task,
            language=self.language,
            temperature=temperature,
            beam_size=self.beam_size if greedy else None,
            patience=self.patience if greedy else None,
            best_of=None if greedy else self.best_of,
            length_penalty=self.length_penalty,
            prompt=prompt or None,  # an empty prompt must not add <|startofprev|>
            without_timestamps=self.without_timestamps,
        )

    def needs_fallback(self, result: DecodingResult) -> bool:
        """Too repetitive or too unlikely, unless the window is silence anyway."""
        too_repetitive = (
            self.compression_ratio_threshold is not None and result.compression_ratio > self.compression_ratio_threshold
        )
        too_unlikely = self.logprob_threshold is not None and result.avg_logprob < self.logprob_threshold
        silent = (
            self.no_speech_threshold is not None and result.no_speech_prob > self.no_speech_threshold and too_unlikely
        )
        return (too_repetitive or too_unlikely) and not silent

    def is_silence(self, result: DecodingResult) -> bool:
        """Skip the window: no speech is likely and the text is not confident enough to keep."""
        if self.no_speech_threshold is None or result.no_speech_prob <= self.no_speech_threshold:
            return False
        return self.logprob_threshold is None or result.avg_logprob <= self.logprob_threshold
