"""Metrics: the normalisation and corpus rates must reproduce ../shared/data/reference."""

import json
import random
from pathlib import Path

import pytest

from models.tuner.metrics import cer, char_errors, edit_distance, normalize_text, wer, word_errors

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "reference"
# Rounded numbers from the reference README, as percentages: (WER, CER).
README_NUMBERS = {
    "en-read": (7.8, 3.2),
    "te-validation": (124.0, 124.9),
    "yo-validation": (151.6, 78.4),
    "sw-validation": (91.5, 22.6),
}


def _naive_distance(a, b):
    """Textbook O(n*m) Levenshtein, the oracle for the vectorised one."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def test_normalize_text():
    assert normalize_text("  Hello, World!  ") == "hello world"
    assert normalize_text("ﬁne\tdone—really?") == "fine done really"  # NFKC ligature, em dash
    assert normalize_text("1+1=2 $5 «ok»") == "1 1 2 5 ok"  # symbols S* too
    assert normalize_text("Ọ̀rọ̀ Yorùbá") == "ọ̀rọ̀ yorùbá"  # combining marks (Mn) are kept
    assert normalize_text("...") == ""


@pytest.mark.parametrize(
    "a,b,d",
    [
        ("", "", 0),
        ("abc", "", 3),
        ("", "ab", 2),
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("abc", "abc", 0),
        ("ab", "ba", 2),
    ],
)
def test_edit_distance_known(a, b, d):
    assert edit_distance(a, b) == d
    assert edit_distance(list(a), list(b)) == d


def test_edit_distance_matches_naive():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        assert edit_distance(a, b) == _naive_distance(a, b), (a, b)


def test_errors_and_rates():
    assert word_errors("The cat sat.", "the cat sat") == (0, 3)
    assert word_errors("the cat sat", "a cat") == (2, 3)
    assert char_errors("ab cd", "abcd") == (1, 5)  # the space counts
    assert wer(["a b", "c d e f"], ["a x", "c d e f"]) == pytest.approx(1 / 6)  # corpus, not mean
    assert cer(["ab"], ["abcd"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 references but 1"):
        wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        wer(["?!"], ["a"])


@pytest.mark.parametrize("name", sorted(README_NUMBERS))
def test_reproduces_reference_summary(name):
    path = REFERENCE / f"{name}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found: the shared data folder must sit beside the repo")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    summary, clips = rows[-1], rows[:-1]
    assert summary["summary"] and summary["n"] == len(clips)
    refs, hyps = [c["ref"] for c in clips], [c["hyp"] for c in clips]
    w, c = wer(refs, hyps), cer(refs, hyps)
    assert w == pytest.approx(summary["wer"], abs=1e-12)
    assert c == pytest.approx(summary["cer"], abs=1e-12)
    assert (round(100 * w, 1), round(100 * c, 1)) == README_NUMBERS[name]
