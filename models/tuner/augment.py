"""On-the-fly augmentation and synthetic no-speech windows, all drawn from seeded generators.

`spec_augment` masks bands of mel bins and runs of frames of one example's features (the
LibriSpeech "LD" policy of SpecAugment, scaled to the clip: time masks stay inside the audio
and never cover more than a tenth of it each). `no_speech_audio` makes the silence and noise
windows that teach an adapter to keep Whisper's `<|nospeech|>` answer instead of writing words.
A generator seeded by (seed, epoch, batch, row) draws every mask, so a resumed run repeats them.
"""

from dataclasses import dataclass

import numpy as np

from ..audio import SAMPLE_RATE

NO_SPEECH_KINDS = ("silence", "white noise", "brown noise", "hum")


@dataclass(frozen=True)
class SpecAugment:
    freq_masks: int = 2
    freq_width: int = 27  # at 80 mel bins; scaled with the model's bin count
    time_masks: int = 2
    time_width: int = 100  # frames (1 s), and at most a tenth of the clip
    n_mels: int = 80  # the model's mel bins: masks drawn before the features are computed

    def __call__(self, mel: np.ndarray, frames: int, rng: np.random.Generator) -> np.ndarray:
        """A masked copy of `mel` (N_FRAMES, n_mels) whose first `frames` frames hold audio."""
        return apply_masks(mel, self.draw(mel.shape[1], frames, rng))

    def draw(self, n_mels: int, frames: int, rng: np.random.Generator) -> tuple:
        """The masks of one example: ((axis, start, width), ...), axis 1 for mel bins, 0 for frames."""
        masks = []
        freq_width = max(1, round(self.freq_width * n_mels / 80))
        for _ in range(self.freq_masks):
            width = int(rng.integers(freq_width + 1))
            masks.append((1, int(rng.integers(n_mels - width + 1)), width))
        time_width = min(self.time_width, max(frames, 1) // 10)
        for _ in range(self.time_masks):
            width = int(rng.integers(time_width + 1))
            masks.append((0, int(rng.integers(max(frames - width, 0) + 1)), width))
        return tuple(masks)


def apply_masks(mel: np.ndarray, masks: tuple) -> np.ndarray:
    """A copy of `mel` (frames, n_mels) with `masks` (SpecAugment.draw) set to zero, the features'
    value past the audio (zero-padded log-mel)."""
    out = np.array(mel, copy=True)
    for axis, start, width in masks:
        if axis == 1:
            out[:, start : start + width] = 0.0
        else:
            out[start : start + width] = 0.0
    return out


def no_speech_kind(rng: np.random.Generator) -> tuple:
    """The first draws of `no_speech_audio`: (kind, number of samples), without making the audio."""
    return NO_SPEECH_KINDS[int(rng.integers(len(NO_SPEECH_KINDS)))], int(rng.uniform(1.0, 30.0) * SAMPLE_RATE)


def no_speech_audio(rng: np.random.Generator) -> tuple:
    """(kind, 16 kHz samples) of a window without speech: 1-30 s of silence, white or brown noise, or mains hum."""
    kind, n = no_speech_kind(rng)
    level = 10 ** (rng.uniform(-60.0, -20.0) / 20)  # RMS from -60 to -20 dBFS
    if kind == "silence":
        return kind, np.zeros(n, dtype=np.float32)
    if kind == "white noise":
        audio = rng.standard_normal(n)
    elif kind == "brown noise":
        audio = np.cumsum(rng.standard_normal(n))
        audio -= np.convolve(audio, np.ones(801) / 801, mode="same")  # keep it centred: no slow drift
    else:
        t = np.arange(n) / SAMPLE_RATE
        mains = rng.choice([50.0, 60.0])
        audio = sum(np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 2 * np.pi)) / k for k in (1, 2, 3))
        audio = audio + 0.1 * rng.standard_normal(n)
    audio = audio / max(float(np.sqrt(np.mean(audio**2))), 1e-12) * level
    return kind, np.clip(audio, -1.0, 1.0).astype(np.float32)
