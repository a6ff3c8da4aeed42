"""The logit rules of decoding: suppressed tokens, no blank start, and OpenAI's timestamp rules.

They look only at the tokens sampled so far in each row (never at the prompt), so rows whose
prompts differ in length are filtered exactly as they would be alone.
"""

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
        self.timestamps = not options.without_timestamps
        self.max_initial = None
        if self.timestamps and options.max_initial_timestamp is not None:
            self.max_initial = round(options.max_initial_timestamp / TIME_PRECISION)

    def apply(self, logits: np.ndarray, sampled: np.ndarray) -> None:
        """logits: (n, n_vocab) float32; sampled: (n, steps) tokens sampled so far, prompt excluded."""
        if self.suppress_blank and sampled.shape[1] == 0:
            logits[:, self.tokenizer.encode(" ") + [self.tokenizer.eot]] = -np.inf
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
