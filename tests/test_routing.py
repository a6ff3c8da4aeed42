"""Per-language adapters at transcription time: each file gets its language's adapters, others the base."""

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from mlx.utils import tree_flatten

import transcribe as transcribe_cli
from conftest import tiny_whisper
from models.audio import SAMPLE_RATE, clip_features
from models.backend import NO_REEXEC_ENV
from models.inference.decoding import DecodingOptions, decode
from models.inference.routing import AdapterRouter, parse_adapter_routes, with_adapters
from models.tuner.adapters import load_adapters, save_adapters
from models.tuner.lora import LoRAConfig, LoRALinear, linear_to_lora_layers


def write_adapters(folder, seed: int, targets=("attn.query", "mlp1")):
    """Adapters with random non-zero B for the tiny model: they change its output."""
    model = tiny_whisper()
    mx.random.seed(seed)
    config = LoRAConfig(rank=4, targets=list(targets))
    linear_to_lora_layers(model, config)
    for _, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_b = 0.5 * mx.random.normal(layer.lora_b.shape)
    save_adapters(model, folder, {"lora": config.to_dict(), "model_dims": model.dims.to_dict()})
    return folder


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return write_adapters(root / "te", 1), write_adapters(root / "yo", 2, targets=("cross_attn.value", "mlp2"))


def test_parse_routes():
    assert parse_adapter_routes("adapters/te") == "adapters/te"
    assert parse_adapter_routes("te=a, Yoruba=b") == {"te": "a", "yo": "b"}
    for bad in ("te=", "te=a,te=b", "xx=a"):
        with pytest.raises(ValueError):
            parse_adapter_routes(bad)


def test_each_language_gets_its_adapters_and_shares_the_base_weights(two_adapters):
    te, yo = two_adapters
    base = tiny_whisper()
    router = AdapterRouter(base, {"te": str(te), "yo": str(yo)})
    mel = mx.array(clip_features(0.1 * np.random.default_rng(0).standard_normal(SAMPLE_RATE).astype(np.float32)))[None]
    tokens = mx.array([[50258, 50259, 50359, 50363]])
    for language, folder in (("te", te), ("yo", yo)):
        model, chosen = router.route("unused.wav", language)
        assert chosen == language
        alone = load_adapters(tiny_whisper(), folder)
        np.testing.assert_allclose(np.array(model(mel, tokens)), np.array(alone(mel, tokens)), atol=1e-5)
    model, chosen = router.route("unused.wav", "English")
    assert model is base and chosen == "en"
    outputs = {lang: np.array(router.route("x", lang)[0](mel, tokens)) for lang in ("te", "yo", "en")}
    assert not np.allclose(outputs["te"], outputs["yo"]) and not np.allclose(outputs["te"], outputs["en"])


def test_with_adapters_reads_no_base_weights_and_leaves_the_base_untouched(two_adapters, monkeypatch):
    from models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("base weights read again"))
    base = tiny_whisper()
    before = {k: np.array(v) for k, v in tree_flatten(base.parameters())}
    adapted = with_adapters(base, two_adapters[0])
    assert any("lora_a" in k for k, _ in tree_flatten(adapted.parameters()))
    assert not any("lora" in k for k, _ in tree_flatten(base.parameters()))
    after = {k: np.array(v) for k, v in tree_flatten(base.parameters())}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    # The adapted model shares the base's arrays rather than holding copies.
    assert adapted.decoder.token_embedding.weight is base.decoder.token_embedding.weight


def test_the_cli_routes_by_detected_language(tmp_path, two_adapters, model_folder, monkeypatch, capsys):
    monkeypatch.setenv(NO_REEXEC_ENV, "1")
    te, yo = two_adapters
    for name in ("a", "b", "c"):
        sf.write(tmp_path / f"{name}.wav", np.zeros(SAMPLE_RATE // 2, np.float32), SAMPLE_RATE)
    heard = {"a.wav": "te", "b.wav": "yo", "c.wav": "en"}
    monkeypatch.setattr(AdapterRouter, "detect", lambda self, audio: heard[str(audio).split("/")[-1]])
    used = []
    from models.inference.transcribe import Transcriber

    def run(self, audio, progress=False):
        used.append((str(audio).split("/")[-1], self.requested.language, self.model))
        return {"text": "", "segments": [], "language": self.requested.language}

    monkeypatch.setattr(Transcriber, "run", run)
    argv = [str(tmp_path / n) for n in ("a.wav", "b.wav", "c.wav")]
    argv += ["--model", str(model_folder), "--adapter-path", f"te={te},yo={yo}", "--output-dir", str(tmp_path / "o")]
    assert transcribe_cli.main(argv) == 0
    assert [(name, language) for name, language, _ in used] == [("a.wav", "te"), ("b.wav", "yo"), ("c.wav", "en")]
    models = [model for _, _, model in used]
    assert len({id(m) for m in models}) == 3
    assert not any("lora" in k for k, _ in tree_flatten(models[2].parameters()))  # English: the base model


def test_decoding_with_a_route_equals_decoding_with_that_adapter_alone(two_adapters):
    te, _ = two_adapters
    audio = 0.1 * np.random.default_rng(1).standard_normal(SAMPLE_RATE).astype(np.float32)
    mel = mx.array(clip_features(audio))
    options = DecodingOptions(language="te", without_timestamps=True, sample_len=8)
    routed = decode(AdapterRouter(tiny_whisper(), {"te": str(te)}).route("x", "te")[0], mel, options)
    alone = decode(load_adapters(tiny_whisper(), te), mel, options)
    assert routed.tokens == alone.tokens
