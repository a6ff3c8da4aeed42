"""The training-speed paths of the model (query padding for cuDNN, GELU's own backward, LayerNorm's
backward without frozen-weight gradients, LoRA through addmm), checked on CPU against the plain formulas.

The padding only switches on under CUDA; here `kernels.on_cuda` is forced so that the padded attention
runs through MLX's CPU kernels, whose results must equal the unpadded ones.
"""

import math
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from models import backend, kernels
from models.kernels import LayerNorm, gelu, gelu_cpu
from models.tuner.lora import LoRALinear
from models.whisper import MultiHeadAttention

N_HEAD, D_HEAD = 4, 16


def spy_on_padding(monkeypatch) -> list:
    """Record the row count of every `kernels.append_zero_rows` call (the padded path)."""
    calls, append_zero_rows = [], kernels.append_zero_rows

    def spy(x, n):
        calls.append(n)
        return append_zero_rows(x, n)

    monkeypatch.setattr(kernels, "append_zero_rows", spy)
    return calls


def _attention_and_grads(q, k, v, mask, training):
    cotangent = mx.random.normal(q.shape, key=mx.random.key(3)).astype(q.dtype)
    scale = D_HEAD**-0.5

    def loss(q, k, v):
        out = kernels.attention(q, k, v, scale, mask, training)
        return (out.astype(mx.float32) * cotangent.astype(mx.float32)).sum()

    grads = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return kernels.attention(q, k, v, scale, mask, training), grads


@pytest.mark.parametrize("t_q,t_k,mask", [(50, 50, None), (37, 37, "causal"), (20, 70, None)])
def test_query_padding_changes_nothing(monkeypatch, t_q, t_k, mask):
    monkeypatch.setattr(kernels, "on_cuda", lambda: True)
    padded_rows = spy_on_padding(monkeypatch)
    keys = mx.random.split(mx.random.key(0), 3)
    q, k, v = (
        mx.random.normal((2, N_HEAD, t, D_HEAD), key=key).astype(mx.bfloat16) for t, key in zip((t_q, t_k, t_k), keys)
    )

    assert kernels.cudnn_query_padding(t_q, mx.bfloat16, mask, training=False) == 0
    out_plain, grads_plain = _attention_and_grads(q, k, v, mask, training=False)
    assert padded_rows == []
    assert kernels.cudnn_query_padding(t_q, mx.bfloat16, mask, training=True) == 128 - t_q
    out_padded, grads_padded = _attention_and_grads(q, k, v, mask, training=True)
    assert set(padded_rows) == {128 - t_q}  # the padded path did run (keys too when causal)

    assert out_padded.shape == out_plain.shape
    np.testing.assert_allclose(
        np.array(out_padded.astype(mx.float32)), np.array(out_plain.astype(mx.float32)), atol=2e-2
    )
    for padded, plain in zip(grads_padded, grads_plain):
        assert padded.shape == plain.shape
        scale = float(mx.abs(plain.astype(mx.float32)).max())
        np.testing.assert_allclose(
            np.array(padded.astype(mx.float32)), np.array(plain.astype(mx.float32)), atol=2e-2 * scale
        )


def test_query_padding_only_where_cudnn_needs_it(monkeypatch):
    assert kernels.cudnn_query_padding(50, mx.bfloat16, None, training=True) == 0  # CPU: never
    monkeypatch.setattr(kernels, "on_cuda", lambda: True)
    assert kernels.cudnn_query_padding(1500, mx.bfloat16, None, training=True) == 36
    assert kernels.cudnn_query_padding(256, mx.bfloat16, None, training=True) == 0  # already a multiple of 128
    assert kernels.cudnn_query_padding(50, mx.float32, None, training=True) == 0  # cuDNN: half precision only
    assert kernels.cudnn_query_padding(50, mx.bfloat16, mx.zeros((50, 50)), training=True) == 0  # array masks: no
    assert kernels.cudnn_query_padding(50, mx.bfloat16, None, training=False) == 0


def test_attention_layers_pad_in_training_only(monkeypatch):
    monkeypatch.setattr(kernels, "on_cuda", lambda: True)
    padded_rows = spy_on_padding(monkeypatch)
    attention = MultiHeadAttention(64, N_HEAD)
    attention.set_dtype(mx.bfloat16)
    x = mx.random.normal((2, 50, 64), key=mx.random.key(12)).astype(mx.bfloat16)
    attention.eval()
    mx.eval(attention(x)[0])
    assert padded_rows == []
    attention.train()
    mx.eval(attention(x)[0])
    assert padded_rows == [78]


@pytest.mark.parametrize("cpu_path", [True, False])
@pytest.mark.parametrize("dtype,tolerance", [(mx.float32, 1e-5), (mx.bfloat16, 2e-2)])
def test_gelu_and_its_backward_match_nn_gelu(monkeypatch, cpu_path, dtype, tolerance):
    monkeypatch.setattr(kernels, "on_cpu", lambda: cpu_path)  # False: the GPU formulas, run on CPU
    x = (3 * mx.random.normal((4, 33), key=mx.random.key(1))).astype(dtype)
    weights = mx.random.normal((4, 33), key=mx.random.key(2))

    def loss(fn):
        return lambda x: (fn(x).astype(mx.float32) * weights).sum()

    assert mx.array_equal(gelu(x), gelu_cpu(x) if cpu_path else nn.gelu(x))
    lean, plain = mx.grad(loss(gelu))(x), mx.grad(loss(nn.gelu))(x)
    np.testing.assert_allclose(
        np.array(lean.astype(mx.float32)), np.array(plain.astype(mx.float32)), atol=tolerance, rtol=tolerance
    )
    # Compiled, as in the training step.
    compiled = mx.compile(mx.grad(loss(gelu)))(x)
    np.testing.assert_allclose(np.array(compiled.astype(mx.float32)), np.array(lean.astype(mx.float32)), atol=tolerance)


def test_layer_norm_training_path_equals_fused():
    ln = LayerNorm(48)
    ln.weight = mx.random.normal((48,), key=mx.random.key(4))
    ln.bias = mx.random.normal((48,), key=mx.random.key(5))
    x = mx.random.normal((3, 7, 48), key=mx.random.key(6))
    weights = mx.random.normal((3, 7, 48), key=mx.random.key(7))

    def grad_of_input(train):
        ln.train(train)
        return mx.grad(lambda x: (ln(x) * weights).sum())(x)

    ln.eval()
    fused, plain_grad = ln(x), grad_of_input(False)
    ln.freeze()
    ln.train()
    np.testing.assert_allclose(np.array(ln(x)), np.array(fused), atol=1e-5)
    np.testing.assert_allclose(np.array(grad_of_input(True)), np.array(plain_grad), atol=1e-4)
    compiled = mx.compile(mx.grad(lambda x: (ln(x) * weights).sum()))(x)
    np.testing.assert_allclose(np.array(compiled), np.array(plain_grad), atol=1e-4)


def test_layer_norm_with_trainable_weight_keeps_its_gradients():
    ln = LayerNorm(8)
    ln.train()
    x = mx.random.normal((5, 8), key=mx.random.key(11))
    grads = nn.value_and_grad(ln, lambda m, x: (m(x) * mx.arange(8)).sum())(ln, x)[1]
    assert float(mx.abs(grads["weight"]).sum()) > 0 and float(mx.abs(grads["bias"]).sum()) > 0


def test_lora_forward_and_gradients_follow_the_formula():
    base = nn.Linear(16, 12)
    layer = LoRALinear.from_base(base, r=4, alpha=8.0)
    layer.lora_b = mx.random.normal((4, 12), key=mx.random.key(8))
    x = mx.random.normal((2, 5, 16), key=mx.random.key(9))
    weights = mx.random.normal((2, 5, 12), key=mx.random.key(10))

    def reference(params):
        a, b = params["lora_a"], params["lora_b"]
        return ((base(x) + layer.scale * (x @ a) @ b) * weights).sum()

    def ours(params):
        layer.update(params)
        return (layer(x) * weights).sum()

    params = {"lora_a": layer.lora_a, "lora_b": layer.lora_b}
    np.testing.assert_allclose(
        np.array(layer(x)), np.array(base(x) + layer.scale * (x @ layer.lora_a) @ layer.lora_b), atol=1e-5
    )
    expected, got = mx.grad(reference)(params), mx.grad(ours)(params)
    for name in params:
        np.testing.assert_allclose(np.array(got[name]), np.array(expected[name]), atol=1e-4)


def test_cuda_queue_limit_respects_the_user(monkeypatch):
    monkeypatch.setattr(backend.sys, "platform", "linux")
    monkeypatch.delenv("MLX_MAX_MB_PER_BUFFER", raising=False)
    backend.limit_cuda_queue_memory()
    assert os.environ["MLX_MAX_MB_PER_BUFFER"] == backend.CUDA_MAX_MB_PER_BUFFER
    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "123")
    backend.limit_cuda_queue_memory()
    assert os.environ["MLX_MAX_MB_PER_BUFFER"] == "123"
    monkeypatch.setattr(backend.sys, "platform", "darwin")  # Metal has its own defaults
    monkeypatch.delenv("MLX_MAX_MB_PER_BUFFER")
    backend.limit_cuda_queue_memory()
    assert "MLX_MAX_MB_PER_BUFFER" not in os.environ
    assert math.isfinite(float(backend.CUDA_MAX_MB_PER_BUFFER))
