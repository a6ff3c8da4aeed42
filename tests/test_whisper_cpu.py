"""The CPU-only paths of models/kernels.py, whisper.py and decoding.py against their plain MLX equivalents."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from conftest import tiny_dims, tiny_whisper
from models import kernels
from models.backend import cpu_buffer_cache
from models.inference.decoding import _rearrange_cache

SHAPE = dict(n_audio_head=4, n_text_head=4, n_text_layer=2)
DIMS = tiny_dims(**SHAPE)

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU paths need CPU as default device")


def heads(x: mx.array, n_head: int) -> mx.array:
    """(batch, T, n_state) -> (batch, heads, T, d_head)."""
    b, t, d = x.shape
    return x.reshape(b, t, n_head, d // n_head).transpose(0, 2, 1, 3)


@pytest.fixture(scope="module")
def model():
    model = tiny_whisper(seed=1, **SHAPE)
    model.eval()
    return model


@pytest.fixture(scope="module")
def features(model) -> mx.array:
    mel = mx.random.normal((2, 3000, 80), key=mx.random.key(2))
    return model.embed_audio(mel)


def test_rational_gelu_matches_the_exact_gelu():
    x = mx.concatenate([mx.linspace(-12, 12, 100_001), 3 * mx.random.normal((100_000,), key=mx.random.key(0))])
    assert mx.abs(kernels.gelu_cpu(x) - nn.gelu(x)).max().item() < 2e-6


@pytest.mark.parametrize("t_q", [1, 80])
def test_exp2_attention_matches_scaled_dot_product_attention(t_q):
    q, k, v = (
        2 * mx.random.normal(shape, key=mx.random.key(i))
        for i, shape in enumerate([(2, 3, t_q, 16), (2, 3, 200, 16), (2, 3, 200, 16)])
    )
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25)
    assert mx.allclose(kernels.attend_exp2(q, k, v, 0.25), expected, atol=1e-5).item()


def test_splitting_over_cpu_streams_changes_nothing():
    q, k, v = (mx.random.normal((1, 3, 100, 16), key=mx.random.key(i)) for i in range(3))  # an odd head count

    def attend(q, k, v):
        return kernels.attend_exp2(q, k, v, 0.25)

    split = kernels.split_over_cpu_streams(attend, (q, k, v), axis=1)
    assert split.shape == (1, 3, 100, 16)
    assert mx.array_equal(split, attend(q, k, v)).item()


def test_encoder_attention_equals_the_fused_kernel(model):
    x = mx.random.normal((1, 1500, DIMS.n_audio_state), key=mx.random.key(3))
    attn = model.encoder.blocks[0].attn
    q, k, v = (heads(layer(x), DIMS.n_audio_head) for layer in (attn.query, attn.key, attn.value))
    scale = (DIMS.n_audio_state // DIMS.n_audio_head) ** -0.5
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    expected = attn.out(fused.transpose(0, 2, 1, 3).reshape(x.shape))
    out, _, _ = attn(x)  # 1500 unmasked queries on CPU: the exp2 path over two streams
    assert mx.allclose(out, expected, atol=1e-5).item()


def test_cached_decoding_equals_one_pass_over_all_tokens(model, features):
    tokens = mx.array([[50258, 50259, 50359, 440, 1044, 2068], [50258, 50259, 50359, 1029, 257, 6]])
    expected = model.decoder(tokens, features)[0]
    logits, cache, _ = model.decoder(tokens[:, :3], features)
    cross_k, cross_v = cache[0][1]
    assert cross_k.shape == cross_v.shape == (2, DIMS.n_text_head, 1500, DIMS.n_text_state // DIMS.n_text_head)
    steps = [logits]
    for i in range(3, tokens.shape[1]):
        logits, cache, _ = model.decoder(tokens[:, i : i + 1], features, cache)
        steps.append(logits)
    assert mx.allclose(mx.concatenate(steps, axis=1), expected, atol=1e-4).item()


def test_reordered_cache_follows_its_rows_as_in_beam_search(model, features):
    same_audio = mx.repeat(features[:1], 2, axis=0)  # two beams of one window
    tokens = mx.array([[50258, 50259, 50359, 440], [50258, 50259, 50359, 1029]])
    _, cache, _ = model.decoder(tokens, same_audio)
    cache = _rearrange_cache(cache, mx.array([1, 1]))  # both beams continue the second one
    logits = model.decoder(mx.array([[6], [257]]), same_audio, cache)[0]
    expected = model.decoder(mx.array([[50258, 50259, 50359, 1029, 6], [50258, 50259, 50359, 1029, 257]]), same_audio)[
        0
    ][:, -1:]
    assert mx.allclose(logits, expected, atol=1e-4).item()


def test_cross_attention_weights_come_back_with_the_cache_layout(model, features):
    tokens = mx.array([[50258, 50259, 50359, 440]])
    _, _, qks = model.decoder(tokens, features[:1], return_qk=True)
    block = model.decoder.blocks[0]
    x = model.decoder.token_embedding(tokens) + model.decoder.positional_embedding[:4]
    x = x + block.attn(block.attn_ln(x), mask="causal")[0]
    attn = block.cross_attn
    q = heads(attn.query(block.cross_attn_ln(x)), DIMS.n_text_head)
    k = heads(attn.key(features[:1]), DIMS.n_text_head)
    scale = (DIMS.n_text_state // DIMS.n_text_head) ** -0.5
    assert mx.allclose(qks[0], (q * scale) @ k.transpose(0, 1, 3, 2), atol=1e-4).item()


def test_vocabulary_projection_copy_follows_replaced_weights():
    model = tiny_whisper(seed=4, **SHAPE)
    features = mx.random.normal((1, 1500, DIMS.n_audio_state), key=mx.random.key(5))
    tokens = mx.array([[50258, 50259, 50359]])

    def logits(training: bool) -> mx.array:
        model.train(training)
        return model.decoder(tokens, features)[0]

    assert mx.allclose(logits(False), logits(True), atol=1e-5).item()  # the transposed copy vs as_linear
    new_embedding = mx.random.normal((DIMS.n_vocab, DIMS.n_text_state), key=mx.random.key(6))
    model.load_weights([("decoder.token_embedding.weight", new_embedding)], strict=False)
    assert mx.allclose(logits(False), logits(True), atol=1e-5).item()
    assert "_embedding_t" not in dict(model.decoder.items())  # never a parameter or state


def test_cpu_buffer_cache_is_raised_inside_and_restored_after():
    scores = DIMS.n_audio_head * 1500**2 * 4  # float32 bytes of one layer's attention scores

    def limit_inside(*args, **kwargs) -> int:
        with cpu_buffer_cache(DIMS, *args, **kwargs):
            inside = mx.set_cache_limit(0)
            mx.set_cache_limit(inside)
        return inside

    previous = mx.set_cache_limit(32 << 20)
    try:
        assert limit_inside(mx.float32) == 4 * scores
        assert limit_inside(mx.float16) == 2 * scores  # half the bytes per score
        assert mx.set_cache_limit(10 * scores) == 32 << 20
        assert limit_inside(mx.float32, batch_size=2) == 10 * scores  # a larger limit is kept
        assert mx.set_cache_limit(0) == 10 * scores
    finally:
        mx.set_cache_limit(previous)
