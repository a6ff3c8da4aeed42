"""Speech datasets for fine-tuning: local folders and the Hugging Face Hub, filtering, batching.

Every source is turned into `Example`s (audio path or bytes, text, language), then into
`Features` (30 s of log-mel frames and the label tokens Whisper is trained on), which
`iterate_batches` pads into `Batch`es in an order that depends only on (seed, epoch).
"""

import csv
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .audio import N_FRAMES, N_SAMPLES, SAMPLE_RATE, load_audio, log_mel_spectrogram, pad_or_trim
from .tokenizer import Tokenizer, language_code

TEXT_COLUMNS = ("sentence", "text", "transcription", "normalized_text")
AUDIO_COLUMNS = ("file_name", "audio", "path")
LANGUAGE_COLUMNS = ("language", "locale")
SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "valid", "dev", "eval"), "test": ("test",)}
MAX_LABEL_TOKENS = 448  # the decoder's context (n_text_ctx)
MAX_PRINTED_PROBLEMS = 10


@dataclass
class Example:
    audio: Union[str, bytes]  # a file path or the encoded file's bytes
    text: str
    language: Optional[str]
    source: str  # "file:row", for messages


@dataclass
class Features:
    mel: np.ndarray  # (N_FRAMES, n_mels) float16
    labels: np.ndarray  # (n_tokens,) int32: sot, language, transcribe, notimestamps, text..., eot
    source: str


@dataclass
class Batch:
    mel: mx.array  # (B, N_FRAMES, n_mels)
    inputs: mx.array  # (B, T) int32, labels[:-1] padded
    targets: mx.array  # (B, T) int32, labels[1:] padded
    mask: mx.array  # (B, T) float32, 1 on real targets
    n_tokens: int
    sources: List[str]


@dataclass
class DropReport:
    """Which examples were left out of a dataset, and why."""

    total: int = 0
    kept: int = 0
    counts: Counter = field(default_factory=Counter)
    samples: Dict[str, List[str]] = field(default_factory=dict)  # reason -> a few "source: detail"
    max_samples: int = 3

    def drop(self, reason: str, source: str, detail: str = "") -> None:
        self.counts[reason] += 1
        examples = self.samples.setdefault(reason, [])
        if len(examples) < self.max_samples:
            examples.append(f"{source}: {detail}" if detail else source)

    @property
    def dropped(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        summary = f"kept {self.kept} of {self.total} examples"
        if not self.counts:
            return summary
        reasons = ", ".join(f"{reason}: {n} (e.g. {self.samples[reason][0]})" for reason, n in self.counts.items())
        return f"{summary}; dropped {self.dropped}: {reasons}"


class DroppedExample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class DatasetLoadError(RuntimeError):
    """A Hub dataset could not be reached or found; the message says what to check."""


# ---------------------------------------------------------------- local folders


def load_local_dataset(data_dir: Union[str, Path], *, val_fraction: float = 0.1, seed: int = 0,
                       text_column: Optional[str] = None) -> Dict[str, List[Example]]:
    """Read a folder of audio and metadata into {"train": [...], "validation": [...], ("test")}.

    Splits come from train/, validation/ (or valid/, dev/, eval/) and test/ subfolders, each with
    its own manifest. A folder (or manifest file) holding one flat set, or a train/ folder with no
    validation folder, is split by `val_fraction`, drawn with `seed`.
    """
    root = Path(data_dir)
    layout = "a folder with metadata.csv or metadata.jsonl, or with train/ and validation/ subfolders"
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist; pass {layout}")
    split_dirs = _find_split_folders(root) if root.is_dir() else {}
    if not split_dirs:
        if root.is_dir() and find_manifest(root) is None:
            raise FileNotFoundError(f"{root} has no manifest and no split folders; pass {layout}")
        splits = {"train": read_manifest(root, text_column=text_column)}
    elif find_manifest(root) is not None:
        raise ValueError(f"{root} holds both a top-level manifest and split folders; keep one layout")
    else:
        splits = {name: read_manifest(folder, text_column=text_column) for name, folder in split_dirs.items()}
    if "train" in splits and "validation" not in splits:
        splits["train"], validation = split_examples(splits["train"], val_fraction, seed)
        if validation:
            splits["validation"] = validation
    return splits


def _find_split_folders(root: Path) -> Dict[str, Path]:
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        folders = [root / name for name in names if (root / name).is_dir()]
        if len(folders) > 1:
            listed = ", ".join(f.name for f in folders)
            raise ValueError(f"{root} has several {split} folders ({listed}); keep one")
        if folders:
            found[split] = folders[0]
    return found


def split_examples(examples: Sequence[Example], val_fraction: float,
                   seed: int) -> Tuple[List[Example], List[Example]]:
    """Hold out `val_fraction` of the examples (at least one when > 0), drawn with `seed`; order is kept."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(len(examples) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(examples) > 1:
        n_val = 1
    held_out = set(np.random.default_rng(seed).permutation(len(examples))[:n_val].tolist())
    train = [e for i, e in enumerate(examples) if i not in held_out]
    return train, [e for i, e in enumerate(examples) if i in held_out]


def find_manifest(folder: Path) -> Optional[Path]:
    """metadata.csv, metadata.jsonl or a single *.jsonl in `folder`; None when there is none."""
    found = [path for path in (folder / "metadata.csv", folder / "metadata.jsonl") if path.is_file()]
    found = found or sorted(folder.glob("*.jsonl"))
    if len(found) > 1:
        raise ValueError(f"{folder} has several manifests ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def read_manifest(path: Union[str, Path], *, text_column: Optional[str] = None) -> List[Example]:
    """Examples of an audiofolder metadata.csv or a JSONL manifest (the file, or a folder holding it).

    Audio paths (file_name, audio or path) are relative to the manifest's folder; the transcript
    is `text_column` or the first of sentence/text/transcription/normalized_text; the language
    comes from a language or locale column when there is one.
    """
    path = Path(path)
    if path.is_dir():
        path = find_manifest(path) or path / "metadata.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write a metadata.csv or a .jsonl manifest")
    rows = _read_csv(path) if path.suffix == ".csv" else _read_jsonl(path)
    text_columns = TEXT_COLUMNS if text_column is None else (text_column,)
    examples = []
    for line, row in rows:
        where = f"{path}:{line}"
        audio = row[_pick_column(row, AUDIO_COLUMNS, "audio file", where, f"fix {path.name}")]
        if isinstance(audio, dict):  # {"path": ...}, as some manifests write it
            audio = audio.get("path")
        text = row[_pick_column(row, text_columns, "transcript", where, f"fix {path.name} or pass text_column=")]
        language = next((_text(row[c]) for c in LANGUAGE_COLUMNS if _text(row.get(c))), None)
        audio_path = str(path.parent / str(audio)) if audio else ""
        examples.append(Example(audio_path, _text(text), language, where))
    if not examples:
        raise ValueError(f"{path} has no rows; add one row per audio file")
    return examples


def _pick_column(keys: Iterable[str], candidates: Sequence[str], what: str, where: str, fix: str) -> str:
    keys = list(keys)
    for name in candidates:
        if name in keys:
            return name
    found = ", ".join(str(k) for k in keys) or "none"  # csv puts surplus fields under None
    raise ValueError(f"{where}: no {what} column; expected one of {', '.join(candidates)}, found {found}; {fix}")


def _text(value) -> str:
    return "" if value is None else str(value)


def _read_csv(path: Path) -> List[Tuple[int, dict]]:
    # surrogateescape: a row with bytes that are not UTF-8 is dropped later (label_tokens), not the whole file.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        return [(reader.line_num, row) for row in reader]


def _read_jsonl(path: Path) -> List[Tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:  # see _read_csv
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                message = f"{path}:{line_number}: invalid JSON ({e.msg}); write one object per line"
                raise ValueError(message) from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_number, row))
    return rows


# ---------------------------------------------------------------- Hugging Face Hub


def load_hf_dataset(name, config: Optional[str] = None, split: str = "train", *, text_column: Optional[str] = None,
                    audio_column: Optional[str] = None, streaming: bool = False):
    """Examples of a Hub dataset split: a list, or a lazy, re-iterable `HubExamples` when `streaming`.

    `name` is a Hub id or an already-loaded `datasets.Dataset`/`IterableDataset`. Audio is never
    decoded by `datasets` (Audio(decode=False)): rows keep the encoded bytes for `load_audio`.
    """
    import datasets

    label = f"{name}/{split}" if isinstance(name, str) else f"dataset/{split}"
    dataset = name
    if isinstance(name, str):
        try:
            dataset = datasets.load_dataset(name, config, split=split, streaming=streaming)
        except Exception as e:
            raise DatasetLoadError(
                f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): {e}. "
                "Check the dataset name, config and split, your network connection, and HF_TOKEN (gated datasets)."
            ) from e
    audio_column = "audio" if audio_column is None else audio_column
    columns = dataset.column_names
    if columns is not None and audio_column not in columns:
        found = ", ".join(columns)
        raise ValueError(f"{label}: no audio column {audio_column!r} (columns: {found}); pass audio_column=")
    dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
    if columns is None:  # some streamed datasets only know their columns once read
        columns = list(next(iter(dataset)))
    text_columns = TEXT_COLUMNS if text_column is None else (text_column,)
    text_column = _pick_column(columns, text_columns, "transcript", label, "pass text_column=")
    language_column = next((c for c in LANGUAGE_COLUMNS if c in columns), None)
    stream = HubExamples(dataset, label, audio_column, text_column, language_column)
    return stream if streaming else list(stream)


@dataclass
class HubExamples:
    """A Hub dataset read lazily as Examples; each iteration reads it again."""

    dataset: object
    label: str
    audio_column: str
    text_column: str
    language_column: Optional[str]

    def __iter__(self) -> Iterator[Example]:
        for index, row in enumerate(self.dataset):
            audio = row[self.audio_column]  # {"bytes": ..., "path": ...} with Audio(decode=False)
            if isinstance(audio, dict):
                audio = audio.get("bytes") or audio.get("path")
            text, language = row[self.text_column], row.get(self.language_column)
            yield Example(audio or "", _text(text), _text(language) or None, f"{self.label}:{index}")

    def shuffled(self, seed: int, epoch: int = 0, buffer_size: int = 1000) -> "HubExamples":
        """The same examples in an order drawn from (seed, epoch); a streamed dataset is shuffled
        through a buffer of `buffer_size` rows (and its shards)."""
        if not hasattr(self.dataset, "set_epoch"):  # a map-style Dataset shuffles all at once
            epoch_seed = int(np.random.default_rng([seed, epoch]).integers(2**31))
            return replace(self, dataset=self.dataset.shuffle(seed=epoch_seed))
        dataset = self.dataset.shuffle(seed=seed, buffer_size=buffer_size)
        dataset.set_epoch(epoch)
        return replace(self, dataset=dataset)


# ---------------------------------------------------------------- features


def prepare_examples(examples: Iterable[Example], tokenizer: Tokenizer, n_mels: int,
                     default_language: Optional[str], max_label_tokens: int = MAX_LABEL_TOKENS,
                     verbose: bool = True) -> Tuple[List[Features], DropReport]:
    """Log-mel features and label tokens of every usable example, and a report of the others.

    Dropped: empty or non-UTF-8 transcripts, unknown languages, labels over `max_label_tokens`, audio over
    30 s, and missing or unreadable audio files (each reported; loading carries on).
    `verbose=False` hides the progress bar and the messages (distributed ranks other than 0).
    """
    report = DropReport()
    total = len(examples) if hasattr(examples, "__len__") else None
    progress = tqdm(examples, total=total, desc="Preparing audio", unit="clip", leave=False, disable=not verbose)
    features = list(iter_features(progress, tokenizer, n_mels, default_language, report, max_label_tokens, verbose))
    return features, report


def iter_features(examples: Iterable[Example], tokenizer: Tokenizer, n_mels: int, default_language: Optional[str],
                  report: DropReport, max_label_tokens: int = MAX_LABEL_TOKENS,
                  verbose: bool = True) -> Iterator[Features]:
    """Features of each usable example, lazily; drops are counted in `report` (and the first
    unreadable files printed, when `verbose`)."""
    printed = 0 if verbose else MAX_PRINTED_PROBLEMS
    for example in examples:
        report.total += 1
        try:
            labels = label_tokens(tokenizer, example.text, example.language or default_language, max_label_tokens)
            mel = _mel_features(example.audio, n_mels)
        except DroppedExample as dropped:
            report.drop(dropped.reason, example.source, dropped.detail)
            if dropped.reason == "unreadable audio" and printed < MAX_PRINTED_PROBLEMS:
                printed += 1
                tqdm.write(f"Skipping {example.source}: {dropped.detail}")
            continue
        report.kept += 1
        yield Features(mel, labels, example.source)


def label_tokens(tokenizer: Tokenizer, text: str, language: Optional[str],
                 max_label_tokens: int = MAX_LABEL_TOKENS) -> np.ndarray:
    """[sot, language, transcribe, notimestamps] + tokens of " text" + [eot] (English-only models: no
    language or task token). Raises DroppedExample when the example cannot be used."""
    text = text.strip()
    if not text:
        raise DroppedExample("empty transcript")
    undecodable = next((c for c in text if "\udc80" <= c <= "\udcff"), None)  # kept by surrogateescape
    if undecodable is not None:
        raise DroppedExample("non-UTF-8 text", f"byte 0x{ord(undecodable) - 0xdc00:02x} is not UTF-8; "
                                               f"save the manifest as UTF-8")
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


def _mel_features(audio: Union[str, bytes], n_mels: int) -> np.ndarray:
    try:
        samples = load_audio(audio)
    except Exception as e:  # decoders raise many types; the message names the file
        raise DroppedExample("unreadable audio", str(e)) from None
    if len(samples) > N_SAMPLES:
        raise DroppedExample("audio longer than 30 s", f"{len(samples) / SAMPLE_RATE:.1f} s")
    # Pad the audio (not the mel) to 30 s, so the padding is silence as Whisper saw in training.
    mel = log_mel_spectrogram(pad_or_trim(samples, N_SAMPLES), n_mels)
    return pad_or_trim(mel, N_FRAMES, axis=0).astype(np.float16)  # (N_FRAMES, n_mels)


# ---------------------------------------------------------------- batching


def epoch_batches(lengths: Sequence[int], batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                  drop_last: bool = False, sort_window: Optional[int] = None) -> List[np.ndarray]:
    """The global batches of one epoch as index arrays: a pure function of its arguments.

    With `sort_window`, each run of `sort_window` batches is sorted by label length before it is
    cut into batches (less padding); the batches are then shuffled as a whole when `shuffle`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if drop_last:
        order = order[: len(order) - len(order) % batch_size]
    if sort_window is not None:
        lengths, window = np.asarray(lengths), sort_window * batch_size
        chunks = [order[i : i + window] for i in range(0, len(order), window)]
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in chunks] or [order])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle and sort_window is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def iterate_batches(features: Sequence[Features], batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                    start_batch: int = 0, drop_last: bool = False, sort_window: Optional[int] = None,
                    pad_to_multiple: int = 8, pad_id: Optional[int] = None, rank: int = 0,
                    world_size: int = 1) -> Iterator[Batch]:
    """Padded batches of one epoch in an order fixed by (seed, epoch); `start_batch` skips ahead.

    `batch_size` is the global batch: with `world_size` > 1 each rank gets its slice of it.
    """
    _check_world(batch_size, rank, world_size)
    lengths = [len(f.labels) for f in features]
    order = epoch_batches(lengths, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last,
                          sort_window=sort_window)
    for indices in order[start_batch:]:
        yield _rank_slice([features[i] for i in indices], rank, world_size, pad_to_multiple, pad_id)


def training_batches(features: Sequence[Features], batch_size: int, *, seed: int, start_step: int = 0,
                     drop_last: bool = True, **kwargs) -> Iterator[Tuple[int, Batch]]:
    """Endless shuffled (step, batch) pairs, epoch after epoch, from `start_step` on (for resuming).

    Step s is batch s % per_epoch of epoch s // per_epoch, so a resumed run sees the same data.
    `kwargs` go to `iterate_batches`.
    """
    per_epoch = len(features) // batch_size if drop_last else -(-len(features) // batch_size)
    if per_epoch == 0:
        n = len(features)
        raise ValueError(f"{n} training examples cannot fill one batch of {batch_size}; lower --batch-size")
    step = start_step
    while True:
        epoch, start = divmod(step, per_epoch)
        for batch in iterate_batches(features, batch_size, shuffle=True, seed=seed, epoch=epoch, start_batch=start,
                                     drop_last=drop_last, **kwargs):
            yield step, batch
            step += 1


def collate(features: Sequence[Features], *, pad_to_multiple: int = 8, pad_id: Optional[int] = None,
            masked: bool = False) -> Batch:
    """Stack mels; pad inputs/targets to the longest row, rounded up to `pad_to_multiple`.

    `pad_id` defaults to the end-of-text token every label sequence ends with; padding is
    masked out, so its value never reaches the loss. `masked` zeroes the whole mask.
    """
    longest = max(len(f.labels) for f in features) - 1
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    if longest <= MAX_LABEL_TOKENS < width:  # never pad past the decoder's context
        width = MAX_LABEL_TOKENS
    pad_id = int(features[0].labels[-1]) if pad_id is None else pad_id
    inputs = np.full((len(features), width), pad_id, dtype=np.int32)
    targets = np.full((len(features), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(features), width), dtype=np.float32)
    for row, f in enumerate(features):
        n = len(f.labels) - 1
        inputs[row, :n], targets[row, :n], mask[row, :n] = f.labels[:-1], f.labels[1:], 0.0 if masked else 1.0
    mel = mx.array(np.stack([f.mel for f in features])).astype(mx.float32)  # (B, N_FRAMES, n_mels)
    sources = [f.source for f in features]
    return Batch(mel, mx.array(inputs), mx.array(targets), mx.array(mask), int(mask.sum()), sources)


def _check_world(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size % world_size != 0 or not 0 <= rank < world_size:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by world_size ({world_size}), "
                         f"and rank ({rank}) below it")


def _rank_slice(global_batch: List[Features], rank: int, world_size: int, pad_to_multiple: int, pad_id) -> Batch:
    """This rank's part of a global batch. A rank left with nothing (a short last batch) gets a
    fully masked row, so every rank still runs the same number of steps."""
    part = np.array_split(np.arange(len(global_batch)), world_size)[rank]
    if len(part) == 0:
        return collate(global_batch[:1], pad_to_multiple=pad_to_multiple, pad_id=pad_id, masked=True)
    return collate([global_batch[i] for i in part], pad_to_multiple=pad_to_multiple, pad_id=pad_id)


# ---------------------------------------------------------------- streaming


def stream_batches(examples: Iterable[Example], tokenizer: Tokenizer, n_mels: int, default_language: Optional[str],
                   batch_size: int, *, report: Optional[DropReport] = None, pad_to_multiple: int = 8,
                   rank: int = 0, world_size: int = 1,
                   max_label_tokens: int = MAX_LABEL_TOKENS) -> Iterator[Batch]:
    """Batches computed on the fly from a stream of examples, in stream order (shuffle a Hub stream
    with `HubExamples.shuffled`). Every rank reads the whole stream and takes its slice of each
    global batch; a short last batch is kept. Drops are counted in `report`.
    """
    _check_world(batch_size, rank, world_size)
    report = DropReport() if report is None else report
    pending: List[Features] = []
    for feature in iter_features(examples, tokenizer, n_mels, default_language, report, max_label_tokens,
                                 verbose=rank == 0):
        pending.append(feature)
        if len(pending) == batch_size:
            yield _rank_slice(pending, rank, world_size, pad_to_multiple, None)
            pending = []
    if pending:
        yield _rank_slice(pending, rank, world_size, pad_to_multiple, None)
