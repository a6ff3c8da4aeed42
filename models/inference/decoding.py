"""Decoding 30 s windows: language detection, greedy/sampling and beam search (rules.py: the logit rules)."""

import zlib
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from ..tokenizer import Tokenizer, tokenizer_for
from ..whisper import Whisper
from .rules import LogitRules, log_softmax


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


def _rearrange_cache(kv_cache, index: mx.array):
    """Reorder the self-attention keys/values along the batch; cross-attention ones stay."""
    return [((k[index], v[index]), cross) for (k, v), cross in kv_cache]


class RaggedPrompts:
    """The initial tokens of a batch's rows, right-padded to the longest.

    A row shorter than the longest continues from its own length: each sampled token gets the
    position it would have alone, and the padding slots of the cache are masked out, so rows
    with prompts of different lengths decode as they would one by one.
    """

    def __init__(self, rows: List[List[int]], pad: int, sot: int, n_group: int):
        lengths = np.array([len(row) for row in rows])
        self.width = int(lengths.max())
        padded = np.array([row + [pad] * (self.width - len(row)) for row in rows], dtype=np.int64)
        self.tokens = np.repeat(padded, n_group, axis=0)  # (rows * n_group, width)
        self.lengths = np.repeat(lengths, n_group)
        self.sot_index = np.repeat([row.index(sot) for row in rows], n_group)
        self.uniform = bool((lengths == self.width).all())

    def step(self, n_sampled: int, n_ctx: int):
        """(positions, mask) for feeding sampled token number `n_sampled`; (None, None) when uniform."""
        if self.uniform:
            return None, None
        positions = np.minimum(self.lengths + n_sampled - 1, n_ctx - 1)  # rows past n_ctx are done anyway
        slots = np.arange(self.width + n_sampled)[None]
        keep = (slots < self.lengths[:, None]) | (slots >= self.width)  # (rows, cached keys + 1)
        return mx.array(positions[:, None], dtype=mx.int32), mx.array(keep[:, None, None, :])


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
        self.initial_tokens = self._initial_tokens(options.prompt, language)
        self.rules = LogitRules(self.tokenizer, self.options)
        self.rules_on_device = mx.default_device() == mx.gpu  # greedy and sampled decoding (see _pick)

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

    def _initial_tokens(self, prompt: Optional[Union[str, List[int]]], language: str) -> List[int]:
        tokenizer, options = self.tokenizer, self.options
        tokens = list(tokenizer.sot_sequence)
        if self.model.is_multilingual:
            tokens[1] = tokenizer.to_language_token(language)  # sot, language, task
        if options.without_timestamps:
            tokens.append(tokenizer.no_timestamps)
        if options.prefix is not None:
            prefix = options.prefix
            prefix = tokenizer.encode(" " + prefix.strip()) if isinstance(prefix, str) else list(prefix)
            tokens += prefix[-(self.n_ctx // 2 - self.sample_len) :] if self.sample_len < self.n_ctx // 2 else prefix
        if prompt is not None:
            prompt = tokenizer.encode(" " + prompt.strip()) if isinstance(prompt, str) else list(prompt)
            tokens = [tokenizer.sot_prev] + prompt[-(self.n_ctx // 2 - 1) :] + tokens
        return tokens

    def run(
        self,
        mel: mx.array,
        prompts: Optional[Sequence[Optional[List[int]]]] = None,
        languages: Optional[Sequence[str]] = None,
    ) -> List[DecodingResult]:
        """Decode a batch of windows (mel or encoder output); `prompts` and `languages`, one per
        window, replace the options' prompt and language (no detection then)."""
        features = _as_features(self.model, mel)  # (batch, n_audio_ctx, n_audio_state)
        n_audio = features.shape[0]
        if languages is None:
            languages, language_probs = self._languages(features, n_audio)
        else:
            languages, language_probs = list(languages), [None] * n_audio
        prompts = [self.options.prompt] * n_audio if prompts is None else prompts
        rows = [self._initial_tokens(prompt, language) for prompt, language in zip(prompts, languages)]
        batch = RaggedPrompts(rows, self.tokenizer.eot, self.tokenizer.sot, self.n_group)
        features = mx.repeat(features, self.n_group, axis=0) if self.n_group > 1 else features
        if self.options.beam_size is not None:
            sequences, sum_logprobs, no_speech = self._beam_search(batch, features, n_audio)
        else:
            sequences, sum_logprobs, no_speech = self._sample(batch, features)
        return self._results(sequences, sum_logprobs, no_speech, languages, language_probs)

    def _languages(self, features: mx.array, n_audio: int):
        if self.options.language is not None or not self.model.is_multilingual:
            return [self.options.language or "en"] * n_audio, [None] * n_audio
        return detect_language(self.model, features, self.tokenizer)

    def _step(self, tokens: mx.array, features: mx.array, kv_cache, positions=None, mask=None):
        logits, kv_cache, _ = self.model.decoder(tokens, features, kv_cache, positions=positions, mask=mask)
        return logits.astype(mx.float32), kv_cache

    def _first_step(self, batch: RaggedPrompts, features: mx.array, on_host: bool = True):
        """Run the prompts; return each row's last logits (NumPy when `on_host`), the cache and
        no-speech probabilities."""
        logits, kv_cache = self._step(mx.array(batch.tokens, dtype=mx.int32), features, None)
        rows = mx.arange(logits.shape[0])
        at_sot = logits[rows, mx.array(batch.sot_index)]
        probs_at_sot = mx.softmax(at_sot, axis=-1)[:, self.tokenizer.no_speech]
        last = logits[rows, mx.array(batch.lengths - 1)]
        return np.array(last) if on_host else last, kv_cache, np.array(probs_at_sot)[:: self.n_group]

    def _filtered_logprobs(self, logits: np.ndarray, sampled: np.ndarray) -> np.ndarray:
        self.rules.apply(logits, sampled)
        return log_softmax(logits)

    def _next_logits(self, sampled: np.ndarray, features: mx.array, kv_cache, batch: RaggedPrompts, on_host=True):
        """Feed the last sampled token of every row."""
        positions, mask = batch.step(sampled.shape[1], self.n_ctx)
        next_tokens = mx.array(sampled[:, -1:], dtype=mx.int32)
        logits, kv_cache = self._step(next_tokens, features, kv_cache, positions, mask)
        return np.array(logits[:, -1]) if on_host else logits[:, -1], kv_cache

    def _pick(self, logits: mx.array, sampled: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Each row's next token (greedy or sampled, after the logit rules) and its log-probability.
        With `rules_on_device` only these come back from the device; else the logits do, for the
        NumPy rules (on a CPU nothing has to cross, and the device path measured no faster)."""
        temperature = self.options.temperature
        if not self.rules_on_device:
            host = np.array(logits)
            logprobs = self._filtered_logprobs(host, sampled)
            if temperature == 0:
                tokens = host.argmax(axis=-1)
            else:
                tokens = np.array(mx.random.categorical(mx.array(host / temperature)))
            return tokens, logprobs[np.arange(len(tokens)), tokens]
        logits = self.rules.on_device(logits, sampled)
        tokens = mx.argmax(logits, axis=-1) if temperature == 0 else mx.random.categorical(logits / temperature)
        logprobs = mx.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)
        mx.eval(tokens, logprobs)  # one wait for the step, not one per array
        return np.array(tokens).astype(np.int64), np.array(logprobs).astype(np.float64)

    def _sample(self, batch: RaggedPrompts, features: mx.array):
        """Greedy (temperature 0) or sampled decoding of every row until end of text (or no room)."""
        eot = self.tokenizer.eot
        logits, kv_cache, no_speech = self._first_step(batch, features, on_host=False)
        n_rows = len(batch.lengths)
        sampled = np.zeros((n_rows, 0), dtype=np.int64)
        sum_logprobs, done = np.zeros(n_rows), np.zeros(n_rows, dtype=bool)
        for _ in range(self.sample_len):
            next_tokens, logprobs = self._pick(logits, sampled)
            sum_logprobs += np.where(done, 0.0, logprobs)
            next_tokens = np.where(done, eot, next_tokens)
            sampled = np.concatenate([sampled, next_tokens[:, None]], axis=1)
            done |= (next_tokens == eot) | (batch.lengths + sampled.shape[1] > self.n_ctx)
            if done.all():
                break
            logits, kv_cache = self._next_logits(sampled, features, kv_cache, batch, on_host=False)
        return [self._trim(row) for row in sampled], sum_logprobs, no_speech

    def _trim(self, row: np.ndarray) -> List[int]:
        sampled = row.tolist()
        return sampled[: sampled.index(self.tokenizer.eot)] if self.tokenizer.eot in sampled else sampled

    def _beam_search(self, batch: RaggedPrompts, features: mx.array, n_audio: int):
        """Beam search: keep the `beam_size` best unfinished sequences of each window."""
        beam = self.options.beam_size
        max_finished = round(beam * (self.options.patience or 1.0))
        finished = [dict() for _ in range(n_audio)]
        final = [None] * n_audio  # the candidates of a window that ran out of context
        room = self.n_ctx - batch.lengths[::beam]  # how many tokens each window may sample
        logits, kv_cache, no_speech = self._first_step(batch, features)
        tokens, sum_logprobs = np.zeros((n_audio * beam, 0), dtype=np.int64), np.zeros(n_audio * beam)
        for step in range(self.sample_len):
            logprobs = self._filtered_logprobs(logits, tokens)
            tokens, sum_logprobs, sources = self._next_beams(logprobs, tokens, sum_logprobs, finished, max_finished)
            for audio in np.flatnonzero(tokens.shape[1] > room):
                if final[audio] is None:
                    final[audio] = self._best_beams(finished[audio], tokens, sum_logprobs, audio)
            done = all(f is not None or len(d) >= max_finished for f, d in zip(final, finished))
            if done or step == self.sample_len - 1:
                break
            kv_cache = _rearrange_cache(kv_cache, mx.array(sources, dtype=mx.int32))
            logits, kv_cache = self._next_logits(tokens, features, kv_cache, batch)
        groups = [
            f if f is not None else self._best_beams(d, tokens, sum_logprobs, audio)
            for audio, (f, d) in enumerate(zip(final, finished))
        ]
        return groups, None, no_speech

    def _next_beams(self, logprobs, tokens, sum_logprobs, finished, max_finished):
        """Each window's `beam_size` best continuations; endings go to `finished` (in place)."""
        beam, eot = self.options.beam_size, self.tokenizer.eot
        next_rows, next_scores, sources = [], [], []
        for audio in range(len(finished)):
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
        return np.array(next_rows, dtype=np.int64), np.array(next_scores), sources

    def _best_beams(self, finished: dict, tokens: np.ndarray, sum_logprobs: np.ndarray, audio: int):
        """One window's finished sequences, topped up with its live beams when too few finished."""
        beam, done = self.options.beam_size, dict(finished)
        if len(done) < beam:
            rows = range(audio * beam, (audio + 1) * beam)
            for row in sorted(rows, key=lambda r: -sum_logprobs[r]):
                done.setdefault(tuple(tokens[row].tolist()) + (self.tokenizer.eot,), sum_logprobs[row])
                if len(done) >= beam:
                    break
        return [(self._trim(np.array(seq)), score) for seq, score in done.items()]

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
