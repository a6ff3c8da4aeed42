"""Shared fixtures: a tiny random Whisper built from the dimensions dataclass."""

import mlx.core as mx
import pytest

from models.whisper import ModelDimensions, Whisper

TINY_DIMS = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
                            n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1)


@pytest.fixture(scope="module")
def tiny_model() -> Whisper:
    mx.random.seed(0)
    model = Whisper(TINY_DIMS)
    mx.eval(model.parameters())
    return model
