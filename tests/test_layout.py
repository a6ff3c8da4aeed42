"""The tree's design rules, checked on the source: imports run scripts -> utils.py -> models/, sizes stay small."""

import ast
from pathlib import Path

from conftest import ROOT

SCRIPTS = ("lora", "fuse", "transcribe", "utils")
LIBRARY = sorted((ROOT / "models").rglob("*.py"))
LONG_FUNCTIONS_ALLOWED = {("models/tuner/trainer.py", "train")}  # the training loop, kept flat


def imported_modules(path: Path) -> list:
    """Top-level names of every module `path` imports (relative imports stay inside models/)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module.split(".")[0])
    return names


def test_the_library_never_imports_a_script_or_utils():
    offenders = [(str(p.relative_to(ROOT)), name) for p in LIBRARY for name in imported_modules(p) if name in SCRIPTS]
    assert offenders == []
    assert len(LIBRARY) > 20  # the walk found the package, subfolders included


def test_the_import_check_sees_a_script_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\ndef f():\n    from utils import find_inputs\n    import lora\n")
    assert [n for n in imported_modules(sample) if n in SCRIPTS] == ["utils", "lora"]


def test_library_files_and_functions_stay_small():
    long_files = [str(p.relative_to(ROOT)) for p in LIBRARY if len(p.read_text().splitlines()) > 400]
    long_functions = []
    for path in LIBRARY + [ROOT / f"{name}.py" for name in SCRIPTS]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                where = (str(path.relative_to(ROOT)), node.name)
                if where not in LONG_FUNCTIONS_ALLOWED:
                    long_functions.append(where)
    assert long_files == [] and long_functions == []
