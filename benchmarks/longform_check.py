"""Check long-form transcription (with or without a LoRA adapter) on a recording built from short clips.

    python benchmarks/longform_check.py --data ../shared/data/te/validation \\
        --model ../shared/models/whisper-base-mlx --adapter-path runs/te/best --min-seconds 120

The clips of --data (an audiofolder: metadata.csv with file_name,transcription,language) are
joined in manifest order with --gap seconds of digital silence between them, going round the
list again as often as needed, until the recording lasts --min-seconds. It is written as
longform.wav and transcribed with the library's default options and word timestamps; srt, vtt
and json are written beside it. Then:

- segments_monotonic: start <= end, starts never go back, no overlap beyond 0.02 s;
- coverage: speech starts within 2 s of the first clip, ends within 3 s of the audio's end,
  and every clip is overlapped by some segment;
- srt, vtt: the written files parse back strictly, one cue per segment;
- word_timestamps: 0 <= start <= end <= duration for every word;
- cer: the CER of the whole transcript against the joined references is at most --max-cer-gap
  points above the CER of the same model transcribing each clip alone with the same options.

The summary prints as one JSON object (also written to --output-dir/longform_check.json);
the exit status is 0 when every check passes, 1 otherwise.
"""

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

import common  # noqa: F401  (puts the repository on sys.path)
import utils
from models.audio import SAMPLE_RATE
from utils import number

MAX_OVERLAP = 0.02  # seconds a segment may start before the previous one ends (one timestamp step)
FIRST_START_SLACK = 2.0  # seconds after the first clip's start within which the first segment must start
LAST_END_SLACK = 3.0  # seconds before the audio's end within which the last segment must end
MAX_LISTED = 20  # offending values listed per check; the count says how many there were
AUDIO_NAME = "longform.wav"


# --- The recording -----------------------------------------------------------------------------


def join_clips(
    clips: Sequence[np.ndarray], gap: float = 0.5, min_seconds: float = 120.0
) -> Tuple[np.ndarray, List[Tuple[int, float, float]]]:
    """Join 16 kHz clips with `gap` seconds of zeros between them, in order and going round the
    list again, until the audio lasts at least `min_seconds` (at least one clip).

    Returns the audio and (clip index, start, end) in seconds of each clip placed in it.
    """
    if len(clips) == 0 or any(len(c) == 0 for c in clips):
        raise ValueError("join_clips needs at least one clip, and no empty ones")
    silence = np.zeros(round(gap * SAMPLE_RATE), np.float32)
    parts, spans, n_samples = [], [], 0
    while n_samples < min_seconds * SAMPLE_RATE or not spans:
        index = len(spans) % len(clips)
        if spans:
            parts.append(silence)
            n_samples += len(silence)
        parts.append(np.asarray(clips[index], np.float32))
        spans.append((index, n_samples / SAMPLE_RATE, (n_samples + len(clips[index])) / SAMPLE_RATE))
        n_samples += len(clips[index])
    return np.concatenate(parts), spans


def write_wav(path: Path, audio: np.ndarray) -> None:
    """A 16 kHz mono float WAV (the samples exactly as transcribed clip by clip), written atomically."""
    import soundfile

    from models.atomic import atomic_output

    with atomic_output(path, "wb") as f:
        soundfile.write(f, audio, SAMPLE_RATE, format="WAV", subtype="FLOAT")


# --- Checks on a transcription result ----------------------------------------------------------


def _verdict(problems: List, **values) -> dict:
    return {"passed": not problems, **values, "problems": problems[:MAX_LISTED], "n_problems": len(problems)}


def check_segments(segments: Sequence[dict]) -> dict:
    """Segments in time order: start <= end, each start >= the previous start, and no overlap
    beyond MAX_OVERLAP with the previous segment's end."""
    problems = []
    for i, segment in enumerate(segments):
        start, end = segment["start"], segment["end"]
        if start > end:
            problems.append({"segment": i, "start": start, "end": end, "problem": "starts after it ends"})
        if i == 0:
            continue
        previous = segments[i - 1]
        if start < previous["start"]:
            problems.append(
                {"segment": i, "start": start, "previous_start": previous["start"], "problem": "starts earlier"}
            )
        elif start < previous["end"] - MAX_OVERLAP:
            problems.append(
                {"segment": i, "start": start, "previous_end": previous["end"], "problem": "overlaps the previous"}
            )
    return _verdict(problems, segments=len(segments))


def check_coverage(segments: Sequence[dict], spans: Sequence[Tuple[int, float, float]], duration: float) -> dict:
    """The first segment starts near the first clip, the last ends near the audio's end, and every
    clip (index, start, end) is overlapped by at least one segment."""
    problems = []
    if len(segments) == 0:
        return _verdict(["no segments"], first_start=None, last_end=None, uncovered_clips=[])
    first_start, last_end = segments[0]["start"], segments[-1]["end"]
    if first_start > spans[0][1] + FIRST_START_SLACK:
        problems.append(f"first segment starts at {first_start} s, clip 0 at {spans[0][1]:.3f} s")
    if last_end < duration - LAST_END_SLACK:
        problems.append(f"last segment ends at {last_end} s, the audio at {duration:.3f} s")
    uncovered = [
        {"position": p, "clip": index, "start": round(start, 3), "end": round(end, 3)}
        for p, (index, start, end) in enumerate(spans)
        if not any(s["start"] < end and s["end"] > start for s in segments)
    ]
    if uncovered:
        problems.append(f"{len(uncovered)} clip(s) overlapped by no segment")
    return _verdict(problems, first_start=first_start, last_end=last_end, uncovered_clips=uncovered[:MAX_LISTED])


def check_words(segments: Sequence[dict], duration: float) -> dict:
    """Every word of every segment has 0 <= start <= end <= `duration`."""
    problems, n_words = [], 0
    for i, segment in enumerate(segments):
        if "words" not in segment:
            problems.append({"segment": i, "problem": "no word timestamps"})
            continue
        for word in segment["words"]:
            n_words += 1
            if not 0 <= word["start"] <= word["end"] <= duration:
                problems.append({"segment": i, "word": word["word"], "start": word["start"], "end": word["end"]})
    return _verdict(problems, words=n_words, duration=round(duration, 3))


# --- Strict srt / vtt parsers -----------------------------------------------------------------


def _blocks(text: str) -> List[List[str]]:
    """Groups of lines separated by blank lines."""
    blocks, current = [], []
    for line in text.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    return blocks + ([current] if current else [])


def _timing(line: str, marker: str, where: str) -> Tuple[float, float]:
    stamp = r"(\d{2,}):([0-5]\d):([0-5]\d)" + re.escape(marker) + r"(\d{3})"
    match = re.fullmatch(stamp + " --> " + stamp, line)
    if match is None:
        raise ValueError(f"{where}: expected 'HH:MM:SS{marker}mmm --> HH:MM:SS{marker}mmm', got {line!r}")
    h1, m1, s1, ms1, h2, m2, s2, ms2 = (int(g) for g in match.groups())
    return h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000


def _cues(blocks: List[List[str]], marker: str, numbered: bool) -> List[Tuple[float, float, str]]:
    """(start, end, text) of each cue block; srt blocks start with their number (1, 2, ...)."""
    cues = []
    for n, lines in enumerate(blocks, start=1):
        where = f"cue {n}"
        if numbered:
            if lines[0] != str(n):
                raise ValueError(f"{where}: expected the number {n}, got {lines[0]!r}")
            lines = lines[1:]
        elif "-->" not in lines[0]:
            lines = lines[1:]  # a vtt cue identifier
        if len(lines) < 2:
            raise ValueError(f"{where}: expected a timing line and text, got {len(lines)} line(s)")
        start, end = _timing(lines[0], marker, where)
        if start > end:
            raise ValueError(f"{where}: starts at {start} s, after it ends at {end} s")
        if cues and start < cues[-1][0]:
            raise ValueError(f"{where}: starts at {start} s, before cue {n - 1} at {cues[-1][0]} s")
        cues.append((start, end, "\n".join(lines[1:])))
    return cues


def parse_srt(text: str) -> List[Tuple[float, float, str]]:
    """(start, end, text) of each cue of a SubRip file; a malformed file is a ValueError naming the cue."""
    return _cues(_blocks(text), ",", numbered=True)


def parse_vtt(text: str) -> List[Tuple[float, float, str]]:
    """(start, end, text) of each cue of a WebVTT file; a malformed file is a ValueError naming the cue."""
    header, _, body = text.partition("\n")
    if not re.fullmatch(r"WEBVTT([ \t].*)?", header):
        raise ValueError(f"expected the header 'WEBVTT' on the first line, got {header!r}")
    return _cues(_blocks(body), ".", numbered=False)


def check_subtitles(text: str, parse, n_segments: int) -> dict:
    """`parse` (parse_srt or parse_vtt) reads `text` back, one cue per segment."""
    try:
        cues = parse(text)
    except ValueError as error:
        return _verdict([str(error)], cues=None)
    problems = [] if len(cues) == n_segments else [f"{len(cues)} cues for {n_segments} segments"]
    return _verdict(problems, cues=len(cues))


# --- Error rates ----------------------------------------------------------------------------------


def check_cer(refs: Sequence[str], long_text: str, clip_texts: Sequence[str], max_gap_points: float) -> dict:
    """CER of `long_text` against the joined `refs`, and of `clip_texts` clip by clip, in percent."""
    from models.tuner.metrics import corpus_counts, normalize_text, rates_from_counts

    long_cer = rates_from_counts(corpus_counts([" ".join(refs)], [long_text], normalize_text))[1]
    clip_cer = rates_from_counts(corpus_counts(refs, clip_texts, normalize_text))[1]
    gap = 100 * (long_cer - clip_cer)
    problems = [] if gap <= max_gap_points else [f"long-form CER is {gap:.2f} points above clip by clip"]
    return _verdict(
        problems,
        long_form_cer=round(100 * long_cer, 2),
        clip_by_clip_cer=round(100 * clip_cer, 2),
        gap_points=round(gap, 2),
        max_gap_points=max_gap_points,
    )


# --- The script -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Check long-form transcription on clips joined into one recording.")
    p.add_argument(
        "--data", required=True, help="audiofolder of short clips (metadata.csv: file_name,transcription,language)"
    )
    utils.add_model_flags(p, "default: float16 on a GPU, float32 on the CPU")
    p.add_argument("--adapter-path", default=None, help="folder with LoRA adapters written by lora.py")
    p.add_argument("--language", default=None, help="default: the manifest's language, else detected")
    p.add_argument(
        "--gap", type=number(float, 0), default=0.5, help="seconds of silence between clips (default: %(default)s)"
    )
    p.add_argument(
        "--min-seconds",
        type=number(float, 0),
        default=120.0,
        help="shortest recording to build, in seconds (default: %(default)s)",
    )
    p.add_argument(
        "--max-cer-gap",
        type=number(float, 0),
        default=3.0,
        help="CER points the long-form transcript may lose against clip by clip (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling fallback (default: %(default)s)")
    p.add_argument("--output-dir", default=None, help="where to write the recording and results (default: a temp dir)")
    return p


def load_clips(folder: str, language: Optional[str]):
    """(audio arrays, references, language) of the manifest's clips, in manifest order."""
    from models.audio import load_audio
    from models.tuner.datasets import read_manifest

    examples = read_manifest(folder)
    if language is None:
        languages = {e.language for e in examples}
        language = languages.pop() if len(languages) == 1 else None
    return [load_audio(e.audio) for e in examples], [e.text for e in examples], language


def load(args):
    from models.backend import compute_dtype
    from models.loading import load_model
    from models.tuner.adapters import load_adapters

    model = load_model(args.model, dtype=compute_dtype(args.dtype, training=False))
    if args.adapter_path is not None:
        model = load_adapters(model, Path(args.adapter_path))
    return model


def transcribe_clips(model, options, clips: Sequence[np.ndarray]) -> List[str]:
    from tqdm import tqdm

    from models.inference.transcribe import Transcriber

    return [Transcriber(model, options).run(c)["text"] for c in tqdm(clips, unit="clip", file=sys.stderr)]


def output_folder(args) -> Path:
    from models.outputs import check_not_an_input

    if args.output_dir is None:
        return Path(tempfile.mkdtemp(prefix="longform_check."))
    inputs = {"--data": args.data, "--model": args.model, "--adapter-path": args.adapter_path}
    check_not_an_input("--output-dir", args.output_dir, inputs)
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_checks(result, spans, duration, refs, clip_texts, srt_text, vtt_text, max_cer_gap) -> dict:
    """Every check of one long-form `result`; `refs` and `clip_texts` follow `spans` (repeats included)."""
    segments = result["segments"]
    return {
        "segments_monotonic": check_segments(segments),
        "coverage": check_coverage(segments, spans, duration),
        "srt": check_subtitles(srt_text, parse_srt, len(segments)),
        "vtt": check_subtitles(vtt_text, parse_vtt, len(segments)),
        "word_timestamps": check_words(segments, duration),
        "cer": check_cer(refs, result["text"], clip_texts, max_cer_gap),
    }


def run(args) -> int:
    from models.atomic import write_json_atomic
    from models.inference.options import TranscribeOptions
    from models.inference.transcribe import Transcriber
    from models.inference.writers import write_result

    folder = output_folder(args)
    clips, texts, language = load_clips(args.data, args.language)
    audio, spans = join_clips(clips, args.gap, args.min_seconds)
    duration = len(audio) / SAMPLE_RATE
    wav = folder / AUDIO_NAME
    write_wav(wav, audio)
    print(
        f"{len(spans)} clips ({min(len(spans), len(clips))} distinct) joined into {duration:.1f} s: {wav}",
        file=sys.stderr,
    )
    model = load(args)
    mx.random.seed(args.seed)
    options = TranscribeOptions(language=language, word_timestamps=True)
    result = Transcriber(model, options).run(wav, progress=True)
    srt_path, vtt_path, _ = write_result(result, folder, AUDIO_NAME, ["srt", "vtt", "json"])
    alone = transcribe_clips(model, options, clips[: len(spans)])  # each clip once; repeats reuse its text
    refs, clip_texts = [texts[i] for i, _, _ in spans], [alone[i] for i, _, _ in spans]
    srt_text, vtt_text = srt_path.read_text(encoding="utf-8"), vtt_path.read_text(encoding="utf-8")
    checks = run_checks(result, spans, duration, refs, clip_texts, srt_text, vtt_text, args.max_cer_gap)
    summary = {
        "passed": all(c["passed"] for c in checks.values()),
        "failed": [name for name, c in checks.items() if not c["passed"]],
        "model": args.model,
        "adapter_path": args.adapter_path,
        "language": result["language"],
        "audio": {
            "path": str(wav),
            "duration_s": round(duration, 3),
            "clips": len(spans),
            "distinct_clips": min(len(spans), len(clips)),
        },
        "segments": len(result["segments"]),
        # above 0: a window failed the compression or log-prob threshold and was sampled again
        "max_temperature": max((s["temperature"] for s in result["segments"]), default=None),
        "checks": checks,
    }
    write_json_atomic(folder / "longform_check.json", summary)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0 if summary["passed"] else 1


def main(argv: Optional[List[str]] = None) -> int:
    utils.start_cli()
    args = build_parser().parse_args(argv)
    return utils.report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
