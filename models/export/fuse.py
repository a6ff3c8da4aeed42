"""Merge LoRA adapters into a Whisper model and write standalone model folders.

`fuse.py` is the command line; this module does the work so tests and scripts can call it:
fuse (`fuse_adapters`), optionally quantize (`quantize_model`), write an MLX community
folder that `models.loading.load_model` and `mlx_whisper` both read (`save_mlx_folder`), a
transformers folder (`models.export_hf.save_hf_folder`), and upload to the Hub.
"""

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..atomic import atomic_folder
from ..backend import DTYPE_NAMES
from ..loading import ModelLoadError, load_model, write_model_files
from ..outputs import check_not_an_input, check_replaceable
from ..tuner.adapters import load_adapters, read_adapter_config
from ..tuner.lora import dequantize_model, fuse_lora_layers
from ..whisper import Whisper

Q_BITS = (4, 8)
Q_GROUP_SIZES = (32, 64, 128)


@dataclass
class FuseConfig:
    """What `fuse.py` was asked to do (see `fuse.py --help`)."""

    model: str
    adapter_path: str
    save_path: str = "fused_model"
    dtype: Optional[str] = None  # None: keep the base model's dtype
    quantize: bool = False
    q_bits: int = 4
    q_group_size: int = 64
    dequantize: bool = False
    export_hf: Optional[str] = None
    upload_repo: Optional[str] = None
    force: bool = False

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if self.q_bits not in Q_BITS:
            raise ValueError(f"q_bits must be one of {Q_BITS}, got {self.q_bits}")
        if self.q_group_size not in Q_GROUP_SIZES:
            raise ValueError(f"q_group_size must be one of {Q_GROUP_SIZES}, got {self.q_group_size}")
        if self.upload_repo is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.upload_repo):
            raise ValueError(f"upload repo must look like user/name, got {self.upload_repo!r}")
        if self.export_hf is not None and Path(self.export_hf).resolve() == Path(self.save_path).resolve():
            raise ValueError("--export-hf must name another folder than --save-path")


MLX_FILES = ("config.json", "weights.safetensors", "README.md")
HF_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "README.md",
)


def check_outputs(config: FuseConfig) -> None:
    """Fail before any work when an input is missing, an output would overwrite an input, or an output
    folder exists: without --force always, with --force unless every file in it is one fuse.py writes."""
    adapter = Path(config.adapter_path)
    for name in ("adapter_config.json", "adapters.safetensors"):
        if not (adapter / name).is_file():
            raise ModelLoadError(f"{adapter / name}: not found; --adapter-path takes the folder lora.py wrote")
    inputs = {"--model": config.model, "--adapter-path": config.adapter_path}
    for flag, folder, ours in (
        ("--save-path", config.save_path, MLX_FILES),
        ("--export-hf", config.export_hf, HF_FILES),
    ):
        if folder is None:
            continue
        check_not_an_input(flag, folder, inputs)
        if Path(folder).exists() and not config.force:
            raise FileExistsError(
                f"{flag} {folder} already exists; choose another path, or pass --force to replace "
                f"a model folder fuse.py wrote"
            )
        check_replaceable(flag, folder, ours + (".*.tmp",), "fuse.py")


def _same_model(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def quantization_of(model: nn.Module) -> Optional[dict]:
    """{"group_size", "bits"} of the model's quantized layers, or None if it has none."""
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return {"group_size": module.group_size, "bits": module.bits}
    return None


def fuse_adapters(
    model_path: str, adapter_path: str, dtype: Optional[mx.Dtype] = None, dequantize: bool = False
) -> Tuple[Whisper, dict]:
    """The base model with every LoRA layer of `adapter_path` merged in, and the adapter config.

    The LoRA layers are rebuilt from adapter_config.json (`load_adapters`), then fused.
    Weights keep the base dtype unless `dtype` is given. A quantized base (QLoRA) stays
    quantized, fused layers re-quantized with its settings, unless `dequantize`.
    """
    adapter_config = read_adapter_config(Path(adapter_path))
    recorded = adapter_config.get("base_model")
    if recorded is not None and not _same_model(str(recorded), str(model_path)):
        warnings.warn(
            f"{adapter_path}: the adapters were trained on {recorded!r}; fusing them into "
            f"{model_path!r} (the model sizes are checked, the weights cannot be)",
            stacklevel=2,
        )
    # Cast before merging: W + scale * (A @ B).T is rounded once, to the dtype written.
    model = load_model(model_path, dtype=dtype)
    base_quantized = quantization_of(model) is not None
    load_adapters(model, Path(adapter_path))
    fuse_lora_layers(model, requantize=base_quantized and not dequantize)
    if dequantize:
        dequantize_model(model)
    mx.eval(model.parameters())
    return model, adapter_config


def quantize_model(model: Whisper, bits: int, group_size: int) -> dict:
    """Quantize Linear and Embedding layers in place, as mlx_whisper's converter does.

    Layers whose input size is not a multiple of `group_size` stay in float; both loaders
    quantize exactly the layers that have scales in the weights file.
    Returns the config.json "quantization" entry.
    """
    if quantization_of(model) is not None:
        raise ValueError("the model is already quantized; dequantize it first")

    def quantizable(path: str, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=quantizable)
    mx.eval(model.parameters())
    return {"group_size": group_size, "bits": bits}


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def _usage_lines(library: str, language: Optional[str]) -> list:
    """The model card's "how to run it" code block."""
    if library == "mlx":
        return [
            "```python",
            "import mlx_whisper",
            "",
            'result = mlx_whisper.transcribe("audio.flac", path_or_hf_repo="PATH_OR_REPO"'
            + (f', language="{language}"' if language else "")
            + ")",
            "```",
            "",
        ]
    return [
        "```python",
        "from transformers import pipeline",
        "",
        'asr = pipeline("automatic-speech-recognition", model="PATH_OR_REPO")',
        'asr("audio.flac")',
        "```",
        "",
    ]


def model_card(
    adapter_config: dict,
    base_model: str,
    adapter_path: str,
    dtype: mx.Dtype,
    quantization: Optional[dict],
    library: str = "mlx",
) -> str:
    """README.md of a fused model: base model, data and adapter settings, and how to run it."""
    lora, training = adapter_config.get("lora", {}), adapter_config.get("training", {})
    language = adapter_config.get("language")
    header = [
        "---",
        f"library_name: {library}",
        "pipeline_tag: automatic-speech-recognition",
        "tags:",
        "- whisper",
        "- lora",
        f"- {library}",
    ]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base_model) and not Path(base_model).exists():
        header.append(f"base_model: {base_model}")
    if language is not None:
        header += ["language:", f"- {language}"]
    header.append("---")
    blocks = "all" if lora.get("num_layers", -1) == -1 else f"the last {lora.get('num_layers')}"
    stacks = "decoder" if lora.get("freeze_encoder") else "encoder and decoder"
    scale = "alpha / rank" if lora.get("scale") is None else lora["scale"]
    settings = (
        f"rank {lora.get('rank')}, alpha {lora.get('alpha')}, scale {scale}, "
        f"dropout {lora.get('dropout')}, on {', '.join(lora.get('targets', []))} "
        f"of {blocks} {stacks} blocks"
    )
    lines = header + [
        "",
        "# Whisper fine-tuned with LoRA (fused)",
        "",
        f"- Base model: `{base_model}` (adapters were trained on `{adapter_config.get('base_model')}`)",
        f"- Training data: `{adapter_config.get('data')}`" + (f", language `{language}`" if language else ""),
        f"- Adapters: `{adapter_path}`; LoRA {settings}",
        f"- Training: iters {training.get('iters')}, batch size {training.get('batch_size')}, "
        f"learning rate {training.get('learning_rate')}",
        f"- Weights: {dtype_name(dtype)}"
        + (
            f", quantized to {quantization['bits']} bits (group size {quantization['group_size']})"
            if quantization
            else ""
        ),
        "",
        "Written by `fuse.py`: the adapters are merged into the weights, so no adapter files are needed.",
        "",
    ]
    return "\n".join(lines + _usage_lines(library, language))


def save_mlx_folder(model: Whisper, folder: Path, card: str, force: bool = False) -> None:
    """config.json + weights.safetensors + README.md, written to a temp sibling and renamed."""
    quantization = quantization_of(model)
    with atomic_folder(Path(folder), force) as staging:
        write_model_files(model, staging, {"quantization": quantization} if quantization else None)
        (staging / "README.md").write_text(card, encoding="utf-8")


def upload_folder(folder: Path, repo_id: str, api=None) -> str:
    """Create `repo_id` on the Hub (if needed) and upload `folder` to it; returns the repo URL."""
    from huggingface_hub import HfApi

    api = api if api is not None else HfApi()
    url = api.create_repo(repo_id=repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload Whisper model fused with LoRA adapters (fuse.py)",
    )
    return str(url)


def run(config: FuseConfig, log=print) -> None:
    """Fuse, optionally export to transformers, quantize, save, and upload, as `config` says."""
    from .hf import save_hf_folder

    check_outputs(config)
    dtype = getattr(mx, config.dtype) if config.dtype is not None else None
    model, adapter_config = fuse_adapters(
        config.model, config.adapter_path, dtype, dequantize=config.dequantize or config.quantize
    )
    log(f"Fused {config.adapter_path} into {config.model} ({dtype_name(model.dtype)})")

    def card(library: str) -> str:
        return model_card(
            adapter_config, config.model, config.adapter_path, model.dtype, quantization_of(model), library
        )

    if config.export_hf is not None:  # before quantizing: transformers wants float weights
        if quantization_of(model) is not None:
            raise ValueError("--export-hf needs float weights, and this base model is quantized: add --dequantize")
        save_hf_folder(
            model, Path(config.export_hf), card("transformers"), adapter_config.get("language"), force=config.force
        )
        log(f"Wrote the transformers model to {config.export_hf}")
    if config.quantize:
        q = quantize_model(model, config.q_bits, config.q_group_size)
        log(f"Quantized to {q['bits']} bits, group size {q['group_size']}")
    save_mlx_folder(model, Path(config.save_path), card("mlx"), force=config.force)
    log(f"Wrote the MLX model to {config.save_path}")
    if config.upload_repo is not None:
        url = upload_folder(Path(config.save_path), config.upload_repo)
        log(f"Uploaded {config.save_path} to {url}")
