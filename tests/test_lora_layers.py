"""LoRA layers on a tiny random Whisper: invariants of conversion, fusing and freezing."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import tiny_dims, tiny_whisper
from models.tuner.lora import (
    DEFAULT_TARGETS,
    VALID_TARGETS,
    LoRAConfig,
    LoRALinear,
    dequantize_model,
    fuse_lora_layers,
    linear_to_lora_layers,
    parameter_count,
    trainable_parameter_count,
)
from models.whisper import Whisper

N_LAYERS = 3
SHAPE = dict(n_audio_ctx=16, n_audio_head=4, n_audio_layer=N_LAYERS, n_text_head=4, n_text_layer=N_LAYERS)
DIMS = tiny_dims(**SHAPE)


def base_model(seed: int = 0) -> Whisper:
    model = tiny_whisper(seed, **SHAPE)
    # The decoder's positional embedding starts at zero; give it values so it matters.
    shape = (DIMS.n_text_ctx, DIMS.n_text_state)
    model.decoder.positional_embedding = 0.02 * mx.random.normal(shape)
    mx.eval(model.parameters())
    return model


def inputs(seed: int = 1):
    key = mx.random.key(seed)
    # (batch, n_frames, n_mels)
    mel = mx.random.normal((2, 2 * DIMS.n_audio_ctx, DIMS.n_mels), key=key)
    tokens = mx.array([[50258, 50259, 50359, 400, 17, 9], [50258, 50259, 50359, 1, 2, 3]])
    return mel, tokens


def lora_layers(module: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear)}


def randomise_lora_b(model: nn.Module, seed: int = 2) -> None:
    mx.random.seed(seed)
    for layer in lora_layers(model).values():
        layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
    mx.eval(model.parameters())


def loss_fn(model, mel, tokens):
    logits = model(mel, tokens[:, :-1]).astype(mx.float32)
    return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()


# --- LoRALinear on its own ---------------------------------------------------


def test_lora_linear_math_and_fuse():
    mx.random.seed(0)
    base = nn.Linear(32, 48)
    lora = LoRALinear.from_base(base, r=4, alpha=8.0)
    assert lora.scale == 2.0
    assert lora.lora_a.shape == (32, 4) and lora.lora_b.shape == (4, 48)
    assert mx.all(lora.lora_b == 0).item()
    assert mx.max(mx.abs(lora.lora_a)).item() <= 1 / math.sqrt(32)

    lora.lora_b = mx.random.normal((4, 48))
    x = mx.random.normal((3, 5, 32))
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ lora.lora_a) @ lora.lora_b
    assert mx.allclose(lora(x), expected, atol=1e-5).item()

    fused = lora.fuse()
    assert type(fused) is nn.Linear and fused.weight.dtype == base.weight.dtype
    assert mx.allclose(fused(x), expected, atol=1e-5).item()
    assert mx.array_equal(fused.bias, base.bias).item()


def test_lora_linear_keeps_input_dtype_and_scale_override():
    base = nn.Linear(16, 16, bias=False)
    base.set_dtype(mx.float16)
    lora = LoRALinear.from_base(base, r=2, alpha=100.0, scale=0.5)
    assert lora.scale == 0.5
    lora.lora_b = mx.ones((2, 16))
    y = lora(mx.ones((1, 16), dtype=mx.float16))
    assert y.dtype == mx.float16
    fused = lora.fuse()
    assert fused.weight.dtype == mx.float16 and "bias" not in fused


# --- whole-model conversion --------------------------------------------------


def test_fresh_adapter_changes_nothing():
    model = base_model()
    mel, tokens = inputs()
    before = model(mel, tokens)
    config = LoRAConfig(targets=list(VALID_TARGETS), dropout=0.1)
    linear_to_lora_layers(model, config)
    # Encoder blocks: 4 attn + 2 mlp targets; decoder blocks add 4 cross_attn.
    assert len(lora_layers(model.encoder)) == N_LAYERS * 6
    assert len(lora_layers(model.decoder)) == N_LAYERS * 10
    after = model(mel, tokens)
    assert mx.array_equal(before, after).item()


def test_fused_model_equals_unfused():
    model = base_model()
    mel, tokens = inputs()
    base = model(mel, tokens)
    linear_to_lora_layers(model, LoRAConfig(targets=list(VALID_TARGETS), rank=4, alpha=8.0))
    randomise_lora_b(model)
    unfused = model(mel, tokens)
    assert not mx.allclose(base, unfused, atol=1e-3).item(), "adapter should change the logits"

    fuse_lora_layers(model)
    assert not lora_layers(model)
    assert type(model.decoder.blocks[0].cross_attn.value) is nn.Linear
    fused = model(mel, tokens)
    np.testing.assert_allclose(np.array(fused), np.array(unfused), rtol=1e-4, atol=1e-4)


def test_trainable_parameters_are_only_lora_tensors():
    model = base_model()
    config = LoRAConfig(rank=4)  # default targets
    linear_to_lora_layers(model, config)
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.endswith((".lora_a", ".lora_b")) for k in names)
    # Default targets: 2 per encoder block, 4 per decoder block, each r * (in + out).
    n_state = DIMS.n_audio_state
    n_layers = N_LAYERS * 2 + N_LAYERS * 4
    assert len(names) == 2 * n_layers
    assert trainable_parameter_count(model) == n_layers * 4 * (n_state + n_state)

    mel, tokens = inputs()
    _, grads = nn.value_and_grad(model, loss_fn)(model, mel, tokens)
    grad_names = [k for k, _ in tree_flatten(grads)]
    assert sorted(grad_names) == sorted(names)


def test_num_layers_selects_last_blocks():
    model = base_model()
    linear_to_lora_layers(model, LoRAConfig(num_layers=2))
    for stack in (model.encoder, model.decoder):
        kinds = [type(block.attn.query) for block in stack.blocks]
        assert kinds == [nn.Linear, LoRALinear, LoRALinear]
        assert type(stack.blocks[0].attn.value) is nn.Linear
        assert type(stack.blocks[-1].attn.key) is nn.Linear  # not a default target
    assert type(model.decoder.blocks[1].cross_attn.value) is LoRALinear

    model = base_model()
    linear_to_lora_layers(model, LoRAConfig(num_layers=-1))
    for stack in (model.encoder, model.decoder):
        assert all(type(block.attn.query) is LoRALinear for block in stack.blocks)


def test_num_layers_beyond_model_adapts_all_blocks_with_warning():
    model = base_model()
    with pytest.warns(UserWarning, match="exceeds"):
        linear_to_lora_layers(model, LoRAConfig(num_layers=N_LAYERS + 5))
    assert all(type(block.attn.query) is LoRALinear for block in model.encoder.blocks)


def test_freeze_encoder_leaves_encoder_untouched():
    model = base_model()
    encoder_before = {k: v for k, v in tree_flatten(model.encoder.parameters())}
    linear_to_lora_layers(model, LoRAConfig(targets=list(VALID_TARGETS), freeze_encoder=True))
    assert not lora_layers(model.encoder)
    assert lora_layers(model.decoder)
    assert not tree_flatten(model.encoder.trainable_parameters())

    mel, tokens = inputs()
    _, grads = nn.value_and_grad(model, loss_fn)(model, mel, tokens)
    assert not any(k.startswith("encoder.") for k, _ in tree_flatten(grads))

    randomise_lora_b(model)
    fuse_lora_layers(model)
    encoder_after = dict(tree_flatten(model.encoder.parameters()))
    assert encoder_after.keys() == encoder_before.keys()
    for k, v in encoder_before.items():
        assert mx.array_equal(encoder_after[k], v).item(), k


def test_converting_twice_is_an_error():
    model = base_model()
    linear_to_lora_layers(model, LoRAConfig())
    with pytest.raises(ValueError, match="already has a LoRA layer"):
        linear_to_lora_layers(model, LoRAConfig())


# --- QLoRA -------------------------------------------------------------------


def quantized_model() -> Whisper:
    model = base_model()
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    assert isinstance(model.decoder.blocks[0].attn.query, nn.QuantizedLinear)
    return model


def test_quantized_base_trains_only_adapters_and_fuse_dequantizes():
    model = quantized_model()
    mel, tokens = inputs()
    base = model(mel, tokens)
    linear_to_lora_layers(model, LoRAConfig(targets=list(VALID_TARGETS), rank=4))
    layer = model.decoder.blocks[0].attn.query
    assert isinstance(layer, LoRALinear) and isinstance(layer.linear, nn.QuantizedLinear)
    assert layer.lora_a.shape == (DIMS.n_text_state, 4)
    assert mx.array_equal(model(mel, tokens), base).item()

    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.endswith((".lora_a", ".lora_b")) for k in names)
    _, grads = nn.value_and_grad(model, loss_fn)(model, mel, tokens)
    assert mx.any(grads["decoder"]["blocks"][0]["attn"]["query"]["lora_b"] != 0).item()

    randomise_lora_b(model)
    unfused = model(mel, tokens)
    fuse_lora_layers(model)
    fused_layer = model.decoder.blocks[0].attn.query
    assert type(fused_layer) is nn.Linear
    assert fused_layer.weight.shape == (DIMS.n_text_state, DIMS.n_text_state)
    fused = model(mel, tokens)
    np.testing.assert_allclose(np.array(fused), np.array(unfused), rtol=1e-4, atol=1e-4)


def test_quantized_fuse_can_requantize():
    model = quantized_model()
    linear_to_lora_layers(model, LoRAConfig(rank=4))
    randomise_lora_b(model)
    lora = model.decoder.blocks[0].attn.query
    # Re-quantizing quantizes the dequantized merge with the base's settings.
    expected = nn.QuantizedLinear.from_linear(lora.fuse(), group_size=64, bits=4)
    fuse_lora_layers(model, requantize=True)
    layer = model.decoder.blocks[0].attn.query
    assert isinstance(layer, nn.QuantizedLinear) and layer.bits == 4 and layer.group_size == 64
    for name in ("weight", "scales", "biases", "bias"):
        assert mx.array_equal(layer[name], expected[name]).item(), name
    assert not lora_layers(model)


def test_dequantize_model_and_parameter_count():
    float_count = parameter_count(base_model())
    model = quantized_model()
    assert isinstance(model.decoder.token_embedding, nn.QuantizedEmbedding)
    assert parameter_count(model) == float_count
    mel, tokens = inputs()
    quantized = model(mel, tokens)
    dequantize_model(model)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    assert type(model.decoder.token_embedding) is nn.Embedding
    dequantized = model(mel, tokens)
    np.testing.assert_allclose(np.array(dequantized), np.array(quantized), rtol=1e-4, atol=1e-4)
    assert parameter_count(model) == float_count


# --- LoRAConfig --------------------------------------------------------------


def test_config_round_trip():
    config = LoRAConfig(
        num_layers=2,
        rank=4,
        alpha=8.0,
        dropout=0.05,
        targets=["attn.key", "mlp1", "cross_attn.out"],
        freeze_encoder=True,
    )
    assert config.lora_scale == 2.0
    restored = LoRAConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert LoRAConfig().targets == DEFAULT_TARGETS
    assert LoRAConfig(rank=4, alpha=8.0, scale=0.25).lora_scale == 0.25


def test_config_scale_reaches_layers():
    model = base_model()
    linear_to_lora_layers(model, LoRAConfig(rank=4, alpha=32.0))
    assert all(m.scale == 8.0 for m in lora_layers(model).values())


def test_config_unknown_key_is_an_error():
    with pytest.raises(ValueError, match=r"Unknown LoRA config keys \['rnak'\].*'rank'"):
        LoRAConfig.from_dict({"rnak": 4})


def test_config_from_newer_version_warns_and_drops_new_keys():
    with pytest.warns(UserWarning, match="newer"):
        config = LoRAConfig.from_dict({"version": 99, "rank": 4, "future_option": True})
    assert config.rank == 4


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="num_layers"):
        LoRAConfig(num_layers=0)
    with pytest.raises(ValueError, match="list of strings"):
        LoRAConfig(targets="attn.query")


def test_unknown_target_is_an_error_listing_valid_ones():
    with pytest.raises(ValueError, match=r"\['attn.qeury'\].*'attn.query'.*'mlp2'"):
        LoRAConfig(targets=["attn.qeury"])
    config = LoRAConfig()
    config.targets = ["mlp3"]  # bypasses __post_init__; conversion must still check
    with pytest.raises(ValueError, match="mlp3"):
        linear_to_lora_layers(base_model(), config)
