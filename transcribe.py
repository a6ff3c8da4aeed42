"""Transcribe audio files with Whisper (optionally with LoRA adapters) and write txt/srt/vtt/tsv/json.

    python transcribe.py talk.mp3 recordings/ "clips/*.flac" --model mlx-community/whisper-tiny \
        --language en --output-format srt,vtt --output-dir out/

Each input file gets its own set of output files, named after it. A file that cannot be
transcribed is reported and skipped; the exit status is non-zero if any file failed.
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import utils
from models.inference.options import default
from models.inference.writers import FORMAT_CHOICES


def _bool(value: str) -> bool:
    if value.strip().lower() in ("true", "1", "yes"):
        return True
    if value.strip().lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _optional_float(value: str) -> Optional[float]:
    return None if value.strip().lower() == "none" else float(value)


def _formats(value: str) -> List[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in FORMAT_CHOICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown output format {value!r}; choose from {', '.join(FORMAT_CHOICES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Transcribe audio with Whisper (MLX).")
    p.add_argument("inputs", nargs="+", help="audio files, folders (searched recursively) or glob patterns")
    utils.add_model_flags(p, "default: float16 on a GPU, float32 on the CPU")
    p.add_argument("--adapter-path", default=None, help="folder with LoRA adapters written by lora.py")
    p.add_argument("--language", default=None, help="language code or name; detected when not given")
    p.add_argument("--task", choices=("transcribe", "translate"), default=default("task"))
    p.add_argument("--beam-size", type=int, default=default("beam_size"), help="beam search width at temperature 0")
    p.add_argument("--best-of", type=int, default=default("best_of"), help="samples to pick from at temperature > 0")
    p.add_argument("--patience", type=float, default=default("patience"), help="beam search patience")
    p.add_argument(
        "--length-penalty", type=float, default=default("length_penalty"), help="0..1; default: divide by length"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="first sampling temperature, 0..1")
    p.add_argument(
        "--temperature-increment-on-fallback",
        type=_optional_float,
        default=0.2,
        help="raise the temperature by this up to 1.0 when a window fails the thresholds; none: never",
    )
    for name in ("compression_ratio_threshold", "logprob_threshold", "no_speech_threshold"):
        p.add_argument("--" + name.replace("_", "-"), type=_optional_float, default=default(name))
    p.add_argument("--initial-prompt", default=None, help="text to condition the first window on")
    p.add_argument(
        "--condition-on-previous-text",
        type=_bool,
        default=default("condition_on_previous_text"),
        metavar="{True,False}",
    )
    p.add_argument("--word-timestamps", action="store_true", help="time every word (json output)")
    p.add_argument("--without-timestamps", action="store_true", help="decode 30 s windows without timestamps")
    p.add_argument(
        "--output-format",
        type=_formats,
        default=["txt"],
        help=f"comma-separated, from {', '.join(FORMAT_CHOICES)} (default: txt)",
    )
    p.add_argument("--output-dir", default=".", help="where to write the output files")
    p.add_argument("--verbose", action="store_true", help="print each segment as it is decoded")
    return p


def options_from_args(args: argparse.Namespace):
    from models.inference.options import TranscribeOptions, temperature_schedule

    return TranscribeOptions(
        language=args.language,
        task=args.task,
        temperature=temperature_schedule(args.temperature, args.temperature_increment_on_fallback),
        compression_ratio_threshold=args.compression_ratio_threshold,
        logprob_threshold=args.logprob_threshold,
        no_speech_threshold=args.no_speech_threshold,
        condition_on_previous_text=args.condition_on_previous_text,
        initial_prompt=args.initial_prompt,
        word_timestamps=args.word_timestamps,
        beam_size=args.beam_size,
        best_of=args.best_of,
        patience=args.patience,
        length_penalty=args.length_penalty,
        without_timestamps=args.without_timestamps,
        verbose=args.verbose,
    )


def load(model_path: str, adapter_path: Optional[str], dtype_name: Optional[str]):
    from models.backend import compute_dtype
    from models.loading import load_model
    from models.tuner.adapters import load_adapters

    model = load_model(model_path, dtype=compute_dtype(dtype_name, training=False))
    if adapter_path is not None:
        model = load_adapters(model, Path(adapter_path))
    return model


def _output_name(path: Path, used: set) -> str:
    """The file name to name outputs after; a stem already used gets a -2, -3, ... suffix."""
    stem, n = path.stem, 2
    name = stem
    while name in used:
        name, n = f"{stem}-{n}", n + 1
    used.add(name)
    return name + path.suffix


def transcribe_files(model, files: List[Path], options, output_dir: str, formats: List[str]) -> List[Tuple[str, str]]:
    """Transcribe and write each file; return (file, reason) for those that failed."""
    from tqdm import tqdm

    from models.inference.transcribe import Transcriber
    from models.inference.writers import write_result

    failures, used = [], set()
    bar = tqdm(files, unit="file", disable=len(files) < 2, file=sys.stderr)
    for path in bar:
        name = _output_name(path, used)
        try:
            result = Transcriber(model, options).run(path, progress=len(files) == 1 and not options.verbose)
            write_result(result, output_dir, name, formats)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # any one bad file must not stop the others
            failures.append((str(path), f"{type(error).__name__}: {error}"))
            bar.write(f"error: {path}: {error}", file=sys.stderr)
            continue
        bar.write(result["text"] if len(files) == 1 else f"{path}: {result['text']}")
    return failures


def main(argv: Optional[List[str]] = None) -> int:
    utils.start_cli()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    files, missing = utils.find_inputs(args.inputs)
    for item, reason in missing:
        print(f"error: {item}: {reason}", file=sys.stderr)
    failed = []
    if files:
        try:
            model = load(args.model, args.adapter_path, args.dtype)
        except (ValueError, OSError) as error:
            print(f"error: could not load the model: {error}", file=sys.stderr)
            return 2
        failed = transcribe_files(model, files, options, args.output_dir, args.output_format)
    if missing or failed:
        print(
            f"\nTranscribed {len(files) - len(failed)} of {len(files)} file(s); "
            f"{len(failed)} failed, {len(missing)} input(s) not found:",
            file=sys.stderr,
        )
        for item, reason in missing + failed:
            print(f"  {item}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
