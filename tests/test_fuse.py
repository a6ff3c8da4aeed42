"""fuse.py on tiny random models: fused folders equal base + adapters, quantized folders load back
(ours and mlx_whisper's way), the transformers export round-trips, refusals, atomic writes, upload;
and once on the real whisper-base with a real clip."""

import json
import re
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import fuse
from conftest import BASE_MODEL, SHARED, tiny_dims, tiny_whisper
from models import loading
from models.audio import clip_features, load_audio
from models.backend import NO_REEXEC_ENV
from models.export.fuse import FuseConfig, run
from models.inference.decoding import DecodingOptions, DecodingTask
from models.loading import ModelLoadError, load_model, save_model
from models.tuner.adapters import load_adapters, save_adapters
from models.tuner.lora import LoRAConfig, linear_to_lora_layers
from models.whisper import ModelDimensions, Whisper

# Two layers of four heads (room for alignment heads), 16 audio positions: fast, yet every layer kind.
SHAPE = dict(n_audio_ctx=16, n_audio_head=4, n_audio_layer=2, n_text_ctx=64, n_text_head=4, n_text_layer=2)
DIMS = tiny_dims(**SHAPE)
HEADS = [[1, 0], [1, 3]]


def write_base(folder: Path, dtype=mx.float32, seed: int = 0, **overrides) -> Path:
    model = tiny_whisper(seed, **{**SHAPE, **overrides})
    dims = model.dims
    model.decoder.positional_embedding = 0.02 * mx.random.normal((dims.n_text_ctx, dims.n_text_state))
    model.set_dtype(dtype)
    model.set_alignment_heads(np.array(HEADS))
    save_model(model, folder)
    return folder


def write_adapter(base: Path, folder: Path, seed: int = 1, **lora) -> Path:
    """Adapters with random (non-zero) B on `base`, saved as lora.py saves them."""
    model = load_model(str(base), dtype=None)
    config = LoRAConfig(**{"rank": 4, "alpha": 8.0, "targets": ["attn.query", "cross_attn.value", "mlp1"], **lora})
    linear_to_lora_layers(model, config)
    mx.random.seed(seed)
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            model.update(tree_unflatten([(name, 0.1 * mx.random.normal(value.shape))]))
    save_adapters(
        model,
        folder,
        {
            "version": 1,
            "base_model": str(base),
            "model_dims": model.dims.to_dict(),
            "lora": config.to_dict(),
            "language": "te",
            "data": "tiny/te",
        },
    )
    return folder


@pytest.fixture
def base(tmp_path):
    return write_base(tmp_path / "base")


@pytest.fixture
def adapter(base, tmp_path):
    return write_adapter(base, tmp_path / "adapter")


def inputs():
    mel = mx.random.normal((2, 2 * DIMS.n_audio_ctx, DIMS.n_mels), key=mx.random.key(7))
    tokens = mx.array([[50258, 50259, 50359, 50363, 400, 17], [50258, 50299, 50359, 50363, 1, 2]])
    return mel, tokens


def logits(model):
    return np.array(model(*inputs()).astype(mx.float32))


def max_rel_diff(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def fused(base, adapter, out, **options) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the recorded base matches: no warning expected
        run(FuseConfig(str(base), str(adapter), str(out), **options), log=lambda *_: None)
    return out


def test_fused_folder_equals_base_plus_adapter(base, adapter, tmp_path):
    out = fused(base, adapter, tmp_path / "out")
    reference = load_adapters(load_model(str(base)), adapter)
    model = load_model(str(out))
    assert not any("lora" in k for k, _ in tree_flatten(model.parameters()))
    assert max_rel_diff(logits(model), logits(reference)) < 1e-5
    assert max_rel_diff(logits(model), logits(load_model(str(base)))) > 1e-3, "the adapter must matter"
    # mlx_whisper builds ModelDimensions(**config) after popping model_type: no other keys allowed.
    config = json.loads((out / "config.json").read_text())
    assert config == {**DIMS.to_dict(), "model_type": "whisper"}
    assert np.array(model.alignment_heads).tolist() == HEADS
    card = (out / "README.md").read_text()
    assert "rank 4" in card and "attn.query, cross_attn.value, mlp1" in card and "tiny/te" in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"], "no temp folders left"


def test_dtype_is_kept_unless_given(tmp_path):
    base = write_base(tmp_path / "base16", dtype=mx.float16)
    adapter = write_adapter(base, tmp_path / "adapter", targets=["mlp2"], freeze_encoder=True)
    kept = load_model(str(fused(base, adapter, tmp_path / "f16")), dtype=None)
    assert kept.decoder.blocks[0].mlp2.weight.dtype == mx.float16
    as32 = load_model(str(fused(base, adapter, tmp_path / "f32", dtype="float32")), dtype=None)
    assert as32.decoder.blocks[0].mlp2.weight.dtype == mx.float32
    # float32 fusing rounds W + scale * A @ B once, in float32: it matches the unfused model closely.
    reference = load_adapters(load_model(str(base)), adapter)
    assert max_rel_diff(logits(as32), logits(reference)) < 1e-5
    assert max_rel_diff(logits(load_model(str(tmp_path / "f16"))), logits(reference)) < 1e-2


def mlx_whisper_style_load(folder: Path) -> Whisper:
    """mlx_whisper.load_models.load_model's steps (MIT), applied to our model class."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("model_type", None)
    quantization = config.pop("quantization", None)
    model = Whisper(ModelDimensions(**config))
    weights = mx.load(str(folder / "weights.safetensors"))
    if quantization is not None:
        predicate = lambda p, m: isinstance(m, (nn.Linear, nn.Embedding)) and f"{p}.scales" in weights  # noqa
        nn.quantize(model, **quantization, class_predicate=predicate)
    weights.pop("alignment_heads")  # mlx_whisper keeps them as a plain attribute; ours is private
    model.update(tree_unflatten(list(weights.items())))
    return model


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_folder_loads_back(base, adapter, tmp_path, bits):
    out = fused(base, adapter, tmp_path / "q", quantize=True, q_bits=bits, q_group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": bits}
    model = load_model(str(out))
    quantized = {n for n, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    linears = {n for n, m in Whisper(DIMS).named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    assert quantized == linears and "decoder.token_embedding" in quantized
    reference = logits(load_adapters(load_model(str(base)), adapter))
    assert max_rel_diff(logits(model), reference) < (0.02 if bits == 8 else 0.2)
    np.testing.assert_array_equal(logits(mlx_whisper_style_load(out)), logits(model))


def test_qlora_adapter_stays_quantized_or_dequantizes(tmp_path):
    model = load_model(str(write_base(tmp_path / "float")))
    nn.quantize(model, group_size=32, bits=8)
    save_model(model, tmp_path / "q8base", {"quantization": {"group_size": 32, "bits": 8}})
    base = tmp_path / "q8base"
    adapter = write_adapter(base, tmp_path / "adapter")
    reference = logits(load_adapters(load_model(str(base)), adapter))
    kept = load_model(str(fused(base, adapter, tmp_path / "kept")))
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["quantization"]["bits"] == 8
    assert isinstance(kept.decoder.blocks[0].mlp1, nn.QuantizedLinear)
    assert max_rel_diff(logits(kept), reference) < 0.02
    float_out = fused(base, adapter, tmp_path / "float_out", dequantize=True)
    assert "quantization" not in json.loads((float_out / "config.json").read_text())
    assert max_rel_diff(logits(load_model(str(float_out))), reference) < 1e-5


def test_refusals_name_the_problem(base, adapter, tmp_path):
    other = write_base(tmp_path / "wide", n_text_layer=3)
    with pytest.raises(ModelLoadError, match="another model size.*n_text_layer"), pytest.warns(UserWarning):
        run(FuseConfig(str(other), str(adapter), str(tmp_path / "x")), log=lambda *_: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="adapter_config.json: not found"):
        run(FuseConfig(str(base), str(tmp_path / "empty"), str(tmp_path / "x")))
    fused(base, adapter, tmp_path / "out")
    with pytest.raises(FileExistsError, match="--force"):
        run(FuseConfig(str(base), str(adapter), str(tmp_path / "out")))
    with pytest.raises(FileExistsError, match="--force"):
        run(FuseConfig(str(base), str(adapter), str(tmp_path / "new"), export_hf=str(tmp_path / "out")))
    fused(base, adapter, tmp_path / "out", force=True, quantize=True, q_group_size=32)
    assert "quantization" in json.loads((tmp_path / "out" / "config.json").read_text())
    assert not (tmp_path / "x").exists() and not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="user/name"):
        FuseConfig(str(base), str(adapter), upload_repo="no-slash")


def test_other_recorded_base_only_warns(base, adapter, tmp_path):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model": "/root/wb"}))
    with pytest.warns(UserWarning, match="trained on '/root/wb'"):
        run(FuseConfig(str(base), str(adapter), str(tmp_path / "out")), log=lambda *_: None)
    assert (tmp_path / "out" / "weights.safetensors").is_file()


def test_a_crash_leaves_no_half_folder(base, adapter, tmp_path, monkeypatch):
    fused(base, adapter, tmp_path / "out")
    before = (tmp_path / "out" / "weights.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(loading, "save_safetensors_atomic", crash)
    for out, force in ((tmp_path / "fresh", False), (tmp_path / "out", True)):
        with pytest.raises(OSError, match="disk full"):
            run(FuseConfig(str(base), str(adapter), str(out), force=force), log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]
    assert (tmp_path / "out" / "weights.safetensors").read_bytes() == before, "the old folder is kept"


def test_hf_names_round_trip(base):
    weights = dict(tree_flatten(load_model(str(base)).parameters()))
    hf = loading.mlx_to_hf_weights(weights)
    assert "model.decoder.layers.1.encoder_attn.v_proj.weight" in hf
    assert hf["model.encoder.conv1.weight"].shape == (64, 80, 3)  # (out, in, kernel)
    back = loading.hf_to_mlx_weights(hf)
    assert back.keys() == weights.keys()
    assert all(mx.array_equal(back[k], weights[k]).item() for k in weights)


@pytest.fixture
def hf_folder(base, adapter, tmp_path):
    fused(base, adapter, tmp_path / "out", export_hf=str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_export_hf_reads_back_with_our_loader(hf_folder, tmp_path):
    names = {p.name for p in hf_folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "README.md",
    } <= names
    generation = json.loads((hf_folder / "generation_config.json").read_text())
    assert generation["alignment_heads"] == HEADS and generation["is_multilingual"] is True
    assert generation["forced_decoder_ids"] == [[1, generation["lang_to_id"]["<|te|>"]], [2, 50359]]
    assert generation["decoder_start_token_id"] == 50258 and generation["no_timestamps_token_id"] == 50363
    assert generation["begin_suppress_tokens"] == [220, 50257] and 50362 in generation["suppress_tokens"]
    assert max_rel_diff(logits(load_model(str(hf_folder))), logits(load_model(str(tmp_path / "out")))) < 1e-6


def test_export_hf_loads_in_transformers(hf_folder, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(str(hf_folder), dtype=torch.float32).eval()
    ours = load_model(str(tmp_path / "out"))
    mel, tokens = inputs()
    with torch.no_grad():
        theirs = hf(
            input_features=torch.tensor(np.array(mel).transpose(0, 2, 1)),
            decoder_input_ids=torch.tensor(np.array(tokens)),
        ).logits.numpy()
    assert max_rel_diff(theirs, logits(ours)) < 1e-4
    task = DecodingTask(ours, DecodingOptions(language="en", without_timestamps=True, sample_len=8))
    expected = [r.tokens for r in task.run(mel)]
    with torch.no_grad():
        out = hf.generate(
            torch.tensor(np.array(mel).transpose(0, 2, 1)),
            language="en",
            task="transcribe",
            max_new_tokens=8,
            do_sample=False,
            num_beams=1,
        )
    assert [[t for t in row.tolist() if t < 50257] for row in out] == expected
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    text = " Telugu తెలుగు, 3.14 and «ünïcödé»  spaces"
    assert tokenizer.encode(text, add_special_tokens=False) == task.tokenizer.encode(text)
    assert tokenizer.decode(task.tokenizer.encode(text)) == text


def test_upload_sends_the_mlx_folder(base, adapter, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:  # stands in for the Hub: records what would be created and uploaded
        def create_repo(self, repo_id, repo_type=None, exist_ok=False, **kwargs):
            calls.append(("create_repo", repo_id, repo_type, exist_ok))
            return f"https://hub.example/{repo_id}"

        def upload_folder(self, folder_path, repo_id, repo_type=None, **kwargs):
            folder = Path(folder_path)
            files = sorted(p.name for p in folder.iterdir())
            calls.append(("upload_folder", repo_id, repo_type, files, json.loads((folder / "config.json").read_text())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run(
        FuseConfig(
            str(base),
            str(adapter),
            str(tmp_path / "out"),
            quantize=True,
            q_bits=8,
            q_group_size=32,
            upload_repo="me/whisper-tiny-te",
        ),
        log=lambda *_: None,
    )
    assert calls[0] == ("create_repo", "me/whisper-tiny-te", "model", True)
    _, repo, repo_type, files, config = calls[1]
    assert (repo, repo_type) == ("me/whisper-tiny-te", "model")
    assert files == ["README.md", "config.json", "weights.safetensors"]
    assert config == {**DIMS.to_dict(), "model_type": "whisper", "quantization": {"group_size": 32, "bits": 8}}


def test_cli(base, adapter, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(NO_REEXEC_ENV, "1")
    argv = ["--model", str(base), "--adapter-path", str(adapter), "--save-path", str(tmp_path / "out")]
    assert fuse.main(argv) == 0
    assert "Wrote the MLX model" in capsys.readouterr().out
    assert fuse.main(argv) == 1
    assert re.search(r"error: .*out already exists", capsys.readouterr().err)
    with pytest.raises(SystemExit):
        fuse.main(argv + ["--q-bits", "3"])
    assert fuse.main(argv + ["--force", "--dtype", "float16"]) == 0


@pytest.mark.skipif(
    not (BASE_MODEL / "config.json").is_file() or not (SHARED / "data" / "te").is_dir(),
    reason="needs ../shared (whisper-base-mlx and the te clips)",
)
def test_real_whisper_base_adapter_fuses_exactly(tmp_path):
    """whisper-base + a random adapter, fused in float32, on a real te clip: same greedy tokens, logits within 1e-4."""
    adapter = write_adapter(BASE_MODEL, tmp_path / "adapter", seed=3)
    out = fused(BASE_MODEL, adapter, tmp_path / "te", dtype="float32")
    clip = sorted((SHARED / "data" / "te" / "validation").glob("*.flac"))[0]
    mel = mx.array(clip_features(load_audio(clip))[None])
    results = []
    unfused = load_adapters(load_model(str(BASE_MODEL)), adapter)
    for model in (unfused, load_model(str(out)), load_model(str(BASE_MODEL))):  # teacher-forced on the unfused tokens
        features = model.embed_audio(mel)
        task = DecodingTask(model, DecodingOptions(language="te", without_timestamps=True, sample_len=48))
        tokens = task.run(features)[0].tokens
        forced = mx.array([list(task.initial_tokens) + (results[0][0] if results else tokens)])
        results.append((tokens, np.array(model.logits(forced, features))))
    (ref_tokens, ref_logits), (tokens, fused_logits), (_, base_logits) = results
    assert tokens == ref_tokens
    assert max_rel_diff(fused_logits, ref_logits) < 1e-4
    assert max_rel_diff(base_logits, ref_logits) > 1e-2, "the adapter must matter"
