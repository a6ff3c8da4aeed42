"""Whisper's log-mel features of a batch of clips, computed in MLX on the default device.

The training data pipeline keeps only the audio of its clips and turns each batch into features
on the device (the GPU when there is one), so the log-mels of the whole dataset are never held in
memory. The numbers are those of `models.audio.clip_features`, up to float32 FFT rounding: the
same reflect padding, periodic Hann window, filter bank, per-clip floor and padding policies.
"""

from functools import lru_cache
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from models.audio import CLIP_PADDING, HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, _hann_window, mel_filters


@lru_cache(maxsize=None)
def _constants(n_mels: int) -> Tuple[mx.array, mx.array]:
    """The Hann window (N_FFT,) and the transposed filter bank (N_FFT // 2 + 1, n_mels)."""
    return mx.array(_hann_window()), mx.array(mel_filters(n_mels).T)


def _check_lengths(lengths: Sequence[int], shape: Tuple[int, ...]) -> List[int]:
    if len(shape) != 2:
        raise ValueError(f"samples must be (batch, n_samples), got shape {tuple(shape)}")
    lengths = [int(n) for n in lengths]
    if len(lengths) != shape[0]:
        raise ValueError(f"got {len(lengths)} lengths for a batch of {shape[0]} rows of samples")
    for row, n in enumerate(lengths):
        if not 0 <= n <= min(shape[1], N_SAMPLES):
            raise ValueError(
                f"row {row}: length {n} is outside [0, {min(shape[1], N_SAMPLES)}]: a clip holds at most "
                f"{N_SAMPLES} samples (30 s) and fits in its row of {shape[1]}; cut longer audio into clips"
            )
    return lengths


def _padded(samples: mx.array, lengths: mx.array, n_samples: int) -> mx.array:
    """(B, n_samples) clips padded as `MelWindows._samples` pads one, each at its own ends.

    Row i's clip (its first `lengths[i]` samples) is reflected by N_FFT // 2 at the start and
    followed by zeros. MelWindows also reflects at the end of the clip plus one hop of zeros, but no frame it uses
    reaches more than 40 samples past that hop, so the reflection lands in the zeros again.
    """
    index = mx.abs(mx.arange(n_samples) - N_FFT // 2)  # (n_samples,): np.pad's reflection at the start
    values = mx.take(samples, mx.minimum(index, samples.shape[1] - 1), axis=1)
    return mx.where(index < lengths[:, None], values, 0.0)


def clip_features_batch(
    samples: Union[mx.array, np.ndarray], lengths: Sequence[int], n_mels: int = 80, padding: Optional[str] = None
) -> mx.array:
    """(B, N_FRAMES, n_mels) float32 features of B clips of at most 30 s, computed on the default device.

    Row i of `samples` (B, L) holds clip i's 16 kHz audio in its first `lengths[i]` samples; the
    rest of the row is not read. Row i of the result equals
    `clip_features(samples[i, :lengths[i]], n_mels, padding)` (`padding` "mel" or "audio",
    default CLIP_PADDING). A clip shorter than one hop (160 samples) has no frames: all zeros
    under "mel", as `clip_features` gives.
    """
    padding = CLIP_PADDING if padding is None else padding
    if padding not in ("mel", "audio"):
        raise ValueError(f"padding must be 'mel' or 'audio', got {padding!r}")
    window, filters = _constants(n_mels)
    samples = mx.array(samples, dtype=mx.float32)
    lengths = _check_lengths(lengths, tuple(samples.shape))
    batch = len(lengths)
    if batch == 0:
        return mx.zeros((0, N_FRAMES, n_mels))
    if samples.shape[1] == 0:  # only empty clips; mx.take needs a sample to point at
        samples = mx.zeros((batch, 1))

    # "audio" pads every clip with silence to 30 s; "mel" takes each clip as it is.
    clip_lengths = [N_SAMPLES] * batch if padding == "audio" else lengths
    content_frames = mx.array([n // HOP_LENGTH for n in clip_lengths])[:, None, None]
    # Frames 0..content_frames of each clip (the hop of zeros adds the last one) set its floor.
    n_frames = max(clip_lengths) // HOP_LENGTH + 1
    n_samples = (n_frames - 1) * HOP_LENGTH + N_FFT

    padded = _padded(samples, mx.array(lengths), n_samples)
    frames = mx.as_strided(padded, (batch, n_frames, N_FFT), (n_samples, HOP_LENGTH, 1)) * window
    power = mx.square(mx.abs(mx.fft.rfft(frames, axis=-1))) @ filters  # (B, n_frames, n_mels)

    frame = mx.arange(n_frames)[None, :, None]
    loudest = mx.max(mx.where(frame <= content_frames, power, 0.0), axis=(1, 2), keepdims=True)
    log_max = mx.log10(mx.maximum(loudest, 1e-10))  # (B, 1, 1)
    log_spec = mx.log10(mx.maximum(power[:, :-1], 1e-10))
    features = (mx.maximum(log_spec, log_max - 8.0) + 4.0) / 4.0
    features = mx.where(frame[:, :-1] < content_frames, features, 0.0)  # zeros past each clip's frames
    return mx.pad(features, [(0, 0), (0, N_FRAMES - (n_frames - 1)), (0, 0)])
