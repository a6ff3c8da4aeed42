"""Shared fixtures: tiny random Whisper models built from the dimensions dataclass, and their folders."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from models.audio import SAMPLE_RATE
from models.loading import save_model
from models.whisper import ModelDimensions, Whisper

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BASE_MODEL = SHARED / "models" / "whisper-base-mlx"


def tiny_dims(**overrides) -> ModelDimensions:
    """A one-layer, 64-wide multilingual Whisper shape (30 s audio context); `overrides` change fields."""
    dims = dict(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=64,
        n_audio_head=2,
        n_audio_layer=1,
        n_vocab=51865,
        n_text_ctx=448,
        n_text_state=64,
        n_text_head=2,
        n_text_layer=1,
    )
    return ModelDimensions(**{**dims, **overrides})


def tiny_whisper(seed: int = 0, **overrides) -> Whisper:
    """A tiny random model of `tiny_dims(**overrides)`, drawn with `seed`."""
    mx.random.seed(seed)
    model = Whisper(tiny_dims(**overrides))
    mx.eval(model.parameters())
    return model


def write_model_folder(folder: Path, seed: int = 0, **overrides) -> Path:
    """An MLX model folder (config.json + weights.safetensors) of `tiny_whisper(seed, **overrides)`."""
    save_model(tiny_whisper(seed, **overrides), folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model() -> Whisper:
    return tiny_whisper()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """The folder of the `tiny_model` weights, for the scripts' --model."""
    return write_model_folder(tmp_path_factory.mktemp("model") / "tiny")


def make_clips(folder: Path, language: str = None) -> Path:
    """An audiofolder of four 1 s tones transcribed "clip 0" to "clip 3" (with a language column when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["file_name,text" + (",language" if language else "")]
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    for i in range(4):
        sf.write(folder / f"c{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t)).astype(np.float32), SAMPLE_RATE)
        lines.append(f"c{i}.wav,clip {i}" + (f",{language}" if language else ""))
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder
