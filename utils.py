"""Loading and saving models and adapters, atomically where the user keeps the files."""

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from models.whisper import ModelDimensions, Whisper

DEFAULT_MODEL = "mlx-community/whisper-tiny"
_WEIGHT_FILES = ("weights.safetensors", "weights.npz", "model.safetensors")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # never loaded

# Hugging Face transformers names -> OpenAI/MLX names (applied in order, as regex substitutions).
HF_TO_MLX = [
    (r"^model\.", ""),
    (r"^proj_out\.weight$", ""),  # tied to the token embedding
    (r"\.layers\.", ".blocks."),
    (r"\.self_attn\.q_proj\.", ".attn.query."),
    (r"\.self_attn\.k_proj\.", ".attn.key."),
    (r"\.self_attn\.v_proj\.", ".attn.value."),
    (r"\.self_attn\.out_proj\.", ".attn.out."),
    (r"\.self_attn_layer_norm\.", ".attn_ln."),
    (r"\.encoder_attn\.q_proj\.", ".cross_attn.query."),
    (r"\.encoder_attn\.k_proj\.", ".cross_attn.key."),
    (r"\.encoder_attn\.v_proj\.", ".cross_attn.value."),
    (r"\.encoder_attn\.out_proj\.", ".cross_attn.out."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.fc1\.", ".mlp1."),
    (r"\.fc2\.", ".mlp2."),
    (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"^encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^decoder\.layer_norm\.", "decoder.ln."),
    (r"^decoder\.embed_tokens\.", "decoder.token_embedding."),
    (r"^decoder\.embed_positions\.weight$", "decoder.positional_embedding"),
    (r"^encoder\.embed_positions\.weight$", ""),  # sinusoids, recomputed
]
# OpenAI/MLX names -> transformers names (the inverse of HF_TO_MLX, for --export-hf).
MLX_TO_HF = [
    (r"\.blocks\.", ".layers."),
    (r"\.attn\.query\.", ".self_attn.q_proj."),
    (r"\.attn\.key\.", ".self_attn.k_proj."),
    (r"\.attn\.value\.", ".self_attn.v_proj."),
    (r"\.attn\.out\.", ".self_attn.out_proj."),
    (r"\.attn_ln\.", ".self_attn_layer_norm."),
    (r"\.cross_attn\.query\.", ".encoder_attn.q_proj."),
    (r"\.cross_attn\.key\.", ".encoder_attn.k_proj."),
    (r"\.cross_attn\.value\.", ".encoder_attn.v_proj."),
    (r"\.cross_attn\.out\.", ".encoder_attn.out_proj."),
    (r"\.cross_attn_ln\.", ".encoder_attn_layer_norm."),
    (r"\.mlp1\.", ".fc1."),
    (r"\.mlp2\.", ".fc2."),
    (r"\.mlp_ln\.", ".final_layer_norm."),
    (r"^encoder\.ln_post\.", "encoder.layer_norm."),
    (r"^decoder\.ln\.", "decoder.layer_norm."),
    (r"^decoder\.token_embedding\.", "decoder.embed_tokens."),
    (r"^decoder\.positional_embedding$", "decoder.embed_positions.weight"),
    (r"^", "model."),
]
HF_CONFIG_KEYS = {
    "num_mel_bins": "n_mels", "max_source_positions": "n_audio_ctx", "d_model": "n_audio_state",
    "encoder_attention_heads": "n_audio_head", "encoder_layers": "n_audio_layer",
    "vocab_size": "n_vocab", "max_target_positions": "n_text_ctx",
    "decoder_attention_heads": "n_text_head", "decoder_layers": "n_text_layer",
}


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


def _read_json(path: Path, missing_message: str) -> dict:
    """A JSON config file; a missing or malformed one is a ModelLoadError naming it."""
    if not path.is_file():
        raise ModelLoadError(missing_message)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error})") from None


def read_model_config(folder: Path) -> Tuple[ModelDimensions, dict, bool]:
    """(dims, raw config, is_hf_layout) of a model folder."""
    config_path = folder / "config.json"
    config = _read_json(config_path, f"{folder}: no config.json; is this a Whisper model folder?")
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
        for pattern, replacement in HF_TO_MLX:
            key = re.sub(pattern, replacement, key)
            if not key:
                break
        if not key:
            continue
        if re.match(r"encoder\.conv[12]\.weight$", key):
            value = value.transpose(0, 2, 1)  # (out, in, kernel) -> (out, kernel, in)
        renamed[key] = value
    return renamed


def mlx_to_hf_weights(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Rename our tensors to transformers names and move conv kernels to PyTorch layout.

    The encoder's sinusoidal positions are not parameters here; the caller adds them.
    """
    renamed = {}
    for key, value in weights.items():
        if re.match(r"encoder\.conv[12]\.weight$", key):
            value = value.transpose(0, 2, 1)  # (out, kernel, in) -> (out, in, kernel)
        for pattern, replacement in MLX_TO_HF:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
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
    hint = (f"; {', '.join(pickled)} not loaded: pickle-based files can run code when opened, "
            f"convert them to safetensors" if pickled else "")
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
        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                    class_predicate=lambda path, module: f"{path}.scales" in weights)
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    check_weights(model, weights, str(folder))
    model.load_weights(list(weights.items()), strict=False)
    if alignment_heads is not None:
        model.set_alignment_heads(alignment_heads)
    mx.eval(model.parameters())
    model.eval()
    model.source = str(path_or_repo)
    return model


@contextmanager
def _disk_full_names(path: Path):
    """Re-raise "no space left" as an error that names `path` and says the old file is intact."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OSError(error.errno, f"disk full: could not save {path} ({error.strerror}); the previous "
                                   f"{path.name}, if any, is unchanged. Free some space and try again") from error


@contextmanager
def atomic_output(path: Path, mode: str = "w", **kwargs):
    """Open a temp file beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _disk_full_names(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, mode, **kwargs) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def save_safetensors_atomic(path: Path, arrays: Dict[str, mx.array], metadata: Optional[dict] = None) -> None:
    """mx.save_safetensors to a temp file, then rename: a crash leaves the old file intact."""
    # A Python file object keeps a failed write's errno (disk full); MLX's own writer drops it.
    with atomic_output(path, "wb") as f:
        mx.save_safetensors(f, arrays, metadata=metadata or {})


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_output(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


@contextmanager
def atomic_folder(folder: Path, force: bool = False):
    """Yield an empty temp folder beside `folder`; it becomes `folder` only if the block succeeds.

    A crash leaves no half-written `folder`; with `force` an existing one is replaced.
    """
    folder = Path(folder)
    if folder.exists() and not force:
        raise FileExistsError(f"{folder} already exists; choose another path or pass --force")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        yield staging
        _default_permissions(staging)
        old = None
        if folder.exists():  # move the old folder aside first so one of the two always exists
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
            os.replace(folder, old / folder.name)
        os.replace(staging, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _default_permissions(folder: Path) -> None:
    """Temp files are private (0600); give a finished folder the modes a plain write would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


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


ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def save_adapters(model: nn.Module, folder: Path, config: dict, weights_name: str = ADAPTER_WEIGHTS) -> None:
    """Trainable (LoRA) tensors to `folder/weights_name` and the config beside them, each atomically."""
    folder = Path(folder)
    adapters = dict(tree_flatten(model.trainable_parameters()))
    save_safetensors_atomic(folder / weights_name, adapters)
    write_json_atomic(folder / ADAPTER_CONFIG, config)


def read_adapter_config(folder: Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    config = _read_json(path, f"{folder}: no {ADAPTER_CONFIG}; pass the folder lora.py wrote with --adapter-path")
    if "lora" not in config:
        raise ModelLoadError(f"{path}: no 'lora' section; was it written by lora.py?")
    return config


def load_adapters(model: nn.Module, folder: Path, weights_name: str = ADAPTER_WEIGHTS) -> nn.Module:
    """Turn `model` into the LoRA model described by `folder/adapter_config.json` and load its weights.

    Strict: every adapter tensor must be present with the shape this model needs, so adapters
    trained on another model size are refused with the tensor named.
    """
    from models.lora import LoRAConfig, linear_to_lora_layers

    folder = Path(folder)
    config = read_adapter_config(folder)
    try:
        lora_config = LoRAConfig.from_dict(config["lora"])
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"{folder / ADAPTER_CONFIG}: {error}") from None
    dims = config.get("model_dims")
    if dims is not None and dims != model.dims.to_dict():
        changed = {k: (v, model.dims.to_dict().get(k)) for k, v in dims.items() if model.dims.to_dict().get(k) != v}
        raise ModelLoadError(
            f"{folder}: adapters were trained on another model size (adapter vs model: {changed}); "
            f"use the base model {config.get('base_model')!r}"
        )
    path = folder / weights_name
    if not path.is_file():
        raise ModelLoadError(f"{path}: adapter weights not found")
    linear_to_lora_layers(model, lora_config)
    try:
        weights = dict(mx.load(str(path)))
    except Exception as error:
        raise ModelLoadError(f"{path}: could not read adapter weights ({error})") from None
    expected = dict(tree_flatten(model.trainable_parameters()))
    for key in sorted(set(expected) | set(weights)):
        if key not in weights:
            raise ModelLoadError(f"{path}: missing adapter tensor {key}")
        if key not in expected:
            raise ModelLoadError(f"{path}: unexpected tensor {key}; the adapter config does not describe it")
        if weights[key].shape != expected[key].shape:
            raise ModelLoadError(
                f"{path}: tensor {key} has shape {tuple(weights[key].shape)}, this model needs {tuple(expected[key].shape)}"
            )
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model
