"""The logit rules on the device (MLX) block exactly what the NumPy rules block, row by row."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_whisper
from models.inference.decoding import DecodingOptions, DecodingTask
from models.inference.rules import LogitRules
from models.tokenizer import get_tokenizer

TOKENIZER = get_tokenizer(True, language="en", task="transcribe")
BEGIN, EOT = TOKENIZER.timestamp_begin, TOKENIZER.eot
N_VOCAB = 51865  # multilingual whisper-base
WORDS = TOKENIZER.encode(" the cat sat")


def _histories():
    """Sampled tokens of several rows at one step: every branch of the timestamp rules."""
    t = lambda seconds: BEGIN + round(seconds / 0.02)  # noqa: E731
    return {
        1: [[WORDS[0]], [t(0.0)], [t(1.0)], [WORDS[1]]],  # text; a lone opening timestamp (pair open)
        2: [[t(0.0), WORDS[0]], [WORDS[0], t(2.0)], [t(0.5), t(0.5)], [WORDS[0], WORDS[1]]],
        4: [[t(0.0), WORDS[0], t(1.0), t(1.0)], [t(0.0), WORDS[0], WORDS[1], t(3.0)], [t(0.0)] + WORDS[:3],
            [WORDS[0], t(0.2), t(0.4), WORDS[2]]],
    }  # fmt: skip


def _logits(rows: int, seed: int, timestamps_likelier: bool) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0, 3, (rows, N_VOCAB)).astype(np.float32)
    if timestamps_likelier:  # so that the "a timestamp is likelier than any text" rule fires on some rows
        logits[::2, BEGIN:] += 6.0
    return logits


def _compare(rules: LogitRules, logits: np.ndarray, sampled: np.ndarray) -> None:
    expected = logits.copy()
    rules.apply(expected, sampled)
    got = np.array(rules.on_device(mx.array(logits), sampled))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
    kept = np.isfinite(expected)
    np.testing.assert_array_equal(got[kept], expected[kept])
    np.testing.assert_array_equal(got.argmax(axis=-1), expected.argmax(axis=-1))


@pytest.mark.parametrize("timestamps_likelier", [False, True])
@pytest.mark.parametrize("max_initial", [None, 1.0])
def test_timestamp_rules_on_the_device_equal_the_numpy_ones(timestamps_likelier, max_initial):
    options = DecodingOptions(without_timestamps=False, max_initial_timestamp=max_initial)
    rules = LogitRules(TOKENIZER, options)
    first = _logits(3, 0, timestamps_likelier)
    _compare(rules, first, np.zeros((3, 0), dtype=np.int64))
    for length, rows in _histories().items():
        sampled = np.array(rows, dtype=np.int64)
        assert sampled.shape[1] == length
        _compare(rules, _logits(len(rows), length, timestamps_likelier), sampled)
    blocked = np.isneginf(np.array(rules.on_device(mx.array(first), np.zeros((3, 0), dtype=np.int64))))
    assert blocked[:, :BEGIN].all()  # the text starts with a timestamp
    if max_initial is not None:
        assert blocked[:, BEGIN + 51 :].all() and not blocked[:, BEGIN + 50].any()


def test_rules_without_timestamps_suppress_blank_only_at_the_first_step():
    rules = LogitRules(TOKENIZER, DecodingOptions(without_timestamps=True))
    logits = _logits(2, 5, False)
    for sampled in (np.zeros((2, 0), dtype=np.int64), np.array([[WORDS[0]], [WORDS[1]]])):
        _compare(rules, logits, sampled)
    first = np.array(rules.on_device(mx.array(logits), np.zeros((2, 0), dtype=np.int64)))
    later = np.array(rules.on_device(mx.array(logits), np.array([[WORDS[0]], [WORDS[1]]])))
    assert np.isneginf(first[:, EOT]).all() and np.isfinite(later[:, EOT]).all()
    assert np.isfinite(later[:, BEGIN:]).all()  # timestamps are not this rule set's business


@pytest.mark.parametrize("without_timestamps", [False, True], ids=["timestamps", "no-timestamps"])
def test_decoding_gives_the_same_tokens_with_the_rules_on_the_device_or_the_host(without_timestamps):
    model = tiny_whisper(seed=1)
    model.decoder.positional_embedding = mx.random.normal((448, 64), key=mx.random.key(3))
    features = mx.array(np.random.default_rng(1).standard_normal((3, 1500, 64)).astype(np.float32))
    options = DecodingOptions(language="en", sample_len=24, without_timestamps=without_timestamps)
    results = {}
    for on_device in (False, True):
        task = DecodingTask(model, options)
        task.rules_on_device = on_device
        results[on_device] = task.run(features)
    host, device = results[False], results[True]
    assert [r.tokens for r in device] == [r.tokens for r in host]
    assert any(len(r.tokens) > 2 for r in host)
    np.testing.assert_allclose([r.avg_logprob for r in device], [r.avg_logprob for r in host], rtol=1e-5)
    if not without_timestamps:  # the timestamp rules had something to do
        assert any(t >= BEGIN for r in host for t in r.tokens)
