"""Transcribe audio files with Whisper (optionally with LoRA adapters) and write txt/srt/vtt/tsv/json.

    python transcribe.py talk.mp3 recordings/ "clips/*.flac" --model mlx-community/whisper-tiny \
        --language en --output-format srt,vtt --output-dir out/

Each input file gets its own set of output files, named after it. A file that cannot be
transcribed is reported and skipped; the exit status is non-zero if any file failed.
"""

import argparse
import glob
import sys
from pathlib import Path
from typing import List, Optional, Tuple

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".mp4", ".aac")
OUTPUT_FORMATS = ("txt", "srt", "vtt", "tsv", "json", "all")


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
    unknown = [n for n in names if n not in OUTPUT_FORMATS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown output format {value!r}; choose from {', '.join(OUTPUT_FORMATS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Transcribe audio with Whisper (MLX).")
    p.add_argument("inputs", nargs="+", help="audio files, folders (searched recursively) or glob patterns")
    p.add_argument("--model", default="mlx-community/whisper-tiny", help="model folder or Hugging Face repo id")
    p.add_argument("--adapter-path", default=None, help="folder with LoRA adapters written by lora.py")
    p.add_argument("--language", default=None, help="language code or name; detected when not given")
    p.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    p.add_argument("--beam-size", type=int, default=None, help="beam search width at temperature 0")
    p.add_argument("--best-of", type=int, default=5, help="samples to pick from at temperature > 0")
    p.add_argument("--patience", type=float, default=None, help="beam search patience")
    p.add_argument("--length-penalty", type=float, default=None, help="0..1; default: divide by length")
    p.add_argument("--temperature", type=float, default=0.0, help="first sampling temperature")
    p.add_argument("--temperature-increment-on-fallback", type=_optional_float, default=0.2,
                   help="raise the temperature by this up to 1.0 when a window fails the thresholds; none: never")
    p.add_argument("--compression-ratio-threshold", type=_optional_float, default=2.4)
    p.add_argument("--logprob-threshold", type=_optional_float, default=-1.0)
    p.add_argument("--no-speech-threshold", type=_optional_float, default=0.6)
    p.add_argument("--initial-prompt", default=None, help="text to condition the first window on")
    p.add_argument("--condition-on-previous-text", type=_bool, default=True, metavar="{True,False}")
    p.add_argument("--word-timestamps", action="store_true", help="time every word (json output)")
    p.add_argument("--without-timestamps", action="store_true", help="decode 30 s windows without timestamps")
    p.add_argument("--output-format", type=_formats, default=["txt"],
                   help=f"comma-separated, from {', '.join(OUTPUT_FORMATS)} (default: txt)")
    p.add_argument("--output-dir", default=".", help="where to write the output files")
    p.add_argument("--dtype", choices=("float16", "float32", "bfloat16"), default=None,
                   help="default: float16 on a GPU, float32 on the CPU")
    p.add_argument("--verbose", action="store_true", help="print each segment as it is decoded")
    return p


def find_inputs(inputs: List[str]) -> Tuple[List[Path], List[Tuple[str, str]]]:
    """Expand files, folders and glob patterns into audio files; also return (input, reason) errors."""
    files, errors = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                errors.append((item, f"folder holds no audio files ({', '.join(AUDIO_EXTENSIONS)})"))
        elif path.is_file():
            found = [path]
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                errors.append((item, "no files match this pattern"))
        else:
            found = []
            errors.append((item, "no such file or folder"))
        files += [f for f in found if f not in files]
    return files, errors


def temperature_schedule(start: float, increment: Optional[float]) -> Tuple[float, ...]:
    """start, start + increment, ... up to 1.0 (only `start` when there is no increment)."""
    if increment is None or increment <= 0:
        return (start,)
    count = int((1.0 - start) / increment + 1e-6) + 1
    return tuple(round(start + i * increment, 6) for i in range(max(count, 1)))


def options_from_args(args: argparse.Namespace):
    from models.transcribe import TranscribeOptions

    return TranscribeOptions(
        language=args.language, task=args.task,
        temperature=temperature_schedule(args.temperature, args.temperature_increment_on_fallback),
        compression_ratio_threshold=args.compression_ratio_threshold, logprob_threshold=args.logprob_threshold,
        no_speech_threshold=args.no_speech_threshold, condition_on_previous_text=args.condition_on_previous_text,
        initial_prompt=args.initial_prompt, word_timestamps=args.word_timestamps, beam_size=args.beam_size,
        best_of=args.best_of, patience=args.patience, length_penalty=args.length_penalty,
        without_timestamps=args.without_timestamps, verbose=args.verbose,
    )


def load(model_path: str, adapter_path: Optional[str], dtype_name: Optional[str]):
    import mlx.core as mx

    import utils

    if dtype_name is None:
        dtype_name = "float16" if mx.default_device() == mx.gpu else "float32"
    model = utils.load_model(model_path, dtype=getattr(mx, dtype_name))
    if adapter_path is not None:
        # Hook for the trainer's adapters: utils.load_adapters turns the model into its LoRA version.
        load_adapters = getattr(utils, "load_adapters", None)
        if load_adapters is None:
            raise NotImplementedError("--adapter-path: utils.load_adapters is not implemented yet")
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

    from models.transcribe import Transcriber
    from models.writers import write_result

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
    try:
        from models.blas import ensure_fast_blas
    except ImportError:
        ensure_fast_blas = None
    if ensure_fast_blas is not None:
        ensure_fast_blas()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    files, missing = find_inputs(args.inputs)
    for item, reason in missing:
        print(f"error: {item}: {reason}", file=sys.stderr)
    failed = []
    if files:
        try:
            model = load(args.model, args.adapter_path, args.dtype)
        except (ValueError, OSError, NotImplementedError) as error:
            print(f"error: could not load the model: {error}", file=sys.stderr)
            return 2
        failed = transcribe_files(model, files, options, args.output_dir, args.output_format)
    if missing or failed:
        print(f"\nTranscribed {len(files) - len(failed)} of {len(files)} file(s); "
              f"{len(failed)} failed, {len(missing)} input(s) not found:", file=sys.stderr)
        for item, reason in missing + failed:
            print(f"  {item}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
