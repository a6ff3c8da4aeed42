"""Reliability: every bad input gets a clear error, no interruption loses work.

One test (or more) per row of docs/reliability.md: bad audio, bad data rows, broken model and
adapter folders, training faults (NaN, Ctrl-C, SIGKILL, disk full, resume), and security.
Tiny random models and synthetic audio keep them fast and offline; the end-to-end ones drive
`lora.py` and `transcribe.py` the way a user does, in-process or as a subprocess.
"""

import errno
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from mlx.utils import tree_flatten

import lora as lora_cli
import transcribe as transcribe_cli
from conftest import ROOT, tiny_dims, tiny_whisper
from models import atomic
from models import audio as audio_module
from models.audio import HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE, AudioError, load_audio
from models.backend import NO_REEXEC_ENV
from models.inference import transcribe as tr
from models.inference.options import TranscribeOptions
from models.loading import ModelLoadError, load_model, save_model
from models.tokenizer import get_tokenizer
from models.tuner.adapters import RESUME_FILE, AdapterFolder, load_adapters, save_adapters
from models.tuner.batches import DroppedExample, Features, label_tokens, prepare_examples
from models.tuner.datasets import DatasetLoadError, Example, load_local_dataset, read_manifest
from models.tuner.lora import LoRAConfig, linear_to_lora_layers
from models.tuner.trainer import Trainer, TrainingArgs, TrainingStopped, train
from models.whisper import Whisper

DIMS = tiny_dims()
# 16 audio positions (32 mel frames): in-process training loops that need no real audio run much faster.
SHORT = dict(n_audio_ctx=16)
TOKENIZER = get_tokenizer(True, language="en", task="transcribe")


@pytest.fixture(autouse=True)
def no_reexec(monkeypatch):
    """The CLIs' main() would re-exec the process to preload OpenBLAS; not inside pytest."""
    monkeypatch.setenv(NO_REEXEC_ENV, "1")


def silent_model() -> Whisper:
    """A tiny model that hears no speech anywhere, so long-form transcription skips every window.

    The decoder's final layer norm has zero gain, so every position's logits are the token
    embeddings times its bias: <|nospeech|> dominates at <|startoftranscript|> (no_speech_prob ~ 1)
    and <|endoftext|> right after the first timestamp (avg_logprob < -1): OpenAI's silence rule.
    """
    model = tiny_whisper()
    direction = mx.zeros((DIMS.n_text_state,)).at[0].add(1.0)
    model.decoder.ln.weight = mx.zeros((DIMS.n_text_state,))
    model.decoder.ln.bias = direction
    embedding = model.decoder.token_embedding.weight
    embedding[TOKENIZER.no_speech] = 40 * direction
    embedding[TOKENIZER.eot] = 20 * direction
    model.decoder.token_embedding.weight = embedding
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def silent_model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "silent"
    save_model(silent_model(), folder)
    return folder


def tone(seconds: float, freq: float = 440.0, sr: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def truncated_flac(path: Path) -> Path:
    """The first half of a valid 2 s FLAC, as an interrupted download or copy leaves it."""
    buffer = io.BytesIO()
    sf.write(buffer, tone(2.0), SAMPLE_RATE, format="FLAC")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


# ================================================================ audio


def test_audio_empty_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: the file is empty$"):
        load_audio(tmp_path / "empty.wav")


def test_audio_length_names_what_is_not_a_readable_audio_file_without_waiting_on_it(tmp_path):
    from models.audio import audio_length

    os.mkfifo(tmp_path / "pipe.wav")  # opening a FIFO to read would wait for a writer
    (tmp_path / "folder.wav").mkdir()
    (tmp_path / "empty.wav").write_bytes(b"")
    for name, why in (("pipe.wav", "not a regular file"), ("folder.wav", "not a regular file"),
                      ("gone.wav", "no such audio file"), ("empty.wav", "the file is empty")):  # fmt: skip
        with pytest.raises(AudioError, match=rf"{re.escape(str(tmp_path / name))}: {why}$"):
            audio_length(tmp_path / name)
    sf.write(tmp_path / "a.wav", tone(1.0), SAMPLE_RATE)
    assert audio_length(tmp_path / "a.wav") == SAMPLE_RATE and audio_length(str(tmp_path / "a.wav")) == SAMPLE_RATE


def test_audio_truncated_flac_is_an_error_not_a_silently_shorter_clip(tmp_path):
    # ffmpeg would decode the first half and say nothing: the transcript would not match the audio.
    with pytest.raises(AudioError, match=r"trunc\.flac: truncated or corrupt FLAC file \(.*\); re-export it"):
        load_audio(truncated_flac(tmp_path / "trunc.flac"))


def test_audio_text_file_named_wav_is_an_error_naming_it(tmp_path):
    (tmp_path / "notes.wav").write_text("these are my notes, not audio\n")
    with pytest.raises(AudioError, match=r"notes\.wav: .*(could not decode|Invalid data)"):
        load_audio(tmp_path / "notes.wav")


def test_audio_nan_samples_are_an_error_not_a_nan_loss(tmp_path):
    samples = tone(1.0)
    samples[100] = np.nan
    sf.write(tmp_path / "nan.wav", samples, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav: the file holds NaN or infinite samples"):
        load_audio(tmp_path / "nan.wav")


def test_audio_silence_gives_finite_features_and_an_empty_transcript(tmp_path):
    sf.write(tmp_path / "silence.wav", np.zeros(3 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    samples = load_audio(tmp_path / "silence.wav")
    assert samples.shape == (3 * SAMPLE_RATE,) and not samples.any()
    assert np.isfinite(audio_module.log_mel_spectrogram(samples)).all()  # log10(0) is floored, never -inf
    (feature,), report = prepare_examples(
        [Example(str(tmp_path / "silence.wav"), "quiet", "en", "row")], TOKENIZER, 80, "en", verbose=False
    )
    assert report.kept == 1 and np.isfinite(feature.mel.astype(np.float32)).all()
    windows = audio_module.MelWindows(audio_module.open_audio(tmp_path / "silence.wav"))
    assert np.isfinite(windows.window(0)).all()
    result = tr.transcribe(silent_model(), str(tmp_path / "silence.wav"), language="en")
    assert result == {"text": "", "segments": [], "language": "en"}


def test_audio_8_bit_wav_is_read_at_full_scale(tmp_path):
    sf.write(tmp_path / "u8.wav", tone(1.0), SAMPLE_RATE, subtype="PCM_U8")
    samples = load_audio(tmp_path / "u8.wav")
    assert samples.dtype == np.float32 and samples.shape == (SAMPLE_RATE,)
    np.testing.assert_allclose(samples, tone(1.0), atol=1 / 64)  # 8-bit steps, not 0..255 or 1/256 scale


def test_audio_48khz_stereo_is_mixed_to_mono_and_resampled(tmp_path):
    left, right = tone(2.0, 440, 48000), tone(2.0, 660, 48000)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 48000)
    samples = load_audio(tmp_path / "stereo.wav")
    assert samples.shape == (2 * SAMPLE_RATE,)
    expected = (tone(2.0, 440) + tone(2.0, 660)) / 2
    np.testing.assert_allclose(samples[100:-100], expected[100:-100], atol=0.01)


@pytest.mark.parametrize(
    "name, format, subtype", [("clip.mp3", "MP3", None), ("clip.ogg", "OGG", "VORBIS"), ("clip.opus", "OGG", "OPUS")]
)
def test_audio_mp3_ogg_opus_are_read(tmp_path, name, format, subtype):
    if format not in sf.available_formats() or (subtype and subtype not in sf.available_subtypes(format)):
        pytest.skip(f"this libsndfile cannot write {name}")
    sf.write(tmp_path / name, tone(2.0, 440, 48000), 48000, format=format, subtype=subtype)
    samples = load_audio(tmp_path / name)
    assert abs(len(samples) - 2 * SAMPLE_RATE) < 0.05 * SAMPLE_RATE  # codecs add a little padding
    spectrum = np.abs(np.fft.rfft(samples[:SAMPLE_RATE]))
    assert abs(np.argmax(spectrum) - 440) <= 2  # the tone survived the codec (1 Hz bins)


@pytest.fixture(scope="module")
def two_hour_flac(tmp_path_factory) -> Path:
    """Two hours of a quiet constant level (digital silence would be skipped without decoding): small as
    FLAC, 460 MB as float32 samples, 230 MB as a mel."""
    path = tmp_path_factory.mktemp("long") / "two_hours.flac"
    with sf.SoundFile(path, "w", SAMPLE_RATE, 1, format="FLAC") as f:
        block = np.full(SAMPLE_RATE * 900, 0.001, np.float32)
        for _ in range(8):
            f.write(block)
    return path


def test_audio_two_hour_file_is_transcribed_window_by_window(two_hour_flac, monkeypatch):
    # The file is read 30 s at a time and features are made per window. The FFTs and the model are
    # replaced by cheap stand-ins here (the slow test below runs them for real); that windows equal
    # whole-file features is test_transcribe.py::test_mel_windows_equal_the_whole_file_features.
    reads, mel_frames, encoded = [], [], []
    real_read = audio_module.SoundFileSource.read

    def read(self, start, stop):
        reads.append(stop - start)
        return real_read(self, start, stop)

    def power(self, start, stop):
        mel_frames.append(stop - start)
        self._samples(start * HOP_LENGTH, (stop - 1) * HOP_LENGTH + N_FFT)  # the real read
        return np.full((stop - start, self.n_mels), 1e-10, np.float32)

    def whole_file(*args, **kwargs):
        raise AssertionError("long-form transcription must not load or featurise the whole file")

    class Spy(tr.Transcriber):
        def encode(self, mel_window):
            encoded.append(mel_window.shape)
            return mx.zeros((DIMS.n_audio_ctx, DIMS.n_audio_state))

    monkeypatch.setattr(audio_module.SoundFileSource, "read", read)
    monkeypatch.setattr(audio_module.MelWindows, "_power", power)
    for module in (audio_module, tr):  # every name a whole-file load could go through
        monkeypatch.setattr(module, "load_audio", whole_file)
    monkeypatch.setattr(audio_module, "log_mel_spectrogram", whole_file)
    tracemalloc.start()
    tic = time.perf_counter()
    try:
        result = Spy(silent_model(), TranscribeOptions(language="en")).run(str(two_hour_flac))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result["text"] == "" and result["segments"] == []
    windows = 2 * 3600 // 30
    assert encoded == [(N_FRAMES, 80)] * windows  # every 30 s window, one at a time
    assert max(mel_frames) <= N_FRAMES and max(reads) <= N_SAMPLES + N_FFT + HOP_LENGTH
    # Streaming passes: one for the level, one for the silence check, one to decode.
    assert sum(reads) < 4 * 2 * 3600 * SAMPLE_RATE
    assert peak < 64e6, f"peak traced memory {peak / 1e6:.0f} MB"
    assert time.perf_counter() - tic < 60


@pytest.mark.slow
def test_audio_two_hour_file_real_features_and_model_stay_small(two_hour_flac):
    tracemalloc.start()
    try:
        result = tr.transcribe(silent_model(), str(two_hour_flac), language="en")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result["text"] == "" and peak < 100e6, f"peak traced memory {peak / 1e6:.0f} MB"


def test_audio_tenth_of_a_second_clip_featurises_and_transcribes(tmp_path):
    sf.write(tmp_path / "blip.wav", tone(0.1), SAMPLE_RATE)
    assert load_audio(tmp_path / "blip.wav").shape == (1600,)
    (feature,), _ = prepare_examples(
        [Example(str(tmp_path / "blip.wav"), "hi", "en", "row")], TOKENIZER, 80, "en", verbose=False
    )
    assert feature.mel.shape == (N_FRAMES, 80) and np.isfinite(feature.mel.astype(np.float32)).all()
    assert tr.transcribe(silent_model(), str(tmp_path / "blip.wav"), language="en")["text"] == ""
    # Even shorter than one FFT window: no crash, nothing to transcribe.
    assert tr.transcribe(silent_model(), np.zeros(5, np.float32), language="en")["segments"] == []


# ================================================================ data


def write_manifest(folder: Path, lines, encoding="utf-8") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.csv").write_bytes("\n".join(lines).encode(encoding) + b"\n")
    return folder


def test_data_missing_metadata_column_names_the_file_row_and_columns(tmp_path):
    write_manifest(tmp_path, ["file_name,caption", "a.flac,hello"])
    with pytest.raises(
        ValueError,
        match=r"metadata\.csv:2: no transcript column; expected one of sentence, "
        r"text, transcription, normalized_text, found file_name, caption",
    ):
        read_manifest(tmp_path)


def test_data_row_whose_file_is_missing_is_dropped_and_named(tmp_path):
    sf.write(tmp_path / "here.flac", tone(1.0), SAMPLE_RATE)
    write_manifest(tmp_path, ["file_name,text", "here.flac,present", "gone.flac,absent"])
    features, report = prepare_examples(read_manifest(tmp_path), TOKENIZER, 80, "en", verbose=False)
    assert [f.source for f in features] == [f"{tmp_path / 'metadata.csv'}:2"]
    assert str(report) == (
        f"kept 1 of 2 examples; dropped 1: unreadable audio: 1 (e.g. {tmp_path / 'metadata.csv'}:3: "
        f"{tmp_path / 'gone.flac'}: no such audio file)"
    )


def test_data_non_utf8_row_is_dropped_not_the_whole_manifest(tmp_path):
    for name in ("a.flac", "b.flac"):
        sf.write(tmp_path / name, tone(1.0), SAMPLE_RATE)
    (tmp_path / "metadata.csv").write_bytes(b"file_name,text\na.flac,caf\xe9 au lait\nb.flac,plain text\n")
    examples = read_manifest(tmp_path)  # used to fail: 'utf-8' codec can't decode byte 0xe9
    features, report = prepare_examples(examples, TOKENIZER, 80, "en", verbose=False)
    assert [f.source for f in features] == [f"{tmp_path / 'metadata.csv'}:3"]
    assert report.samples["non-UTF-8 text"] == [
        f"{tmp_path / 'metadata.csv'}:2: byte 0xe9 is not UTF-8; save the manifest as UTF-8"
    ]


def test_data_row_over_448_tokens_is_dropped():
    with pytest.raises(DroppedExample, match=r"^transcript too long: 50[0-9] tokens > 448$"):
        label_tokens(TOKENIZER, "word " * 500, "en")


def test_data_audio_over_30_s_is_dropped(tmp_path):
    sf.write(tmp_path / "long.flac", tone(31.0), SAMPLE_RATE)
    _, report = prepare_examples(
        [Example(str(tmp_path / "long.flac"), "long", "en", "m.csv:2")], TOKENIZER, 80, "en", verbose=False
    )
    assert report.samples == {"audio longer than 30 s": ["m.csv:2: 31.0 s; give it segments"]}


def test_data_empty_split_is_an_error_naming_the_manifest(tmp_path, model_folder, capsys):
    write_manifest(tmp_path / "train", ["file_name,text", "a.flac,hi"])
    sf.write(tmp_path / "train" / "a.flac", tone(1.0), SAMPLE_RATE)
    write_manifest(tmp_path / "validation", ["file_name,text"])
    with pytest.raises(ValueError, match=r"validation/metadata\.csv has no rows; add one row per audio file"):
        load_local_dataset(tmp_path)
    code = lora_cli.main(
        [
            "--model",
            str(model_folder),
            "--data",
            str(tmp_path),
            "--language",
            "en",
            "--adapter-path",
            str(tmp_path.parent / f"{tmp_path.name}-adapters"),
        ]
    )
    assert code == 1
    assert (
        capsys.readouterr().err == f"error: {tmp_path / 'validation' / 'metadata.csv'} has no rows; "
        f"add one row per audio file\n"
    )


def test_data_unknown_hub_dataset_offline_says_it_could_not_be_reached(tmp_path, model_folder):
    # A subprocess: the Hub libraries read the offline switches when they are imported.
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), **{NO_REEXEC_ENV: "1"}
    )
    run = subprocess.run(
        [
            sys.executable,
            "lora.py",
            "--model",
            str(model_folder),
            "--hf-dataset",
            "nobody-xyz/no-such-dataset",
            "--language",
            "en",
            "--adapter-path",
            str(tmp_path / "a"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert re.search(
        r"^error: could not load Hugging Face dataset 'nobody-xyz/no-such-dataset' \(config None, "
        r"split 'train'\): Couldn't reach 'nobody-xyz/no-such-dataset' on the Hub .*Check the dataset "
        r"name, config and split, your network connection, and HF_TOKEN",
        run.stderr,
        re.M,
    ), run.stderr
    assert issubclass(DatasetLoadError, RuntimeError)


# ================================================================ end to end: a scraped data set


def scraped_folder(folder: Path) -> Path:
    """Usable clips in every format a scrape brings, and one bad row of every kind."""
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / "tone.flac", tone(1.0), SAMPLE_RATE)
    sf.write(folder / "blip.wav", tone(0.1), SAMPLE_RATE)
    sf.write(folder / "u8.wav", tone(1.0), SAMPLE_RATE, subtype="PCM_U8")
    sf.write(folder / "stereo.wav", np.stack([tone(1.0, 440, 48000)] * 2, axis=1), 48000)
    sf.write(folder / "quiet.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    sf.write(folder / "long.flac", tone(31.0), SAMPLE_RATE)
    truncated_flac(folder / "trunc.flac")
    (folder / "notes.wav").write_text("not audio")
    (folder / "empty.wav").write_bytes(b"")
    nan = tone(1.0)
    nan[5] = np.nan
    sf.write(folder / "nan.wav", nan, SAMPLE_RATE, subtype="FLOAT")
    rows = [
        b"file_name,text",
        b"tone.flac,a tone",
        b"blip.wav,a blip",
        b"u8.wav,eight bits",
        b"stereo.wav,two channels",
        b"quiet.wav,silence",
        b"gone.flac,missing file",
        b"tone.flac,caf\xe9",
        b"long.flac,too long",
        b"tone.flac," + b"word " * 500,
        b"trunc.flac,truncated",
        b"notes.wav,text file",
        b"empty.wav,empty file",
        b"nan.wav,not a number",
    ]
    (folder / "metadata.csv").write_bytes(b"\n".join(rows) + b"\n")
    return folder


def test_bad_rows_do_not_kill_a_training_run(tmp_path, model_folder, capsys):
    data = scraped_folder(tmp_path / "scraped")
    # one epoch at batch 1: every row's audio is decoded once
    code = lora_cli.main(lora_args(model_folder, data, tmp_path / "adapters", "--iters", "7", "--batch-size", "1"))
    out = capsys.readouterr().out
    assert code == 0, out
    reasons = r"(unreadable audio|non-UTF-8 text|audio longer than 30 s|transcript too long): (\d+)"
    # what the transcripts and audio headers show is reported before training ...
    report = next(line for line in out.splitlines() if line.startswith("train: "))
    assert report.startswith("train: kept 7 of 13 examples; dropped 6: ")
    assert dict(re.findall(reasons, report)) == {
        "unreadable audio": "3",
        "non-UTF-8 text": "1",
        "audio longer than 30 s": "1",
        "transcript too long": "1",
    }
    # ... and what only decoding shows (a FLAC cut short, NaN samples) once the rows' batches are due
    decoded = next(line for line in out.splitlines() if line.startswith("Found when decoded: "))
    assert decoded.startswith("Found when decoded: dropped 2: ")
    assert dict(re.findall(reasons, decoded)) == {"unreadable audio": "2"}
    for name in ("gone.flac", "trunc.flac", "notes.wav", "empty.wav", "nan.wav"):
        assert re.search(rf"^Skipping .*metadata\.csv:\d+: .*{re.escape(name)}: ", out, re.M), name
    assert load_adapters(tiny_whisper(), tmp_path / "adapters") is not None


def test_bad_files_do_not_stop_a_transcription_batch(tmp_path, silent_model_folder, capsys):
    sf.write(tmp_path / "good.wav", tone(1.0), SAMPLE_RATE)
    (tmp_path / "empty.wav").write_bytes(b"")
    truncated_flac(tmp_path / "trunc.flac")
    (tmp_path / "notes.wav").write_text("not audio")
    names = ["good.wav", "empty.wav", "trunc.flac", "notes.wav"]
    code = transcribe_cli.main(
        [
            *(str(tmp_path / n) for n in names),
            "--model",
            str(silent_model_folder),
            "--language",
            "en",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "Transcribed 1 of 4 file(s); 3 failed, 0 input(s) not found:" in err
    for name, why in (
        ("empty.wav", "the file is empty"),
        ("trunc.flac", "truncated or corrupt FLAC file"),
        ("notes.wav", "could not decode"),
    ):
        assert re.search(rf"^  {re.escape(str(tmp_path / name))}: AudioError: .*{why}", err, re.M), name
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.txt"]


# ================================================================ model and adapters


def test_model_missing_folder_is_a_clear_error_in_every_cli(tmp_path, capsys):
    missing = tmp_path / "no-model-here"
    with pytest.raises(ModelLoadError, match=r"no-model-here: no such model folder \(and not a Hugging Face repo"):
        load_model(str(missing))
    sf.write(tmp_path / "a.wav", tone(1.0), SAMPLE_RATE)
    assert transcribe_cli.main([str(tmp_path / "a.wav"), "--model", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"error: could not load the model: {missing}: no such model folder "
        f"(and not a Hugging Face repo id like user/name)\n"
    )
    adapters = str(tmp_path / "adapters")
    assert lora_cli.main(["--model", str(missing), "--data", str(tmp_path / "data"), "--adapter-path", adapters]) == 1
    assert capsys.readouterr().err.startswith(f"error: {missing}: no such model folder")


def copy_model(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("config.json", "weights.safetensors"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def test_model_config_without_required_keys_names_them(tmp_path, model_folder):
    folder = copy_model(model_folder, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    del config["n_text_layer"], config["n_audio_head"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"config\.json: missing required keys \['n_audio_head', 'n_text_layer'\]"):
        load_model(str(folder))


@pytest.mark.parametrize("fault", ["missing", "misshapen"])
def test_model_weights_with_a_missing_or_misshapen_tensor_name_it(tmp_path, model_folder, fault):
    folder = copy_model(model_folder, tmp_path / "model")
    weights, metadata = mx.load(str(folder / "weights.safetensors"), return_metadata=True)
    key = "decoder.blocks.0.cross_attn.value.weight"
    if fault == "missing":
        del weights[key]
        pattern = rf"missing tensors \['{re.escape(key)}'\]"
    else:
        weights[key] = mx.zeros((64, 32))
        pattern = rf"tensor {re.escape(key)} has shape \(64, 32\), the model expects \(64, 64\)"
    mx.save_safetensors(str(folder / "weights.safetensors"), weights, metadata)
    with pytest.raises(ModelLoadError, match=pattern):
        load_model(str(folder))


def lora_adapters(folder: Path, dims: dict = None, lora: dict = None, **config) -> Path:
    """Fresh rank-4 adapters on `tiny_whisper(**dims)`, saved with `config` added to adapter_config.json."""
    model = tiny_whisper(**(dims or {}))
    lora_config = LoRAConfig(rank=4)
    linear_to_lora_layers(model, lora_config)
    save_adapters(
        model,
        folder,
        {"lora": lora or lora_config.to_dict(), "model_dims": model.dims.to_dict(), "base_model": "tiny", **config},
    )
    return folder


def test_adapters_for_another_model_size_are_refused_by_transcribe(tmp_path, model_folder, capsys):
    adapters = lora_adapters(tmp_path / "adapters", dict(n_audio_state=32, n_text_state=32))
    sf.write(tmp_path / "a.wav", tone(1.0), SAMPLE_RATE)
    code = transcribe_cli.main([str(tmp_path / "a.wav"), "--model", str(model_folder), "--adapter-path", str(adapters)])
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: could not load the model: {adapters}: adapters were trained on another model size (adapter vs "
        f"model: {{'n_audio_state': (32, 64), 'n_text_state': (32, 64)}}); use the base model 'tiny'\n"
    )


def test_adapter_config_from_a_newer_version_loads_with_a_warning(tmp_path):
    lora = {**LoRAConfig(rank=4).to_dict(), "version": 2, "gate": "tanh"}
    adapters = lora_adapters(tmp_path / "adapters", lora=lora, version=2, future_section={"x": 1})
    with pytest.warns(
        UserWarning,
        match=r"LoRA config version 2 is newer than this code \(1\); ignoring keys "
        r"\['gate'\]",
    ):
        model = load_adapters(tiny_whisper(), adapters)
    saved = mx.load(str(adapters / "adapters.safetensors"))
    loaded = dict(tree_flatten(model.trainable_parameters()))
    assert sorted(saved) == sorted(loaded) and all(mx.array_equal(saved[k], loaded[k]).item() for k in saved)
    # The same unknown key without a newer version is a mistake, and says which keys are valid.
    (adapters / "adapter_config.json").write_text(json.dumps({"lora": {**LoRAConfig(rank=4).to_dict(), "gate": 1}}))
    with pytest.raises(ModelLoadError, match=r"Unknown LoRA config keys \['gate'\]; valid keys are"):
        load_adapters(tiny_whisper(), adapters)


# ================================================================ training faults


def lora_args(model_folder: Path, data: Path, adapters: Path, *extra: str) -> list:
    return [
        "--model",
        str(model_folder),
        "--data",
        str(data),
        "--language",
        "en",
        "--val-fraction",
        "0",
        "--adapter-path",
        str(adapters),
        "--batch-size",
        "2",
        "--steps-per-eval",
        "0",
        "--steps-per-report",
        "1",
        "--lora-rank",
        "4",
        "--lora-dropout",
        "0.1",
        *extra,
    ]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    lines = ["file_name,text"]
    for i in range(5):
        sf.write(folder / f"c{i}.flac", tone(1.0, 200 + 120 * i), SAMPLE_RATE)
        lines.append(f"c{i}.flac,clip number {i}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_flag_mistakes_say_what_to_do(tmp_path, model_folder, clips, capsys):
    base = lora_args(model_folder, clips, tmp_path / "adapters", "--iters", "1")
    with pytest.raises(SystemExit) as exit_:
        lora_cli.main([*base, "--lora-targets", "attn.q,mlp1"])
    assert exit_.value.code == 2
    assert (
        "argument --lora-targets: unknown LoRA targets ['attn.q']; choose from attn.query, " in capsys.readouterr().err
    )
    assert lora_cli.main([*base, "--resume"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --resume: {tmp_path / 'adapters'} holds no adapter_config.json; train without --resume first"
    )
    (tmp_path / "config.yaml").write_text("learning_rate: 1e-3\nlr: 5\n")
    with pytest.raises(SystemExit) as exit_:
        lora_cli.main([*base, "--config", str(tmp_path / "config.yaml")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: --config {tmp_path / 'config.yaml'}: unknown setting 'lr'\n")


def test_training_nan_loss_stops_keeps_the_last_good_adapters_and_says_why(tmp_path, model_folder, clips, capsys):
    # A learning rate off by 30 orders of magnitude: Adam moves every weight by ~1e30 at once.
    adapters = tmp_path / "adapters"
    code = lora_cli.main(
        lora_args(
            model_folder,
            clips,
            adapters,
            "--iters",
            "10",
            "--save-every",
            "1",
            "--learning-rate",
            "1e30",
            "--lr-schedule",
            "constant",
        )
    )
    out = capsys.readouterr().out
    assert code == 1
    stop = next(line for line in out.splitlines() if "stopped without saving" in line)
    assert re.fullmatch(
        rf"Iter (\d+): training loss is (nan|inf)(, adapter weights not finite)?; stopped without "
        rf"saving; the last good adapters \(iter (\d+)\) are in {re.escape(str(adapters))} "
        rf"\(resume\.safetensors / checkpoints\)\. Lower --learning-rate or use --dtype float32",
        stop,
    ), stop
    failed, kept = int(stop.split()[1].rstrip(":")), int(re.search(r"\(iter (\d+)\)", stop).group(1))
    assert kept == failed - 1
    _, metadata = mx.load(str(adapters / RESUME_FILE), return_metadata=True)
    assert metadata["step"] == str(kept)
    model = load_adapters(tiny_whisper(), adapters)
    assert all(np.isfinite(np.array(v)).all() for _, v in tree_flatten(model.trainable_parameters()))


def test_training_nan_before_the_first_save_says_nothing_was_saved(tmp_path):
    model = tiny_whisper(**SHORT)
    linear_to_lora_layers(model, LoRAConfig(rank=4))
    features = [Features(np.full((32, 80), np.nan, np.float16), label_tokens(TOKENIZER, "hi", "en"), "nan")] * 2
    trainer = Trainer(
        model, TOKENIZER, TrainingArgs(iters=5, batch_size=2, steps_per_eval=0, steps_per_report=1, save_every=100)
    )
    with pytest.raises(
        TrainingStopped,
        match=r"^Iter 1: training loss is nan.*; stopped without saving; no "
        r"adapters were saved before it\. Lower --learning-rate",
    ):
        train(trainer, features, [], AdapterFolder(tmp_path, {"lora": {}}))
    assert not (tmp_path / "adapters.safetensors").exists()


def read_lines_until(process: subprocess.Popen, pattern: str, timeout: float = 120) -> list:
    """stdout lines of `process` up to the first that matches `pattern`."""
    lines, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if re.search(pattern, line):
            return lines
        if time.monotonic() > deadline:
            break
    process.kill()
    raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(lines))


def start_lora(args: list, stderr_path: Path) -> subprocess.Popen:
    """lora.py in a subprocess; stderr (progress bars) goes to a file so no pipe can fill up and block it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{NO_REEXEC_ENV: "1"})
    with open(stderr_path, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "lora.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )


def test_ctrl_c_saves_the_adapters_and_exits_cleanly(tmp_path, model_folder, clips):
    adapters = tmp_path / "adapters"
    process = start_lora(
        lora_args(model_folder, clips, adapters, "--iters", "1000", "--save-every", "1000"), tmp_path / "stderr.txt"
    )
    read_lines_until(process, r"^Iter 2: train loss")
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = next(line for line in out.splitlines() if line.startswith("Interrupted"))
    assert re.fullmatch(
        rf"Interrupted at iter (\d+): saved adapters and resume state in {re.escape(str(adapters))}; "
        rf"continue with --resume",
        line,
    ), line
    step = line.split()[3].rstrip(":")
    assert mx.load(str(adapters / RESUME_FILE), return_metadata=True)[1]["step"] == step
    load_adapters(tiny_whisper(), adapters)


@pytest.mark.parametrize("data", ["decoded in the step", "workers and feature cache"])
def test_resume_after_sigkill_gives_the_same_adapters_as_an_uninterrupted_run(
    tmp_path, model_folder, clips, capsys, data
):
    common = ["--iters", "4", "--save-every", "2", "--learning-rate", "1e-2", "--warmup", "1"]
    if data == "decoded in the step":
        common += ["--num-workers", "0"]
    else:  # the uninterrupted run fills the cache, the killed and the resumed run read it
        common += ["--num-workers", "2", "--feature-cache", str(tmp_path / "cache")]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert lora_cli.main(lora_args(model_folder, clips, straight, *common)) == 0

    process = start_lora(lora_args(model_folder, clips, killed, *common), tmp_path / "stderr.txt")
    read_lines_until(process, r"^Iter 3: train loss")  # the checkpoint of iter 2 is on disk
    process.kill()  # SIGKILL: no handler runs, nothing is flushed
    process.communicate(timeout=60)
    resumed_from = int(mx.load(str(killed / RESUME_FILE), return_metadata=True)[1]["step"])
    assert resumed_from in (2, 4)
    capsys.readouterr()

    assert lora_cli.main(lora_args(model_folder, clips, killed, *common, "--resume")) == 0
    out = capsys.readouterr().out
    assert resumed_from == 4 or re.search(r"^Iter 3: train loss", out, re.M), out
    if data != "decoded in the step":
        assert re.search(r"^Feature cache: features \d+ read, 0 computed$", out, re.M), out
    for name in ("adapters.safetensors", "checkpoints/0000004_adapters.safetensors"):
        a, b = mx.load(str(straight / name)), mx.load(str(killed / name))
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_allclose(np.array(a[key]), np.array(b[key]), rtol=0, atol=1e-6, err_msg=key)


SAVE_LOOP = """
import sys
import mlx.core as mx
from models.atomic import save_safetensors_atomic

step = 0
while True:
    step += 1
    save_safetensors_atomic(sys.argv[1], {"data": mx.full((1_000_000,), step, mx.float32)}, {"step": str(step)})
    print(step, flush=True)
"""


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    target, rng = tmp_path / "adapters.safetensors", random.Random(0)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for _ in range(4):
        process = subprocess.Popen(
            [sys.executable, "-c", SAVE_LOOP, str(target)], env=env, stdout=subprocess.PIPE, text=True
        )
        saved = int(process.stdout.readline())
        time.sleep(rng.uniform(0.0, 0.3))  # lands mid-write more often than not: each write is 4 MB
        process.kill()
        out, _ = process.communicate(timeout=60)
        saved = max([saved] + [int(line) for line in out.split()])
        arrays, metadata = mx.load(str(target), return_metadata=True)
        step = int(metadata["step"])
        assert step >= saved and mx.all(arrays["data"] == step).item()


@pytest.fixture
def disk_full(monkeypatch):
    """Call it to fill the disk: from then on every temp file the savers open is /dev/full (ENOSPC)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    real_mkstemp = tempfile.mkstemp

    def full_mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        os.unlink(name)
        os.symlink("/dev/full", name)
        return os.open(name, os.O_WRONLY), name

    return lambda: monkeypatch.setattr(tempfile, "mkstemp", full_mkstemp)


def test_disk_full_on_save_is_a_clear_error_and_keeps_the_previous_file(tmp_path, disk_full):
    weights, config = tmp_path / "adapters.safetensors", tmp_path / "adapter_config.json"
    atomic.save_safetensors_atomic(weights, {"a": mx.ones((4,))})
    atomic.write_json_atomic(config, {"version": 1})
    disk_full()
    for path, save in (
        (weights, lambda: atomic.save_safetensors_atomic(weights, {"a": mx.zeros((4,))})),
        (config, lambda: atomic.write_json_atomic(config, {"version": 2})),
    ):
        with pytest.raises(OSError) as error:
            save()
        assert error.value.errno == errno.ENOSPC
        assert str(error.value) == (
            f"[Errno 28] disk full: could not save {path} (No space left on device); the "
            f"previous {path.name}, if any, is unchanged. Free some space and try again"
        )
    assert mx.array_equal(mx.load(str(weights))["a"], mx.ones((4,))).item()
    assert json.loads(config.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapters.safetensors"]


def test_disk_full_during_training_stops_with_the_previous_checkpoint_intact(tmp_path, disk_full):
    model = tiny_whisper(**SHORT)
    linear_to_lora_layers(model, LoRAConfig(rank=4))
    features = [Features(np.zeros((32, 80), np.float16), label_tokens(TOKENIZER, t, "en"), t) for t in ("a", "b")]
    trainer = Trainer(
        model,
        TOKENIZER,
        TrainingArgs(iters=5, batch_size=2, steps_per_eval=0, steps_per_report=1, save_every=1),
        log=lambda line: disk_full() if line.startswith("Iter 2: train loss") else None,
    )
    with pytest.raises(
        OSError,
        match=rf"^\[Errno 28\] disk full: could not save "
        rf"{re.escape(str(tmp_path / 'adapters.safetensors'))} ",
    ):
        train(trainer, features, [], AdapterFolder(tmp_path, {"lora": {}}))
    assert mx.load(str(tmp_path / RESUME_FILE), return_metadata=True)[1]["step"] == "1"
    saved = mx.load(str(tmp_path / "adapters.safetensors"))
    checkpoint = mx.load(str(tmp_path / "checkpoints" / "0000001_adapters.safetensors"))
    assert all(mx.array_equal(saved[k], checkpoint[k]).item() for k in saved)


# ================================================================ security


SOURCE_FILES = sorted(
    p
    for p in ROOT.rglob("*.py")  # the library, CLIs and benchmarks; not tests, venvs or caches
    if not any(part.startswith(".") or part == "tests" for part in p.relative_to(ROOT).parts)
)
UNSAFE_LOADERS = {
    r"allow_pickle\s*=\s*True": "np.load with allow_pickle=True unpickles",
    r"\btorch\.load\b": "torch.load unpickles",
    r"\b(c?pickle|dill|joblib|cloudpickle|marshal|shelve)\.loads?\b": "unpickling",
    r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|shelve|marshal)\b": "a pickle module",
    r"trust_remote_code": "running code from the Hub",
}


def unsafe_loads(path: Path) -> list:
    """(line number, why) of every line of `path` that matches an UNSAFE_LOADERS pattern."""
    return [
        (n, why)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        for pattern, why in UNSAFE_LOADERS.items()
        if re.search(pattern, line)
    ]


def test_no_pickle_or_remote_code_loading_in_the_codebase():
    names = {str(p.relative_to(ROOT)) for p in SOURCE_FILES}
    assert {
        "utils.py",
        "lora.py",
        "models/whisper.py",
        "models/inference/decoding.py",
        "models/tuner/adapters.py",
        "models/export/hf.py",
        "benchmarks/common.py",
    } <= names  # every subfolder of models/ is scanned
    assert [f"{p.relative_to(ROOT)}:{n}: {why}" for p in SOURCE_FILES for n, why in unsafe_loads(p)] == []


def test_the_unsafe_loader_scan_sees_each_kind(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "x = np.load(f, allow_pickle=True)\nstate = torch.load(path)\nobj = pickle.loads(blob)\n"
        "import dill\nm = AutoModel.from_pretrained(repo, trust_remote_code=True)\nok = mx.load(path)\n"
    )
    assert [n for n, _ in unsafe_loads(sample)] == [1, 2, 3, 4, 5]


def test_model_downloads_fetch_no_pickle_or_code_files(monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(
        ModelLoadError,
        match=r"^someone/whisper: no such model folder, and could not download "
        r"model 'someone/whisper' from the Hugging Face Hub \(ConnectionError: "
        r"offline\); check the path or repo name, your network, or HF_TOKEN$",
    ):
        load_model("someone/whisper")
    patterns = calls[0]["allow_patterns"]
    assert not [p for p in patterns if p.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt", ".py", "*"))]
    assert "trust_remote_code" not in calls[0]


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pkl"])
def test_model_folder_with_only_pickle_weights_is_refused(tmp_path, model_folder, name):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes((model_folder / "config.json").read_bytes())
    (folder / name).write_bytes(b"\x80\x04\x95 pretend pickle: must never be opened")
    with pytest.raises(
        ModelLoadError,
        match=rf"no weights file; expected one of weights\.safetensors, weights\.npz, "
        rf"model\.safetensors; {re.escape(name)} not loaded: pickle-based files "
        rf"can run code when opened, convert them to safetensors",
    ):
        load_model(str(folder))


def test_npz_weights_holding_pickled_objects_are_refused(tmp_path, model_folder):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes((model_folder / "config.json").read_bytes())
    np.savez(folder / "weights.npz", payload=np.array([{"code": "evil"}], dtype=object))
    with pytest.raises(ModelLoadError, match=r"weights\.npz: could not read weights"):
        load_model(str(folder))


HOSTILE_NAMES = ["..wav", "...wav", ".wav", "-rf.wav", "a\\..\\..\\evil.wav", "new\nline.wav", "$(touch x).wav"]


def test_output_names_from_input_names_stay_inside_the_output_dir(tmp_path, silent_model_folder, capsys):
    inputs, out = tmp_path / "in", tmp_path / "work" / "out"
    inputs.mkdir()
    for name in HOSTILE_NAMES:
        sf.write(inputs / name, tone(0.5), SAMPLE_RATE, format="WAV")

    def outside_out() -> set:
        return {p for p in tmp_path.rglob("*") if p != out and out not in p.parents}

    (tmp_path / "work").mkdir()
    before = outside_out()
    code = transcribe_cli.main(
        [
            *(str(inputs / name) for name in HOSTILE_NAMES),
            "--model",
            str(silent_model_folder),
            "--language",
            "en",
            "--output-dir",
            str(out),
            "--output-format",
            "txt,json",
        ]
    )
    assert code == 0, capsys.readouterr().err
    written = sorted(p for p in out.rglob("*"))
    assert len(written) == 2 * len(HOSTILE_NAMES) and all(p.parent == out for p in written)
    assert "evil.txt" in {p.name for p in written}  # Windows-style parents are dropped too
    assert outside_out() == before  # nothing written anywhere else
