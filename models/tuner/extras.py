"""Examples added to a training set: packed windows of joined clips, no-speech windows, replay.

lora.py's --pack-fraction, --no-speech-fraction and --mix-data draw them once, from the seed,
before training; they are then ordinary examples of the set. Like the scanned training clips
they hold where their audio comes from, not their features (pipeline.py).
"""

from typing import List, Sequence

import numpy as np

from ..audio import SAMPLE_RATE
from ..tokenizer import Tokenizer
from .augment import no_speech_kind
from .batches import Features
from .labels import MAX_LABEL_TOKENS, no_speech_labels, text_start, timestamp_token
from .sources import ClipAudio, NoSpeechAudio, PackedAudio, frames_of

MAX_MISFITS = 3  # packed_examples: draws in a row that do not fit close a window
WINDOW_SAMPLES = 30 * SAMPLE_RATE
TAIL_SECONDS = 1.0  # an unfinished last clip has at least this much audio inside the window and beyond it


def no_speech_examples(tokenizer: Tokenizer, count: int, seed: int) -> List[Features]:
    """`count` windows of silence or noise (augment.no_speech_audio) labelled as no speech, drawn from `seed`."""
    found = []
    for i in range(count):
        audio = NoSpeechAudio((seed, 7919, i))
        kind, n = no_speech_kind(np.random.default_rng(list(audio.seed)))
        source = f"no-speech:{i} ({kind}, {n / SAMPLE_RATE:.1f} s)"
        found.append(Features(None, no_speech_labels(tokenizer), source, frames=frames_of(n), audio=audio, n_samples=n))
    return found


def packed_examples(
    clips: Sequence[Features], tokenizer: Tokenizer, count: int, seed: int, gaps=(0.2, 1.0), tail_prob: float = 0.0
) -> List[Features]:
    """`count` windows of several training clips of one language joined with `gaps` seconds of
    silence, up to 30 s, each clip a timestamped segment: what teaches an adapter that speech
    goes on after the first sentence (long-form transcription) instead of ending the window.
    A window closes after MAX_MISFITS draws in a row that do not fit. Clip lengths come from the
    scan (`n_samples`): nothing is decoded here.

    With probability `tail_prob` a window then takes the head of one more clip, cut off at 30 s,
    as in a long recording. Its timestamped labels end with that clip's start timestamp and no
    text: Whisper's unfinished segment, after which transcription seeks to the end of the last
    whole segment and decodes the cut-off speech in the next window (instead of skipping it).
    Such a window is always trained with its timestamped labels (labels.Labeler).
    """
    rng, packed, by_prefix = np.random.default_rng([seed, 15485863]), [], {}
    usable = [f for f in clips if isinstance(f.audio, ClipAudio) and f.timed is not None and f.n_samples]
    for f in usable:
        by_prefix.setdefault(_prefix(tokenizer, f), []).append(f)
    for i in range(count if usable else 0):
        prefix = _prefix(tokenizer, usable[int(rng.integers(len(usable)))])
        window = _pack_window(tokenizer, by_prefix[prefix], prefix, rng, gaps, rng.random() < tail_prob)
        if window is not None:
            pieces, text, timed, n = window
            source = f"packed:{i} ({len(pieces)} clips)"
            labels = np.array([*prefix, tokenizer.no_timestamps, *text, tokenizer.eot], dtype=np.int32)
            packed.append(Features(None, labels, source, timed, None, frames_of(n), PackedAudio(pieces), n))
    return packed


def _prefix(tokenizer: Tokenizer, f: Features) -> tuple:
    """The start of a clip's labels before <|notimestamps|>: <|startoftranscript|> and its language and task."""
    return tuple(int(t) for t in f.labels[: text_start(tokenizer, f.labels) - 1])


def _pack_window(tokenizer: Tokenizer, pool: Sequence[Features], prefix: tuple, rng, gaps, tail: bool):
    pieces, text, timed, t, used, placed, misfits = [], [], [], 0, set(), set(), 0
    while misfits < MAX_MISFITS and len(used) < len(pool) and t < WINDOW_SAMPLES - (gaps[0] + 1.0) * SAMPLE_RATE:
        j = int(rng.integers(len(pool)))
        if j in used:
            continue
        used.add(j)
        clip = pool[j]
        words = clip.labels[text_start(tokenizer, clip.labels) : -1].tolist()
        gap = int(float(rng.uniform(*gaps) if pieces else rng.uniform(0.0, gaps[1])) * SAMPLE_RATE)
        start, end = t + gap, t + gap + clip.n_samples
        too_long = len(prefix) + 2 + len(timed) + len(words) + 2 > MAX_LABEL_TOKENS
        if end > WINDOW_SAMPLES or too_long:
            misfits += 1
            continue
        misfits, t = 0, end
        placed.add(j)
        pieces.append((clip.audio, gap))
        text += words
        timed += [timestamp_token(tokenizer, start / SAMPLE_RATE), *words]
        timed.append(timestamp_token(tokenizer, end / SAMPLE_RATE))
    if not pieces:
        return None
    cut = _tail(pool, placed, t, rng, gaps) if tail and len(timed) + len(prefix) + 3 <= MAX_LABEL_TOKENS else None
    if cut is not None:
        clip, gap = cut
        pieces.append((clip.audio, gap))
        timed.append(timestamp_token(tokenizer, (t + gap) / SAMPLE_RATE))
        t = WINDOW_SAMPLES
    return tuple(pieces), text, np.array(timed, dtype=np.int32), t


def _tail(pool: Sequence[Features], placed: set, t: int, rng, gaps):
    """A clip not yet in the window that, after a gap, starts at least TAIL_SECONDS before the window's end and
    runs past it: (clip, gap), or None after MAX_MISFITS draws that do not."""
    left = [j for j in range(len(pool)) if j not in placed]
    for _ in range(MAX_MISFITS if left else 0):
        clip = pool[left[int(rng.integers(len(left)))]]
        gap = int(float(rng.uniform(*gaps)) * SAMPLE_RATE)
        inside, beyond = WINDOW_SAMPLES - (t + gap), t + gap + clip.n_samples - WINDOW_SAMPLES
        if min(inside, beyond) >= TAIL_SECONDS * SAMPLE_RATE:
            return clip, gap
    return None


def mixed_in(examples: Sequence[Features], count: int, seed: int) -> List[Features]:
    """`count` examples drawn from `examples` with `seed` (each once while it lasts, then again)."""
    rng = np.random.default_rng([seed, 104729])
    rounds = -(-count // max(len(examples), 1))
    order = np.concatenate([rng.permutation(len(examples)) for _ in range(rounds)] or [np.zeros(0, int)])
    return [examples[i] for i in order[:count]]
