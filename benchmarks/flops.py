"""Counted FLOPs of Whisper forward and LoRA training passes, and the model shapes benchmarked.

Only matrix products are counted (projections, convolutions, attention scores and
weighted sums, the vocabulary projection); layer norms, GELU, softmax and the loss are
elementwise and left out. One multiply-add is 2 FLOPs. Attention is counted in full
(T_q x T_k), causal masking included, as MFU conventions do.

Backward of a LoRA step counts what the maths needs when only the adapters train:
- every matrix product whose *input* needs a gradient costs its forward FLOPs again (dX);
- the frozen base weights get no gradient (no dW products);
- an attention core whose Q, K, V all need gradients costs 2x its forward (dP, dS->dQ,
  dK, dV: four products of the forward's size); when K does not need one (the first
  block of each stack, whose key projection sees only frozen inputs), 1.5x;
- a LoRA path x @ A @ B costs 2x its forward (dz = dY B^T, dB, dA), plus dX = dz A^T
  when x needs a gradient;
- the convolutions (frozen, on the mel) and the first block's q/k/v base projections
  (whose input is frozen) need no backward.
Recomputation (FlashAttention's backward recomputes the scores) is not counted: this is
model FLOPs for MFU, not hardware FLOPs.
"""

from dataclasses import dataclass
from typing import Dict, Iterable

N_AUDIO_CTX = 1500
N_TEXT_CTX = 448


@dataclass(frozen=True)
class Shape:
    n_mels: int
    n_state: int
    n_head: int
    n_layer: int  # encoder and decoder have the same depth in every Whisper size
    n_vocab: int

    def dims(self) -> dict:
        """The models.whisper.ModelDimensions fields."""
        return dict(
            n_mels=self.n_mels,
            n_audio_ctx=N_AUDIO_CTX,
            n_audio_state=self.n_state,
            n_audio_head=self.n_head,
            n_audio_layer=self.n_layer,
            n_vocab=self.n_vocab,
            n_text_ctx=N_TEXT_CTX,
            n_text_state=self.n_state,
            n_text_head=self.n_head,
            n_text_layer=self.n_layer,
        )


SHAPES: Dict[str, Shape] = {
    "tiny": Shape(80, 384, 6, 4, 51865),
    "base": Shape(80, 512, 8, 6, 51865),
    "small": Shape(80, 768, 12, 12, 51865),
    "medium": Shape(80, 1024, 16, 24, 51865),
    "large-v3": Shape(128, 1280, 20, 32, 51866),
}

DEFAULT_TARGETS = ("attn.query", "attn.value", "cross_attn.query", "cross_attn.value")


def _linear(n: int, d_in: int, d_out: int) -> int:
    return 2 * n * d_in * d_out


def encoder_forward(shape: Shape, n_frames: int = 2 * N_AUDIO_CTX) -> int:
    """One clip through the encoder (convolutions + blocks)."""
    t, d = n_frames // 2, shape.n_state
    conv = _linear(n_frames, 3 * shape.n_mels, d) + _linear(t, 3 * d, d)
    block = 4 * _linear(t, d, d) + 2 * (2 * t * t * d) + _linear(t, d, 4 * d) + _linear(t, 4 * d, d)
    return conv + shape.n_layer * block


def decoder_forward(shape: Shape, n_tokens: int, n_audio: int = N_AUDIO_CTX) -> int:
    """One clip's `n_tokens` through the decoder, cross-attention keys/values and logits included."""
    n_tok, t, d = n_tokens, n_audio, shape.n_state
    self_attn = 4 * _linear(n_tok, d, d) + 2 * (2 * n_tok * n_tok * d)
    cross = 2 * _linear(n_tok, d, d) + 2 * _linear(t, d, d) + 2 * (2 * n_tok * t * d)
    mlp = _linear(n_tok, d, 4 * d) + _linear(n_tok, 4 * d, d)
    return shape.n_layer * (self_attn + cross + mlp) + _linear(n_tok, d, shape.n_vocab)


def _lora_layers(shape: Shape, n_tokens: int, targets: Iterable[str]) -> list:
    """(stack, target, rows, d_in, d_out) of each adapted layer of one block, for both stacks."""
    t, n_tok, d = N_AUDIO_CTX, n_tokens, shape.n_state
    layers = []
    for target in targets:
        d_in, d_out = {"mlp1": (d, 4 * d), "mlp2": (4 * d, d)}.get(target, (d, d))
        if target.startswith("cross_attn."):
            # cross-attention keys/values read the encoder output (T rows), query/out the text
            rows = t if target.endswith((".key", ".value")) else n_tok
            layers.append(("decoder", target, rows, d_in, d_out))
        else:
            layers.append(("encoder", target, t, d_in, d_out))
            layers.append(("decoder", target, n_tok, d_in, d_out))
    return layers


def _first_block_attention_backward(t_q: int, t_k: int, d: int, targets: list) -> int:
    """Backward of block 0's self-attention core, whose q/k/v see only frozen inputs."""
    q, k, v = ("attn.query" in targets), ("attn.key" in targets), ("attn.value" in targets)
    product = 2 * t_q * t_k * d
    return product * ((q or k) + q + k + v)  # dP (for dQ or dK), dQ, dK, dV


def lora_step_flops(
    shape: Shape, batch: int, n_tokens: int = 64, rank: int = 8, targets: Iterable[str] = DEFAULT_TARGETS
) -> Dict[str, int]:
    """Forward, backward and total FLOPs of one LoRA training step over `batch` clips."""
    targets = list(targets)
    t, n_tok, d, n = N_AUDIO_CTX, n_tokens, shape.n_state, shape.n_layer
    layers = _lora_layers(shape, n_tokens, targets)
    # x @ A is (rows, d_in) x (d_in, r), z @ B is (rows, r) x (r, d_out).
    lora_fwd = n * sum(2 * rows * (d_in + d_out) * rank for _, _, rows, d_in, d_out in layers)
    fwd = encoder_forward(shape) + decoder_forward(shape, n_tokens) + lora_fwd

    # Backward: dX of every product in the gradient region, attention 2x, LoRA weight grads.
    mlp = _linear(1, d, 4 * d) + _linear(1, 4 * d, d)  # per row
    enc_attn = 2 * (2 * t * t * d)
    enc_bwd = n * (4 * _linear(t, d, d) + t * mlp + 2 * enc_attn)
    # block 0: the q/k/v projections' inputs are frozen, and its attention needs fewer grads
    enc_bwd -= 3 * _linear(t, d, d) + 2 * enc_attn - _first_block_attention_backward(t, t, d, targets)
    dec_self_attn = 2 * (2 * n_tok * n_tok * d)
    dec_cross_attn = 2 * (2 * n_tok * t * d)
    dec_block = (
        4 * _linear(n_tok, d, d)
        + 2 * dec_self_attn
        + 2 * _linear(n_tok, d, d)
        + 2 * _linear(t, d, d)
        + 2 * dec_cross_attn
        + n_tok * mlp
    )
    dec_bwd = n * dec_block + _linear(n_tok, d, shape.n_vocab)  # + dX of the tied vocabulary projection
    dec_bwd -= 3 * _linear(n_tok, d, d) + 2 * dec_self_attn - _first_block_attention_backward(n_tok, n_tok, d, targets)
    # LoRA: dz = dY B^T, dB, dA (3 products) and dX = dz A^T, except where x is frozen (block 0 q/k/v).
    lora_bwd = n * sum(4 * rows * (d_in + d_out) * rank for _, _, rows, d_in, d_out in layers)
    lora_bwd -= sum(
        2 * rows * d_in * rank
        for _, target, rows, d_in, _ in layers
        if target in ("attn.query", "attn.key", "attn.value")
    )
    bwd = enc_bwd + dec_bwd + lora_bwd
    return {
        "encoder_forward": batch * encoder_forward(shape),
        "decoder_forward": batch * decoder_forward(shape, n_tokens),
        "forward": batch * fwd,
        "backward": batch * bwd,
        "total": batch * (fwd + bwd),
    }


def decode_step_flops(shape: Shape, n_context: int, batch: int = 1) -> int:
    """One new token through the decoder with a kv cache of `n_context` tokens (logits included).

    Cross-attention keys/values are cached, so their projections are not counted.
    """
    d, t = shape.n_state, N_AUDIO_CTX
    per_layer = 4 * _linear(1, d, d) + 2 * (2 * (n_context + 1) * d)  # self-attention
    per_layer += 2 * _linear(1, d, d) + 2 * (2 * t * d)  # cross-attention (q, out, scores, sum)
    per_layer += _linear(1, d, 4 * d) + _linear(1, 4 * d, d)
    return batch * (shape.n_layer * per_layer + _linear(1, d, shape.n_vocab))


H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM datasheet (dense, no sparsity)
