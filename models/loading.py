"""Loading and saving Whisper models: MLX folders, transformers folders and Hugging Face repos.

Loads are strict: a missing, unknown or misshapen tensor is an error that names it.
"""

import json
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .atomic import atomic_folder, save_safetensors_atomic, write_json_atomic
from .whisper import ModelDimensions, Whisper

_WEIGHT_FILES = ("weights.safetensors", "weights.npz", "model.safetensors")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # never loaded

# transformers name piece <-> our (OpenAI) name piece, applied in order; "^" anchors a piece at
# the start of the name and "$" at its end. Used in both directions.
NAME_TABLE = (
    (".layers.", ".blocks."),
    (".self_attn.q_proj.", ".attn.query."),
    (".self_attn.k_proj.", ".attn.key."),
    (".self_attn.v_proj.", ".attn.value."),
    (".self_attn.out_proj.", ".attn.out."),
    (".self_attn_layer_norm.", ".attn_ln."),
    (".encoder_attn.q_proj.", ".cross_attn.query."),
    (".encoder_attn.k_proj.", ".cross_attn.key."),
    (".encoder_attn.v_proj.", ".cross_attn.value."),
    (".encoder_attn.out_proj.", ".cross_attn.out."),
    (".encoder_attn_layer_norm.", ".cross_attn_ln."),
    (".fc1.", ".mlp1."),
    (".fc2.", ".mlp2."),
    (".final_layer_norm.", ".mlp_ln."),
    ("^encoder.layer_norm.", "^encoder.ln_post."),
    ("^decoder.layer_norm.", "^decoder.ln."),
    ("^decoder.embed_tokens.", "^decoder.token_embedding."),
    ("^decoder.embed_positions.weight$", "^decoder.positional_embedding$"),
)
HF_PREFIX = "model."
# transformers tensors with no counterpart here: the tied output projection, the sinusoids.
HF_ONLY = ("proj_out.weight", "encoder.embed_positions.weight")
HF_CONFIG_KEYS = {
    "num_mel_bins": "n_mels",
    "max_source_positions": "n_audio_ctx",
    "d_model": "n_audio_state",
    "encoder_attention_heads": "n_audio_head",
    "encoder_layers": "n_audio_layer",
    "vocab_size": "n_vocab",
    "max_target_positions": "n_text_ctx",
    "decoder_attention_heads": "n_text_head",
    "decoder_layers": "n_text_layer",
}
_CONV_WEIGHT = re.compile(r"encoder\.conv[12]\.weight$")


def _piece_pattern(piece: str) -> str:
    start, end = piece.startswith("^"), piece.endswith("$")
    return ("^" if start else "") + re.escape(piece.strip("^$")) + ("$" if end else "")


def _rename(key: str, to_ours: bool) -> str:
    for hf, ours in NAME_TABLE:
        source, target = (hf, ours) if to_ours else (ours, hf)
        key = re.sub(_piece_pattern(source), target.strip("^$"), key)
    return key


class ModelLoadError(ValueError):
    """A model folder or repo could not be loaded; the message says which file and why."""


def resolve_model_path(path_or_repo: str) -> Path:
    """A local folder as is; anything else is taken as a Hugging Face repo id and downloaded (cached)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: expected a model folder (config.json + weights), found a file")
        return path
    if path_or_repo.startswith((".", "/", "~")) or path_or_repo.count("/") != 1:
        raise ModelLoadError(f"{path_or_repo}: no such model folder (and not a Hugging Face repo id like user/name)")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id=path_or_repo,
            allow_patterns=["*.json", "*.safetensors", "weights.npz", "*.md"],
        )
    except Exception as error:  # network errors, missing repos and auth all land here
        reason = (str(error).strip().splitlines() or [""])[0]  # the Hub's messages run over several lines
        raise ModelLoadError(
            f"{path_or_repo}: no such model folder, and could not download model {path_or_repo!r} from the Hugging "
            f"Face Hub ({type(error).__name__}: {reason}); check the path or repo name, your network, or HF_TOKEN"
        ) from None
    return Path(local)


def read_json(path: Path, missing_message: str) -> dict:
    """A JSON config file; a missing or malformed one is a ModelLoadError naming it."""
    if not path.is_file():
        raise ModelLoadError(missing_message)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error})") from None


def read_model_config(folder: Path) -> Tuple[ModelDimensions, dict, bool]:
    """(dims, raw config, is_hf_layout) of a model folder."""
    config_path = folder / "config.json"
    config = read_json(config_path, f"{folder}: no config.json; is this a Whisper model folder?")
    if "d_model" in config:  # transformers layout
        missing = [k for k in HF_CONFIG_KEYS if k not in config]
        if missing:
            raise ModelLoadError(f"{config_path}: transformers config lacks {missing}")
        dims = {mlx_key: config[hf_key] for hf_key, mlx_key in HF_CONFIG_KEYS.items()}
        dims["n_text_state"] = config["d_model"]
        return ModelDimensions.from_dict(dims, str(config_path)), config, True
    shape = {k: v for k, v in config.items() if k not in ("model_type", "quantization", "base_model")}
    try:
        return ModelDimensions.from_dict(shape, str(config_path)), config, False
    except ValueError as error:
        raise ModelLoadError(str(error)) from None


def hf_to_mlx_weights(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Rename transformers Whisper tensors to ours and move conv kernels to MLX layout."""
    renamed = {}
    for key, value in weights.items():
        key = key[len(HF_PREFIX) :] if key.startswith(HF_PREFIX) else key
        if key in HF_ONLY:
            continue
        key = _rename(key, to_ours=True)
        if _CONV_WEIGHT.match(key):
            value = value.transpose(0, 2, 1)  # (out, in, kernel) -> (out, kernel, in)
        renamed[key] = value
    return renamed


def mlx_to_hf_weights(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Rename our tensors to transformers names and move conv kernels to PyTorch layout.

    The encoder's sinusoidal positions are not parameters here; the caller adds them.
    """
    renamed = {}
    for key, value in weights.items():
        if _CONV_WEIGHT.match(key):
            value = value.transpose(0, 2, 1)  # (out, kernel, in) -> (out, in, kernel)
        renamed[HF_PREFIX + _rename(key, to_ours=False)] = value
    return renamed


def _read_weights(folder: Path) -> Dict[str, mx.array]:
    for name in _WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            try:
                return dict(mx.load(str(path)))
            except Exception as error:
                raise ModelLoadError(f"{path}: could not read weights ({error})") from None
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    hint = (
        f"; {', '.join(pickled)} not loaded: pickle-based files can run code when opened, convert them to safetensors"
        if pickled
        else ""
    )
    raise ModelLoadError(f"{folder}: no weights file; expected one of {', '.join(_WEIGHT_FILES)}{hint}")


def check_weights(model: nn.Module, weights: Dict[str, mx.array], source: str) -> None:
    """Strict load: every parameter present with the right shape, nothing unknown."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing:
        raise ModelLoadError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unknown:
        raise ModelLoadError(f"{source}: unexpected tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise ModelLoadError(
                f"{source}: tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )


def load_model(path_or_repo: str, dtype: Optional[mx.Dtype] = mx.float32) -> Whisper:
    """Load a Whisper model from an MLX folder, a transformers folder, or a Hugging Face repo id.

    Floating-point weights are cast to `dtype` (None: kept as stored); quantized weights stay quantized.
    """
    folder = resolve_model_path(path_or_repo)
    dims, config, hf_layout = read_model_config(folder)
    weights = _read_weights(folder)
    if hf_layout:
        weights = hf_to_mlx_weights(weights)
    weights.pop("encoder.positional_embedding", None)
    alignment_heads = weights.pop("alignment_heads", None)
    if dtype is None:
        dtype = next((v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)), mx.float32)
    model = Whisper(dims, dtype)
    quantization = config.get("quantization")
    if quantization is not None:
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            class_predicate=lambda path, module: f"{path}.scales" in weights,
        )
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    check_weights(model, weights, str(folder))
    model.load_weights(list(weights.items()), strict=False)
    if alignment_heads is not None:
        model.set_alignment_heads(alignment_heads)
    mx.eval(model.parameters())
    model.eval()
    model.source = str(path_or_repo)
    return model


def write_model_files(model: Whisper, folder: Path, extra_config: Optional[dict] = None) -> None:
    """config.json + weights.safetensors (with the alignment heads) of `model` into `folder`."""
    config = {**model.dims.to_dict(), "model_type": "whisper", **(extra_config or {})}
    write_json_atomic(Path(folder) / "config.json", config)
    weights = dict(tree_flatten(model.parameters()))
    weights["alignment_heads"] = model.alignment_heads.astype(mx.int64)
    save_safetensors_atomic(Path(folder) / "weights.safetensors", weights, {"format": "mlx"})


def save_model(model: Whisper, folder: Path, extra_config: Optional[dict] = None, force: bool = False) -> None:
    """Write an MLX community folder (config.json + weights.safetensors) atomically as a whole."""
    with atomic_folder(folder, force) as staging:
        write_model_files(model, staging, extra_config)
