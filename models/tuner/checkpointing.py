"""Gradient checkpointing of Whisper blocks (--grad-checkpoint): less memory for a little speed."""

import mlx.core as mx
import mlx.nn as nn


def checkpoint_blocks(model) -> None:
    """Recompute each residual block in the backward pass instead of keeping its activations.

    The block class is patched once, but only blocks of `model` are checkpointed: other models
    (a decoding run, a test's reference model) keep the plain forward pass. Dropout is refused:
    the recomputation would draw other masks than the forward pass, and the gradients would be wrong.
    """
    if any(isinstance(m, nn.Dropout) and m._p_1 < 1 for _, m in model.named_modules()):
        raise ValueError(
            "--grad-checkpoint cannot be combined with dropout (--lora-dropout > 0): the "
            "recomputed forward pass would draw other dropout masks; drop one of the two"
        )
    for blocks in (model.encoder.blocks, model.decoder.blocks):
        for block in blocks:
            block._grad_checkpoint = True
            block_class = type(block)
            if getattr(block_class, "_checkpointed", False):
                continue
            original = block_class.__call__

            def checkpointed(self, x, *args, _original=original, **kwargs):
                if (
                    not getattr(self, "_grad_checkpoint", False)
                    or not self.training
                    or kwargs.get("kv_cache") is not None
                    or kwargs.get("return_qk")
                ):
                    return _original(self, x, *args, **kwargs)

                def inner(params, x, *inner_args):
                    self.update(params)
                    return _original(self, x, *inner_args, **kwargs)[0]

                return mx.checkpoint(inner)(self.trainable_parameters(), x, *args), None, None

            block_class.__call__ = checkpointed
            block_class._checkpointed = True
