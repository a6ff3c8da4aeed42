"""Word timestamps: DTW, median filter, punctuation merging, alignment on a tiny random model."""

import mlx.core as mx
import numpy as np
import pytest

from models.audio import N_FRAMES
from models.inference.timing import (
    WordTiming,
    add_word_timestamps,
    dtw,
    find_alignment,
    make_monotonic,
    median_filter,
    merge_punctuations,
)
from models.tokenizer import get_tokenizer


def naive_dtw(x):
    """OpenAI's reference double loop, written out plainly."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = -np.ones((n + 1, m + 1))
    cost[0, 0] = 0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = x[i - 1, j - 1] + c
            trace[i, j] = t
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i, j]
        i, j = (i - 1, j - 1) if t == 0 else (i - 1, j) if t == 1 else (i, j - 1)
    path = np.array(path[::-1])
    return path[:, 0], path[:, 1]


def test_dtw_follows_the_cheap_cells_of_a_known_matrix():
    # Zero cost on a staircase: token 0 on frames 0-1, token 1 on frames 2-4, token 2 on frame 5.
    cost = np.ones((3, 6))
    cost[0, :2] = cost[1, 2:5] = cost[2, 5:] = 0
    rows, cols = dtw(cost)
    assert rows.tolist() == [0, 0, 1, 1, 1, 2]
    assert cols.tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (5, 9), (12, 40)])
def test_dtw_matches_the_reference_loop(shape):
    rng = np.random.default_rng(sum(shape))
    for x in (rng.normal(size=shape), rng.integers(0, 3, size=shape).astype(float)):  # integers: many ties
        for got, want in zip(dtw(x), naive_dtw(x)):
            np.testing.assert_array_equal(got, want)


def test_dtw_path_is_monotonic_and_complete():
    rows, cols = dtw(np.random.default_rng(0).normal(size=(8, 30)))
    assert rows[0] == cols[0] == 0 and rows[-1] == 7 and cols[-1] == 29
    assert np.all(np.diff(rows) >= 0) and np.all(np.diff(cols) >= 0)
    assert np.all(np.diff(rows) + np.diff(cols) >= 1)


def test_median_filter_matches_a_plain_median():
    x = np.random.default_rng(1).normal(size=(2, 3, 20))
    padded = np.pad(x, [(0, 0), (0, 0), (3, 3)], mode="reflect")
    want = np.stack([np.median(padded[..., i : i + 7], axis=-1) for i in range(20)], axis=-1)
    np.testing.assert_allclose(median_filter(x, 7), want)
    short = np.ones((1, 2))
    assert median_filter(short, 7) is short


def test_merge_punctuations_glues_quotes_and_stops_to_words():
    words = [WordTiming(w, [i], i, i + 1, 1.0) for i, w in enumerate([' "', "Hello", ",", " world", ".", '"'])]
    merge_punctuations(words, "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、")
    assert [w.word for w in words if w.word] == [' "Hello,', ' world."']
    assert [w.tokens for w in words if w.word] == [[0, 1, 2], [3, 4, 5]]


def test_make_monotonic_clamps_into_bounds():
    words = [dict(start=0.5, end=1.2), dict(start=1.0, end=0.9), dict(start=3.0, end=9.0)]
    make_monotonic(words, lower=0.7, upper=4.0)
    assert [(w["start"], w["end"]) for w in words] == [(0.7, 1.2), (1.2, 1.2), (3.0, 4.0)]


# tiny_model: the fixture in conftest.py


def test_find_alignment_covers_every_word_in_order(tiny_model):
    tokenizer = get_tokenizer(True, language="en", task="transcribe")
    text_tokens = tokenizer.encode(" Hello there, general Kenobi.")
    mel = mx.array(np.random.default_rng(0).normal(size=(N_FRAMES, 80)).astype(np.float32))
    words = find_alignment(tiny_model, tokenizer, text_tokens, mel, num_frames=800)
    assert "".join(w.word for w in words) == " Hello there, general Kenobi."
    assert sum(len(w.tokens) for w in words) == len(text_tokens)
    starts, ends = [w.start for w in words], [w.end for w in words]
    assert starts == sorted(starts) and all(s <= e for s, e in zip(starts, ends))
    assert 0 <= starts[0] and ends[-1] <= 8.0  # only the 8 s of speech frames are searched
    assert all(0 <= w.probability <= 1 for w in words)
    assert find_alignment(tiny_model, tokenizer, [], mel, 800) == []


def test_add_word_timestamps_keeps_words_ordered_and_inside_the_audio(tiny_model):
    tokenizer = get_tokenizer(True, language="en", task="transcribe")
    begin = tokenizer.timestamp_begin
    first = [begin] + tokenizer.encode(" One two three.") + [begin + 100]
    second = [begin + 100] + tokenizer.encode(" Four five.") + [begin + 250]
    seek = 1000  # the window starts at 10 s
    segments = [
        dict(seek=seek, start=10.0, end=12.0, tokens=first),
        dict(seek=seek, start=12.0, end=15.0, tokens=second),
    ]
    mel = mx.array(np.random.default_rng(2).normal(size=(N_FRAMES, 80)).astype(np.float32))
    add_word_timestamps(segments, tiny_model, tokenizer, mel, num_frames=600, end_time=15.5)
    words = [w for s in segments for w in s["words"]]
    assert "".join(w["word"] for w in words) == " One two three. Four five."
    times = [t for w in words for t in (w["start"], w["end"])]
    assert times == sorted(times)
    assert 10.0 <= times[0] and times[-1] <= 15.5
    for s in segments:
        assert 10.0 <= s["start"] <= s["end"] <= 15.5
