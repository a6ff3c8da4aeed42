"""Decoding one 30 s window: language detection, greedy/sampling and beam search, logit rules."""

import zlib
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from ..audio import TIME_PRECISION
from ..tokenizer import Tokenizer, tokenizer_for
from ..whisper import Whisper


@dataclass(frozen=True)
class DecodingOptions:
    task: str = "transcribe"
    language: Optional[str] = None  # None: detect it
    temperature: float = 0.0
    sample_len: Optional[int] = None  # most tokens to sample; default n_text_ctx // 2
    best_of: Optional[int] = None  # independent samples when temperature > 0
    beam_size: Optional[int] = None  # beam search when temperature == 0
    patience: Optional[float] = None  # beam search: stop after beam_size * patience finished
    length_penalty: Optional[float] = None  # None: divide by length; else Google NMT's ((5+n)/6)^a
    prompt: Optional[Union[str, List[int]]] = None  # text of the previous window
    prefix: Optional[Union[str, List[int]]] = None  # forced start of this window's text
    suppress_tokens: Optional[Union[str, Sequence[int]]] = "-1"  # "-1": non-speech symbols
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: Optional[float] = 1.0


@dataclass
class DecodingResult:
    language: str
    tokens: List[int] = field(default_factory=list)
    text: str = ""
    avg_logprob: float = np.nan
    no_speech_prob: float = np.nan
    temperature: float = np.nan
    compression_ratio: float = np.nan
    language_probs: Optional[dict] = None


def compression_ratio(text: str) -> float:
    """How much zlib shrinks the text: repetition loops compress far better than speech."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):  # all -inf (every token suppressed) gives -inf, as it should
        return (np.log(np.sum(np.exp(x - peak), axis=axis, keepdims=True)) + peak).squeeze(axis)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits - _logsumexp(logits)[..., None]


def _as_features(model: Whisper, mel_or_features: mx.array) -> mx.array:
    x = mel_or_features if mel_or_features.ndim == 3 else mel_or_features[None]
    if x.shape[-1] == model.dims.n_audio_state and x.shape[1] == model.dims.n_audio_ctx:
        return x.astype(model.dtype)  # already encoded
    return model.embed_audio(x.astype(model.dtype))


def detect_language(
    model: Whisper, mel_or_features: mx.array, tokenizer: Optional[Tokenizer] = None
) -> Tuple[List[str], List[dict]]:
    """Most likely language code and {code: probability} for each window of a batch."""
    tokenizer = tokenizer or tokenizer_for(model)
    if tokenizer.language is None or tokenizer.language_token not in tokenizer.sot_sequence:
        raise ValueError("this model is English-only; it cannot detect languages")
    features = _as_features(model, mel_or_features)
    sot = mx.full((features.shape[0], 1), tokenizer.sot, dtype=mx.int32)
    logits = model.logits(sot, features)[:, 0].astype(mx.float32)
    language_tokens = np.array(tokenizer.all_language_tokens)
    probs = np.array(mx.softmax(logits[:, mx.array(language_tokens)], axis=-1))
    codes = tokenizer.all_language_codes
    best = [codes[i] for i in probs.argmax(axis=-1)]
    return best, [dict(zip(codes, row.tolist())) for row in probs]


class LogitRules:
    """Suppression and timestamp rules applied to each step's float32 logits (numpy, in place)."""

    def __init__(self, tokenizer: Tokenizer, options: DecodingOptions, sample_begin: int):
        self.tokenizer = tokenizer
        self.sample_begin = sample_begin
        self.suppress_blank = options.suppress_blank
        self.suppress = np.array(tokenizer.suppressed_tokens(options.suppress_tokens), dtype=np.int64)
        self.timestamps = not options.without_timestamps
        self.max_initial = None
        if self.timestamps and options.max_initial_timestamp is not None:
            self.max_initial = round(options.max_initial_timestamp / TIME_PRECISION)

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        """logits: (n, n_vocab) float32; tokens: (n, length) so far, prompt included."""
        if self.suppress_blank and tokens.shape[1] == self.sample_begin:
            logits[:, self.tokenizer.encode(" ") + [self.tokenizer.eot]] = -np.inf
        logits[:, self.suppress] = -np.inf
        if self.timestamps:
            for row in range(logits.shape[0]):
                self._timestamp_rules(logits[row], tokens[row, self.sample_begin :])

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


def _rearrange_cache(kv_cache, index: mx.array):
    """Reorder the self-attention keys/values along the batch; cross-attention ones stay."""
    return [((k[index], v[index]), cross) for (k, v), cross in kv_cache]


class DecodingTask:
    """Decode a batch of windows with one set of options (see `decode`)."""

    def __init__(self, model: Whisper, options: DecodingOptions, tokenizer: Optional[Tokenizer] = None):
        self.model = model
        self.options = self._checked(options)
        language = options.language or "en"
        self.tokenizer = tokenizer or tokenizer_for(model, language, options.task)
        self.n_ctx = model.dims.n_text_ctx
        self.sample_len = options.sample_len or self.n_ctx // 2
        self.n_group = options.beam_size or options.best_of or 1
        self.initial_tokens = self._initial_tokens()
        self.sample_begin = len(self.initial_tokens)
        self.sot_index = self.initial_tokens.index(self.tokenizer.sot)
        self.rules = LogitRules(self.tokenizer, self.options, self.sample_begin)

    @staticmethod
    def _checked(options: DecodingOptions) -> DecodingOptions:
        if options.beam_size is not None and options.best_of is not None:
            raise ValueError("beam_size and best_of can't be given together")
        if options.temperature == 0 and options.best_of is not None:
            raise ValueError("best_of with greedy sampling (temperature 0) has no effect")
        if options.patience is not None and options.beam_size is None:
            raise ValueError("patience requires beam_size")
        if options.length_penalty is not None and not 0 <= options.length_penalty <= 1:
            raise ValueError("length_penalty must be between 0 and 1")
        return options

    def _initial_tokens(self) -> List[int]:
        tokenizer, options = self.tokenizer, self.options
        tokens = list(tokenizer.sot_sequence)
        if options.without_timestamps:
            tokens.append(tokenizer.no_timestamps)
        if options.prefix is not None:
            prefix = options.prefix
            prefix = tokenizer.encode(" " + prefix.strip()) if isinstance(prefix, str) else list(prefix)
            tokens += prefix[-(self.n_ctx // 2 - self.sample_len) :] if self.sample_len < self.n_ctx // 2 else prefix
        if options.prompt is not None:
            prompt = options.prompt
            prompt = tokenizer.encode(" " + prompt.strip()) if isinstance(prompt, str) else list(prompt)
            tokens = [tokenizer.sot_prev] + prompt[-(self.n_ctx // 2 - 1) :] + tokens
        return tokens

    def run(self, mel: mx.array) -> List[DecodingResult]:
        features = _as_features(self.model, mel)  # (batch, n_audio_ctx, n_audio_state)
        n_audio = features.shape[0]
        languages, language_probs = self._languages(features, n_audio)
        tokens = np.array([self.initial_tokens] * n_audio, dtype=np.int64)
        for i, code in enumerate(languages):
            if self.options.language is None and self.model.is_multilingual:
                tokens[i, self.sot_index + 1] = self.tokenizer.to_language_token(code)
        features = mx.repeat(features, self.n_group, axis=0) if self.n_group > 1 else features
        tokens = np.repeat(tokens, self.n_group, axis=0)
        if self.options.beam_size is not None:
            sequences, sum_logprobs, no_speech = self._beam_search(tokens, features, n_audio)
        else:
            sequences, sum_logprobs, no_speech = self._sample(tokens, features, n_audio)
        return self._results(sequences, sum_logprobs, no_speech, languages, language_probs)

    def _languages(self, features: mx.array, n_audio: int):
        if self.options.language is not None or not self.model.is_multilingual:
            return [self.options.language or "en"] * n_audio, [None] * n_audio
        return detect_language(self.model, features, self.tokenizer)

    def _step(self, tokens: mx.array, features: mx.array, kv_cache):
        logits, kv_cache, _ = self.model.decoder(tokens, features, kv_cache)
        return logits.astype(mx.float32), kv_cache

    def _first_step(self, tokens: np.ndarray, features: mx.array):
        """Run the prompt; return the last position's logits, the cache and no-speech probabilities."""
        logits, kv_cache = self._step(mx.array(tokens, dtype=mx.int32), features, None)
        probs_at_sot = mx.softmax(logits[:, self.sot_index], axis=-1)[:, self.tokenizer.no_speech]
        return np.array(logits[:, -1]), kv_cache, np.array(probs_at_sot)[:: self.n_group]

    def _filtered_logprobs(self, logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        self.rules.apply(logits, tokens)
        return log_softmax(logits)

    def _next_logits(self, next_tokens: np.ndarray, features: mx.array, kv_cache):
        logits, kv_cache = self._step(mx.array(next_tokens[:, None], dtype=mx.int32), features, kv_cache)
        return np.array(logits[:, -1]), kv_cache

    def _sample(self, tokens: np.ndarray, features: mx.array, n_audio: int):
        """Greedy (temperature 0) or sampled decoding of every sequence until end of text."""
        eot, temperature = self.tokenizer.eot, self.options.temperature
        logits, kv_cache, no_speech = self._first_step(tokens, features)
        sum_logprobs = np.zeros(tokens.shape[0])
        for _ in range(self.sample_len):
            finished = tokens[:, -1] == eot
            logprobs = self._filtered_logprobs(logits, tokens)
            if temperature == 0:
                next_tokens = logits.argmax(axis=-1)
            else:
                next_tokens = np.array(mx.random.categorical(mx.array(logits / temperature)))
            rows = np.arange(len(next_tokens))
            sum_logprobs += np.where(finished, 0.0, logprobs[rows, next_tokens])
            next_tokens = np.where(finished, eot, next_tokens)
            tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
            if (next_tokens == eot).all() or tokens.shape[1] > self.n_ctx:
                break
            logits, kv_cache = self._next_logits(next_tokens, features, kv_cache)
        sequences = [self._trim(row) for row in tokens]
        return sequences, sum_logprobs, no_speech

    def _trim(self, row: np.ndarray) -> List[int]:
        sampled = row[self.sample_begin :].tolist()
        return sampled[: sampled.index(self.tokenizer.eot)] if self.tokenizer.eot in sampled else sampled

    def _beam_search(self, tokens: np.ndarray, features: mx.array, n_audio: int):
        """Beam search: keep the `beam_size` best unfinished sequences of each window."""
        beam, eot = self.options.beam_size, self.tokenizer.eot
        max_finished = round(beam * (self.options.patience or 1.0))
        finished = [dict() for _ in range(n_audio)]
        logits, kv_cache, no_speech = self._first_step(tokens, features)
        sum_logprobs = np.zeros(tokens.shape[0])
        for step in range(self.sample_len):
            logprobs = self._filtered_logprobs(logits, tokens)
            next_rows, next_scores, sources = [], [], []
            for audio in range(n_audio):
                candidates = {}
                for source in range(audio * beam, (audio + 1) * beam):
                    top = np.argpartition(-logprobs[source], beam + 1)[: beam + 1]
                    prefix = tuple(tokens[source].tolist())
                    for token in top:
                        candidates[prefix + (int(token),)] = (sum_logprobs[source] + logprobs[source, token], source)
                kept = 0
                for sequence, (score, source) in sorted(candidates.items(), key=lambda kv: -kv[1][0]):
                    if sequence[-1] == eot:
                        if len(finished[audio]) < max_finished:
                            finished[audio].setdefault(sequence, score)
                    else:
                        next_rows.append(sequence)
                        next_scores.append(score)
                        sources.append(source)
                        kept += 1
                        if kept == beam:  # endings ranked below the last kept beam don't count as finished
                            break
            tokens = np.array(next_rows, dtype=np.int64)
            sum_logprobs = np.array(next_scores)
            done = all(len(f) >= max_finished for f in finished)
            if done or tokens.shape[1] > self.n_ctx or step == self.sample_len - 1:
                break
            kv_cache = _rearrange_cache(kv_cache, mx.array(sources, dtype=mx.int32))
            logits, kv_cache = self._next_logits(tokens[:, -1], features, kv_cache)
        return self._best_beams(finished, tokens, sum_logprobs, beam), None, no_speech

    def _best_beams(self, finished, tokens, sum_logprobs, beam):
        """Each window's finished sequences, topped up with live beams when too few finished."""
        groups = []
        for audio, done in enumerate(finished):
            if len(done) < beam:
                rows = range(audio * beam, (audio + 1) * beam)
                for row in sorted(rows, key=lambda r: -sum_logprobs[r]):
                    done.setdefault(tuple(tokens[row].tolist()) + (self.tokenizer.eot,), sum_logprobs[row])
                    if len(done) >= beam:
                        break
            groups.append([(self._trim(np.array(seq)), score) for seq, score in done.items()])
        return groups

    def _penalised(self, logprob: float, length: int) -> float:
        penalty = self.options.length_penalty
        return logprob / (length if penalty is None else ((5 + length) / 6) ** penalty)

    def _results(self, sequences, sum_logprobs, no_speech, languages, language_probs):
        if sum_logprobs is not None:  # sampling: group the flat rows per window
            g = self.n_group
            sequences = [
                [(sequences[i * g + j], sum_logprobs[i * g + j]) for j in range(g)] for i in range(len(languages))
            ]
        results = []
        for i, group in enumerate(sequences):
            tokens, logprob = max(group, key=lambda c: self._penalised(c[1], max(len(c[0]), 1)))
            text = self.tokenizer.decode(tokens).strip()
            results.append(
                DecodingResult(
                    language=languages[i],
                    tokens=tokens,
                    text=text,
                    avg_logprob=float(logprob) / (len(tokens) + 1),
                    no_speech_prob=float(no_speech[i]),
                    temperature=self.options.temperature,
                    compression_ratio=compression_ratio(text),
                    language_probs=language_probs[i],
                )
            )
        return results


def decode(
    model: Whisper, mel: mx.array, options: DecodingOptions = DecodingOptions(), **kwargs
) -> Union[DecodingResult, List[DecodingResult]]:
    """Decode one window (n_frames, n_mels) or a batch (batch, n_frames, n_mels) of 30 s windows."""
    if kwargs:
        options = replace(options, **kwargs)
    single = mel.ndim == 2
    results = DecodingTask(model, options).run(mel[None] if single else mel)
    return results[0] if single else results


def decode_batches(
    model: Whisper, windows: Sequence[np.ndarray], options: DecodingOptions, batch_size: int
) -> List[DecodingResult]:
    """Decode many 30 s windows (mel or encoder output each), `batch_size` per forward pass."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    results = []
    for first in range(0, len(windows), batch_size):
        results += decode(model, mx.array(np.stack(windows[first : first + batch_size])), options)
    return results
