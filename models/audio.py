"""Audio loading and Whisper's log-mel spectrogram (OpenAI's numerics, in numpy)."""

import io
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a 30 s window
N_SAMPLES_PER_TOKEN = HOP_LENGTH * 2  # the encoder's conv2 halves the frame rate
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
TOKENS_PER_SECOND = SAMPLE_RATE // N_SAMPLES_PER_TOKEN  # 50 audio positions per second

_ASSETS = Path(__file__).parent / "assets"


class AudioError(ValueError):
    """An audio file could not be read; the message names the file and says why."""


def load_audio(file: Union[str, Path, bytes], sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file (path or encoded bytes) as mono float32 at `sr` Hz.

    wav/flac/ogg/opus/mp3 are read with soundfile; anything else goes through the ffmpeg
    command-line tool when it is installed.
    """
    name = "<bytes>" if isinstance(file, (bytes, bytearray)) else str(file)
    if not isinstance(file, (bytes, bytearray)):
        path = Path(file)
        if not path.is_file():
            raise AudioError(f"{name}: no such audio file")
        if path.stat().st_size == 0:
            raise AudioError(f"{name}: the file is empty")
    try:
        sound = _open_soundfile(file)
    except Exception as soundfile_error:  # a format soundfile does not know; ffmpeg may still cope
        if shutil.which("ffmpeg") is None:
            raise AudioError(
                f"{name}: could not decode audio ({soundfile_error}); install ffmpeg to read more formats"
            ) from None
        return _read_ffmpeg(file, sr, name)
    try:
        with sound:
            audio, file_sr = sound.read(dtype="float32", always_2d=True).mean(axis=1), sound.samplerate
    except Exception as error:  # the header was readable, the data is not: ffmpeg would hide the damage
        raise AudioError(
            f"{name}: truncated or corrupt {sound.format} file ({error}); re-export it or leave it out"
        ) from None
    if audio.size == 0:
        raise AudioError(f"{name}: the file holds no audio samples")
    if not np.isfinite(audio).all():  # float files can hold NaN/inf, which would make the training loss NaN
        raise AudioError(f"{name}: the file holds NaN or infinite samples; re-export it or leave it out")
    return resample(audio, file_sr, sr)


def _open_soundfile(file):
    import soundfile

    return soundfile.SoundFile(io.BytesIO(file) if isinstance(file, (bytes, bytearray)) else str(file))


def _read_ffmpeg(file, sr: int, name: str) -> np.ndarray:
    from_bytes = isinstance(file, (bytes, bytearray))
    cmd = ["ffmpeg", "-nostdin", "-threads", "0", "-i", "pipe:0" if from_bytes else str(file)]
    cmd += ["-f", "s16le", "-ac", "1", "-acodec", "pcm_s16le", "-ar", str(sr), "-"]
    result = subprocess.run(cmd, input=bytes(file) if from_bytes else None, capture_output=True)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise AudioError(f"{name}: ffmpeg could not decode it ({message[-1] if message else 'no output'})")
    audio = np.frombuffer(result.stdout, np.int16).astype(np.float32) / 32768.0
    if audio.size == 0:
        raise AudioError(f"{name}: the file holds no audio samples")
    return audio


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """High-quality resampling (libsoxr); a no-op when the rates match."""
    if orig_sr == target_sr:
        return np.ascontiguousarray(audio, dtype=np.float32)
    import soxr

    return soxr.resample(audio.astype(np.float32), orig_sr, target_sr, quality="HQ").astype(np.float32)


def pad_or_trim(array: np.ndarray, length: int = N_FRAMES, axis: int = 0) -> np.ndarray:
    """Zero-pad or cut `array` along `axis` to exactly `length` entries."""
    if array.shape[axis] > length:
        array = np.take(array, np.arange(length), axis=axis)
    if array.shape[axis] < length:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - array.shape[axis])
        array = np.pad(array, widths)
    return array


@lru_cache(maxsize=None)
def mel_filters(n_mels: int) -> np.ndarray:
    """The Slaney-style mel filter bank Whisper was trained with, (n_mels, N_FFT // 2 + 1)."""
    if n_mels not in (80, 128):
        raise ValueError(f"n_mels must be 80 or 128, got {n_mels}")
    with np.load(_ASSETS / "mel_filters.npz", allow_pickle=False) as f:
        return f[f"mel_{n_mels}"].astype(np.float32)


@lru_cache(maxsize=None)
def _hann_window() -> np.ndarray:
    # Periodic Hann window, as torch.hann_window(N_FFT) builds it.
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def _mel_power(audio: np.ndarray, n_mels: int, block_frames: int = 6000) -> np.ndarray:
    """Mel power spectrum (frames, n_mels) of a centred STFT, computed a block of frames at a time."""
    padded = np.pad(audio, (N_FFT // 2, N_FFT // 2), mode="reflect")
    n_frames = 1 + (len(padded) - N_FFT) // HOP_LENGTH - 1  # OpenAI drops the last frame
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
    window, filters = _hann_window(), mel_filters(n_mels)
    out = np.empty((n_frames, n_mels), dtype=np.float32)
    for start in range(0, n_frames, block_frames):
        block = frames[start : min(start + block_frames, n_frames)] * window
        power = np.abs(np.fft.rfft(block, axis=-1)).astype(np.float32) ** 2
        out[start : start + len(block)] = power @ filters.T
    return out


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """Whisper's log-mel features of 16 kHz mono audio: (n_frames, n_mels) float32.

    `padding` zero samples are appended first (long-form transcription pads by 30 s).
    """
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio (1-D), got shape {audio.shape}")
    if padding > 0:
        audio = np.pad(audio, (0, padding))
    if len(audio) <= N_FFT // 2:  # reflect padding needs more samples than half a window
        audio = np.pad(audio, (0, N_FFT // 2 + 1 - len(audio)))
    log_spec = np.log10(np.maximum(_mel_power(audio, n_mels), 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0
