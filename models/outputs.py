"""The output-path policy of every script: no flag can make the project destroy what the user keeps.

- An output that is, contains or lies inside an input (base model, adapter folder, dataset,
  audio files) is refused, whatever the flags.
- A folder that already exists is replaced (`force`) or added to (an adapter folder on
  `--overwrite`/`--resume`) only when every file in it is one this project writes there;
  anything else in it means the folder is someone else's, and it is left alone.
"""

import os
from pathlib import Path
from typing import Dict, Iterable, Optional


class OutputPathError(ValueError):
    """An output path would overwrite or delete something the user keeps; the message says what."""


def _resolved(path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def _relation(output: Path, input_path: Path) -> Optional[str]:
    if output == input_path:
        return "is"
    if input_path in output.parents:
        return "lies inside"
    if output in input_path.parents:
        return "contains"
    return None


def check_not_an_input(flag: str, output, inputs: Dict[str, Optional[str]], replaced: bool = True) -> None:
    """Refuse `output` (given with `flag`) when it is, contains or lies inside one of `inputs`.

    `inputs` maps a flag (e.g. "--model") to its local path; Hub ids and None are skipped.
    `replaced=False`: `output` is a folder only written into, file by file at its top level
    (transcription outputs), so one that merely contains an input folder is harmless.
    """
    out = _resolved(output)
    for input_flag, value in inputs.items():
        if value is None or not Path(os.path.expanduser(str(value))).exists():
            continue  # a Hub repo id, or nothing given: no local files to protect
        relation = _relation(out, _resolved(value))
        if relation == "contains" and not replaced and Path(os.path.expanduser(str(value))).is_dir():
            continue
        if relation is not None:
            raise OutputPathError(
                f"{flag} {output} {relation} {input_flag} {value}: the output would overwrite "
                f"an input; choose a {flag} outside it"
            )


def foreign_files(folder: Path, ours: Iterable[str]) -> list:
    """Files and folders under `folder` that do not match the patterns in `ours` (relative paths, globs)."""
    folder, patterns = Path(folder), list(ours)
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_dir() and any(
            Path(p).parts[0] == relative.parts[0] and len(Path(p).parts) > len(relative.parts) for p in patterns
        ):
            continue  # a subfolder that our files live in
        if not any(relative.match(p) and len(relative.parts) == len(Path(p).parts) for p in patterns):
            found.append(str(relative))
    return found


def check_replaceable(flag: str, folder, ours: Iterable[str], what: str) -> None:
    """Refuse to replace or write into an existing `folder` that holds files `what` does not write."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OutputPathError(f"{flag} {folder} is a file, not a folder; choose another {flag}")
    foreign = foreign_files(folder, ours)
    if foreign:
        listed = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise OutputPathError(
            f"{flag} {folder} holds files {what} did not write ({listed}); it is left as it is: choose another {flag}"
        )
