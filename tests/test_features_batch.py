"""clip_features_batch (MLX, a batch at once) against clip_features (numpy, one clip at a time)."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import SHARED
from models.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, clip_features, load_audio
from models.features import clip_features_batch

# Both sides compute the FFT in float32; they differ by ~4e-5 in the (x + 4) / 4 domain, on the
# quietest bins above the floor (1e-8 of the clip's loudest frame), where rounding of the FFT
# (~1e-7 of the frame's largest amplitude) is largest relative to the bin. 5e-4 there is 0.5% of
# the power (0.02 dB); a wrong window, frame or floor moves features by 1e-2 or more.
TOLERANCE = 5e-4

SPEECH_FILES = sorted((SHARED / "data" / "te" / "train").glob("*.flac"))


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """A minute of real Telugu speech: Common Voice clips one after another."""
    if len(SPEECH_FILES) < 12:
        pytest.skip(f"needs the Common Voice clips in {SHARED / 'data' / 'te' / 'train'}")
    return np.concatenate([load_audio(path) for path in SPEECH_FILES[:12]])


def tail_burst(n: int, seed: int) -> np.ndarray:
    """Silence ending in 50 loud samples: the clip's loudest frame is its last, the hop of zeros's."""
    clip = np.zeros(n, dtype=np.float32)
    clip[-50:] = np.random.default_rng(seed).standard_normal(50)
    return clip


def batch_of(clips, width=None) -> np.ndarray:
    """(len(clips), width) zero-padded rows: clip i in the first len(clips[i]) samples of row i."""
    rows = np.zeros((len(clips), max(len(c) for c in clips) if width is None else width), dtype=np.float32)
    for row, clip in zip(rows, clips):
        row[: len(clip)] = clip
    return rows


def assert_rows_match(clips, features, n_mels, padding):
    assert features.shape == (len(clips), N_FRAMES, n_mels) and features.dtype == mx.float32
    features = np.array(features)
    for row, clip in enumerate(clips):
        expected = clip_features(clip, n_mels, padding)
        error = np.abs(features[row] - expected).max()
        assert error < TOLERANCE, f"row {row} ({len(clip)} samples): max abs difference {error:.2e}"
        if padding == "mel":  # past the clip's frames, exact zeros as in transcription
            assert not features[row, len(clip) // HOP_LENGTH :].any(), f"row {row}: non-zero frames past the clip"


@pytest.mark.parametrize("padding", ["mel", "audio"])
@pytest.mark.parametrize("n_mels", [80, 128])
def test_mixed_batch_matches_clip_features(speech, n_mels, padding):
    rng = np.random.default_rng(0)
    clips = [
        speech[:N_SAMPLES],  # 30 s: the batch is as wide as a window
        speech[N_SAMPLES : N_SAMPLES + SAMPLE_RATE],  # 1 s
        speech[123_457 : 123_457 + 83_333],  # 5.2 s, not a whole number of hops
        0.1 * rng.standard_normal(300, dtype=np.float32),  # two frames
        np.zeros(2 * SAMPLE_RATE, dtype=np.float32),  # silence: every frame at the floor
        1e-3 * rng.standard_normal(7 * SAMPLE_RATE + 17, dtype=np.float32),  # quiet noise
        tail_burst(300, seed=1),
        tail_burst(SAMPLE_RATE + 30, seed=2),
    ]
    assert_rows_match(
        clips, clip_features_batch(mx.array(batch_of(clips)), [len(c) for c in clips], n_mels, padding), n_mels, padding
    )


@pytest.mark.parametrize("padding", ["mel", "audio"])
def test_batch_narrower_than_30s(speech, padding):
    # Rows are padded (to 30 s for "audio") at each clip's own end, not at the buffer's.
    clips = [speech[:80_000], speech[200_000:250_001], speech[300_000:300_480], tail_burst(1_000, seed=3)]
    features = clip_features_batch(batch_of(clips), [len(c) for c in clips], padding=padding)
    assert_rows_match(clips, features, 80, padding)


@pytest.mark.parametrize("padding", ["mel", "audio"])
def test_edge_lengths(padding):
    # Up to 40 samples the reflection runs past the hop of zeros; below one hop there are no frames.
    lengths = [0, 1, 17, 40, 41, 159, 160, 161, 199, 200, 201, 399, 400, 401, N_SAMPLES - 1, N_SAMPLES]
    rng = np.random.default_rng(4)
    clips = [0.5 * rng.standard_normal(n, dtype=np.float32) for n in lengths]
    features = clip_features_batch(batch_of(clips), lengths, padding=padding)
    assert_rows_match(clips, features, 80, padding)


def test_numpy_input_and_row_tails_are_not_read():
    rng = np.random.default_rng(5)
    clips = [0.3 * rng.standard_normal(n, dtype=np.float32) for n in (16_000, 4_321, 250)]
    lengths = [len(c) for c in clips]
    rows = batch_of(clips, width=20_000)
    features = clip_features_batch(rows.astype(np.float64), lengths)
    assert features.shape == (3, N_FRAMES, 80) and features.dtype == mx.float32
    assert_rows_match(clips, features, 80, "mel")

    noisy = rows + (np.arange(rows.shape[1]) >= np.array(lengths)[:, None]) * rng.standard_normal(rows.shape)
    assert np.array_equal(np.array(clip_features_batch(noisy, lengths)), np.array(features))


def test_rejects_bad_input():
    rows = np.zeros((2, 1_000), dtype=np.float32)
    with pytest.raises(ValueError, match="row 1: length 1001"):
        clip_features_batch(rows, [10, 1_001])
    with pytest.raises(ValueError, match="2 lengths for a batch of 3"):
        clip_features_batch(np.zeros((3, 10)), [1, 2])
    with pytest.raises(ValueError, match="shape"):
        clip_features_batch(np.zeros(10), [10])
    with pytest.raises(ValueError, match="30 s"):
        clip_features_batch(np.zeros((1, N_SAMPLES + 1)), [N_SAMPLES + 1])
    with pytest.raises(ValueError, match="padding"):
        clip_features_batch(rows, [1, 2], padding="zeros")
    with pytest.raises(ValueError, match="n_mels"):
        clip_features_batch(rows, [1, 2], n_mels=40)
