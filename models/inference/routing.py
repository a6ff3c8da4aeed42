"""Several adapters at transcription time: each file goes to the adapter of its language.

`--adapter-path te=DIR_A,yo=DIR_B`: a file whose language is given or detected as te is
transcribed with DIR_A's adapters, yo with DIR_B's, any other language with the base model. The
base weights are loaded once: every adapted model shares the base model's arrays and adds only
its LoRA tensors.
"""

from pathlib import Path
from typing import Dict, Optional, Union

import mlx.core as mx
import numpy as np

from ..audio import MelWindows, open_audio
from ..tokenizer import language_code
from ..tuner.adapters import load_adapters
from ..whisper import Whisper
from .decoding import detect_language


def parse_adapter_routes(value: str) -> Union[str, Dict[str, str]]:
    """ "DIR" (one adapter for every file) or "te=DIR_A,yo=DIR_B" ({language code: folder})."""
    if "=" not in value:
        return value
    routes = {}
    for part in (p.strip() for p in value.split(",") if p.strip()):
        language, sep, folder = part.partition("=")
        if not sep or not folder.strip():
            raise ValueError(f"--adapter-path {value!r}: expected LANGUAGE=FOLDER pairs, got {part!r}")
        code = language_code(language.strip())
        if code in routes:
            raise ValueError(f"--adapter-path {value!r}: language {code!r} is given twice")
        routes[code] = folder.strip()
    return routes


def with_adapters(base: Whisper, folder: Path) -> Whisper:
    """A LoRA model of `folder`'s adapters that shares every base weight array with `base`."""
    model = Whisper(base.dims, base.dtype)
    model.update(base.parameters())  # the same arrays: no copy, nothing read from disk
    model.set_alignment_heads(np.array(base.alignment_heads))
    return load_adapters(model, Path(folder))


class AdapterRouter:
    """The model for each file: its language's adapters, or the base model."""

    def __init__(self, base: Whisper, routes: Dict[str, str]):
        self.base = base
        self.models = {code: with_adapters(base, Path(folder)) for code, folder in routes.items()}

    def detect(self, audio) -> str:
        """The language the base model hears in the first 30 s of `audio`."""
        if not self.base.is_multilingual:
            return "en"
        source = open_audio(audio)
        try:
            window = MelWindows(source, self.base.dims.n_mels).window(0)
        finally:
            source.close()
        features = self.base.embed_audio(mx.array(window)[None].astype(self.base.dtype))
        return detect_language(self.base, features)[0][0]

    def route(self, audio, language: Optional[str]):
        """(model, language) for `audio`: the given language, else the detected one."""
        language = language_code(language) if language is not None else self.detect(audio)
        return self.models.get(language, self.base), language
