"""Word and character error rates, with the normalisation of ../shared/data/reference.

Corpus-level rates: total edits over all utterances divided by total reference length,
so long utterances weigh more than short ones. Characters are Unicode code points of the
normalised text, spaces between words included (this reproduces the reference numbers).
"""

import unicodedata
from collections.abc import Sequence

import numpy as np


def normalize_text(s: str) -> str:
    """NFKC, lower case, punctuation and symbols (categories P*, S*) to spaces, collapse spaces.

    Combining marks (category M*: Telugu vowel signs and virama, Yoruba tone marks) are letters'
    parts here: they are never replaced or split from the letter they sit on.
    """
    s = unicodedata.normalize("NFKC", s).lower()
    s = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in s)
    return " ".join(s.split())


def orthographic_text(s: str) -> str:
    """The text as written (case and punctuation kept): only Unicode NFC and runs of spaces unified."""
    return " ".join(unicodedata.normalize("NFC", s).split())


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    if len(ref) == 0 or len(hyp) == 0:
        return max(len(ref), len(hyp))
    # Map items to ints so one row of the DP table is a vectorised numpy comparison.
    vocab: dict = {}
    r = np.array([vocab.setdefault(x, len(vocab)) for x in ref], dtype=np.int64)
    h = np.array([vocab.setdefault(x, len(vocab)) for x in hyp], dtype=np.int64)
    cols = np.arange(len(h) + 1)
    prev = cols.copy()  # distances from the empty ref prefix
    for i in range(1, len(r) + 1):
        cur = np.empty_like(prev)
        cur[0] = i
        cur[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (h != r[i - 1]))  # deletion, substitution
        # Insertions chain along the row: cur[j] = min_k (cur[k] + j - k), a running minimum.
        prev = np.minimum.accumulate(cur - cols) + cols
    return int(prev[-1])


def word_errors(ref: str, hyp: str, normalize=normalize_text) -> tuple[int, int]:
    """(word edits, reference words) after `normalize`."""
    r, h = normalize(ref).split(), normalize(hyp).split()
    return edit_distance(r, h), len(r)


def char_errors(ref: str, hyp: str, normalize=normalize_text) -> tuple[int, int]:
    """(character edits, reference characters incl. spaces) after `normalize`."""
    r, h = normalize(ref), normalize(hyp)
    return edit_distance(r, h), len(r)


def corpus_counts(refs: Sequence[str], hyps: Sequence[str], normalize=normalize_text) -> list:
    """[word edits, reference words, character edits, reference characters] summed over the corpus,
    after `normalize` (normalize_text, or orthographic_text for the text as written)."""
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses")
    counts = [0, 0, 0, 0]
    for ref, hyp in zip(refs, hyps):
        (we, wn), (ce, cn) = word_errors(ref, hyp, normalize), char_errors(ref, hyp, normalize)
        counts = [counts[0] + we, counts[1] + wn, counts[2] + ce, counts[3] + cn]
    return counts


def rates_from_counts(counts: Sequence[int]) -> tuple:
    """(WER, CER) of `corpus_counts`; an empty reference corpus is an error."""
    if counts[1] == 0 or counts[3] == 0:
        raise ValueError("references are empty after normalisation: the error rate is undefined")
    return counts[0] / counts[1], counts[2] / counts[3]


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate: sum of word edits / sum of reference words (can exceed 1)."""
    return rates_from_counts(corpus_counts(refs, hyps))[0]


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus character error rate: sum of char edits / sum of reference chars (can exceed 1)."""
    return rates_from_counts(corpus_counts(refs, hyps))[1]
