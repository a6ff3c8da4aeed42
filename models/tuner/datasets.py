"""Speech datasets for fine-tuning: local folders (audiofolder CSV or JSONL) and the Hugging Face Hub.

Every source is read into `Example`s (audio path or bytes, text, language, where it came
from); models/tuner/batches.py turns them into features, labels and batches.
"""

import csv
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .labels import check_segments

TEXT_COLUMNS = ("sentence", "text", "transcription", "normalized_text")
AUDIO_COLUMNS = ("file_name", "audio", "path")
LANGUAGE_COLUMNS = ("language", "locale")
GROUP_COLUMNS = ("speaker_id", "speaker", "client_id", "recording_id", "recording")  # prompts stay within one
SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "valid", "dev", "eval"), "test": ("test",)}


@dataclass
class Example:
    audio: Union[str, bytes]  # a file path or the encoded file's bytes
    text: str
    language: Optional[str]
    source: str  # "file:row", for messages
    segments: Optional[List[dict]] = None  # [{start, end, text}] of a recording longer than 30 s (JSONL)
    group: Optional[str] = None  # speaker or recording


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
        dropped = f"dropped {self.dropped}: {reasons}"
        return dropped if self.total == 0 else f"{summary}; {dropped}"  # total 0: drops found while loading


class DatasetLoadError(RuntimeError):
    """A Hub dataset could not be reached or found; the message says what to check."""


# ---------------------------------------------------------------- local folders


def load_local_dataset(
    data_dir: Union[str, Path], *, val_fraction: float = 0.1, seed: int = 0, text_column: Optional[str] = None
) -> Dict[str, List[Example]]:
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


def split_examples(examples: Sequence[Example], val_fraction: float, seed: int) -> Tuple[List[Example], List[Example]]:
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
    comes from a language or locale column when there is one, the speaker or recording from
    one of GROUP_COLUMNS. A JSONL row may give `segments` ([{start, end, text}] in seconds)
    instead of a transcript: a recording of any length, cut into 30 s windows for training.
    """
    path = Path(path)
    if path.is_dir():
        path = find_manifest(path) or path / "metadata.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write a metadata.csv or a .jsonl manifest")
    rows = _read_csv(path) if path.suffix == ".csv" else read_jsonl(path)
    text_columns = TEXT_COLUMNS if text_column is None else (text_column,)
    examples = []
    for line, row in rows:
        where = f"{path}:{line}"
        audio = row[_pick_column(row, AUDIO_COLUMNS, "audio file", where, f"fix {path.name}")]
        if isinstance(audio, dict):  # {"path": ...}, as some manifests write it
            audio = audio.get("path")
        segments = check_segments(row["segments"], where) if row.get("segments") is not None else None
        fix = f"fix {path.name} or pass text_column="
        text = "" if segments else row[_pick_column(row, text_columns, "transcript", where, fix)]
        language = next((_text(row[c]) for c in LANGUAGE_COLUMNS if _text(row.get(c))), None)
        group = next((_text(row[c]) for c in GROUP_COLUMNS if _text(row.get(c))), None)
        audio_path = str(path.parent / str(audio)) if audio else ""
        examples.append(Example(audio_path, _text(text), language, where, segments, group))
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
        rows, previous = [], 1
        for row in reader:
            start, previous = previous + 1, reader.line_num
            if any("\n" in str(v) or "\r" in str(v) for v in row.values()):
                raise ValueError(
                    f"{path}:{start}: a quoted field runs on to line {reader.line_num} (an unbalanced "
                    f"quote?); a row is one line: fix the quotes in {path.name}"
                )
            rows.append((start, row))
        return rows


def read_jsonl(path: Path, cut_last_line_ok: bool = False) -> List[Tuple[int, dict]]:
    """(line number, object) of each non-empty line; a bad line is an error naming it.

    `cut_last_line_ok`: a last line that is not valid JSON (a write cut short by a killed run) is left out.
    """
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:  # see _read_csv
        lines = f.read().splitlines()
    rows = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if cut_last_line_ok and line_number == len(lines):
                break
            raise ValueError(f"{path}:{line_number}: invalid JSON ({e.msg}); write one object per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
        rows.append((line_number, row))
    return rows


# ---------------------------------------------------------------- Hugging Face Hub


def load_hf_dataset(
    name,
    config: Optional[str] = None,
    split: str = "train",
    *,
    text_column: Optional[str] = None,
    audio_column: Optional[str] = None,
    streaming: bool = False,
):
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
