"""The logit rules of decoding: suppressed tokens, no blank start, and OpenAI's timestamp rules.

They look only at the tokens sampled so far in each row (never at the prompt), so rows whose
prompts differ in length are filtered exactly as they would be alone. `apply` works on NumPy
logits in place (beam search ranks candidates on the host anyway); `on_device` applies the same
rules to MLX logits, with each row's state read from its sampled tokens on the host, so greedy
and sampled decoding copy back one token a row instead of the whole vocabulary.
"""

import mlx.core as mx
import numpy as np

from ..audio import TIME_PRECISION
from ..tokenizer import Tokenizer


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):  # all -inf (every token suppressed) gives -inf, as it should
        return (np.log(np.sum(np.exp(x - peak), axis=axis, keepdims=True)) + peak).squeeze(axis)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits - _logsumexp(logits)[..., None]


class LogitRules:
    """Suppression and timestamp rules applied to each step's float32 logits (numpy, in place)."""

    def __init__(self, tokenizer: Tokenizer, options):
        """`options`: the DecodingOptions (suppress_tokens, suppress_blank, without_timestamps, ...)."""
        self.tokenizer = tokenizer
        self.suppress_blank = options.suppress_blank
        self.suppress = np.array(tokenizer.suppressed_tokens(options.suppress_tokens), dtype=np.int64)
        self.blank = np.array(tokenizer.encode(" ") + [tokenizer.eot], dtype=np.int64)
        self._masks = {}  # n_vocab -> (suppressed, suppressed or blank), additive float32 masks
        self.timestamps = not options.without_timestamps
        self.max_initial = None
        if self.timestamps and options.max_initial_timestamp is not None:
            self.max_initial = round(options.max_initial_timestamp / TIME_PRECISION)

    def apply(self, logits: np.ndarray, sampled: np.ndarray) -> None:
        """logits: (n, n_vocab) float32; sampled: (n, steps) tokens sampled so far, prompt excluded."""
        if self.suppress_blank and sampled.shape[1] == 0:
            logits[:, self.blank] = -np.inf
        logits[:, self.suppress] = -np.inf
        if self.timestamps:
            for row in range(logits.shape[0]):
                self._timestamp_rules(logits[row], sampled[row])

    def _timestamp_rules(self, logits: np.ndarray, sampled: np.ndarray) -> None:
        begin, eot = self.tokenizer.timestamp_begin, self.tokenizer.eot
        logits[self.tokenizer.no_timestamps] = -np.inf
        last_ts = len(sampled) >= 1 and sampled[-1] >= begin
        penultimate_ts = len(sampled) < 2 or sampled[-2] >= begin
        if last_ts:  # timestamps come in pairs, except directly before end of text
            if penultimate_ts:
                logits[begin:] = -np.inf
            else:
                logits[:eot] = -np.inf
        stamps = sampled[sampled >= begin]
        if len(stamps) > 0:  # timestamps never go back; a closing one may repeat the opening one
            floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
            logits[begin:floor] = -np.inf
        if len(sampled) == 0:
            logits[:begin] = -np.inf  # the text starts with a timestamp
            if self.max_initial is not None:
                logits[begin + self.max_initial + 1 :] = -np.inf
        logprobs = log_softmax(logits)
        if _logsumexp(logprobs[begin:]) > logprobs[:begin].max():
            logits[:begin] = -np.inf  # a timestamp is likelier than any text token

    def on_device(self, logits: mx.array, sampled: np.ndarray) -> mx.array:
        """`apply` for MLX logits (n, n_vocab) float32: returns the filtered logits."""
        logits = logits + self._additive_mask(logits.shape[-1], first=sampled.shape[1] == 0)
        if not self.timestamps:
            return logits
        vocab = mx.arange(logits.shape[-1])[None]  # (1, n_vocab)
        blocked = mx.array(self._timestamp_bounds(sampled))  # (n, 5), see _timestamp_bounds
        is_text, is_time = vocab < self.tokenizer.timestamp_begin, vocab >= self.tokenizer.timestamp_begin
        drop = (
            ((vocab < self.tokenizer.eot) & (blocked[:, 0:1] > 0))
            | (is_time & (blocked[:, 1:2] > 0))
            | (is_time & (vocab < blocked[:, 2:3]))
            | (is_text & (blocked[:, 3:4] > 0))
            | (vocab >= blocked[:, 4:5])
            | (vocab == self.tokenizer.no_timestamps)
        )
        logits = mx.where(drop, -mx.inf, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        begin = self.tokenizer.timestamp_begin
        time_likelier = mx.logsumexp(logprobs[:, begin:], axis=-1) > mx.max(logprobs[:, :begin], axis=-1)
        return mx.where(time_likelier[:, None] & is_text, -mx.inf, logits)

    def _additive_mask(self, n_vocab: int, first: bool) -> mx.array:
        if n_vocab not in self._masks:
            later = np.zeros(n_vocab, dtype=np.float32)
            later[self.suppress] = -np.inf
            first_step = later.copy()
            first_step[self.blank] = -np.inf
            self._masks[n_vocab] = (mx.array(later), mx.array(first_step))
        return self._masks[n_vocab][1 if first and self.suppress_blank else 0]

    def _timestamp_bounds(self, sampled: np.ndarray) -> np.ndarray:
        """Per row, what `_timestamp_rules` blocks, as int32 columns: text below end of text (0/1),
        every timestamp (0/1), timestamps below this id, all text (0/1), every token from this id."""
        begin, n = self.tokenizer.timestamp_begin, sampled.shape[0]
        bounds = np.zeros((n, 5), dtype=np.int32)
        bounds[:, 4] = np.iinfo(np.int32).max
        if sampled.shape[1] == 0:
            bounds[:, 3] = 1  # the text starts with a timestamp
            if self.max_initial is not None:
                bounds[:, 4] = begin + self.max_initial + 1
            return bounds
        is_time = sampled >= begin
        last_ts = is_time[:, -1]
        penultimate_ts = is_time[:, -2] if sampled.shape[1] >= 2 else np.ones(n, dtype=bool)
        bounds[:, 1] = last_ts & penultimate_ts  # a pair is complete: text or end of text next
        bounds[:, 0] = last_ts & ~penultimate_ts  # an opening timestamp: its closing one next
        last_at = sampled.shape[1] - 1 - is_time[:, ::-1].argmax(axis=1)  # the latest timestamp of each row
        last_stamp = sampled[np.arange(n), last_at]
        floor = np.where(last_ts & ~penultimate_ts, last_stamp, last_stamp + 1)
        bounds[:, 2] = np.where(is_time.any(axis=1), floor, 0)  # timestamps never go back
        return bounds
