"""Training loop on tiny random models: overfitting, resume, Ctrl-C, non-finite losses,
gradient accumulation and checkpointing, adapter files."""

import json
import os
import signal
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import tiny_dims, tiny_whisper
from models.loading import ModelLoadError
from models.tokenizer import get_tokenizer
from models.tuner.adapters import AdapterFolder, load_adapters, save_adapters
from models.tuner.batches import Features, collate, label_tokens
from models.tuner.lora import VALID_TARGETS, LoRAConfig, LoRALinear, linear_to_lora_layers
from models.tuner.trainer import Trainer, TrainingArgs, TrainingStopped, loss_fn, train
from models.whisper import Whisper

# 16 audio positions (32 mel frames) keep the encoder cheap. The full vocabulary is needed
# wherever the loop decodes (validation); elsewhere 1024 tokens make the logits 50x cheaper.
SHAPE = dict(n_audio_ctx=16, n_text_ctx=64)
SMALL_VOCAB = 1024
DIMS = tiny_dims(**SHAPE)
FULL_VOCAB = DIMS.n_vocab
ALL_TARGETS = list(VALID_TARGETS)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(multilingual=True, num_languages=99, language="en", task="transcribe")


def base_model(seed: int = 0, n_vocab: int = SMALL_VOCAB, **overrides) -> Whisper:
    """`tiny_whisper` of SHAPE and `overrides`, set up so that training can fit a batch."""
    model = tiny_whisper(seed, **SHAPE, n_vocab=n_vocab, **overrides)
    dims = model.dims
    # A random final layer norm caps the logits near +-8: a gain of 4 lets the model become
    # confident. The positional embedding starts at zero; give it values so positions differ.
    model.decoder.ln.weight = 4 * mx.ones((dims.n_text_state,))
    model.decoder.positional_embedding = 0.02 * mx.random.normal((dims.n_text_ctx, dims.n_text_state))
    mx.eval(model.parameters())
    return model


def lora_model(
    seed: int = 0, rank: int = 8, dropout: float = 0.0, lora_seed: int = 0, n_vocab: int = SMALL_VOCAB
) -> Whisper:
    """A base model with LoRA on every target; the same seeds give the same weights and adapters."""
    model = base_model(seed, n_vocab)
    mx.random.seed(lora_seed)
    linear_to_lora_layers(model, LoRAConfig(rank=rank, targets=ALL_TARGETS, dropout=dropout))
    mx.eval(model.parameters())
    return model


def randomise_lora_b(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B matrices, so every adapter tensor gets a gradient from the first step."""
    mx.random.seed(seed)
    for _, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape)
    mx.eval(model.parameters())


def clip_mel(rng: np.random.Generator) -> np.ndarray:
    # (frames, n_mels): one random spectrum held over the clip, like a steady tone. Frames of
    # independent noise would average out in cross-attention, and clips would be slow to tell apart.
    return np.tile(2 * rng.standard_normal((1, DIMS.n_mels)), (2 * DIMS.n_audio_ctx, 1)).astype(np.float16)


def small_vocab_features(lengths, seed: int = 0):
    """Label sequences like Whisper's: a shared 4-token prefix, clip-specific text, an end token."""
    prefix, eot = [1020, 1021, 1022, 1023], 1019
    rng = np.random.default_rng(seed)
    return [
        Features(clip_mel(rng), np.array(prefix + rng.integers(1, 1000, size=n).tolist() + [eot], np.int32), f"clip{i}")
        for i, n in enumerate(lengths)
    ]


def text_features(tokenizer, texts, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Features(clip_mel(rng), label_tokens(tokenizer, text, "en"), f"clip{i}") for i, text in enumerate(texts)]


def args_for(**overrides) -> TrainingArgs:
    defaults = dict(
        iters=6,
        batch_size=2,
        learning_rate=1e-3,
        steps_per_report=1,
        steps_per_eval=0,
        save_every=100,
        pad_to_multiple=8,
    )
    return TrainingArgs(**{**defaults, **overrides})


def run_training(
    model,
    folder: Path,
    args: TrainingArgs,
    train_set,
    val_set=(),
    tokenizer=None,
    resume=False,
    log=lambda line: None,
    **kwargs,
):
    trainer = Trainer(model, tokenizer, args, log=log)
    config = {"lora": {"rank": 8, "targets": ALL_TARGETS}, "model_dims": model.dims.to_dict()}
    return train(trainer, train_set, list(val_set), AdapterFolder(folder, config), resume=resume, **kwargs)


def read_weights(path: Path) -> dict:
    return dict(mx.load(str(path)))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(np.array(a[key]), np.array(b[key]), rtol=0, atol=atol, err_msg=key)


def metrics(folder: Path) -> list:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines() if line]


def batch_loss(model, features) -> float:
    batch = collate(features)
    loss, _ = loss_fn(model, batch.mel, batch.inputs, batch.targets, batch.mask)
    return loss.item()


# ---------------------------------------------------------------- learning


def test_training_overfits_one_batch(tmp_path):
    model = lora_model(rank=32)
    features = small_vocab_features([3, 5, 2])  # the first text token can only come from the audio
    before = batch_loss(model, features)
    args = args_for(iters=60, batch_size=3, learning_rate=3e-3, steps_per_report=10)
    run_training(model, tmp_path, args, features)
    after = batch_loss(model, features)
    assert before > 5 and after < 0.02, (before, after)
    losses = [r["train_loss"] for r in metrics(tmp_path)]
    assert len(losses) == 6 and losses[-1] < losses[0] / 50


def test_loss_is_averaged_over_real_target_tokens_only():
    model = lora_model()
    short, long = small_vocab_features([1, 12])
    parts = [collate([f]) for f in (short, long)]
    part_losses = [loss_fn(model, b.mel, b.inputs, b.targets, b.mask)[0].item() for b in parts]
    n_short, n_long = parts[0].n_tokens, parts[1].n_tokens  # 5 and 16 targets
    expected = (part_losses[0] * n_short + part_losses[1] * n_long) / (n_short + n_long)
    for pad_to_multiple in (8, 64):  # the short row is mostly padding, more so with 64
        batch = collate([short, long], pad_to_multiple=pad_to_multiple)
        loss, n_tokens = loss_fn(model, batch.mel, batch.inputs, batch.targets, batch.mask)
        assert n_tokens.item() == 21 and abs(loss.item() - expected) < 1e-5


def test_grad_accumulation_weights_micro_batches_by_tokens():
    # Micro-batches of very different token counts: averaging their mean losses would differ.
    features = small_vocab_features([2, 3, 25, 30])
    whole = collate(features)
    halves = [collate(features[:2]), collate(features[2:])]
    results = []
    for accumulation, batches in ((1, [whole]), (2, halves)):
        model = lora_model()
        randomise_lora_b(model)
        trainer = Trainer(model, None, TrainingArgs(learning_rate=1e-3, grad_accumulation=accumulation))
        model.train()
        losses = []
        for _ in range(3):
            loss, n_tokens = trainer.train_step(batches)
            mx.eval(loss, n_tokens, model.state, trainer.optimizer.state)
            losses.append(loss.item())
        assert n_tokens.item() == whole.n_tokens
        results.append((losses, dict(tree_flatten(model.trainable_parameters()))))
    (losses_1, weights_1), (losses_2, weights_2) = results
    np.testing.assert_allclose(losses_1, losses_2, rtol=1e-5)
    assert_same_weights(weights_1, weights_2, atol=1e-5)


def test_grad_checkpoint_gives_the_same_loss_and_gradients():
    features = small_vocab_features([4, 7])
    batch = collate(features)
    inputs = (batch.mel, batch.inputs, batch.targets, batch.mask)
    results = []
    for checkpoint in (False, True):
        model = lora_model()
        randomise_lora_b(model)
        trainer = Trainer(model, None, TrainingArgs(learning_rate=1e-3, grad_checkpoint=checkpoint))
        model.train()
        (loss, _), grads = trainer.loss_and_grad(model, *inputs)
        mx.eval(loss, grads)
        step_loss, _ = trainer.train_step([batch])
        mx.eval(step_loss, model.state)
        results.append(
            (loss.item(), dict(tree_flatten(grads)), step_loss.item(), dict(tree_flatten(model.trainable_parameters())))
        )
        # Checkpointed blocks keep no activations, so in training mode they return no key/value cache.
        _, cache, _ = model.decoder(batch.inputs[:, :3], model.embed_audio(batch.mel))
        assert all((block_cache is None) == checkpoint for block_cache in cache)
    (loss_a, grads_a, step_a, weights_a), (loss_b, grads_b, step_b, weights_b) = results
    assert abs(loss_a - loss_b) < 1e-5 and abs(step_a - step_b) < 1e-5
    assert_same_weights(grads_a, grads_b, atol=1e-5)
    assert_same_weights(weights_a, weights_b, atol=1e-5)

    # Only the trained model's blocks are checkpointed: another model in training mode still
    # returns its key/value cache (decoding relies on it).
    other = base_model()
    other.train()
    _, cache, _ = other.decoder(batch.inputs[:, :3], other.embed_audio(batch.mel))
    assert cache[0] is not None and cache[0][0] is not None


def test_grad_checkpoint_refuses_dropout():
    with pytest.raises(ValueError, match="dropout"):
        Trainer(lora_model(dropout=0.1), None, TrainingArgs(grad_checkpoint=True))


# ---------------------------------------------------------------- resume and interruption


def test_resume_equals_an_uninterrupted_run(tmp_path, tokenizer):
    # Dropout makes the RNG state matter; 5 clips in batches of 2 wrap into a new epoch (new order)
    # after 2 steps; warm-up and cosine decay make the schedule position matter.
    texts = ["one", "two words", "three little words", "a b c d e", "go"]
    train_set, val_set = text_features(tokenizer, texts), text_features(tokenizer, ["hello there"], seed=9)
    args = dict(iters=6, warmup=2, learning_rate=1e-2, steps_per_eval=3, best_metric="loss")
    straight, parts = tmp_path / "straight", tmp_path / "parts"

    def model(lora_seed: int = 0):
        return lora_model(lora_seed=lora_seed, dropout=0.2, n_vocab=FULL_VOCAB)

    run_training(model(), straight, args_for(**args), train_set, val_set, tokenizer)
    run_training(model(), parts, args_for(stop_after=3, **args), train_set, val_set, tokenizer)
    assert mx.load(str(parts / "resume.safetensors"), return_metadata=True)[1]["step"] == "3"
    assert max(r["step"] for r in metrics(parts)) == 3
    # Differently initialised adapters: everything must come from the resume file.
    run_training(model(lora_seed=5), parts, args_for(**args), train_set, val_set, tokenizer, resume=True)

    assert_same_weights(read_weights(straight / "adapters.safetensors"), read_weights(parts / "adapters.safetensors"))
    assert_same_weights(
        read_weights(straight / "best" / "adapters.safetensors"), read_weights(parts / "best" / "adapters.safetensors")
    )

    def numbers(folder):
        keys = ("step", "train_loss", "lr", "val_loss", "val_wer", "val_cer")
        return [{k: r[k] for k in keys if k in r} for r in metrics(folder)]

    assert numbers(parts) == numbers(straight)
    assert [r["step"] for r in metrics(straight) if "val_loss" in r] == [0, 3, 6]


def test_ctrl_c_saves_a_resumable_checkpoint_and_returns(tmp_path):
    lines = []

    def log(line):
        lines.append(line)
        if line.startswith("Iter 2: train loss"):
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C mid-run

    before = signal.getsignal(signal.SIGINT)
    run_training(lora_model(), tmp_path, args_for(iters=50), small_vocab_features([3, 4, 5]), log=log)
    assert signal.getsignal(signal.SIGINT) is before
    # The signal came after step 2 had decided not to save: step 3 saves and stops.
    assert any(line.startswith("Interrupted at iter 3: saved") for line in lines)
    assert mx.load(str(tmp_path / "resume.safetensors"), return_metadata=True)[1]["step"] == "3"
    assert (tmp_path / "adapters.safetensors").is_file()
    assert max(r["step"] for r in metrics(tmp_path)) == 3


def batches_with_nan_at(features, bad_step: int, batch_size: int = 2):
    """A batch source whose batch for `bad_step` (1-based) has a NaN spectrogram."""

    def source(start):
        step = start
        while True:
            batch = collate(features[:batch_size], pad_to_multiple=8)
            if step + 1 == bad_step:
                batch.mel = mx.full(batch.mel.shape, float("nan"))
            yield batch
            step += 1

    return source


def test_nan_loss_stops_before_evaluating_or_saving(tmp_path, tokenizer):
    train_set = text_features(tokenizer, ["one", "two words"])
    val_set = text_features(tokenizer, ["hello there"], seed=9)
    args = args_for(iters=10, save_every=2, steps_per_report=10, steps_per_eval=3, best_metric="loss")
    with pytest.raises(TrainingStopped, match=r"^Iter 3: training loss is nan\b.*; stopped without saving"):
        run_training(
            lora_model(n_vocab=FULL_VOCAB),
            tmp_path,
            args,
            train_set,
            val_set,
            tokenizer,
            batch_source=batches_with_nan_at(train_set, bad_step=3),
        )
    saved = read_weights(tmp_path / "adapters.safetensors")
    assert_same_weights(saved, read_weights(tmp_path / "checkpoints" / "0000002_adapters.safetensors"))
    assert all(np.isfinite(np.array(v)).all() for v in saved.values())
    assert mx.load(str(tmp_path / "resume.safetensors"), return_metadata=True)[1]["step"] == "2"
    # The NaN weights were never evaluated (nor could they become the best adapters).
    assert [(r["step"], "val_loss" in r) for r in metrics(tmp_path)] == [(0, True), (2, False)]


def test_overflowing_weights_are_never_saved(tmp_path):
    model = lora_model()
    trainer = Trainer(model, None, args_for(iters=10, save_every=2, steps_per_report=10))
    real_step, calls = trainer.train_step, []

    def step_that_overflows_at_4(batches):
        result = real_step(batches)
        calls.append(1)
        if len(calls) == 4:  # the loss of step 4 is finite; the update it made is not
            model.decoder.blocks[0].mlp2.lora_b = mx.full(model.decoder.blocks[0].mlp2.lora_b.shape, float("inf"))
        return result

    trainer.train_step = step_that_overflows_at_4
    with pytest.raises(TrainingStopped, match=r"^Iter 4: training loss is [0-9.]+, adapter weights not finite"):
        train(trainer, small_vocab_features([3, 4]), [], AdapterFolder(tmp_path, {"lora": {}}))
    assert_same_weights(
        read_weights(tmp_path / "adapters.safetensors"),
        read_weights(tmp_path / "checkpoints" / "0000002_adapters.safetensors"),
    )
    assert not (tmp_path / "checkpoints" / "0000004_adapters.safetensors").exists()  # a save step, skipped


# ---------------------------------------------------------------- adapter files


def test_adapters_round_trip_onto_a_fresh_model(tmp_path):
    model = lora_model(rank=4)
    randomise_lora_b(model)
    config = {"lora": LoRAConfig(rank=4, targets=ALL_TARGETS).to_dict(), "model_dims": model.dims.to_dict()}
    save_adapters(model, tmp_path, config)
    batch = collate(small_vocab_features([3, 6]))
    model.eval()
    expected = model(batch.mel, batch.inputs)

    fresh = load_adapters(base_model(), tmp_path)
    assert mx.array_equal(fresh(batch.mel, batch.inputs), expected).item()
    assert not mx.allclose(base_model()(batch.mel, batch.inputs), expected).item()  # the adapters matter


def test_adapters_for_another_model_size_are_refused(tmp_path):
    model = lora_model(rank=4)
    config = {"lora": LoRAConfig(rank=4, targets=ALL_TARGETS).to_dict(), "model_dims": model.dims.to_dict()}
    save_adapters(model, tmp_path, config)
    other = dict(n_audio_state=32, n_text_state=32)
    with pytest.raises(ModelLoadError, match=r"another model size.*'n_text_state': \(64, 32\)"):
        load_adapters(base_model(**other), tmp_path)
    # Without the recorded model shape, the strict load names the first tensor that does not fit.
    del config["model_dims"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    pattern = r"tensor decoder\.blocks\.0\.attn\.key\.lora_a has shape \(64, 4\), this model needs \(32, 4\)"
    with pytest.raises(ModelLoadError, match=pattern):
        load_adapters(base_model(**other), tmp_path)


def test_adapters_without_config_are_refused(tmp_path):
    save_adapters(lora_model(rank=4), tmp_path, {"lora": {}})
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no adapter_config\.json.*--adapter-path"):
        load_adapters(base_model(), tmp_path)
    (tmp_path / "adapters.safetensors").unlink()
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora": LoRAConfig(rank=4).to_dict()}))
    with pytest.raises(ModelLoadError, match=r"adapters\.safetensors: adapter weights not found"):
        load_adapters(base_model(), tmp_path)


def test_compiling_every_batch_shape_first_changes_no_weight(tmp_path, monkeypatch):
    """The step is built for each (rows, width) of the coming batches before step 1 (no report window
    pays for a new shape), and the weights, optimizer state and random key it touched are put back."""
    from models.tuner import batches as batches_module

    features = small_vocab_features([3, 9, 20, 5, 14, 30])  # widths 8..40 at pad_to_multiple 8
    args = args_for(iters=6, batch_size=2, precompile=True)
    seen = []
    real_precompile = Trainer.precompile

    def recording(self, shapes, features_shape):
        seen.append((sorted(shapes), features_shape))
        real_precompile(self, shapes, features_shape)

    monkeypatch.setattr(Trainer, "precompile", recording)
    model = lora_model(dropout=0.1)  # the random key matters: dropout draws from it
    run_training(model, tmp_path / "precompiled", args, features)
    assert len(seen) == 1 and seen[0][1] == (features[0].mel.shape[0], features[0].mel.shape[1])
    assert len(seen[0][0]) >= 2 and all(rows == 2 and width % 8 == 0 for rows, width in seen[0][0])

    plain = lora_model(dropout=0.1)  # the same batches from a batch_source: nothing compiled ahead
    source = lambda start: batches_module.training_batches(  # noqa: E731
        features, 2, seed=args.seed, start_step=start, sort_window=args.sort_window, pad_to_multiple=8
    )
    run_training(plain, tmp_path / "plain", args, features, batch_source=source)
    assert len(seen) == 1
    assert_same_weights(
        read_weights(tmp_path / "precompiled" / "adapters.safetensors"),
        read_weights(tmp_path / "plain" / "adapters.safetensors"),
    )
