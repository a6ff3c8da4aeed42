"""The adapter folder: the one place that names its files and reads or writes them.

ADAPTER_PATH/
  adapters.safetensors   LoRA tensors of the last saved step
  adapter_config.json    everything needed to rebuild the layers (+ base model, training flags)
  best/                  the same two files for the best validation score
  checkpoints/           NNNNNNN_adapters.safetensors every --save-every steps (+ the config)
  resume.safetensors     adapters + optimizer + RNG + step, for --resume
  metrics.jsonl          one JSON object per report or evaluation
  loss.png               loss and validation CER curves
  test_predictions.jsonl predictions of lora.py --test
"""

import fcntl
import io
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..atomic import save_safetensors_atomic, write_json_atomic, write_text_atomic
from ..loading import ModelLoadError, read_json
from .datasets import read_jsonl
from .distributed import read_on_rank0
from .lora import LoRAConfig, linear_to_lora_layers

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BEST = "best"
CHECKPOINTS = "checkpoints"
RESUME_FILE = "resume.safetensors"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
PREDICTIONS_FILE = "test_predictions.jsonl"
REPORT_FILE, REPORT_PLOT = "test_report.md", "test_report.png"  # lora.py --test: base against adapters
LOCK_INFO = ".lock"  # who holds the folder's lock, for the message a second run prints
# Everything this project writes into an adapter folder (temp files of atomic writes included);
# --overwrite refuses a folder holding anything else.
FILES_WRITTEN = (
    ADAPTER_WEIGHTS,
    ADAPTER_CONFIG,
    f"{BEST}/{ADAPTER_WEIGHTS}",
    f"{BEST}/{ADAPTER_CONFIG}",
    f"{CHECKPOINTS}/*_{ADAPTER_WEIGHTS}",
    f"{CHECKPOINTS}/{ADAPTER_CONFIG}",
    RESUME_FILE,
    METRICS_FILE,
    LOSS_PLOT,
    PREDICTIONS_FILE,
    REPORT_FILE,
    REPORT_PLOT,
    f"{BEST}/{PREDICTIONS_FILE}",  # lora.py --test --adapter-path ADAPTERS/best writes there
    f"{BEST}/{REPORT_FILE}",
    f"{BEST}/{REPORT_PLOT}",
    LOCK_INFO,
    ".*.tmp",
    f"{BEST}/.*.tmp",
    f"{CHECKPOINTS}/.*.tmp",
)
# The adapter_config.json keys a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("base_model", "model_dims", "lora", "recipe")


class AdapterFolderBusy(RuntimeError):
    """Another process holds the adapter folder's lock."""


class AdapterFolder:
    """Paths of one adapter folder, and saving into it (the config once per folder it goes in)."""

    def __init__(self, path, config: Optional[dict] = None):
        self.path, self.config = Path(path), config
        self.weights, self.best, self.resume = self.path / ADAPTER_WEIGHTS, self.path / BEST, self.path / RESUME_FILE
        self.metrics, self.loss_plot = self.path / METRICS_FILE, self.path / LOSS_PLOT
        self.predictions = self.path / PREDICTIONS_FILE
        self._configured = set()

    def checkpoint(self, step: int) -> Path:
        return self.path / CHECKPOINTS / f"{step:07d}_{ADAPTER_WEIGHTS}"

    def has_adapters(self) -> bool:
        return self.weights.exists()

    def has_config(self) -> bool:
        return (self.path / ADAPTER_CONFIG).is_file()

    @contextmanager
    def locked(self):
        """Hold an exclusive lock on the folder for a run's lifetime; a second run is refused, told who holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = json.loads((self.path / LOCK_INFO).read_text())
                who = f"pid {holder['pid']} on {holder['host']}, since {holder['started']}"
            except (OSError, ValueError, KeyError):
                who = "a process that is just starting or stopping"
            raise AdapterFolderBusy(
                f"{self.path} is in use by another lora.py run ({who}); wait for it to end, "
                f"or choose another --adapter-path"
            ) from None
        info = self.path / LOCK_INFO
        try:
            info.write_text(
                json.dumps(
                    {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
                )
            )
            yield self
        finally:
            info.unlink(missing_ok=True)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def save(self, model: nn.Module, which: str = "last", step: Optional[int] = None) -> Path:
        """Save the trainable tensors as the last (`which="last"`), best or step-`step` checkpoint."""
        target = {"last": self.weights, "best": self.best / ADAPTER_WEIGHTS}.get(which)
        if which == "checkpoint":
            target = self.checkpoint(step)
        if target is None:
            raise ValueError(f"unknown adapter save {which!r}")
        save_safetensors_atomic(target, dict(tree_flatten(model.trainable_parameters())))
        if self.config is not None and target.parent not in self._configured:
            write_json_atomic(target.parent / ADAPTER_CONFIG, self.config)
            self._configured.add(target.parent)
        return target


def resume_mismatch(saved: dict, wanted: dict) -> list:
    """The RESUME_KEYS settings (flattened, e.g. "lora.rank") on which two adapter configs differ."""

    def flat(config: dict) -> dict:
        out = {}
        for key in RESUME_KEYS:
            value = config.get(key)
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out

    a, b = flat(saved), flat(wanted)
    return [
        f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def save_adapters(model: nn.Module, folder: Path, config: dict) -> None:
    """Trainable (LoRA) tensors and the config into `folder`, each atomically."""
    AdapterFolder(folder, config).save(model)


def read_adapter_config(folder: Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    config = read_json(path, f"{folder}: no {ADAPTER_CONFIG}; pass the folder lora.py wrote with --adapter-path")
    if not isinstance(config, dict) or "lora" not in config:
        raise ModelLoadError(f"{path}: no 'lora' section; was it written by lora.py?")
    return config


def _check_adapter_tensors(path: Path, weights: dict, expected: dict) -> None:
    for key in sorted(set(expected) | set(weights)):
        if key not in weights:
            raise ModelLoadError(f"{path}: missing adapter tensor {key}")
        if key not in expected:
            raise ModelLoadError(f"{path}: unexpected tensor {key}; the adapter config does not describe it")
        if weights[key].shape != expected[key].shape:
            raise ModelLoadError(
                f"{path}: tensor {key} has shape {tuple(weights[key].shape)}, "
                f"this model needs {tuple(expected[key].shape)}"
            )


def load_adapters(model: nn.Module, folder: Path, weights_name: str = ADAPTER_WEIGHTS) -> nn.Module:
    """Turn `model` into the LoRA model described by `folder/adapter_config.json` and load its weights.

    Strict: every adapter tensor must be present with the shape this model needs, so adapters
    trained on another model size are refused with the tensor named.
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    try:
        lora_config = LoRAConfig.from_dict(config["lora"])
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"{folder / ADAPTER_CONFIG}: {error}") from None
    dims, model_dims = config.get("model_dims"), model.dims.to_dict()
    if dims is not None and dims != model_dims:
        changed = {k: (v, model_dims.get(k)) for k, v in dims.items() if model_dims.get(k) != v}
        raise ModelLoadError(
            f"{folder}: adapters were trained on another model size (adapter vs model: {changed}); "
            f"use the base model {config.get('base_model')!r}"
        )
    path = folder / weights_name
    if not path.is_file():
        raise ModelLoadError(f"{path}: adapter weights not found")
    try:
        weights = dict(mx.load(str(path)))
    except Exception as error:
        raise ModelLoadError(f"{path}: could not read adapter weights ({error})") from None
    linear_to_lora_layers(model, lora_config)
    _check_adapter_tensors(path, weights, dict(tree_flatten(model.trainable_parameters())))
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model


def save_resume_state(folder: AdapterFolder, model: nn.Module, optimizer, step: int, extra: dict) -> None:
    """Adapters, optimizer state and RNG in one file (atomic), so they can never disagree."""
    arrays = {f"model.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    arrays["rng"] = mx.random.state[0]
    metadata = {"step": str(step), "extra": json.dumps(extra)}
    save_safetensors_atomic(folder.resume, arrays, metadata)


def load_resume_state(folder: AdapterFolder, model: nn.Module, optimizer, world=None) -> Tuple[int, dict]:
    """Restore what `save_resume_state` wrote; returns (step, extra).

    In a distributed run every rank loads rank 0's file (sent over the group), so other
    machines need no copy of the folder.
    """
    path = folder.resume
    data = read_on_rank0(path, world)
    if data is None:
        raise FileNotFoundError(f"{path}: nothing to resume from; train without --resume first")
    arrays, metadata = mx.load(io.BytesIO(data), format="safetensors", return_metadata=True)
    mx.eval(arrays)
    model_weights = [(k[len("model.") :], v) for k, v in arrays.items() if k.startswith("model.")]
    expected = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if {k for k, _ in model_weights} != expected:
        raise ValueError(f"{path}: its adapters do not match the LoRA settings of this run; use the same flags")
    model.load_weights(model_weights, strict=False)
    optimizer_state = [(k[len("optimizer.") :], v) for k, v in arrays.items() if k.startswith("optimizer.")]
    # In place: the compiled steps hold this very dict (a new one would be invisible to them).
    optimizer.state.clear()
    optimizer.state.update(tree_unflatten(optimizer_state))
    high, low = (int(v) for v in arrays["rng"].tolist())
    mx.random.seed((high << 32) | low)  # mx.random.state takes no assignment; this seed gives the same key
    mx.eval(model.parameters(), optimizer.state)
    return int(metadata["step"]), json.loads(metadata["extra"])


class MetricsLog:
    """metrics.jsonl of the adapter folder: one JSON object per report or evaluation."""

    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int]):
        self.path, self.enabled = Path(path), enabled
        if enabled and resume_step is not None and self.path.exists():
            kept = [json.dumps(r) for r in self.records() if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        elif enabled and resume_step is None:
            self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> List[dict]:
        """The records on disk; a last line cut short (a killed run) is left out, any other bad line is an error."""
        if not self.path.exists():
            return []
        return [record for _, record in read_jsonl(self.path, cut_last_line_ok=True)]
