"""Nothing a user keeps can be destroyed by a flag, and every bad value is refused where it enters.

One test (or a few) per class of failure: outputs that would overwrite inputs, two runs on one
adapter folder, resuming with other settings, flag and config values, wrong numbers without an
error, errors that came too late or named the wrong thing, and file permissions.
"""

import argparse
import json
import os
import stat
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

import fuse as fuse_cli
import lora as lora_cli
import transcribe as transcribe_cli
import utils
from conftest import make_clips, tiny_whisper
from models.audio import SAMPLE_RATE, AudioError, load_audio
from models.backend import NO_REEXEC_ENV
from models.tuner.adapters import AdapterFolder, MetricsLog, save_adapters
from models.tuner.datasets import read_manifest
from models.tuner.lora import LoRAConfig, linear_to_lora_layers


@pytest.fixture(autouse=True)
def no_reexec(monkeypatch):
    monkeypatch.setenv(NO_REEXEC_ENV, "1")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return make_clips(tmp_path_factory.mktemp("clips"))


def lora_args(model: Path, data: Path, adapters: Path, *extra: str) -> list:
    return ["--model", str(model), "--data", str(data), "--language", "en", "--val-fraction", "0",
            "--adapter-path", str(adapters), "--batch-size", "2", "--steps-per-eval", "0", "--lora-rank", "4",
            "--iters", "2", *extra]  # fmt: skip


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under `folder`: to show nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def adapters(tmp_path, model_folder) -> Path:
    """A small adapter folder for the tiny model, as lora.py writes it."""
    model = tiny_whisper()
    linear_to_lora_layers(model, LoRAConfig(rank=4))
    folder = tmp_path / "adapters"
    save_adapters(model, folder, {"lora": LoRAConfig(rank=4).to_dict(), "model_dims": model.dims.to_dict()})
    return folder


# ---------------------------------------------------------------- 1. flags cannot destroy inputs


@pytest.mark.parametrize("target", ["model", "adapters", "inside-model", "inside-adapters", "parent-of-adapters"])
def test_fuse_never_writes_over_its_inputs_even_with_force(tmp_path, model_folder, adapters, target, capsys):
    import shutil

    model = shutil.copytree(model_folder, tmp_path / "model")
    save_path = {"model": model, "adapters": adapters, "inside-model": model / "fused",
                 "inside-adapters": adapters / "fused", "parent-of-adapters": tmp_path}[target]  # fmt: skip
    before = snapshot(tmp_path)
    for flag in ("--save-path", "--export-hf"):
        other = tmp_path / "elsewhere" if flag == "--export-hf" else None
        argv = ["--model", str(model), "--adapter-path", str(adapters), "--force", flag, str(save_path)]
        if other is not None:
            argv += ["--save-path", str(other)]
        assert fuse_cli.main(argv) == 1
        err = capsys.readouterr().err
        assert f"{flag} {save_path}" in err and "would overwrite an input" in err, err
    assert snapshot(tmp_path) == before


def test_fuse_force_replaces_only_a_folder_fuse_wrote(tmp_path, model_folder, adapters, capsys):
    out = tmp_path / "fused"
    base = ["--model", str(model_folder), "--adapter-path", str(adapters), "--save-path", str(out)]
    assert fuse_cli.main(base) == 0
    assert fuse_cli.main(base) == 1 and "pass --force" in capsys.readouterr().err
    assert fuse_cli.main([*base, "--force"]) == 0  # its own folder: replaced
    (out / "notes.txt").write_text("mine")
    assert fuse_cli.main([*base, "--force"]) == 1
    assert "holds files fuse.py did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "a.jpg").write_bytes(b"jpeg")
    hf = [*base[:4], "--save-path", str(tmp_path / "fused2"), "--export-hf", str(unrelated), "--force"]
    assert fuse_cli.main(hf) == 1 and "a.jpg" in capsys.readouterr().err
    assert (unrelated / "a.jpg").read_bytes() == b"jpeg" and not (tmp_path / "fused2").exists()


@pytest.mark.parametrize("where", ["data", "inside-data", "model", "inside-model"])
def test_lora_adapter_path_cannot_be_an_input(tmp_path, model_folder, clips, where, capsys):
    import shutil

    model, data = shutil.copytree(model_folder, tmp_path / "m"), shutil.copytree(clips, tmp_path / "d")
    path = {"data": data, "inside-data": data / "adapters", "model": model, "inside-model": model / "a"}[where]
    before = snapshot(tmp_path)
    assert lora_cli.main(lora_args(model, data, path, "--overwrite")) == 1
    assert "would overwrite an input" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_lora_overwrite_refuses_a_folder_holding_other_files(tmp_path, model_folder, clips, capsys):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (folder / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    for extra in ((), ("--overwrite",)):
        assert lora_cli.main(lora_args(model_folder, clips, folder, *extra)) == 1
        assert "holds files lora.py did not write (thesis.tex)" in capsys.readouterr().err
    assert (folder / "metrics.jsonl").read_text() == '{"step": 1, "mine": true}\n'
    test_output = clips / "metadata.csv"
    argv = lora_args(model_folder, clips, tmp_path / "a", "--test", "--test-output", str(test_output))
    assert lora_cli.main(argv) == 1 and "--test-output" in capsys.readouterr().err


def test_transcribe_output_dir_cannot_be_inside_the_model(tmp_path, model_folder, clips, capsys):
    import shutil

    model = shutil.copytree(model_folder, tmp_path / "m")
    before = snapshot(model)
    for inside in (model, model / "sub"):
        code = transcribe_cli.main([str(clips / "c0.wav"), "--model", str(model), "--output-dir", str(inside)])
        assert code == 1 and "--output-dir" in capsys.readouterr().err
    assert snapshot(model) == before
    # A folder that only holds the model (the default --output-dir "." beside a model folder) is fine:
    # outputs go to its top level, never into the model.
    assert transcribe_cli.main([str(clips / "c0.wav"), "--model", str(model), "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "c0.txt").is_file() and snapshot(model) == before


def test_lora_test_output_replaces_only_its_own_predictions(tmp_path, model_folder, clips, capsys):
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"mine": true}\n')
    argv = ["--test", "--model", str(model_folder), "--data", str(clips), "--language", "en",
            "--adapter-path", str(tmp_path / "none"), "--batch-size", "4"]  # fmt: skip
    assert lora_cli.main([*argv, "--test-output", str(notes)]) == 1
    assert "is not a predictions file of lora.py --test" in capsys.readouterr().err
    assert notes.read_text() == '{"mine": true}\n'
    predictions = tmp_path / "predictions.jsonl"
    for _ in range(2):  # written, then replaced: it is lora.py's own file
        assert lora_cli.main([*argv, "--test-output", str(predictions)]) == 0
    assert json.loads(predictions.read_text().splitlines()[-1])["clips"] == 4


# ---------------------------------------------------------------- 2. two runs, one folder


def test_a_second_run_on_a_locked_adapter_folder_is_refused_with_the_holder(tmp_path, model_folder, clips, capsys):
    folder = AdapterFolder(tmp_path / "adapters")
    with folder.locked():
        assert lora_cli.main(lora_args(model_folder, clips, folder.path)) == 1
        err = capsys.readouterr().err
        assert f"in use by another lora.py run (pid {os.getpid()} on " in err
        assert not folder.weights.exists()
    assert not (folder.path / ".lock").exists()  # released and cleaned up
    assert lora_cli.main(lora_args(model_folder, clips, folder.path)) == 0  # free again


# ---------------------------------------------------------------- 3. resume with other settings


def test_resume_with_other_lora_settings_names_the_differences(tmp_path, model_folder, clips, capsys):
    adapters = tmp_path / "adapters"
    assert lora_cli.main(lora_args(model_folder, clips, adapters)) == 0
    before = snapshot(adapters)
    argv = lora_args(model_folder, clips, adapters, "--resume", "--iters", "4")
    argv[argv.index("--lora-rank") + 1] = "8"
    assert lora_cli.main([*argv, "--lora-targets", "mlp1"]) == 1
    err = capsys.readouterr().err
    assert "lora.rank: 4 in the checkpoint, 8 now" in err and "lora.targets:" in err
    assert snapshot(adapters) == before
    assert lora_cli.main(lora_args(model_folder, clips, adapters, "--resume", "--iters", "3")) == 0


# ---------------------------------------------------------------- 4. values checked where they enter


def numeric_actions(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and hasattr(a.type, "bounds")]


def bad_values(kind) -> list:
    low, high, low_open, high_open = kind.bounds
    values = ["abc", "1.5.2", "nan", "inf"]
    if low is not None:
        values.append(str(low if low_open else low - 1))
    if high is not None:
        values.append(str(high if high_open else high + 1))
    return values


SCRIPTS = {"lora.py": (lora_cli, []), "fuse.py": (fuse_cli, []), "transcribe.py": (transcribe_cli, ["x.wav"])}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_numeric_flag_refuses_wrong_types_and_out_of_range_values(script, capsys):
    module, positional = SCRIPTS[script]
    parser = module.build_parser()
    actions = numeric_actions(parser) + [a for a in parser._actions if a.choices and a.option_strings]
    assert script == "fuse.py" or len(actions) >= 8
    for action in actions:
        flag = action.option_strings[-1]
        values = bad_values(action.type) if hasattr(action.type, "bounds") else ["not-a-choice", "99"]
        for value in values:
            with pytest.raises(SystemExit) as exit_:
                parser.parse_args([*positional, flag, value])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and f"argument {flag}" in err and "Traceback" not in err, (flag, value)


def test_config_file_values_are_checked_like_the_command_line(tmp_path, capsys):
    parser = lora_cli.build_parser()
    checked = 0
    for action in numeric_actions(parser):
        for value in bad_values(action.type)[:1] + bad_values(action.type)[4:]:
            config = tmp_path / "c.yaml"
            config.write_text(f"{action.dest}: {json.dumps(value) if value == 'abc' else value}\n")
            with pytest.raises(SystemExit) as exit_:
                lora_cli.parse_args(["--config", str(config)])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and action.option_strings[-1] in err, (action.dest, value, err)
            checked += 1
    assert checked >= 20
    for text, message in (("grad-checkpoint: 'false'", "must be true or false"), ("iters: 2.5", "--iters"),
                          ("iters: [1, 2]", "--iters"), ("resume: yes please", "must be true or false")):  # fmt: skip
        (tmp_path / "c.yaml").write_text(text + "\n")
        with pytest.raises(SystemExit):
            lora_cli.parse_args(["--config", str(tmp_path / "c.yaml")])
        assert message in capsys.readouterr().err, text
    (tmp_path / "c.yaml").write_text("grad-checkpoint: false\niters: 7\n")
    args = lora_cli.parse_args(["--config", str(tmp_path / "c.yaml")])
    assert args.grad_checkpoint is False and args.iters == 7


def test_number_type_bounds():
    at_least_one = utils.number(int, 1)
    assert at_least_one("3") == 3
    for bad in ("0", "-2", "1.0", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            at_least_one(bad)
    layers = utils.number(int, 1, also=(-1,))
    assert layers("-1") == -1 and layers("2") == 2
    optional = utils.number(float, 0, 1, low_open=True, none=True)
    assert optional("none") is None and optional("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError):
        optional("0")


# ---------------------------------------------------------------- 5. wrong numbers without an error


def test_half_precision_on_the_cpu_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_:
        transcribe_cli.main(["x.wav", "--dtype", "float16"])
    assert exit_.value.code == 2 and "--dtype float16 on the CPU" in capsys.readouterr().err


def test_truncated_wav_is_an_error_not_a_shorter_clip(tmp_path):
    sf.write(tmp_path / "whole.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE, subtype="PCM_16")
    data = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    assert len(load_audio(tmp_path / "whole.wav")) == SAMPLE_RATE
    with pytest.raises(AudioError, match=r"cut\.wav: truncated WAV file"):
        load_audio(tmp_path / "cut.wav")
    with pytest.raises(AudioError, match="truncated WAV file"):
        load_audio(data[: len(data) // 2])


def test_unbalanced_quote_in_a_manifest_is_an_error_naming_the_row(tmp_path):
    (tmp_path / "metadata.csv").write_text('file_name,text\na.wav,"hello\nb.wav,world\nc.wav,fine\n')
    with pytest.raises(ValueError, match=r"metadata\.csv:2: a quoted field runs on to line 4"):
        read_manifest(tmp_path)
    (tmp_path / "metadata.csv").write_text('file_name,text\na.wav,"hello, world"\nb.wav,x\n')
    assert [e.text for e in read_manifest(tmp_path)] == ["hello, world", "x"]


# ---------------------------------------------------------------- 6. errors that name the right thing, in time


def test_pipes_and_devices_are_named_as_such(tmp_path, model_folder, capsys):
    os.mkfifo(tmp_path / "fifo")
    code = transcribe_cli.main([str(tmp_path / "fifo"), "/dev/null", "--model", str(model_folder),
                                "--output-dir", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("a pipe or device, not an audio file") == 4  # the line and the summary
    assert "no such file" not in err


def test_an_unusable_output_dir_is_refused_before_transcribing(tmp_path, model_folder, clips, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(transcribe_cli, "load", lambda *a: calls.append(a))
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        code = transcribe_cli.main([str(clips / "c0.wav"), "--model", str(model_folder), "--output-dir", str(out)])
        assert code == 1 and f"--output-dir {out}" in capsys.readouterr().err
    assert calls == []  # no model was loaded, nothing was transcribed


def test_the_text_is_printed_even_when_writing_fails(tmp_path, model_folder, clips, capsys, monkeypatch):
    from models.inference import writers

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers, "write_result", full_disk)
    argv = [str(clips / "c0.wav"), "--model", str(model_folder), "--output-dir", str(tmp_path), "--language", "en",
            "--temperature-increment-on-fallback", "none", "--no-speech-threshold", "none"]  # fmt: skip
    assert transcribe_cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert out.strip() != "" and "No space left on device" in err


def test_a_cut_last_metrics_line_does_not_block_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss": 1.5}\n{"step": 3, "tra')
    assert [r["step"] for r in MetricsLog(path, True, resume_step=2).records()] == [1, 2]
    assert path.read_text() == '{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss": 1.5}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: invalid JSON"):
        MetricsLog(path, True, resume_step=2)


def test_ctrl_c_while_preparing_data_prints_a_summary(tmp_path, model_folder, clips, capsys, monkeypatch):
    from models.tuner import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "scan_examples", interrupted)
    assert lora_cli.main(lora_args(model_folder, clips, tmp_path / "a")) == 130
    err = capsys.readouterr().err
    assert "Interrupted: stopped before training; nothing was saved" in err and "Traceback" not in err
    assert not (tmp_path / "a" / ".lock").exists()


def test_ctrl_c_in_a_transcription_batch_prints_a_summary(tmp_path, model_folder, clips, capsys, monkeypatch):
    from models.inference.transcribe import Transcriber

    runs = []

    def run(self, audio, progress=False):
        runs.append(audio)
        if len(runs) == 2:
            raise KeyboardInterrupt
        return {"text": "hello", "segments": [], "language": "en"}

    monkeypatch.setattr(Transcriber, "run", run)
    argv = [str(clips), "--model", str(model_folder), "--output-dir", str(tmp_path), "--language", "en"]
    assert transcribe_cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "Stopped at" in err and "1 of 4 file(s) done" in err and "Traceback" not in err
    assert (tmp_path / "c0.txt").is_file() and not (tmp_path / "c1.txt").exists()


# ---------------------------------------------------------------- 7. permissions follow the umask


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_users_keep_follow_the_umask(tmp_path, model_folder, adapters, umask):
    previous = os.umask(umask)
    try:
        model = tiny_whisper()
        linear_to_lora_layers(model, LoRAConfig(rank=4))
        folder = AdapterFolder(tmp_path / "a", {"lora": LoRAConfig(rank=4).to_dict()})
        folder.save(model)
        folder.save(model, "checkpoint", 5)
        assert fuse_cli.main(["--model", str(model_folder), "--adapter-path", str(adapters),
                              "--save-path", str(tmp_path / "fused")]) == 0  # fmt: skip
    finally:
        os.umask(previous)
    files = [folder.weights, folder.path / "adapter_config.json", folder.checkpoint(5),
             tmp_path / "fused" / "weights.safetensors", tmp_path / "fused" / "README.md"]  # fmt: skip
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE((tmp_path / "fused").stat().st_mode) == 0o777 & ~umask
    assert mx.load(str(folder.weights))  # and they are whole files
