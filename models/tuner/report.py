"""Reports of a training run a person reads: loss and validation CER curves (loss.png)."""

from pathlib import Path
from typing import List, Optional


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
