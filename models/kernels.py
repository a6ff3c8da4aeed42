"""The Whisper model's kernels, with their per-backend fast paths: same results, less time or memory.

`attention`, `cross_attention_cache`, `vocab_logits`, `gelu` and `LayerNorm` are what
models/whisper.py calls; each picks its path here:
- CPU (inference and training): a rational-erf GELU, softmax attention with 2^x, encoder heads
  split over two CPU streams, cross-attention keys stored transposed, a contiguous transposed
  vocabulary projection.
- CUDA training: query padding that keeps attention's backward on cuDNN's fused kernel.
- Training anywhere: GELU and LayerNorm whose backward passes keep and compute only what
  frozen weights need.
"""

import math
from typing import Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from .backend import on_cpu, on_cuda

CUDNN_BLOCK = 128  # query-length multiple for cuDNN's fused attention backward in MLX's CUDA backend


# erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (Eigen's float erf, max error 4e-7): MLX's CPU erf goes
# through its slow exp (benchmarks/README.md, CPU transcription).
_ERF_P = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


def erf_cpu(z: mx.array) -> mx.array:
    """erf through the rational approximation above (CPU: faster than mx.erf)."""
    z = mx.clip(z, -4.0, 4.0)
    z2 = z * z
    p, q = _ERF_P[0], _ERF_Q[0]
    for c in _ERF_P[1:]:
        p = p * z2 + c
    for c in _ERF_Q[1:]:
        q = q * z2 + c
    return z * p / q


def gelu_cpu(x: mx.array) -> mx.array:
    """Exact (erf) GELU through the rational erf."""
    return x * (1 + erf_cpu(x * (1 / math.sqrt(2)))) / 2


@mx.custom_function
def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, differentiated from its input alone.

    Autodiff through the formula keeps x / sqrt(2), 1 + erf(...) (and on CPU every term of the
    rational erf) as well as x for the backward pass: several (batch, T, 4 * n_state) arrays per
    block instead of one.
    """
    return gelu_cpu(x) if on_cpu() else nn.gelu(x)


@gelu.vjp
def _gelu_vjp(x, cotangent, output):
    # d/dx x Phi(x) = Phi(x) + x phi(x), in float32; 2^x for e^x on CPU, whose exp is slow.
    x = x.astype(mx.float32)
    if on_cpu():
        cdf = 0.5 * (1 + erf_cpu(x * (1 / math.sqrt(2))))
        density = mx.power(2.0, (-0.5 * math.log2(math.e)) * x * x)
    else:
        cdf = 0.5 * (1 + mx.erf(x * (1 / math.sqrt(2))))
        density = mx.exp(-0.5 * x * x)
    slope = cdf + x * density * (1 / math.sqrt(2 * math.pi))
    return (cotangent * slope.astype(cotangent.dtype),)


_cpu_streams = []  # created on first use


def split_over_cpu_streams(fn, arrays, axis: int) -> mx.array:
    """`fn` of each half of `arrays` along `axis`, every half on its own CPU stream, joined again.

    MLX runs each CPU elementwise or reduction kernel on one thread, so the softmax passes of
    the encoder's attention left the second core idle between BLAS calls; two streams run two
    halves of the heads at once.
    """
    n = arrays[0].shape[axis]
    if n < 2:
        return fn(*arrays)
    if not _cpu_streams:
        _cpu_streams.extend(mx.new_stream(mx.cpu) for _ in range(2))
    parts = []
    for stream, part in zip(_cpu_streams, (slice(0, n // 2), slice(n // 2, n))):
        index = (slice(None),) * axis + (part,)
        with mx.stream(stream):
            parts.append(fn(*(a[index] for a in arrays)))
    return mx.concatenate(parts, axis=axis)


def attend_exp2(q, k, v, scale: float) -> mx.array:
    """softmax(q k^T * scale) v with 2^x instead of e^x (log2(e) folded into the scale).

    For long unmasked attention on CPU (the encoder, cross-attention over a long prompt): MLX's
    CPU exp is slower than its power(2, x), and the softmax over (heads, 1500, 1500) dominates
    each encoder block. The row sums come out of the product with v (a column of ones
    appended to it) instead of another pass over (heads, T, T), and the division is then over
    (heads, T, d_head).
    """
    scores = (q * (scale * math.log2(math.e))) @ k.transpose(0, 1, 3, 2)
    weights = mx.power(2.0, scores - scores.max(axis=-1, keepdims=True))
    ones = mx.ones(v.shape[:-1] + (1,), v.dtype)
    out = weights @ mx.concatenate([v, ones], axis=-1)
    return out[..., :-1] / out[..., -1:]


def append_zero_rows(x: mx.array, n: int) -> mx.array:
    """(b, h, t, d) -> (b, h, t + n, d), zeros last; cheaper than mx.pad, which fills everything first."""
    b, h, _, d = x.shape
    return mx.concatenate([x, mx.zeros((b, h, n, d), dtype=x.dtype)], axis=2)


_LN_EPS = 1e-5  # nn.LayerNorm's default, which Whisper uses


@mx.custom_function
def _layer_norm_frozen_affine(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """mx.fast.layer_norm whose backward gives x's gradient only (weight and bias frozen).

    MLX's own layer-norm backward also reduces weight's and bias's gradients over every row
    (batch x frames): work thrown away in LoRA training, where they are frozen.
    """
    return mx.fast.layer_norm(x, weight, bias, _LN_EPS)


@_layer_norm_frozen_affine.vjp
def _layer_norm_frozen_affine_vjp(primals, cotangent, output):
    x, weight, bias = primals
    _, (dx,) = mx.vjp(lambda x: mx.fast.layer_norm(x, None, None, _LN_EPS), [x], [cotangent * weight])
    return dx, mx.zeros_like(weight), mx.zeros_like(bias)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose backward skips the gradients of a frozen weight and bias.

    Same parameters and names; inference and trainable weight/bias take nn.LayerNorm's path.
    """

    def __call__(self, x: mx.array) -> mx.array:
        frozen = {"weight", "bias"} <= self._no_grad
        if self.training and frozen and self.eps == _LN_EPS:
            return _layer_norm_frozen_affine(x, self.weight, self.bias)
        return super().__call__(x)


def cudnn_query_padding(t_q: int, dtype: mx.Dtype, mask, training: bool) -> int:
    """Zero query rows to append in training on CUDA so that attention's backward stays fused.

    MLX's CUDA backend differentiates attention with cuDNN's fused kernel only when the query
    length is a multiple of 128; otherwise it falls back to the unfused product and keeps every
    (batch, heads, T, T) weight matrix for the backward pass. Zero queries past the end change
    nothing: their outputs are dropped, so their output gradient is zero and they add nothing
    to the keys' and values' gradients.
    """
    if not (training and t_q % CUDNN_BLOCK and (mask is None or isinstance(mask, str))):
        return 0
    if dtype not in (mx.float16, mx.bfloat16) or not on_cuda():
        return 0
    return -t_q % CUDNN_BLOCK


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Union[None, str, mx.array] = None, training: bool = False
) -> mx.array:
    """softmax(q k^T * scale + mask) v for (batch, heads, T, d_head) arrays; `mask` may be "causal"."""
    t_q = q.shape[2]
    if mask is None and t_q >= 64 and on_cpu():
        return split_over_cpu_streams(lambda q, k, v: attend_exp2(q, k, v, scale), (q, k, v), axis=1)
    pad = cudnn_query_padding(t_q, q.dtype, mask, training)
    if pad:
        q = append_zero_rows(q, pad)
        if mask == "causal":  # equal lengths keep the causal mask's meaning; padded keys come last
            k, v = append_zero_rows(k, pad), append_zero_rows(v, pad)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if pad:
        # split, not a slice: a slice's gradient is a zero-filled full-size copy, a split's
        # is the kept part joined with zeros for the dropped rows.
        out = mx.split(out, [t_q], axis=2)[0]
    return out


def attention_with_weights(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Optional[mx.array] = None
) -> Tuple[mx.array, mx.array]:
    """`attention` and its pre-softmax scores (float32), for the alignment heads of word timestamps."""
    qk = (q * scale) @ k.transpose(0, 1, 3, 2)
    if mask is not None:
        qk = qk + mask
    qk = qk.astype(mx.float32)
    weights = mx.softmax(qk, axis=-1).astype(q.dtype)
    return weights @ v, qk


def cross_attention_cache(k: mx.array, v: mx.array) -> Tuple[mx.array, mx.array]:
    """The cached layout of cross-attention keys and values, (batch, heads, T, d_head) each.

    On CPU the values are made contiguous and the keys are stored as (batch, heads, d_head, T),
    viewed transposed: the score product q k^T then reads them without a copy.
    """
    if on_cpu():
        return mx.contiguous(k.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2), mx.contiguous(v)
    return k, v


def vocab_logits(x: mx.array, embedding: nn.Module, transposed: "TransposedCopy", training: bool) -> mx.array:
    """x @ embedding.weight.T: on CPU in inference, through a contiguous copy of the transpose.

    With one row per decoded token, OpenBLAS's sgemm reads a (n_vocab, n_state) weight seen
    transposed more slowly than a contiguous (n_state, n_vocab) one. The copy is made on the
    first call and costs n_vocab * n_state more floats of memory.
    """
    if on_cpu() and not training and type(embedding) is nn.Embedding:
        return x @ transposed(embedding.weight)
    return embedding.as_linear(x)


class TransposedCopy:
    """A contiguous copy of `weight.T`, made again whenever the weight array is replaced.

    A plain object rather than an array attribute, so it stays out of parameters() and state.
    """

    def __init__(self):
        self.source = self.copy = None

    def __call__(self, weight: mx.array) -> mx.array:
        if self.source is not weight:
            self.source, self.copy = weight, mx.contiguous(weight.T)
        return self.copy
