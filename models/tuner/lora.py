"""LoRA adapters for Whisper: layers, configuration, and conversion helpers.

`linear_to_lora_layers` is the one place that turns a model's Linear layers into
LoRA layers; training, `transcribe.py --adapter-path` and `fuse.py` all call it
with the `LoRAConfig` stored next to the adapter weights.
"""

import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

# Bump when LoRAConfig gains fields; older code then warns about (and drops)
# the new keys instead of refusing the file.
LORA_CONFIG_VERSION = 1

# Linear layers a LoRA target may name, relative to a residual block.
# `cross_attn.*` exists in decoder blocks only.
ATTENTION_TARGETS = ("attn.query", "attn.key", "attn.value", "attn.out")
CROSS_ATTENTION_TARGETS = tuple("cross_" + t for t in ATTENTION_TARGETS)
VALID_TARGETS = ATTENTION_TARGETS + CROSS_ATTENTION_TARGETS + ("mlp1", "mlp2")

DEFAULT_TARGETS = ["attn.query", "attn.value", "cross_attn.query", "cross_attn.value"]


class LoRALinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update.

    y = base(x) + scale * dropout(x) @ lora_a @ lora_b, with lora_a (in, r) and
    lora_b (r, out). The base may be `nn.Linear` or `nn.QuantizedLinear` (QLoRA);
    it stays frozen and, if quantized, quantized.
    """

    def __init__(self, base: nn.Module, r: int, scale: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise TypeError(f"LoRALinear wraps nn.Linear or nn.QuantizedLinear, got {type(base).__name__}")
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        input_dims, output_dims = _linear_dims(base)
        self.linear = base
        self.linear.freeze()
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, r))
        # Zero B makes a fresh adapter an exact no-op.
        self.lora_b = mx.zeros((r, output_dims))

    @classmethod
    def from_base(
        cls,
        linear: nn.Module,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        scale: Optional[float] = None,
    ) -> "LoRALinear":
        """Wrap `linear` with a fresh adapter; scale is `alpha / r` unless given."""
        if scale is None:
            scale = alpha / r
        return cls(linear, r=r, scale=scale, dropout=dropout)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        # The low-rank path runs in the input dtype (e.g. bf16 activations). Adding it to y inside
        # the matmul (addmm) with the scale folded into B saves full-size elementwise passes
        # forward and backward; rows flattened to 2-D make the gradients of A and B single
        # matmuls instead of per-clip products summed over the batch.
        a = self.lora_a.astype(x.dtype)
        b = (self.scale * self.lora_b).astype(x.dtype)
        rows = self.dropout(x).reshape(-1, x.shape[-1])
        z = mx.addmm(y.reshape(-1, y.shape[-1]), rows @ a, b)
        return z.reshape(y.shape).astype(y.dtype)

    def delta_weight(self) -> mx.array:
        """The update to the base weight, (out, in) in float32."""
        a = self.lora_a.astype(mx.float32)
        b = self.lora_b.astype(mx.float32)
        return self.scale * (a @ b).T

    def fuse(self, requantize: bool = False) -> nn.Module:
        """Merge the adapter into the base weight: W' = W + scale * (A @ B).T.

        Returns an `nn.Linear` in the base dtype. For a quantized base the weight
        is dequantized before merging; with `requantize=True` the result is
        quantized again with the base's group size, bits and mode (lossy).
        """
        base = self.linear
        if isinstance(base, nn.QuantizedLinear):
            weight = _dequantized_weight(base)
        else:
            weight = base.weight
        dtype = weight.dtype
        merged = (weight.astype(mx.float32) + self.delta_weight()).astype(dtype)

        output_dims, input_dims = merged.shape
        fused = nn.Linear(input_dims, output_dims, bias="bias" in base)
        fused.weight = merged
        if "bias" in base:
            fused.bias = base.bias
        if requantize and isinstance(base, nn.QuantizedLinear):
            return nn.QuantizedLinear.from_linear(
                fused, base.group_size, base.bits, mode=getattr(base, "mode", "affine")
            )
        return fused


def _linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(input_dims, output_dims) of a Linear or QuantizedLinear."""
    output_dims, stored_in = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        # Quantized weights pack 32 // bits values into each uint32.
        return stored_in * 32 // layer.bits, output_dims
    return stored_in, output_dims


def _dequantized_weight(layer: nn.Module) -> mx.array:
    return mx.dequantize(
        layer.weight,
        layer.scales,
        layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=getattr(layer, "mode", "affine"),
    )


@dataclass
class LoRAConfig:
    """Everything needed to rebuild LoRA layers on a base model.

    num_layers: adapt the last N blocks of the encoder and of the decoder (-1 = all;
        a stack with fewer blocks is adapted fully).
    alpha / rank is the update scale unless `scale` is set.
    freeze_encoder: no LoRA layers in the encoder (the whole encoder is frozen).
    """

    num_layers: int = -1
    rank: int = 8
    alpha: float = 16.0
    scale: Optional[float] = None
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    freeze_encoder: bool = False
    version: int = LORA_CONFIG_VERSION

    def __post_init__(self):
        if self.num_layers != -1 and self.num_layers < 1:
            raise ValueError(f"LoRA num_layers must be -1 (all blocks) or >= 1, got {self.num_layers}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise ValueError(f"LoRA targets must be a list of strings, got {self.targets!r}")
        self.targets = list(self.targets)
        validate_targets(self.targets)

    @property
    def lora_scale(self) -> float:
        """The scale applied to the low-rank update."""
        return self.scale if self.scale is not None else self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> "LoRAConfig":
        """Build from a dict; unknown keys are an error unless written by a newer version."""
        config = dict(config)
        version = config.get("version", LORA_CONFIG_VERSION)
        if not isinstance(version, int):
            raise ValueError(f"LoRA config 'version' must be an integer, got {version!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown and version > LORA_CONFIG_VERSION:
            warnings.warn(
                f"LoRA config version {version} is newer than this code "
                f"({LORA_CONFIG_VERSION}); ignoring keys {unknown}",
                stacklevel=2,
            )
            config = {k: v for k, v in config.items() if k in known}
            config["version"] = LORA_CONFIG_VERSION
        elif unknown:
            raise ValueError(f"Unknown LoRA config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**config)


def validate_targets(targets: list[str]) -> None:
    """Raise a ValueError naming any target that is not a known block Linear."""
    bad = [t for t in targets if t not in VALID_TARGETS]
    if bad:
        raise ValueError(f"Unknown LoRA targets {bad}; valid targets are {list(VALID_TARGETS)}")


def _adapted_blocks(blocks: list, num_layers: int) -> list:
    """The last `num_layers` blocks (all of them for -1 or a larger count)."""
    if num_layers == -1:
        return list(blocks)
    return list(blocks)[max(len(blocks) - num_layers, 0) :]


def _replace_target(block: nn.Module, target: str, config: LoRAConfig) -> bool:
    """Swap `block.<target>` for a LoRALinear; False if the block lacks the parent module."""
    parent_name, leaf_name = target.rsplit(".", 1) if "." in target else ("", target)
    parent = block.get(parent_name) if parent_name else block
    if parent is None:
        return False
    layer = parent.get(leaf_name)
    if isinstance(layer, LoRALinear):
        raise ValueError(f"'{target}' already has a LoRA layer: call linear_to_lora_layers once per model")
    if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
        raise ValueError(f"LoRA target '{target}' is {type(layer).__name__}, expected a Linear layer")
    lora = LoRALinear.from_base(layer, r=config.rank, dropout=config.dropout, scale=config.lora_scale)
    setattr(parent, leaf_name, lora)
    return True


def linear_to_lora_layers(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replace the targeted Linear layers of `model` with LoRA layers, in place.

    Targets the last `config.num_layers` blocks of the encoder (unless
    `freeze_encoder`) and of the decoder; `cross_attn.*` applies to decoder
    blocks only. Afterwards only the `lora_a` / `lora_b` tensors are trainable.
    Returns `model` for convenience.
    """
    validate_targets(config.targets)
    if config.num_layers != -1:
        deepest = max(len(model.encoder.blocks), len(model.decoder.blocks))
        if config.num_layers > deepest:
            warnings.warn(
                f"LoRA num_layers={config.num_layers} exceeds the model's {deepest} blocks; adapting all blocks",
                stacklevel=2,
            )
    stacks = [model.decoder] if config.freeze_encoder else [model.encoder, model.decoder]
    for stack in stacks:
        for block in _adapted_blocks(stack.blocks, config.num_layers):
            for target in config.targets:
                replaced = _replace_target(block, target, config)
                # Encoder blocks have no cross-attention; anything else must exist.
                if not replaced and target not in CROSS_ATTENTION_TARGETS:
                    raise ValueError(f"Model blocks have no '{target}' layer")

    model.freeze()
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    return model


def fuse_lora_layers(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Replace every LoRALinear in `model` by its fused layer, in place.

    Quantized bases become dequantized `nn.Linear` layers unless `requantize`.
    """
    fused = [
        (name, module.fuse(requantize=requantize))
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear)
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace QuantizedLinear / QuantizedEmbedding layers by float ones, in place.

    The float dtype is that of the quantization scales.
    """
    replaced = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            weight = _dequantized_weight(module)
            output_dims, input_dims = weight.shape
            linear = nn.Linear(input_dims, output_dims, bias="bias" in module)
            linear.weight = weight
            if "bias" in module:
                linear.bias = module.bias
            replaced.append((name, linear))
        elif isinstance(module, nn.QuantizedEmbedding):
            weight = _dequantized_weight(module)
            embedding = nn.Embedding(*weight.shape)
            embedding.weight = weight
            replaced.append((name, embedding))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return model


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of trainable scalars (after LoRA conversion: the lora_a/lora_b sizes)."""
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def parameter_count(model: nn.Module) -> int:
    """Number of model weights, counting quantized weights as unpacked values.

    Quantization scales and biases are bookkeeping, not weights, and are skipped.
    """
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            packed = module.weight.size + module.scales.size
            if module.get("biases") is not None:
                packed += module.biases.size
            total += module.weight.size * 32 // module.bits - packed
    return total
