"""Where a training example's audio comes from, read only when its batch is due: a file's clip or a
window of a recording (ClipAudio), training clips joined into one window (PackedAudio), synthetic
silence or noise (NoSpeechAudio). Each gives its samples (`read`) and a key of its content (`key`,
for the feature cache)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from ..audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, AudioError, audio_length
from .augment import no_speech_audio
from .cache import content_key
from .labels import DroppedExample


@dataclass(frozen=True)
class ClipAudio:
    """An example's audio: a file path or encoded bytes, and the sample range used (a window of a recording)."""

    audio: Union[str, bytes]
    start: int = 0
    stop: Optional[int] = None

    def read(self) -> np.ndarray:
        return read_samples(self.audio)[self.start : self.stop]

    def key(self) -> str:
        try:
            data = self.audio if isinstance(self.audio, (bytes, bytearray)) else Path(self.audio).read_bytes()
        except OSError as e:
            raise DroppedExample("unreadable audio", f"{self.audio}: {e.strerror or e}") from None
        return content_key(b"clip", data, self.start, self.stop)


@dataclass(frozen=True)
class PackedAudio:
    """Training clips joined into one window: (clip, samples of silence before it) each."""

    pieces: Tuple[Tuple[ClipAudio, int], ...]

    def read(self) -> np.ndarray:
        parts = []
        for clip, gap in self.pieces:
            parts += [np.zeros(gap, np.float32), clip.read()]
        return np.concatenate(parts)[:N_SAMPLES]

    def key(self) -> str:
        return content_key(b"packed", *[part for clip, gap in self.pieces for part in (clip.key(), gap)])


@dataclass(frozen=True)
class NoSpeechAudio:
    """Silence or noise drawn from `seed` (augment.no_speech_audio)."""

    seed: Tuple[int, ...]

    def read(self) -> np.ndarray:
        return no_speech_audio(np.random.default_rng(list(self.seed)))[1]

    def key(self) -> str:
        return content_key(b"no-speech", *self.seed)


def read_samples(audio: Union[str, bytes, np.ndarray]) -> np.ndarray:
    """16 kHz samples of a file, encoded bytes or an array; unreadable audio raises DroppedExample."""
    from ..audio import load_audio

    if isinstance(audio, np.ndarray):
        return audio
    try:
        return load_audio(audio)
    except Exception as e:  # decoders raise many types; the message names the file
        raise DroppedExample("unreadable audio", str(e)) from None


def samples_in(audio: Union[str, bytes, np.ndarray]) -> int:
    """The audio's length in 16 kHz samples, from its header (decoded only when the header cannot tell)."""
    if isinstance(audio, np.ndarray):
        return len(audio)
    try:
        n = audio_length(audio)
    except AudioError as e:
        raise DroppedExample("unreadable audio", str(e)) from None
    return len(read_samples(audio)) if n is None else n


def frames_of(n_samples: int) -> int:
    return min(n_samples // HOP_LENGTH, N_FRAMES)
