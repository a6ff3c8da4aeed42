"""Audio loading and Whisper's log-mel spectrogram (OpenAI's numerics, in numpy)."""

import io
import os
import shutil
import stat
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Optional, Tuple, Union

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
TIME_PRECISION = N_SAMPLES_PER_TOKEN / SAMPLE_RATE  # 0.02 s: the step of Whisper's timestamp tokens
FLAC_HEAD = 26  # "fLaC", the STREAMINFO block header and its fields up to the number of samples

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
        if path.exists() and not path.is_file() and not path.is_dir():
            raise AudioError(f"{name}: a pipe or device, not an audio file; save the audio to a file first")
        if not path.is_file():
            raise AudioError(f"{name}: no such audio file")
        if path.stat().st_size == 0:
            raise AudioError(f"{name}: the file is empty")
    missing = _wav_bytes_missing(*_file_head(file))
    if missing:
        raise AudioError(
            f"{name}: truncated WAV file: its header announces {missing} more bytes of audio than "
            f"the file holds; re-export it or leave it out"
        )
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


def audio_length(file: Union[str, Path, bytes], sr: int = SAMPLE_RATE) -> Optional[int]:
    """The number of `sr` Hz samples `load_audio` would return, from the file's header only.

    Raises AudioError for what the header already shows (no file, empty, truncated WAV, not
    audio); None when only decoding can tell (a format that needs ffmpeg). Damage inside the
    data is found when the file is decoded.
    """
    name = "<bytes>" if isinstance(file, (bytes, bytearray)) else str(file)
    head, size = _file_head(file)
    if size == 0 and not isinstance(file, (bytes, bytearray)):
        raise AudioError(f"{name}: the file is empty")
    missing = _wav_bytes_missing(head, size)
    if missing:
        raise AudioError(f"{name}: truncated WAV file: its header announces {missing} more bytes than it holds")
    frames, file_sr = _flac_stream_info(head)
    if file_sr > 0:  # a FLAC, read without opening a decoder; 0 samples: the encoder left the length out
        return None if frames == 0 else frames if file_sr == sr else int(round(frames * sr / file_sr))
    try:
        sound = _open_soundfile(file)
    except Exception as error:
        if shutil.which("ffmpeg") is None:
            raise AudioError(f"{name}: could not decode audio ({error}); install ffmpeg to read more formats") from None
        return None
    with sound:
        frames, file_sr = sound.frames, sound.samplerate
    if frames >= 2**62:  # libsndfile's "unknown length"
        return None
    if frames <= 0:
        raise AudioError(f"{name}: the file holds no audio samples")
    return frames if file_sr == sr else int(round(frames * sr / file_sr))


def _file_head(file) -> Tuple[bytes, int]:
    """The first bytes of an audio file (its chunk list for a WAV, its stream info for a FLAC) and its size."""
    if isinstance(file, (bytes, bytearray)):
        return bytes(file[:65536]), len(file)
    try:  # one open and one fstat, unbuffered: a scan of many files spends its time here
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO is reported, not waited on
    except FileNotFoundError:
        raise AudioError(f"{file}: no such audio file") from None
    except OSError as e:
        raise AudioError(f"{file}: cannot be opened ({e.strerror or e})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AudioError(f"{file}: not a regular file")
        head = os.read(fd, 12)  # read a WAV's chunk list, or a FLAC's stream info, only when the file is one
        if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
            head += os.read(fd, 65536 - 12)
        elif head[:4] == b"fLaC":
            head += os.read(fd, FLAC_HEAD - 12)
        return head, info.st_size
    finally:
        os.close(fd)


def _flac_stream_info(head: bytes) -> Tuple[int, int]:
    """(samples per channel, sample rate) from a FLAC file's STREAMINFO block: (0, rate) when it leaves
    the length unknown, (0, 0) when `head` is not a FLAC that starts with one (tags in front, say)."""
    if len(head) < FLAC_HEAD or head[:4] != b"fLaC" or head[4] & 0x7F != 0:
        return 0, 0
    packed = int.from_bytes(head[18:26], "big")  # rate: 20 bits, channels: 3, bits per sample: 5, samples: 36
    return packed & ((1 << 36) - 1), packed >> 44


def _wav_bytes_missing(head: bytes, size: int) -> int:
    """How many bytes of a RIFF/WAVE file's data chunk are missing from the file (0: complete, or not a WAV),
    from its first bytes and its size (`_file_head`).

    libsndfile quietly shortens a WAV whose data chunk ends early, so a cut-off file would be
    read (and trained on) as if it were whole.
    """
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return 0
    offset = 12
    while offset + 8 <= len(head):
        chunk, length = head[offset : offset + 4], int.from_bytes(head[offset + 4 : offset + 8], "little")
        if chunk == b"data":
            if length in (0, 0xFFFFFFFF):  # written by a stream that could not go back to fill it in
                return 0
            return max(offset + 8 + length - size, 0)
        offset += 8 + length + (length & 1)
    return 0


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


# --- Features: one 30 s window at a time --------------------------------------------------

LAZY_AFTER_SECONDS = 600.0  # longer 16 kHz files are read block by block instead of at once
SILENCE_PEAK = 1e-4  # -80 dBFS, about 3 steps of 16-bit audio: a window below it holds no speech


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

    def is_silent(self, seek: int) -> bool:
        """Whether the audio of the window at `seek` never rises above SILENCE_PEAK (-80 dBFS).

        Whisper writes words into digital silence ("you", "Thank you."); no speech is that quiet.
        """
        samples = self.source.read(seek * HOP_LENGTH, min((seek + N_FRAMES) * HOP_LENGTH, self.n_samples))
        return samples.size == 0 or float(np.abs(samples).max()) < SILENCE_PEAK

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


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """Whisper's log-mel features of all of 16 kHz mono `audio`: (n_samples // HOP_LENGTH, n_mels).

    `padding` zero samples are appended first. The same numbers as `MelWindows`, all at once.
    """
    audio = np.asarray(audio, dtype=np.float32)
    windows = MelWindows(ArraySource(np.pad(audio, (0, padding)) if padding > 0 else audio), n_mels)
    return np.concatenate(
        [
            windows.window(seek)[: windows.content_frames - seek]
            for seek in range(0, max(windows.content_frames, 1), N_FRAMES)
        ]
    )


# How a clip shorter than 30 s is padded to one window, in training, evaluation and transcription
# alike: "mel" zero-pads the log-mel (what transcription of any recording does past its end), "audio"
# pads the samples with silence before the log-mel. benchmarks/padding_policy.py measures both.
CLIP_PADDING = "mel"


def clip_features(audio: np.ndarray, n_mels: int = 80, padding: Optional[str] = None) -> np.ndarray:
    """The (N_FRAMES, n_mels) features of a clip of at most 30 s: the first window `transcribe` sees.

    `padding` ("mel" or "audio", default CLIP_PADDING) says how the clip is padded to 30 s.
    """
    padding = CLIP_PADDING if padding is None else padding
    if padding not in ("mel", "audio"):
        raise ValueError(f"padding must be 'mel' or 'audio', got {padding!r}")
    if padding == "audio":
        audio = pad_or_trim(np.asarray(audio, dtype=np.float32), N_SAMPLES)
    return MelWindows(ArraySource(audio), n_mels).window(0)
