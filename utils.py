"""What the three scripts share: common flags, --config files, input expansion, error printing, start-up."""

import argparse
import glob
import math
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from models.backend import DTYPE_NAMES

DEFAULT_MODEL = "mlx-community/whisper-tiny"
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".mp4", ".aac")


def add_model_flags(parser: argparse.ArgumentParser, dtype_help: str, model_required: bool = False) -> None:
    """--model and --dtype, the same in every script."""
    if model_required:
        parser.add_argument("--model", required=True, help="base model folder or Hugging Face repo id")
    else:
        parser.add_argument(
            "--model", default=DEFAULT_MODEL, help="model folder or Hugging Face repo id (default: %(default)s)"
        )
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help=dtype_help)


def start_cli() -> None:
    """First thing in a script's main(): on a Linux CPU, re-execute with OpenBLAS (models/backend.py)."""
    from models.backend import ensure_fast_blas

    ensure_fast_blas()


def config_argv(parser: argparse.ArgumentParser, path: str) -> List[str]:
    """The flags a YAML `--config` file sets, as command-line words, so argparse checks them as it
    checks the command line (types, choices); the command line, parsed after them, wins."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        parser.error(f"--config {path}: could not read it ({error})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of flag: value")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    argv = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("help", "config"):
            parser.error(f"--config {path}: unknown setting {key!r}")
        flag = action.option_strings[-1]
        if action.nargs == 0:  # on/off flags take true or false, nothing else
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {key} must be true or false, got {value!r}")
            argv += [flag] if value else []
        elif isinstance(value, (dict, bool)) or value is None:
            parser.error(f"--config {path}: {key} needs a value like the flag {flag} takes, got {value!r}")
        else:
            argv += [flag, ",".join(str(v) for v in value) if isinstance(value, list) else str(value)]
    return argv


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """parse_args, with the flags of a `--config FILE.yaml` given first (the command line wins)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = parser.parse_known_args(argv)
    if getattr(known, "config", None) is None:
        return parser.parse_args(argv)
    return parser.parse_args(config_argv(parser, known.config) + argv)


def find_inputs(inputs: Sequence[str]) -> Tuple[List[Path], List[Tuple[str, str]]]:
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
        elif path.exists():  # a FIFO, a device, process substitution (/dev/fd/N)
            found = []
            errors.append((item, "a pipe or device, not an audio file; save the audio to a file first"))
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                errors.append((item, "no files match this pattern"))
        else:
            found = []
            errors.append((item, "no such file or folder"))
        files += [f for f in found if f not in files]
    return files, errors


def report_errors(
    main: Callable[[], int],
    expected: Tuple[type, ...] = (ValueError, OSError),
    interrupted: str = "nothing more was written",
) -> int:
    """Run `main`; an expected error (bad input) is one `error:` line and exit status 1, and Ctrl-C
    a one-line summary (`interrupted` says what is kept) and exit status 130, never a traceback."""
    try:
        return main()
    except expected as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nInterrupted: {interrupted}", file=sys.stderr)
        return 130


def number(
    kind: type,
    low: Optional[float] = None,
    high: Optional[float] = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    none: bool = False,
    also: Tuple = (),
) -> Callable[[str], object]:
    """An argparse `type` that parses an int or float and checks its range where the flag enters.

    `low_open`/`high_open` exclude the bound itself; `none` also accepts "none" (None); `also`
    lists extra accepted values outside the range (e.g. -1 for "all").
    """
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    wanted = ("an integer" if kind is int else "a number") + (" " + " and ".join(parts) if parts else "")
    wanted += "".join(f" or {v}" for v in also) + (" or none" if none else "")

    def parse(text: str):
        if none and text.strip().lower() == "none":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if value in also:
            return value
        if (
            (kind is float and not math.isfinite(value))
            or (low is not None and (value < low or (low_open and value == low)))
            or (high is not None and (value > high or (high_open and value == high)))
        ):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    parse.bounds = (low, high, low_open, high_open)  # for tests that try values just outside
    return parse
