"""Examples added to a training set: packed windows of joined clips, no-speech windows, replay.

lora.py's --pack-fraction, --no-speech-fraction and --mix-data draw them once, from the seed,
before training; they are then ordinary examples of the set.
"""

from typing import List, Sequence

import numpy as np

from ..audio import SAMPLE_RATE
from ..tokenizer import Tokenizer
from .augment import no_speech_audio
from .batches import DroppedExample, Features, audio_frames, mel_features, read_samples
from .datasets import Example
from .labels import no_speech_labels

MAX_MISFITS = 3  # packed_examples: draws in a row that do not fit close a window


def no_speech_examples(tokenizer: Tokenizer, n_mels: int, count: int, seed: int) -> List[Features]:
    """`count` windows of silence or noise (augment.no_speech_audio) labelled as no speech, drawn from `seed`."""
    found = []
    for i in range(count):
        kind, samples = no_speech_audio(np.random.default_rng([seed, 7919, i]))
        source = f"no-speech:{i} ({kind}, {len(samples) / SAMPLE_RATE:.1f} s)"
        found.append(
            Features(mel_features(samples, n_mels), no_speech_labels(tokenizer), source, frames=audio_frames(samples))
        )
    return found


def packed_examples(examples: Sequence[Example], count: int, seed: int, gaps=(0.2, 1.0)) -> List[Example]:
    """`count` windows of several training clips of one language joined with `gaps` seconds of
    silence, up to 30 s, each clip a timestamped segment: what teaches an adapter that speech
    goes on after the first sentence (long-form transcription) instead of ending the window.
    A window closes after MAX_MISFITS draws in a row that do not fit: it decodes a few clips more than it holds.
    """
    rng, packed, by_language = np.random.default_rng([seed, 15485863]), [], {}
    usable = [e for e in examples if e.segments is None and e.text.strip()]
    for e in usable:
        by_language.setdefault(e.language, []).append(e)
    for i in range(count if usable else 0):
        pool = by_language[usable[int(rng.integers(len(usable)))].language]
        pieces, segments, t, used, misfits = [], [], 0.0, set(), 0
        while misfits < MAX_MISFITS and len(used) < len(pool) and t < 30.0 - gaps[0] - 1.0:
            j = int(rng.integers(len(pool)))
            if j in used:
                continue
            used.add(j)
            try:
                clip = read_samples(pool[j].audio)
            except DroppedExample:
                continue  # counted when the clip itself was prepared
            gap = float(rng.uniform(*gaps)) if pieces else float(rng.uniform(0.0, gaps[1]))
            if t + gap + len(clip) / SAMPLE_RATE > 30.0:
                misfits += 1
                continue
            misfits, start = 0, t + gap
            pieces += [np.zeros(int(gap * SAMPLE_RATE), np.float32), clip]
            t = start + len(clip) / SAMPLE_RATE
            segments.append({"start": start, "end": t, "text": pool[j].text})
        if segments:
            audio = np.concatenate(pieces).astype(np.float32)
            packed.append(Example(audio, "", pool[0].language, f"packed:{i} ({len(segments)} clips)", segments))
    return packed


def mixed_in(examples: Sequence[Features], count: int, seed: int) -> List[Features]:
    """`count` examples drawn from `examples` with `seed` (each once while it lasts, then again)."""
    rng = np.random.default_rng([seed, 104729])
    rounds = -(-count // max(len(examples), 1))
    order = np.concatenate([rng.permutation(len(examples)) for _ in range(rounds)] or [np.zeros(0, int)])
    return [examples[i] for i in order[:count]]
