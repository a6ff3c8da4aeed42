"""Validation: loss over target tokens and WER/CER from real greedy decoding."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..inference.decoding import DecodingOptions
from ..inference.decoding import decode as decode_windows
from ..tokenizer import Tokenizer
from .batches import Features, collate
from .metrics import corpus_counts, normalize_text, orthographic_text, rates_from_counts
from .pipeline import FeatureLoader


@dataclass
class EvalResult:
    loss: float
    n_tokens: int
    wer: Optional[float] = None
    cer: Optional[float] = None
    wer_orthographic: Optional[float] = None  # the text as written: case and punctuation count
    cer_orthographic: Optional[float] = None
    predictions: List[dict] = field(default_factory=list)  # {"source", "language", "ref", "hyp"}

    def summary(self) -> str:
        text = f"loss {self.loss:.3f}"
        if self.wer is not None:
            text += f", WER {100 * self.wer:.1f}%, CER {100 * self.cer:.1f}%"
        if self.wer_orthographic is not None:
            text += f" (as written: WER {100 * self.wer_orthographic:.1f}%, CER {100 * self.cer_orthographic:.1f}%)"
        return text


def reference_text(tokenizer: Tokenizer, labels: np.ndarray) -> str:
    return tokenizer.decode([int(t) for t in labels if t < tokenizer.eot]).strip()


def language_of(tokenizer: Tokenizer, labels: np.ndarray) -> Optional[str]:
    tokens = set(int(t) for t in labels[1:3])
    for code, token in zip(tokenizer.all_language_codes, tokenizer.all_language_tokens):
        if token in tokens:
            return code
    return None


def validation_loss(model, features: Sequence[Features], batch_size: int, loss_fn, world=None, loader=None) -> tuple:
    """Token-weighted mean loss over `features` (summed across ranks when `world` is given)."""
    loader = FeatureLoader() if loader is None else loader
    total, tokens = mx.array(0.0), mx.array(0.0)
    for start in range(0, len(features), batch_size):
        rows, mel = loader.load(features[start : start + batch_size])
        batch = collate(rows, mel=mel)
        mel = batch.mel.astype(model.dtype)
        loss, n = loss_fn(model, mel, batch.inputs, batch.targets, batch.mask)
        total, tokens = total + loss * n, tokens + n
        mx.eval(total, tokens)
    if world is not None and world.size() > 1:
        total, tokens = mx.distributed.all_sum(total, group=world), mx.distributed.all_sum(tokens, group=world)
    return float(total / mx.maximum(tokens, 1)), int(tokens.item())


def greedy_predictions(
    model, tokenizer: Tokenizer, features: Sequence[Features], batch_size: int, loader=None
) -> List[dict]:
    """Greedy transcripts (no timestamps) of each clip, decoded in batches of one language."""
    loader = FeatureLoader() if loader is None else loader
    by_language: Dict[Optional[str], List[Features]] = {}
    for f in features:
        by_language.setdefault(language_of(tokenizer, f.labels), []).append(f)
    predictions = []
    for language, group in by_language.items():
        options = DecodingOptions(language=language, without_timestamps=True)
        for start in range(0, len(group), batch_size):
            rows, windows = loader.load(group[start : start + batch_size])
            results = decode_windows(model, windows, options)
            predictions += [_prediction(tokenizer, f, language, result) for f, result in zip(rows, results)]
    return predictions


def _prediction(tokenizer: Tokenizer, f: Features, language: Optional[str], result) -> dict:
    return {"source": f.source, "language": language, "ref": reference_text(tokenizer, f.labels), "hyp": result.text}


def evaluate(
    model,
    tokenizer: Tokenizer,
    features: Sequence[Features],
    batch_size: int,
    loss_fn,
    decode: bool = True,
    world=None,
    loader=None,
) -> EvalResult:
    """Validation loss and, with `decode`, greedy WER/CER of `features`.

    With a distributed `world`, each rank scores every world.size()-th clip and the loss and the
    edit counts are summed over ranks: every rank returns the same numbers, but `predictions`
    holds only this rank's clips.
    """
    world = world if world is not None and world.size() > 1 else None
    shard = features if world is None else features[world.rank() :: world.size()]
    was_training = model.training
    model.eval()
    try:
        loss, n_tokens = validation_loss(model, shard, batch_size, loss_fn, world, loader)
        result = EvalResult(loss, n_tokens)
        if decode and features:  # all ranks take part, even one whose shard is empty
            result.predictions = greedy_predictions(model, tokenizer, shard, batch_size, loader)
            result.wer, result.cer = error_rates(result.predictions, world)
            result.wer_orthographic, result.cer_orthographic = error_rates(result.predictions, world, orthographic_text)
    finally:
        model.train(was_training)
    return result


def error_rates(predictions: List[dict], world=None, normalize=normalize_text) -> tuple:
    """Corpus (WER, CER) of {"ref", "hyp"} predictions after `normalize`, edit counts summed over `world`'s ranks."""
    counts = corpus_counts([p["ref"] for p in predictions], [p["hyp"] for p in predictions], normalize)
    if world is not None:
        counts = mx.distributed.all_sum(mx.array(counts, dtype=mx.int32), group=world).tolist()
    return rates_from_counts(counts)
