"""Training labels beyond `<|notimestamps|> text`: timestamps, previous-text prompts, no speech.

Whisper was trained on four kinds of target sequence, and an adapter trained on only one of
them forgets the others. `Labeler` draws, per training example and from a seeded generator:

- timestamped labels `<|0.00|> text <|t_end|>` (share `timestamp_prob`), the end being the
  clip's duration on Whisper's 0.02 s grid; a window cut from a long recording with segments
  carries one `<|start|> text <|end|>` pair per segment;
- a previous-text prompt `<|startofprev|> earlier transcript` before `<|startoftranscript|>`
  (share `prompt_prob`): the preceding clip of the same speaker or recording, else a random
  clip; the prompt is context only and is masked out of the loss;
- no-speech examples (silence and noise, see augment.py): `<|startoftranscript|> <|nospeech|>`, or
  half the time an empty transcript after a language prefix of the training set
  (`<|startoftranscript|> <|te|> <|transcribe|> <|notimestamps|>` or `<|0.00|>`, then `<|endoftext|>`).

Timestamp tokens are counted from the tokenizer's `<|0.00|>`, never hard-coded: vocabularies differ.
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..audio import TIME_PRECISION
from ..tokenizer import Tokenizer, language_code

MAX_LABEL_TOKENS = 448  # the decoder's context (n_text_ctx)
MAX_PROMPT_TOKENS = 223  # the previous text Whisper conditions on: half its context, minus <|startofprev|>
CHUNK_SECONDS = 30.0


class DroppedExample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def label_tokens(
    tokenizer: Tokenizer, text: str, language: Optional[str], max_label_tokens: int = MAX_LABEL_TOKENS
) -> np.ndarray:
    """[sot, language, transcribe, notimestamps] + tokens of " text" + [eot] (English-only models: no
    language or task token). Raises DroppedExample when the example cannot be used."""
    text = text.strip()
    if not text:
        raise DroppedExample("empty transcript")
    undecodable = next((c for c in text if "\udc80" <= c <= "\udcff"), None)  # kept by surrogateescape
    if undecodable is not None:
        raise DroppedExample(
            "non-UTF-8 text", f"byte 0x{ord(undecodable) - 0xDC00:02x} is not UTF-8; save the manifest as UTF-8"
        )
    english_only = tokenizer.encoding.name.startswith("gpt2")  # the vocabulary of the .en models
    try:
        code = None if language is None else _language(language)
        language_token = None if code is None or english_only else tokenizer.to_language_token(code)
    except ValueError as e:
        raise DroppedExample("unknown language", str(e)) from None
    if english_only and code not in (None, "en"):
        raise DroppedExample("unknown language", f"{language!r} with an English-only model")
    if not english_only and code is None:
        raise DroppedExample("unknown language", "no language column and no default language")
    sot, no_timestamps = tokenizer.sot, tokenizer.no_timestamps
    prefix = [sot, no_timestamps] if english_only else [sot, language_token, tokenizer.transcribe, no_timestamps]
    # Text that looks like "<|en|>" is encoded as plain text, never as a special token.
    tokens = prefix + tokenizer.encoding.encode(" " + text, disallowed_special=()) + [tokenizer.eot]
    if len(tokens) > max_label_tokens:
        raise DroppedExample("transcript too long", f"{len(tokens)} tokens > {max_label_tokens}")
    return np.array(tokens, dtype=np.int32)


def _language(value: str) -> str:
    """A language code from a code, a name, or a locale such as 'pt-BR'."""
    try:
        return language_code(value)
    except ValueError:
        return language_code(value.replace("_", "-").split("-")[0])


def timestamp_token(tokenizer: Tokenizer, seconds: float) -> int:
    """The timestamp token nearest `seconds` (0 to 30 s on the 0.02 s grid)."""
    index = int(round(seconds / TIME_PRECISION))
    if not 0 <= index <= round(CHUNK_SECONDS / TIME_PRECISION):
        raise ValueError(f"a timestamp must lie in [0, 30] s, got {seconds:.2f} s")
    return tokenizer.timestamp_begin + index


def text_start(tokenizer: Tokenizer, labels: np.ndarray) -> int:
    """Where the text begins in plain labels: just after `<|notimestamps|>`."""
    return int(np.flatnonzero(labels == tokenizer.no_timestamps)[0]) + 1


def timed_clip(tokenizer: Tokenizer, labels: np.ndarray, duration: float) -> np.ndarray:
    """The text of plain labels between `<|0.00|>` and the clip's end time."""
    text = labels[text_start(tokenizer, labels) : -1]
    end = timestamp_token(tokenizer, min(duration, CHUNK_SECONDS))
    return np.concatenate([[tokenizer.timestamp_begin], text, [end]]).astype(np.int32)


def timed_segments(tokenizer: Tokenizer, segments: Sequence[dict], offset: float) -> np.ndarray:
    """`<|start|> text <|end|>` for each segment, times relative to `offset` (the window start)."""
    tokens: List[int] = []
    for segment in segments:
        tokens.append(timestamp_token(tokenizer, segment["start"] - offset))
        tokens += tokenizer.encoding.encode(" " + segment["text"].strip(), disallowed_special=())
        tokens.append(timestamp_token(tokenizer, segment["end"] - offset))
    return np.array(tokens, dtype=np.int32)


def segment_windows(segments: Sequence[dict], chunk: float = CHUNK_SECONDS) -> List[Tuple[float, float, list]]:
    """Cut a recording's segments into windows of at most `chunk` seconds: (start, end, segments).

    A window starts at a segment's start and takes whole segments while they end within
    `chunk` seconds of it; its audio ends where its last segment ends, so no window holds
    speech its label leaves out. A segment longer than `chunk` raises ValueError.
    """
    windows, current = [], []
    for segment in segments:
        if segment["end"] - segment["start"] > chunk:
            raise ValueError(f"a segment runs {segment['end'] - segment['start']:.1f} s, more than {chunk:.0f} s")
        if current and segment["end"] - current[0]["start"] > chunk:
            windows.append((current[0]["start"], current[-1]["end"], current))
            current = []
        current.append(segment)
    if current:
        windows.append((current[0]["start"], current[-1]["end"], current))
    return windows


def check_segments(segments, where: str) -> List[dict]:
    """Segments as [{start, end, text}] floats and strings, in time order; a bad one is named."""
    if not isinstance(segments, list) or not segments:
        raise ValueError(f"{where}: segments must be a non-empty list of {{start, end, text}}")
    checked, previous_end = [], 0.0
    for i, s in enumerate(segments):
        try:
            start, end, text = float(s["start"]), float(s["end"]), str(s["text"])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{where}: segment {i} must be {{start, end, text}} with numbers, got {s!r}") from None
        if not 0 <= start < end or start < previous_end - 1e-6:
            raise ValueError(
                f"{where}: segment {i} runs {start}-{end} s; segments must have start < end and not overlap, in order"
            )
        checked.append({"start": start, "end": end, "text": text})
        previous_end = end
    return checked


class Labeler:
    """Draws each training example's label sequence: timestamps or not, a prompt or not.

    `pool` is the training set in manifest order (prompts come from it); `row(index, rng)`
    returns (tokens, n_context): the first `n_context` targets are the prompt, not trained on.
    Every draw comes from `rng`, so a batch's labels depend only on its seed.
    """

    def __init__(self, tokenizer: Tokenizer, pool: Sequence, timestamp_prob: float = 0.0, prompt_prob: float = 0.0):
        self.tokenizer, self.pool = tokenizer, pool
        self.timestamp_prob, self.prompt_prob = timestamp_prob, prompt_prob
        self.previous = _previous_in_group(pool)
        # The language prefixes of the speech clips: a no-speech window is also taught to give an
        # empty transcript after one, as when transcription forces the language.
        prefixes = {tuple(f.labels[: text_start(tokenizer, f.labels) - 1]) for f in pool if f.timed is not None}
        self.prefixes = sorted(prefixes) if any(f.timed is None for f in pool) else []

    @property
    def active(self) -> bool:
        return self.timestamp_prob > 0 or self.prompt_prob > 0 or bool(self.prefixes)

    def row(self, index: int, rng: np.random.Generator) -> Tuple[np.ndarray, int]:
        f, tok = self.pool[index], self.tokenizer
        labels = f.labels
        timed = f.timed is not None and (rng.random() < self.timestamp_prob or unfinished(tok, f.timed))
        if f.timed is None and self.prefixes and rng.random() < 0.5:  # no speech, the language given
            prefix = self.prefixes[int(rng.integers(len(self.prefixes)))]
            start = tok.timestamp_begin if rng.random() < self.timestamp_prob else tok.no_timestamps
            labels = np.array([*prefix, start, tok.eot], dtype=np.int32)
        if timed:
            start = text_start(tok, labels)  # the plain prefix without <|notimestamps|>
            labels = np.concatenate([labels[: start - 1], f.timed, labels[-1:]]).astype(np.int32)
        if not rng.random() < self.prompt_prob:
            return labels, 0
        prompt = self._prompt_text(index, rng)
        room = min(MAX_PROMPT_TOKENS, MAX_LABEL_TOKENS - len(labels) - 1)  # the whole row fits the context
        prompt = prompt[len(prompt) - max(room, 0) :]
        context = np.concatenate([[tok.sot_prev], prompt]).astype(np.int32)
        return np.concatenate([context, labels]).astype(np.int32), len(context)

    def _prompt_text(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """Text tokens of the previous clip of the same group, else of a random other speech clip."""
        source = self.previous[index]
        if source < 0 and len(self.pool) > 1:
            source = int(rng.integers(len(self.pool) - 1))
            source += source >= index  # any clip but this one
        if source < 0 or self.pool[source].timed is None:  # nothing before it, or no speech
            return np.zeros(0, dtype=np.int32)
        labels = self.pool[source].labels
        return labels[text_start(self.tokenizer, labels) : -1]


def unfinished(tokenizer: Tokenizer, timed: np.ndarray) -> bool:
    """Timestamped labels that end with a segment's start and no text (extras.packed_examples):
    the window cuts that speech off, so its plain labels would have no words for it."""
    return len(timed) >= 2 and bool(np.all(timed[-2:] >= tokenizer.timestamp_begin))


def _previous_in_group(pool: Sequence) -> np.ndarray:
    """For each example, the index of the one before it with the same group (speaker or recording), or -1."""
    previous, last = np.full(len(pool), -1, dtype=np.int64), {}
    for i, f in enumerate(pool):
        group = getattr(f, "group", None)
        if group is not None:
            previous[i] = last.get(group, -1)
            last[group] = i
    return previous


def no_speech_labels(tokenizer: Tokenizer) -> np.ndarray:
    """`<|startoftranscript|> <|nospeech|> <|endoftext|>`: what Whisper learned to say of a window without speech."""
    return np.array([tokenizer.sot, tokenizer.no_speech, tokenizer.eot], dtype=np.int32)
