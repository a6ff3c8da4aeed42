"""Write a transcription result to txt, srt, vtt, tsv and json files.

A result is what `transcribe()` returns:
    {"text": str, "language": str,
     "segments": [{"id", "start", "end", "text", "tokens", "avg_logprob", "no_speech_prob",
                   "compression_ratio", "temperature", "words": optional [{"word", "start",
                   "end", "probability"}]}]}
Times are in seconds. Each format has a `format_<fmt>(result) -> str`; `write_result` writes
the files the user keeps, atomically and always inside `output_dir`.
"""

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..atomic import write_text_atomic

SUPPORTED_FORMATS = ("txt", "srt", "vtt", "tsv", "json")
FORMAT_CHOICES = SUPPORTED_FORMATS + ("all",)  # what --output-format takes


def format_timestamp(seconds: float, decimal_marker: str = ".") -> str:
    """HH:MM:SS.mmm (or HH:MM:SS,mmm for srt), rounded to the millisecond."""
    if seconds < 0:
        raise ValueError(f"negative timestamp {seconds}")
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _cue_text(text: str) -> str:
    """Segment text safe inside an srt/vtt cue: no blank lines, no '-->' arrows."""
    lines = (line.strip() for line in text.replace("-->", "->").splitlines())
    return "\n".join(line for line in lines if line)


def _cues(result: dict) -> Iterable[tuple[float, float, str]]:
    for seg in result["segments"]:
        text = _cue_text(seg["text"])
        if text:  # an empty cue would end the block early and break srt/vtt parsers
            yield seg["start"], seg["end"], text


def format_txt(result: dict) -> str:
    """One line per segment."""
    return "".join(seg["text"].strip() + "\n" for seg in result["segments"])


def format_srt(result: dict) -> str:
    """SubRip: numbered cues with HH:MM:SS,mmm times."""
    blocks = []
    for i, (start, end, text) in enumerate(_cues(result), start=1):
        times = f"{format_timestamp(start, ',')} --> {format_timestamp(end, ',')}"
        blocks.append(f"{i}\n{times}\n{text}\n")
    return "\n".join(blocks)


def format_vtt(result: dict) -> str:
    """WebVTT: a header, then cues with HH:MM:SS.mmm times."""
    blocks = ["WEBVTT\n"]
    for start, end, text in _cues(result):
        blocks.append(f"{format_timestamp(start)} --> {format_timestamp(end)}\n{text}\n")
    return "\n".join(blocks)


def format_tsv(result: dict) -> str:
    """Tab-separated start and end in integer milliseconds, then text (tabs become spaces)."""
    rows = ["start\tend\ttext"]
    for seg in result["segments"]:
        text = " ".join(seg["text"].split())
        rows.append(f"{round(seg['start'] * 1000)}\t{round(seg['end'] * 1000)}\t{text}")
    return "\n".join(rows) + "\n"


def format_json(result: dict) -> str:
    """The whole result, UTF-8 (not escaped), one JSON document."""
    return json.dumps(result, ensure_ascii=False) + "\n"


FORMATTERS = {"txt": format_txt, "srt": format_srt, "vtt": format_vtt, "tsv": format_tsv, "json": format_json}


def expand_formats(formats: Iterable[str]) -> list[str]:
    """Validate format names; "all" means every supported format. Keeps order, drops repeats."""
    out: list[str] = []
    for fmt in formats:
        names = SUPPORTED_FORMATS if fmt == "all" else (fmt,)
        for name in names:
            if name not in FORMATTERS:
                raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(FORMAT_CHOICES)}")
            if name not in out:
                out.append(name)
    return out


def output_stem(input_path: str | os.PathLike) -> str:
    """The input's file name without its extension, reduced to a plain file name.

    Directory parts (either slash) are dropped, so '../../evil.wav' and '/etc/evil.wav'
    both give 'evil'; names that are empty or only dots are rejected.
    """
    name = str(input_path).replace("\\", "/").rstrip("/").split("/")[-1]
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    stem = stem.replace("\0", "")
    if stem.strip(".") == "":
        raise ValueError(f"cannot name output files after {str(input_path)!r}: its file name is empty or only dots")
    return stem


def write_result(
    result: dict, output_dir: str | os.PathLike, input_path: str | os.PathLike, formats: Iterable[str]
) -> list[Path]:
    """Write `result` as `<output_dir>/<stem of input_path>.<fmt>` for each format.

    Creates `output_dir` if needed and returns the paths written.
    """
    stem = output_stem(input_path)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in expand_formats(formats):
        path = out_dir / f"{stem}.{fmt}"
        assert path.parent == out_dir and path.name == f"{stem}.{fmt}", path
        write_text_atomic(path, FORMATTERS[fmt](result))
        written.append(path)
    return written
