"""The Whisper model in MLX, with OpenAI's layer names so that weight conversion is a rename."""

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import kernels
from .kernels import LayerNorm, gelu

# Keys that may sit in a config.json beside the dimensions without describing the shape.
_NON_SHAPE_KEYS = {"model_type", "quantization", "quantization_config", "dtype", "base_model"}


@dataclass
class ModelDimensions:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelDimensions":
        """Build from an MLX-style config; unknown or missing keys are errors naming `source`."""
        names = {f.name for f in fields(cls)}
        unknown = set(config) - names - _NON_SHAPE_KEYS
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}; expected {sorted(names)}")
        missing = names - set(config)
        if missing:
            raise ValueError(f"{source}: missing required keys {sorted(missing)}")
        return cls(**{name: int(config[name]) for name in names})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> mx.array:
    """Fixed sinusoidal position embeddings of the audio encoder, (length, channels)."""
    assert channels % 2 == 0
    log_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-log_increment * np.arange(channels // 2))
    scaled_time = np.arange(length)[:, None] * inv_timescales[None, :]
    return mx.array(np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1), dtype=mx.float32)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def __call__(self, x, xa=None, mask=None, kv_cache=None, return_qk: bool = False):
        q = self.query(x)
        if xa is None:
            k, v = self.key(x), self.value(x)
            if kv_cache is not None:
                k = mx.concatenate([kv_cache[0], k], axis=1)
                v = mx.concatenate([kv_cache[1], v], axis=1)
            cache = (k, v)
            k, v = self._split_heads(k), self._split_heads(v)
        elif kv_cache is None:  # cross-attention keys/values depend on the audio only: cached split
            k, v = kernels.cross_attention_cache(self._split_heads(self.key(xa)), self._split_heads(self.value(xa)))
            cache = (k, v)
        else:
            k, v = cache = kv_cache
        b, t_q, d = q.shape
        q, scale = self._split_heads(q), (d // self.n_head) ** -0.5
        qk = None
        if return_qk:
            out, qk = kernels.attention_with_weights(q, k, v, scale, mask)
        else:
            out = kernels.attention(q, k, v, scale, mask, self.training)
        return self.out(out.transpose(0, 2, 1, 3).reshape(b, t_q, d)), cache, qk

    def _split_heads(self, x):
        b, t, d = x.shape
        return x.reshape(b, t, self.n_head, d // self.n_head).transpose(0, 2, 1, 3)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        if cross_attention:
            self.cross_attn = MultiHeadAttention(n_state, n_head)
            self.cross_attn_ln = LayerNorm(n_state)
        n_mlp = n_state * 4
        self.mlp1 = nn.Linear(n_state, n_mlp)
        self.mlp2 = nn.Linear(n_mlp, n_state)
        self.mlp_ln = LayerNorm(n_state)

    def __call__(self, x, xa=None, mask=None, kv_cache=None, return_qk: bool = False):
        self_kv, cross_kv = kv_cache if kv_cache is not None else (None, None)
        y, self_kv, _ = self.attn(self.attn_ln(x), mask=mask, kv_cache=self_kv)
        x = x + y
        cross_qk = None
        if hasattr(self, "cross_attn"):
            y, cross_kv, cross_qk = self.cross_attn(self.cross_attn_ln(x), xa, kv_cache=cross_kv, return_qk=return_qk)
            x = x + y
        x = x + self.mlp2(gelu(self.mlp1(self.mlp_ln(x))))
        return x, (self_kv, cross_kv), cross_qk


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self._positional_embedding = sinusoids(n_ctx, n_state)
        self.blocks = [ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)]
        self.ln_post = LayerNorm(n_state)

    def __call__(self, x):
        # x: (batch, n_frames, n_mels) -> (batch, n_frames // 2, n_state)
        x = gelu(self.conv1(x))
        x = gelu(self.conv2(x))
        n_ctx = self._positional_embedding.shape[0]
        if x.shape[1] != n_ctx:
            raise ValueError(f"audio has {x.shape[1] * 2} mel frames; the encoder expects {n_ctx * 2} (30 s)")
        x = x + self._positional_embedding.astype(x.dtype)
        for block in self.blocks:
            x, _, _ = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int, dtype=mx.float32):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = mx.zeros((n_ctx, n_state))
        self.blocks = [ResidualAttentionBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer)]
        self.ln = LayerNorm(n_state)
        self._mask = nn.MultiHeadAttention.create_additive_causal_mask(n_ctx).astype(dtype)
        self._embedding_t = kernels.TransposedCopy()

    def __call__(self, tokens, xa, kv_cache=None, return_qk: bool = False, positions=None, mask=None):
        """tokens (batch, n_new) -> logits (batch, n_new, n_vocab), new kv_cache, cross-attention qk.

        Rows of one batch may sit at different positions (prompts of different lengths): then
        `positions` (batch, n_new) gives each token's position and `mask` which cached keys each
        row may attend to (see decoding.RaggedPrompts); by default every row continues the cache.
        """
        offset = 0 if kv_cache is None else kv_cache[0][0][0].shape[1]
        n_new = tokens.shape[-1]
        if positions is None:
            x = self.token_embedding(tokens) + self.positional_embedding[offset : offset + n_new]
        else:
            x = self.token_embedding(tokens) + self.positional_embedding[positions]
        if mask is None and n_new > 1:  # "causal": the fused kernel builds the mask itself
            mask = "causal" if offset == 0 else self._mask[offset : offset + n_new, : offset + n_new].astype(x.dtype)
        if kv_cache is None:
            kv_cache = [None] * len(self.blocks)
        new_cache, cross_qk = [], []
        for block, block_cache in zip(self.blocks, kv_cache):
            x, block_cache, qk = block(x, xa, mask=mask, kv_cache=block_cache, return_qk=return_qk)
            new_cache.append(block_cache)
            cross_qk.append(qk)
        x = self.ln(x)
        return self._vocab_logits(x), new_cache, cross_qk

    def _vocab_logits(self, x: mx.array) -> mx.array:
        return kernels.vocab_logits(x, self.token_embedding, self._embedding_t, self.training)


class Whisper(nn.Module):
    def __init__(self, dims: ModelDimensions, dtype: mx.Dtype = mx.float32):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(
            dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer
        )
        self.decoder = TextDecoder(
            dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer, dtype
        )
        # By default use the last half of the decoder layers for time alignment (as OpenAI does).
        heads = np.zeros((dims.n_text_layer, dims.n_text_head), dtype=bool)
        heads[dims.n_text_layer // 2 :] = True
        self._alignment_heads = mx.array(np.argwhere(heads))

    @property
    def alignment_heads(self) -> mx.array:
        """(K, 2) array of (layer, head) pairs whose cross-attention follows the audio in time."""
        return self._alignment_heads

    def set_alignment_heads(self, heads) -> None:
        heads = np.asarray(heads)
        if heads.ndim == 1:  # a flat boolean mask over (layer, head)
            heads = np.argwhere(heads.reshape(self.dims.n_text_layer, self.dims.n_text_head))
        self._alignment_heads = mx.array(heads.astype(np.int32))

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype (of the float weights; the scales' dtype when quantized)."""
        return self.decoder.ln.weight.dtype

    def embed_audio(self, mel: mx.array) -> mx.array:
        return self.encoder(mel)

    def logits(self, tokens: mx.array, audio_features: mx.array) -> mx.array:
        return self.decoder(tokens, audio_features)[0]

    def __call__(self, mel: mx.array, tokens: mx.array) -> mx.array:
        return self.logits(tokens, self.embed_audio(mel))

    @property
    def is_multilingual(self) -> bool:
        return self.dims.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        return self.dims.n_vocab - 51765 - int(self.is_multilingual)
