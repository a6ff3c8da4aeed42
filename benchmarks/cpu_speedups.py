"""A/B of CPU transcription: the working tree's models/ against a git revision's, speed and tokens.

The revision's models/ (default HEAD) is extracted to a temporary folder; both trees are
imported in one process under different package names (either layout: models/inference/ since
the package was split, flat models/ before) and timed in alternation (base,
proposed, base, ...), so load from other processes on a shared machine hits both alike. Wall and
process CPU times are kept. Equality: transcribe() (greedy, temperature 0, timestamps on,
language en) of the 28 s clip and of en-read clips with both trees; every token must match.

    python benchmarks/cpu_speedups.py --base-rev HEAD --rounds 3 --clips 60
    python benchmarks/cpu_speedups.py --base-rev c79706e --rounds 3 --clips 20
"""

import argparse
import importlib.util
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

from common import ROOT, markdown_table, out_dir, write_results
from transcribe_speed import SHARED, build_clip

# Where each module a tree needs lives, by layout: "windows" holds MelWindows and ArraySource.
SPLIT_LAYOUT = {
    "whisper": "whisper",
    "decoding": "inference.decoding",
    "transcribe": "inference.transcribe",
    "windows": "audio",
    "backend": "backend",
}
FLAT_LAYOUT = {"whisper": "whisper", "decoding": "decoding", "transcribe": "transcribe", "windows": "transcribe"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-rev", default="HEAD", help="git revision whose models/ is the base")
    p.add_argument("--model", default=str(SHARED / "models" / "whisper-base-mlx"))
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    p.add_argument("--clips", type=int, default=-1, help="en-read clips to compare (-1: all)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--name", default="cpu_speedups")
    return p


def load_package(name: str, folder: Path) -> SimpleNamespace:
    """Import `folder` (a copy of models/) as package `name`; its relative imports stay inside it.

    Returns the modules the A/B uses (see SPLIT_LAYOUT), plus `buffer_cache(model)`: the CPU
    buffer cache transcribe() runs under, where the tree has one.
    """
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    layout = SPLIT_LAYOUT if (folder / "inference").is_dir() else FLAT_LAYOUT
    tree = SimpleNamespace(**{key: importlib.import_module(f"{name}.{sub}") for key, sub in layout.items()})
    if hasattr(tree, "backend"):
        tree.buffer_cache = lambda model: tree.backend.cpu_buffer_cache(model.dims, model.dtype)
    else:
        tree.buffer_cache = getattr(tree.decoding, "cpu_buffer_cache", lambda model: nullcontext())
    return tree


def revision_copy(rev: str, tmp: Path) -> Path:
    """models/ as of git revision `rev`, extracted under `tmp`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "models"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp, filter="data")
    return tmp / "models"


def twin_models(model_path: str, base_pkg):
    """(base, proposed): the working tree's model as models.loading.load_model gives it, and the same weights
    in the revision's Whisper class."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from models.loading import load_model

    prop = load_model(model_path, dtype=mx.float32)
    base = base_pkg.whisper.Whisper(base_pkg.whisper.ModelDimensions(**prop.dims.to_dict()), mx.float32)
    base.load_weights(tree_flatten(prop.parameters()))
    base.set_alignment_heads(prop.alignment_heads)
    mx.eval(base.parameters())
    base.eval()
    return base, prop


def timed(fn) -> tuple:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def timed_calls(model, pkg, audio) -> dict:
    """{measure: call} of one tree: the encoder, one greedy decode of the first window, transcribe()."""
    import mlx.core as mx

    window = pkg.windows.MelWindows(pkg.windows.ArraySource(audio), model.dims.n_mels).window(0)
    mel = mx.array(window)[None]
    features = model.embed_audio(mel)
    mx.eval(features)
    options = pkg.decoding.DecodingOptions(language="en")
    return {
        "encoder": lambda: mx.eval(model.embed_audio(mel)),
        "decode (one window)": lambda: pkg.decoding.decode(model, features[0], options),
        "transcribe()": lambda: pkg.transcribe.transcribe(model, audio, language="en", temperature=0.0),
    }


def time_ab(models: dict, audio, rounds: int) -> dict:
    """{variant: {measure: [(wall, cpu), ...]}} for encoder, one decode and transcribe()."""
    calls = {variant: timed_calls(model, pkg, audio) for variant, (model, pkg) in models.items()}
    results = {variant: {name: [] for name in calls[variant]} for variant in models}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for variant, (model, pkg) in models.items():
            # The encoder and decode alone run under the buffer cache that transcribe() sets, where a tree has it.
            for name, fn in calls[variant].items():
                with pkg.buffer_cache(model):
                    results[variant][name].append(timed(fn))
    for variant in results:
        results[variant] = {k: v[1:] for k, v in results[variant].items()}
    results["decode_tokens"] = len(calls["base"]["decode (one window)"]().tokens)
    return results


def compare_transcripts(models: dict, clips: list) -> dict:
    same, different = 0, []
    for name, audio in clips:
        out = {v: pkg.transcribe.transcribe(m, audio, language="en", temperature=0.0) for v, (m, pkg) in models.items()}
        tokens = {v: [t for s in r["segments"] for t in s["tokens"]] for v, r in out.items()}
        if tokens["base"] == tokens["proposed"]:
            same += 1
        else:
            different.append({"clip": name, "base": out["base"]["text"], "proposed": out["proposed"]["text"]})
        print(f"  {name}: {'same' if tokens['base'] == tokens['proposed'] else 'DIFFERENT'}", file=sys.stderr)
    return {"clips": len(clips), "identical": same, "different": different}


def encoder_difference(models: dict, audio) -> float:
    import mlx.core as mx

    outs = []
    for model, pkg in models.values():
        window = pkg.windows.MelWindows(pkg.windows.ArraySource(audio), model.dims.n_mels).window(0)
        outs.append(model.embed_audio(mx.array(window)[None]))
    return float(mx.abs(outs[0] - outs[1]).max()), float(mx.abs(outs[0]).max())


def report(timing: dict, equality: dict, enc_diff: tuple) -> str:
    rows = []
    for name in timing["base"]:
        (bw, bc), (pw, pc) = [
            (statistics.median(w for w, _ in timing[v][name]), statistics.median(c for _, c in timing[v][name]))
            for v in ("base", "proposed")
        ]
        rows.append([name, f"{bw:.3f}", f"{pw:.3f}", f"{bw / pw:.2f}x", f"{bc:.3f}", f"{pc:.3f}", f"{bc / pc:.2f}x"])
    text = markdown_table(
        [
            "measure (28 s clip)",
            "base wall s",
            "proposed wall s",
            "speed-up (wall)",
            "base CPU s",
            "proposed CPU s",
            "speed-up (CPU time)",
        ],
        rows,
    )
    text += (
        f"\n\nOne-window decode: {timing['decode_tokens']} tokens. Encoder output max |diff| "
        f"{enc_diff[0]:.2e} (max |value| {enc_diff[1]:.1f}). Transcripts: {equality['identical']} of "
        f"{equality['clips']} clips token-identical."
    )
    for d in equality["different"]:
        text += f"\n- {d['clip']}: base {d['base']!r} / proposed {d['proposed']!r}"
    return text


def main() -> int:
    args = build_parser().parse_args()
    from models.backend import ensure_fast_blas

    ensure_fast_blas()
    import soundfile

    with tempfile.TemporaryDirectory() as tmp:
        prop_pkg = load_package("models", ROOT / "models")
        base_pkg = load_package("base_models", revision_copy(args.base_rev, Path(tmp)))
        base, prop = twin_models(args.model, base_pkg)
        models = {"base": (base, base_pkg), "proposed": (prop, prop_pkg)}
        audio, _ = build_clip()
        timing = time_ab(models, audio, args.rounds)
        enc_diff = encoder_difference(models, audio)
        files = sorted((SHARED / "data" / "en-read").glob("*.flac"))
        files = files if args.clips < 0 else files[: args.clips]
        clips = [("28 s clip", audio)] + [(f.name, soundfile.read(str(f), dtype="float32")[0]) for f in files]
        equality = compare_transcripts(models, clips)
    text = f"base: models/ at {args.base_rev}; proposed: the working tree.\n\n" + report(timing, equality, enc_diff)
    write_results(
        out_dir(args.out_dir),
        args.name,
        {"base_rev": args.base_rev, "timing": timing, "equality": equality, "encoder_max_abs_diff": enc_diff},
        text,
    )
    print(text)
    return 0 if not equality["different"] else 1


if __name__ == "__main__":
    sys.exit(main())
