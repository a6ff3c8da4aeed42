"""Whisper's byte-level BPE tokenizer (tiktoken) with its special tokens."""

import base64
import json
import string
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import tiktoken

from .audio import HOP_LENGTH, N_FRAMES, N_SAMPLES_PER_TOKEN, TIME_PRECISION

_ASSETS = Path(__file__).parent / "assets"
N_TIMESTAMPS = N_FRAMES // (N_SAMPLES_PER_TOKEN // HOP_LENGTH) + 1  # <|0.00|> ... <|30.00|>

# Whisper language codes -> English names, in token order (the 100th, Cantonese, is large-v3's).
LANGUAGES: Dict[str, str] = json.loads((_ASSETS / "languages.json").read_text(encoding="utf-8"))
ALIASES = {
    "burmese": "my",
    "valencian": "ca",
    "flemish": "nl",
    "haitian": "ht",
    "letzeburgesch": "lb",
    "pushto": "ps",
    "panjabi": "pa",
    "moldavian": "ro",
    "moldovan": "ro",
    "sinhalese": "si",
    "castilian": "es",
    "mandarin": "zh",
}
TO_LANGUAGE_CODE = {**{name: code for code, name in LANGUAGES.items()}, **ALIASES}
# Languages written without spaces between words: word timestamps split them per character.
NO_SPACE_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}
_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def language_code(language: str) -> str:
    """'Telugu', 'te' or 'TE' -> 'te'; an unknown language is a ValueError listing the choices."""
    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise ValueError(f"unknown language {language!r}; use a code such as {', '.join(list(LANGUAGES)[:12])}, ...")


@lru_cache(maxsize=None)
def get_encoding(name: str = "multilingual", num_languages: int = 99) -> tiktoken.Encoding:
    ranks = {}
    with open(_ASSETS / f"{name}.tiktoken", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    specials = ["<|endoftext|>", "<|startoftranscript|>"]
    specials += [f"<|{code}|>" for code in list(LANGUAGES)[:num_languages]]
    specials += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>"]
    specials += ["<|nospeech|>", "<|notimestamps|>"]
    specials += [f"<|{i * TIME_PRECISION:.2f}|>" for i in range(N_TIMESTAMPS)]
    special_tokens = {token: len(ranks) + i for i, token in enumerate(specials)}
    return tiktoken.Encoding(
        name=f"{name}-{num_languages}",
        explicit_n_vocab=len(ranks) + len(specials),
        pat_str=_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=special_tokens,
    )


@dataclass
class Tokenizer:
    encoding: tiktoken.Encoding
    num_languages: int
    language: Optional[str] = None
    task: Optional[str] = None
    special_tokens: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.special_tokens = {t: self.encoding.encode_single_token(t) for t in self.encoding.special_tokens_set}
        self.sot = self.special_tokens["<|startoftranscript|>"]
        self.eot = self.special_tokens["<|endoftext|>"]
        self.transcribe = self.special_tokens["<|transcribe|>"]
        self.translate = self.special_tokens["<|translate|>"]
        self.sot_lm = self.special_tokens["<|startoflm|>"]
        self.sot_prev = self.special_tokens["<|startofprev|>"]
        self.no_speech = self.special_tokens["<|nospeech|>"]
        self.no_timestamps = self.special_tokens["<|notimestamps|>"]
        self.timestamp_begin = self.special_tokens["<|0.00|>"]

    def encode(self, text: str) -> List[int]:
        return self.encoding.encode(text)

    def decode(self, tokens: List[int]) -> str:
        """Text of the ordinary tokens (timestamps and other specials dropped)."""
        return self.encoding.decode([t for t in tokens if t < self.eot])

    def decode_with_timestamps(self, tokens: List[int]) -> str:
        """Text with timestamp tokens written as <|1.08|>."""
        return self.encoding.decode(list(tokens))

    def to_language_token(self, language: str) -> int:
        token = self.special_tokens.get(f"<|{language_code(language)}|>")
        if token is None:
            raise ValueError(f"language {language!r} is not in this model's vocabulary")
        return token

    @cached_property
    def language_token(self) -> int:
        if self.language is None:
            raise ValueError("this tokenizer has no language set")
        return self.to_language_token(self.language)

    @cached_property
    def all_language_codes(self) -> Tuple[str, ...]:
        return tuple(list(LANGUAGES)[: self.num_languages])

    @cached_property
    def all_language_tokens(self) -> Tuple[int, ...]:
        return tuple(self.special_tokens[f"<|{code}|>"] for code in self.all_language_codes)

    @cached_property
    def sot_sequence(self) -> Tuple[int, ...]:
        sequence = [self.sot]
        if self.language is not None:
            sequence.append(self.language_token)
        if self.task is not None:
            sequence.append(self.transcribe if self.task == "transcribe" else self.translate)
        return tuple(sequence)

    @cached_property
    def sot_sequence_including_notimestamps(self) -> Tuple[int, ...]:
        return self.sot_sequence + (self.no_timestamps,)

    @cached_property
    def non_speech_tokens(self) -> Tuple[int, ...]:
        """Tokens of symbols and speaker markers that are never speech ('♪', '[', '(', '>>', ...).

        Whole single-token symbols are suppressed; multi-token ones lose their first token only
        where it is a musical sign, as in OpenAI's decoder.
        """
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        musical = set("♩♪♫♬♭♮♯")
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(musical):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in musical:
                    result.add(tokens[0])
        return tuple(sorted(result))

    def suppressed_tokens(self, spec: Union[str, Sequence[int], None] = "-1") -> List[int]:
        """Tokens decoding never samples: `spec` ("-1" means the non-speech symbols, as OpenAI's
        default; ids or a comma-separated string add others) plus the task and prompt specials."""
        if isinstance(spec, str):
            spec = [int(t) for t in spec.split(",") if t.strip()]
        spec = list(spec or [])
        if -1 in spec:
            spec = [t for t in spec if t >= 0] + list(self.non_speech_tokens)
        spec += [self.transcribe, self.translate, self.sot, self.sot_prev, self.sot_lm, self.no_speech]
        return sorted({t for t in spec if 0 <= t < self.encoding.n_vocab})

    def split_to_word_tokens(self, tokens: List[int]) -> Tuple[List[str], List[List[int]]]:
        """Group tokens into words: by space, or by whole Unicode characters for no-space scripts."""
        if self.language in NO_SPACE_LANGUAGES:
            return self._split_on_unicode(tokens)
        subwords, subword_tokens = self._split_on_unicode(tokens)
        words, word_tokens = [], []
        for subword, pieces in zip(subwords, subword_tokens):
            starts_word = subword.startswith(" ") or subword.strip() in string.punctuation
            special = pieces[0] >= self.eot
            if special or starts_word or not words:
                words.append(subword)
                word_tokens.append(list(pieces))
            else:
                words[-1] += subword
                word_tokens[-1].extend(pieces)
        return words, word_tokens

    def _split_on_unicode(self, tokens: List[int]) -> Tuple[List[str], List[List[int]]]:
        # A multi-byte character may span tokens: cut only where the bytes decode cleanly.
        full = self.decode_with_timestamps(tokens)
        words, word_tokens, current, position = [], [], [], 0
        for token in tokens:
            current.append(token)
            decoded = self.decode_with_timestamps(current)
            if "\ufffd" not in decoded or full[position + decoded.index("\ufffd")] == "\ufffd":
                words.append(decoded)
                word_tokens.append(current)
                current = []
                position += len(decoded)
        return words, word_tokens


def tokenizer_for(model, language: Optional[str] = None, task: Optional[str] = "transcribe") -> Tokenizer:
    """The tokenizer of `model` (a Whisper): its vocabulary, with `language` and `task` set."""
    return get_tokenizer(model.is_multilingual, model.num_languages, language=language, task=task)


@lru_cache(maxsize=None)
def get_tokenizer(
    multilingual: bool = True,
    num_languages: int = 99,
    language: Optional[str] = None,
    task: Optional[str] = None,
) -> Tokenizer:
    """The tokenizer of a multilingual (or English-only) Whisper model."""
    if language is not None:
        language = language_code(language)
    if task not in (None, "transcribe", "translate"):
        raise ValueError(f"task must be 'transcribe' or 'translate', got {task!r}")
    if multilingual:
        name, language, task = "multilingual", language or "en", task or "transcribe"
    else:
        name, language, task = "gpt2", None, None
    return Tokenizer(get_encoding(name, num_languages), num_languages, language, task)
