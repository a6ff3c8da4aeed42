"""Reports a person reads: loss and validation CER curves of a training run (loss.png), and the
before/after report of `lora.py --test` with adapters (Markdown and a per-clip CER plot)."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from ..atomic import atomic_output, write_text_atomic
from .metrics import char_errors, normalize_text


def plot_metrics(records: List[dict], path: Path) -> Optional[Path]:
    """Loss (and validation CER) curves as a PNG; skipped when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    cers = [(r["step"], 100 * r["val_cer"]) for r in records if r.get("val_cer") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train loss"), (val, "validation loss")):
        if points:
            ax.plot(*zip(*points), label=label, marker="." if len(points) < 30 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (per token)")
    if cers:
        twin = ax.twinx()
        twin.plot(*zip(*cers), color="tab:red", linestyle="--", marker="o", label="validation CER %")
        twin.set_ylabel("CER %")
        twin.legend(loc="upper center")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


RATE_ROWS = (
    ("WER", "wer"),
    ("CER", "cer"),
    ("WER as written", "wer_orthographic"),
    ("CER as written", "cer_orthographic"),
)


@dataclass
class ClipCER:
    """One clip scored by the base model and by the adapter (character edits against the same reference)."""

    source: str
    ref: str
    base_hyp: str
    adapted_hyp: str
    base_edits: int
    adapted_edits: int
    ref_chars: int

    @property
    def base_cer(self) -> float:
        return self.base_edits / max(self.ref_chars, 1)  # an empty reference: each inserted character is 100%

    @property
    def adapted_cer(self) -> float:
        return self.adapted_edits / max(self.ref_chars, 1)


def paired_clips(base: List[dict], adapted: List[dict]) -> List[ClipCER]:
    """Per-clip CER of two prediction lists of the same clips in the same order; a mismatch is a ValueError."""
    for i, (b, a) in enumerate(zip(base, adapted)):
        if (b["source"], b["ref"]) != (a["source"], a["ref"]):
            raise ValueError(
                f"base and adapter predictions differ at clip {i + 1}: {b['source']} against {a['source']}; "
                f"score the same split of the same data with both"
            )
    if len(base) != len(adapted):
        unmatched = (base if len(base) > len(adapted) else adapted)[min(len(base), len(adapted))]
        raise ValueError(
            f"{len(base)} base predictions but {len(adapted)} adapter predictions: {unmatched['source']} "
            f"has no match; score the same split of the same data with both"
        )
    clips = []
    for b, a in zip(base, adapted):
        base_edits, ref_chars = char_errors(b["ref"], b["hyp"], normalize_text)
        adapted_edits, _ = char_errors(a["ref"], a["hyp"], normalize_text)
        clips.append(ClipCER(b["source"], b["ref"], b["hyp"], a["hyp"], base_edits, adapted_edits, ref_chars))
    return clips


def clip_changes(clips: List[ClipCER]) -> Tuple[int, int, int]:
    """(better, worse, unchanged): clips whose CER the adapter lowers, raises, leaves as it was."""
    better = sum(c.adapted_edits < c.base_edits for c in clips)
    worse = sum(c.adapted_edits > c.base_edits for c in clips)
    return better, worse, len(clips) - better - worse


def markdown_cell(text: str) -> str:
    """`text` as one Markdown table cell: backslashes and pipes escaped, line breaks as <br>."""
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return "<br>".join(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))


def percent(rate: Optional[float]) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%"


def rates_table(base: dict, adapted: dict) -> List[str]:
    """Corpus rates of both runs and their change (percentage points; plain difference for the loss)."""
    lines = ["| | base | adapter | change |", "|---|---:|---:|---:|"]
    for label, key in RATE_ROWS:
        b, a = base.get(key), adapted.get(key)
        # The change of the rounded rates, so the three columns agree as printed.
        change = "" if b is None or a is None else f"{round(100 * a, 1) - round(100 * b, 1):+.1f} points"
        lines.append(f"| {label} | {percent(b)} | {percent(a)} | {change} |")
    b, a = base["loss"], adapted["loss"]
    lines.append(f"| loss (per token) | {b:.3f} | {a:.3f} | {round(a, 3) - round(b, 3):+.3f} |")
    return lines


def clips_table(clips: List[ClipCER]) -> List[str]:
    """One row per clip, the adapter's worst first."""
    lines = [
        "| clip | CER base % | CER adapter % | reference | base | adapter |",
        "|---|---:|---:|---|---|---|",
    ]
    for c in sorted(clips, key=lambda c: -c.adapted_cer):  # stable: ties keep the split's order
        cells = [markdown_cell(Path(c.source).name), f"{100 * c.base_cer:.1f}", f"{100 * c.adapted_cer:.1f}"]
        cells += [markdown_cell(t) for t in (c.ref, c.base_hyp, c.adapted_hyp)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def before_after_markdown(base: dict, adapted: dict, clips: List[ClipCER], title: str, png: Optional[str]) -> str:
    """The whole Markdown report; `png` is the plot's path relative to the report, or None."""
    summary = base["summary"]
    better, worse, unchanged = clip_changes(clips)
    lines = [f"# {title}", "", f"Split `{summary['split']}`, {len(clips)} clips.", ""]
    lines += rates_table(summary, adapted["summary"])
    note = "WER and CER ignore case and punctuation; the rates as written count both. A negative change is a gain."
    lines += ["", note, ""]
    if png is not None:
        lines += [f"![per-clip CER, base against adapter]({png})", ""]
    lines += [f"Per clip (CER): {better} better, {worse} worse, {unchanged} unchanged with the adapter.", ""]
    lines += ["## Clips, the adapter's worst first", ""] + clips_table(clips)
    return "\n".join(lines) + "\n"


def plot_clip_cers(clips: List[ClipCER], path: Path, title: str) -> Optional[Path]:
    """Per-clip CER, base (x) against adapter (y), with the no-change diagonal; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = (
        ("better", "tab:green", lambda c: c.adapted_edits < c.base_edits),
        ("worse", "tab:red", lambda c: c.adapted_edits > c.base_edits),
        ("unchanged", "tab:gray", lambda c: c.adapted_edits == c.base_edits),
    )
    top = max([100.0] + [100 * max(c.base_cer, c.adapted_cer) for c in clips]) * 1.05
    fig, ax = plt.subplots(figsize=(6, 6))
    try:
        diagonal = "no change (below: the adapter is better)"
        ax.plot([0, top], [0, top], color="black", linewidth=1, linestyle="--", label=diagonal)
        for name, color, chosen in groups:
            points = [(100 * c.base_cer, 100 * c.adapted_cer) for c in clips if chosen(c)]
            if points:
                ax.scatter(*zip(*points), s=24, alpha=0.6, color=color, label=f"{name} ({len(points)})")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_aspect("equal")
        ax.set_xlabel("base model CER % (per clip)")
        ax.set_ylabel("with adapter CER % (per clip)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        fig.tight_layout()
        with atomic_output(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def write_test_report(
    base: dict, adapted: dict, markdown_path: Path, png_path: Path, title: str
) -> Tuple[Path, Optional[Path]]:
    """Before/after report of `lora.py --test`: a Markdown file and a per-clip CER plot (PNG).

    `base` and `adapted` are {"summary": {...}, "predictions": [{"source", "language", "ref", "hyp"}, ...]}
    of the same clips in the same order (a ValueError names the first clip that differs). Returns the
    paths written; the PNG's is None when matplotlib is not installed.
    """
    clips = paired_clips(base["predictions"], adapted["predictions"])
    if not clips:
        raise ValueError("no predictions to report on: both runs scored 0 clips")
    markdown_path = Path(markdown_path)
    png = plot_clip_cers(clips, Path(png_path), title)
    link = None if png is None else Path(os.path.relpath(png, markdown_path.parent)).as_posix()
    write_text_atomic(markdown_path, before_after_markdown(base, adapted, clips, title, link))
    return markdown_path, png
