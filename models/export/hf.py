"""Write a Whisper model in the Hugging Face transformers layout.

The folder holds what `WhisperForConditionalGeneration.from_pretrained`, transformers
pipelines and CTranslate2's converter read: config.json, model.safetensors (transformers
names, conv kernels as (out, in, kernel)), generation_config.json, preprocessor_config.json
and the tokenizer (tokenizer.json, vocab.json, merges.txt), which is converted from our
tiktoken vocabulary so no file has to come from the openai/whisper-* repos.
"""

import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..atomic import atomic_folder, save_safetensors_atomic, write_json_atomic
from ..audio import CHUNK_LENGTH, HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE
from ..loading import mlx_to_hf_weights
from ..tokenizer import Tokenizer, tokenizer_for
from ..whisper import Whisper, sinusoids

_TIMESTAMP = re.compile(r"<\|\d+\.\d+\|>")


def hf_config(model: Whisper, tokenizer: Tokenizer) -> dict:
    """config.json of WhisperForConditionalGeneration (WhisperConfig fields)."""
    dims = model.dims
    if dims.n_audio_state != dims.n_text_state:
        raise ValueError(
            "transformers' Whisper needs the same width in encoder and decoder "
            f"(got {dims.n_audio_state} and {dims.n_text_state})"
        )
    eot = tokenizer.eot
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": dims.n_vocab,
        "num_mel_bins": dims.n_mels,
        "d_model": dims.n_audio_state,
        "encoder_layers": dims.n_audio_layer,
        "encoder_attention_heads": dims.n_audio_head,
        "decoder_layers": dims.n_text_layer,
        "decoder_attention_heads": dims.n_text_head,
        "encoder_ffn_dim": 4 * dims.n_audio_state,
        "decoder_ffn_dim": 4 * dims.n_text_state,
        "num_hidden_layers": dims.n_audio_layer,
        "max_source_positions": dims.n_audio_ctx,
        "max_target_positions": dims.n_text_ctx,
        "activation_function": "gelu",
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "init_std": 0.02,
        "scale_embedding": False,
        "use_cache": True,
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": tokenizer.sot,
        # CTranslate2's converter reads the suppression lists from the model config.
        "suppress_tokens": tokenizer.suppressed_tokens(),
        "begin_suppress_tokens": tokenizer.encode(" ") + [eot],
        "torch_dtype": str(model.dtype).split(".")[-1],  # transformers < 4.56 reads this
    }


def generation_config(model: Whisper, tokenizer: Tokenizer, language: Optional[str]) -> dict:
    """generation_config.json: prompt tokens, suppression, timestamps and alignment heads.

    A model fine-tuned for one `language` gets it as the default prompt language.
    """
    eot = tokenizer.eot
    config = {
        "decoder_start_token_id": tokenizer.sot,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "max_length": model.dims.n_text_ctx,
        "suppress_tokens": tokenizer.suppressed_tokens(),
        "begin_suppress_tokens": tokenizer.encode(" ") + [eot],
        "no_timestamps_token_id": tokenizer.no_timestamps,
        "prev_sot_token_id": tokenizer.sot_prev,
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
        "alignment_heads": np.array(model.alignment_heads).tolist(),
        "is_multilingual": model.is_multilingual,
    }
    if model.is_multilingual:
        language_token = tokenizer.to_language_token(language) if language is not None else None
        config["forced_decoder_ids"] = [[1, language_token], [2, tokenizer.transcribe]]
        config["lang_to_id"] = {
            f"<|{code}|>": token for code, token in zip(tokenizer.all_language_codes, tokenizer.all_language_tokens)
        }
        config["task_to_id"] = {"transcribe": tokenizer.transcribe, "translate": tokenizer.translate}
    return config


def preprocessor_config(n_mels: int) -> dict:
    return {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "WhisperProcessor",
        "feature_size": n_mels,
        "sampling_rate": SAMPLE_RATE,
        "hop_length": HOP_LENGTH,
        "n_fft": N_FFT,
        "chunk_length": CHUNK_LENGTH,
        "n_samples": N_SAMPLES,
        "nb_max_frames": N_FRAMES,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }


def hf_weights(model: Whisper) -> Dict[str, mx.array]:
    """Our parameters under transformers names, plus the encoder's fixed positions."""
    weights = mlx_to_hf_weights(dict(tree_flatten(model.parameters())))
    dims, dtype = model.dims, model.dtype
    weights["model.encoder.embed_positions.weight"] = sinusoids(dims.n_audio_ctx, dims.n_audio_state).astype(dtype)
    return weights


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merge_of(ranks: Dict[bytes, int], token: bytes) -> Tuple[bytes, bytes]:
    """The pair BPE merged last to make `token`: replay the merges of lower rank on its bytes."""
    parts, limit = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts[:-1], parts[1:]))]
        rank, i = min(pairs)
        assert rank < limit, f"token {token!r} has no merge path"
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def _tokenizer_config(special_names: list) -> dict:
    """tokenizer_config.json of WhisperTokenizer, <|endoftext|> standing in for bos, eos, unk and pad."""
    eot = "<|endoftext|>"
    return {
        "tokenizer_class": "WhisperTokenizer",
        "model_max_length": 1024,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "pad_token": eot,
        "additional_special_tokens": [t for t in special_names if t != eot],
    }


def tokenizer_files(tokenizer: Tokenizer) -> Dict[str, object]:
    """{file name: JSON object or text} of a transformers Whisper tokenizer equal to ours."""
    ranks = tokenizer.encoding._mergeable_ranks  # tiktoken keeps the BPE ranks here
    to_text = _bytes_to_unicode()
    text = lambda token: "".join(to_text[b] for b in token)  # noqa: E731
    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [
        " ".join(map(text, _merge_of(ranks, token)))
        for token, _ in sorted(ranks.items(), key=lambda kv: kv[1])
        if len(token) > 1
    ]
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": not _TIMESTAMP.fullmatch(t),
        }
        for t, i in specials
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    tokenizer_config = _tokenizer_config([t for t, _ in specials if not _TIMESTAMP.fullmatch(t)])
    special_map = {k: v for k, v in tokenizer_config.items() if k.endswith("_token") or k.endswith("_tokens")}
    eot = "<|endoftext|>"
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special_map,
        "vocab.json": {**vocab, eot: tokenizer.eot},
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
    }


def save_hf_folder(
    model: Whisper, folder: Path, card: str, language: Optional[str] = None, force: bool = False
) -> None:
    """Write the transformers layout of `model` to `folder` (atomically, as a whole)."""
    if any("scales" in key for key, _ in tree_flatten(model.parameters())):
        raise ValueError("the transformers layout needs float weights; dequantize the model first")
    tokenizer = tokenizer_for(model, language)
    with atomic_folder(Path(folder), force) as staging:
        write_json_atomic(staging / "config.json", hf_config(model, tokenizer))
        write_json_atomic(staging / "generation_config.json", generation_config(model, tokenizer, language))
        write_json_atomic(staging / "preprocessor_config.json", preprocessor_config(model.dims.n_mels))
        save_safetensors_atomic(staging / "model.safetensors", hf_weights(model), {"format": "pt"})
        for name, content in tokenizer_files(tokenizer).items():
            if isinstance(content, str):
                (staging / name).write_text(content, encoding="utf-8")
            else:
                write_json_atomic(staging / name, content)
        (staging / "README.md").write_text(card, encoding="utf-8")
