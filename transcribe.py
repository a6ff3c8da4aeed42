"""Transcribe audio files with Whisper (optionally with LoRA adapters) and write txt/srt/vtt/tsv/json.

    python transcribe.py talk.mp3 recordings/ "clips/*.flac" --model mlx-community/whisper-tiny \
        --language en --output-format srt,vtt --output-dir out/

Each input file gets its own set of output files, named after it. A file that cannot be
transcribed is reported and skipped; the exit status is non-zero if any file failed.
--batch-size N decodes the windows of N files together (the same greedy text; meant for a GPU);
--chunked cuts files into independent 30 s windows so that one long file fills a batch.
"""

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

import utils
from models.inference.options import default
from models.inference.writers import FORMAT_CHOICES
from utils import number


def _bool(value: str) -> bool:
    if value.strip().lower() in ("true", "1", "yes"):
        return True
    if value.strip().lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


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
    p.add_argument(
        "--adapter-path",
        default=None,
        help="folder with LoRA adapters written by lora.py, or LANG=FOLDER,LANG=FOLDER: each file gets the "
        "adapters of its given or detected language, other languages the base model",
    )
    p.add_argument("--language", default=None, help="language code or name; detected when not given")
    p.add_argument("--task", choices=("transcribe", "translate"), default=default("task"))
    p.add_argument(
        "--beam-size", type=number(int, 1), default=default("beam_size"), help="beam search width at temperature 0"
    )
    p.add_argument(
        "--best-of", type=number(int, 1), default=default("best_of"), help="samples to pick from at temperature > 0"
    )
    p.add_argument(
        "--patience", type=number(float, 0, low_open=True), default=default("patience"), help="beam search patience"
    )
    p.add_argument(
        "--length-penalty",
        type=number(float, 0, 1),
        default=default("length_penalty"),
        help="0..1; default: divide by length",
    )
    p.add_argument("--temperature", type=number(float, 0, 1), default=0.0, help="first sampling temperature, 0..1")
    p.add_argument(
        "--temperature-increment-on-fallback",
        type=number(float, 0, 1, low_open=True, none=True),
        default=0.2,
        help="raise the temperature by this up to 1.0 when a window fails the thresholds; none: never",
    )
    thresholds = {
        "compression_ratio_threshold": number(float, 0, low_open=True, none=True),
        "logprob_threshold": number(float, high=0, none=True),
        "no_speech_threshold": number(float, 0, 1, none=True),
    }
    for name, kind in thresholds.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default(name))
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
    add_batch_flags(p)
    return p


def add_batch_flags(p: argparse.ArgumentParser) -> None:
    """--batch-size and --chunked: many windows per model call."""
    p.add_argument(
        "--batch-size",
        type=number(int, 1),
        default=1,
        help="decode the 30 s windows of this many files together, one encoder and one decoder call per "
        "round (for a GPU). Each file keeps its own seek, prompt and temperature fallback: greedy decoding "
        "gives the text of --batch-size 1, up to float rounding of the batched model calls. Default 1: one "
        "file after the other",
    )
    p.add_argument(
        "--chunked",
        action="store_true",
        help="cut each file into consecutive fixed 30 s windows decoded independently (no seeking by "
        "timestamps, no previous-text conditioning; the initial prompt goes to every window), so the "
        "windows of one long file can be decoded --batch-size at a time. It trades away the boundaries: "
        "a word spoken across a 30 s cut may be split, garbled or lost, and each window starts without "
        "the text before it. The default seek loop resumes each window at the last complete segment "
        "and conditions on the previous text, which is why it stays the default",
    )


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


def adapter_folders(adapter_path: Optional[str]) -> dict:
    """{flag name: folder} of the --adapter-path value, for the output-path checks."""
    from models.inference.routing import parse_adapter_routes

    if adapter_path is None:
        return {}
    routes = parse_adapter_routes(adapter_path)
    if isinstance(routes, str):
        return {"--adapter-path": routes}
    return {f"--adapter-path {code}=": folder for code, folder in routes.items()}


def load(model_path: str, adapter_path: Optional[str], dtype_name: Optional[str]):
    """A function of (file, options) giving the model and options to transcribe that file with."""
    from dataclasses import replace

    from models.backend import compute_dtype
    from models.inference.routing import AdapterRouter, parse_adapter_routes
    from models.loading import load_model
    from models.tuner.adapters import load_adapters

    model = load_model(model_path, dtype=compute_dtype(dtype_name, training=False))
    routes = None if adapter_path is None else parse_adapter_routes(adapter_path)
    if isinstance(routes, dict):
        router = AdapterRouter(model, routes)

        def routed(path, options):
            chosen, language = router.route(path, options.language)
            return chosen, replace(options, language=language)

        return routed
    if routes is not None:
        model = load_adapters(model, Path(routes))
    return lambda path, options: (model, options)


def _output_name(path: Path, used: set) -> str:
    """The file name to name outputs after; a stem already used gets a -2, -3, ... suffix."""
    stem, n = path.stem, 2
    name = stem
    while name in used:
        name, n = f"{stem}-{n}", n + 1
    used.add(name)
    return name + path.suffix


def check_output_dir(args) -> None:
    """Before transcribing anything: --output-dir is a folder we can write to, and no input folder."""
    from models.outputs import OutputPathError, check_not_an_input

    inputs = {"--model": args.model, **adapter_folders(args.adapter_path)}
    check_not_an_input("--output-dir", args.output_dir, inputs, replaced=False)
    folder = Path(args.output_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"--output-dir {folder} is a file, not a folder; choose another --output-dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputPathError(
            f"--output-dir {folder}: cannot write there ({error.strerror}); choose another --output-dir"
        ) from None


def transcribe_files(pick, files: List[Path], options, output_dir: str, formats: List[str]) -> List[Tuple[str, str]]:
    """Transcribe each file with the model `pick(file, options)` gives, print its text, then write its
    files; return (file, reason) for those that failed."""
    from tqdm import tqdm

    from models.inference.transcribe import Transcriber
    from models.inference.writers import write_result

    failures, used = [], set()
    bar = tqdm(files, unit="file", disable=len(files) < 2, file=sys.stderr)
    for done, path in enumerate(bar):
        name = _output_name(path, used)
        try:
            model, file_options = pick(path, options)
            result = Transcriber(model, file_options).run(path, progress=len(files) == 1 and not options.verbose)
            bar.write(result["text"] if len(files) == 1 else f"{path}: {result['text']}")
            write_result(result, output_dir, name, formats)
        except KeyboardInterrupt:
            bar.write(f"Stopped at {path}: {done - len(failures)} of {len(files)} file(s) done", file=sys.stderr)
            raise
        except SystemExit:
            raise
        except Exception as error:  # any one bad file must not stop the others
            failures.append((str(path), f"{type(error).__name__}: {error}"))
            bar.write(f"error: {path}: {error}", file=sys.stderr)
    return failures


def transcribe_files_batched(
    pick, files: List[Path], options, output_dir: str, formats: List[str], batch_size: int, chunked: bool
) -> List[Tuple[str, str]]:
    """`transcribe_files` with the windows of up to `batch_size` files decoded together (files
    sharing one model: with per-language adapters, one batch run per adapter)."""
    from tqdm import tqdm

    from models.inference.batched import transcribe_many
    from models.inference.writers import write_result

    failures, used = [], set()
    names = {path: _output_name(path, used) for path in files}
    bar = tqdm(total=len(files), unit="file", disable=len(files) < 2, file=sys.stderr)

    def failed(path, error) -> None:
        failures.append((str(path), f"{type(error).__name__}: {error}"))
        bar.write(f"error: {path}: {error}", file=sys.stderr)
        bar.update(1)

    groups = {}  # id(model) -> (model, [(file, language)]): only files of one model share a batch
    for path in files:
        try:
            model, file_options = pick(path, options)
        except Exception as error:  # any one bad file must not stop the others
            failed(path, error)
            continue
        groups.setdefault(id(model), (model, []))[1].append((path, file_options.language))
    done = 0
    try:
        for model, items in groups.values():
            paths, languages = [p for p, _ in items], [language for _, language in items]
            for outcome in transcribe_many(model, paths, options, batch_size, chunked, languages):
                path = paths[outcome.index]
                if outcome.error is not None:
                    failed(path, outcome.error)
                    continue
                try:
                    bar.write(outcome.result["text"] if len(files) == 1 else f"{path}: {outcome.result['text']}")
                    write_result(outcome.result, output_dir, names[path], formats)
                    done += 1
                    bar.update(1)
                except Exception as error:  # an output that cannot be written: the next file still is
                    failed(path, error)
    except KeyboardInterrupt:
        bar.write(f"Stopped: {done} of {len(files)} file(s) done", file=sys.stderr)
        raise
    return failures


def main(argv: Optional[List[str]] = None) -> int:
    utils.start_cli()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
        from models.backend import compute_dtype

        compute_dtype(args.dtype, training=False)
    except ValueError as error:
        parser.error(str(error))
    return utils.report_errors(lambda: run(args, options), interrupted="the files written so far are complete")


def run(args, options) -> int:
    check_output_dir(args)
    files, missing = utils.find_inputs(args.inputs)
    for item, reason in missing:
        print(f"error: {item}: {reason}", file=sys.stderr)
    failed = []
    if files:
        try:
            pick = load(args.model, args.adapter_path, args.dtype)
        except (ValueError, OSError) as error:
            print(f"error: could not load the model: {error}", file=sys.stderr)
            return 2
        if args.batch_size == 1 and not args.chunked:
            failed = transcribe_files(pick, files, options, args.output_dir, args.output_format)
        else:
            failed = transcribe_files_batched(
                pick, files, options, args.output_dir, args.output_format, args.batch_size, args.chunked
            )
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
