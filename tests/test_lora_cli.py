"""lora.py end to end on a tiny random model and a few synthetic clips: flags and config files,
the files a run leaves behind, --test predictions, refusals and a diverging run."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import lora
from conftest import ROOT, tiny_dims, write_model_folder
from models.audio import SAMPLE_RATE
from models.backend import NO_REEXEC_ENV

# Real audio is 30 s of mel frames, so the encoder keeps its 1500 positions; everything else is
# tiny. A short text context keeps greedy decoding of the random model short (32 tokens at most).
TEXT_CTX = 64
SPLITS = {"train": ["one", "two", "three", "four"], "validation": ["five", "six"], "test": ["five", "six"]}


def run_cli(*argv: str):
    """(exit code, stdout, stderr) of lora.main(argv), in this process."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv(NO_REEXEC_ENV, "1")  # never re-exec pytest to preload a BLAS
        try:
            code = lora.main(list(argv))
        except SystemExit as exit:  # as the interpreter reports it: a message goes to stderr, exit code 1
            code = exit.code
            if isinstance(code, str):
                print(code, file=sys.stderr)
                code = 1
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_folder(tmp_path_factory.mktemp("model") / "tiny", n_text_ctx=TEXT_CTX)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """train/, validation/ and test/ folders of 1 s tones; test/ repeats the validation clips."""
    root = tmp_path_factory.mktemp("data")
    for split, texts in SPLITS.items():
        (root / split).mkdir()
        rows = ["file_name,transcription,language"]
        for i, text in enumerate(texts):
            t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
            sf.write(root / split / f"{text}.flac", 0.3 * np.sin(2 * np.pi * 200 * (i + 1) * t), SAMPLE_RATE)
            rows.append(f"{text}.flac,{text},en")
        (root / split / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def common(model_dir, data_dir, adapters) -> list:
    return [
        "--model",
        str(model_dir),
        "--data",
        str(data_dir),
        "--adapter-path",
        str(adapters),
        "--batch-size",
        "2",
        "--lora-rank",
        "4",
    ]


@pytest.fixture(scope="module")
def trained(model_dir, data_dir, tmp_path_factory):
    """One short training run with --test: (adapter folder, stdout)."""
    adapters = tmp_path_factory.mktemp("run") / "adapters"
    code, out, err = run_cli(
        *common(model_dir, data_dir, adapters),
        "--train",
        "--test",
        "--iters",
        "4",
        "--steps-per-report",
        "2",
        "--steps-per-eval",
        "4",
        "--save-every",
        "2",
    )
    assert code == 0, err
    return adapters, out


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# ---------------------------------------------------------------- flags


def test_help_lists_the_main_flags():
    env = {**os.environ, NO_REEXEC_ENV: "1"}
    result = subprocess.run(
        [sys.executable, "lora.py", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for flag in (
        "--model",
        "--data",
        "--hf-dataset",
        "--adapter-path",
        "--iters",
        "--batch-size",
        "--learning-rate",
        "--lora-rank",
        "--lora-layers",
        "--lora-targets",
        "--resume",
        "--test",
        "--save-every",
        "--steps-per-eval",
        "--grad-checkpoint",
        "--config",
        "--seed",
    ):
        assert flag in result.stdout, flag


def test_config_file_sets_flags_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "iters: 7\nlearning-rate: 0.001\nlora_targets: [attn.query, mlp1]\nseed: 0\n"
        "batch-size: 3\ngrad-checkpoint: true\n"
    )
    args = lora.parse_args(["--config", str(config), "--batch-size", "5", "--seed", "4"])
    assert (args.iters, args.learning_rate, args.lora_targets) == (7, 0.001, "attn.query,mlp1")
    assert args.grad_checkpoint is True
    assert (args.batch_size, args.seed) == (5, 4)  # given flags win over the file
    assert lora.parse_args([]).iters == 200  # the file's values do not leak into later parsers


def test_unknown_config_key_is_an_error_naming_it(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("iters: 7\nlearnig-rate: 0.1\n")
    with pytest.raises(SystemExit) as exit:
        lora.parse_args(["--config", str(config)])
    assert exit.value.code == 2
    assert f"--config {config}: unknown setting 'learnig-rate'" in capsys.readouterr().err


# ---------------------------------------------------------------- a training run


def test_training_run_writes_metrics_best_and_checkpoints(trained):
    adapters, out = trained
    records = read_jsonl(adapters / "metrics.jsonl")
    first = records[0]
    assert first["step"] == 0 and set(first) >= {"val_loss", "val_wer", "val_cer", "eval_time"}
    assert all(isinstance(first[k], float) and np.isfinite(first[k]) for k in ("val_loss", "val_wer", "val_cer"))
    train_records = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train_records] == [2, 4]
    for r in train_records:
        assert set(r) >= {"train_loss", "lr", "it_per_s", "tokens_per_s", "peak_memory_gb"}
        assert all(np.isfinite(r[k]) and r[k] >= 0 for k in r)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 4]
    assert "Iter 2: train loss" in out and "tokens/s" in out

    for folder in (adapters, adapters / "best"):
        assert {"adapters.safetensors", "adapter_config.json"} <= {p.name for p in folder.iterdir()}
    assert (adapters / "checkpoints" / "0000002_adapters.safetensors").is_file()
    assert (adapters / "resume.safetensors").is_file()
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["lora"]["rank"] == 4 and config["model_dims"] == tiny_dims(n_text_ctx=TEXT_CTX).to_dict()
    assert config["training"]["iters"] == 4


def test_test_flag_writes_predictions_with_a_summary_line(trained):
    adapters, out = trained
    lines = read_jsonl(adapters / "test_predictions.jsonl")
    predictions, summary = lines[:-1], lines[-1]
    assert sorted(p["ref"] for p in predictions) == ["five", "six"]
    assert all(set(p) >= {"source", "language", "ref", "hyp"} and p["language"] == "en" for p in predictions)
    assert summary["split"] == "test" and summary["clips"] == 2
    assert all(np.isfinite(summary[k]) for k in ("loss", "wer", "cer"))
    assert "Test on test (2 clips)" in out


def test_fresh_adapters_score_like_the_base_model(trained, model_dir, data_dir, tmp_path):
    # The step-0 validation of the run used fresh adapters; --test alone scores the base model on
    # test/, which holds the same clips.
    adapters, _ = trained
    step0 = read_jsonl(adapters / "metrics.jsonl")[0]
    code, _, err = run_cli(*common(model_dir, data_dir, tmp_path / "none"), "--test")
    assert code == 0, err
    summary = read_jsonl(tmp_path / "none" / "test_predictions.jsonl")[-1]
    assert (summary["loss"], summary["wer"], summary["cer"]) == (step0["val_loss"], step0["val_wer"], step0["val_cer"])


def test_existing_adapters_are_not_overwritten_without_a_flag(trained, model_dir, data_dir):
    adapters, _ = trained
    before = (adapters / "adapters.safetensors").read_bytes()
    code, _, err = run_cli(*common(model_dir, data_dir, adapters), "--iters", "1")
    assert code == 1
    assert f"{adapters} already holds adapters; pass --resume to continue that run, --overwrite to replace" in err
    assert (adapters / "adapters.safetensors").read_bytes() == before


def test_absurd_learning_rate_stops_with_the_reason_and_exit_code_1(model_dir, data_dir, tmp_path):
    # Which files survive a stop is test_trainer's business; here: a real divergence reaches the user.
    adapters = tmp_path / "adapters"
    code, out, err = run_cli(
        *common(model_dir, data_dir, adapters),
        "--iters",
        "8",
        "--learning-rate",
        "1e6",
        "--save-every",
        "1",
        "--steps-per-eval",
        "0",
        "--freeze-encoder",
    )
    assert code == 1, err
    assert "stopped without saving" in out and ("training loss is nan" in out or "weights not finite" in out)
    assert (adapters / "adapters.safetensors").is_file()  # the last good adapters are kept


def test_resume_without_a_checkpoint_says_what_to_do(model_dir, data_dir, tmp_path):
    code, _, err = run_cli(*common(model_dir, data_dir, tmp_path / "adapters"), "--resume", "--iters", "2")
    assert code == 1
    assert "holds no adapter_config.json; train without --resume first" in err
