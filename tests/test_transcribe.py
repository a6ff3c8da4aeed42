"""Long-form transcription on hand-built tokens and a tiny random model; the transcribe.py CLI."""

import json

import mlx.core as mx
import numpy as np
import pytest
import soundfile

import transcribe as cli
from models.audio import (
    HOP_LENGTH,
    N_FFT,
    N_FRAMES,
    SAMPLE_RATE,
    ArraySource,
    MelWindows,
    SoundFileSource,
    log_mel_spectrogram,
    mel_filters,
    open_audio,
    pad_or_trim,
)
from models.backend import NO_REEXEC_ENV
from models.inference import transcribe as tr
from models.inference.decoding import DecodingOptions, DecodingResult
from models.inference.options import TranscribeOptions, temperature_schedule
from models.tokenizer import get_tokenizer
from utils import find_inputs

TOKENIZER = get_tokenizer(True, language="en", task="transcribe")
BEGIN = TOKENIZER.timestamp_begin


def ts(seconds: float) -> int:
    return BEGIN + round(seconds / 0.02)


def words(text: str):
    return TOKENIZER.encode(text)


# tiny_model: the fixture in conftest.py


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.1 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.normal(size=t.shape)).astype(np.float32)


# --- segment splitting -------------------------------------------------------------------------


def test_split_segments_at_consecutive_timestamps_and_seeks_to_the_last_complete_one():
    tokens = [ts(0), *words(" Hi."), ts(2.0), ts(2.5), *words(" There."), ts(5.0), ts(6.0), *words(" Unfini")]
    segments, advance, single = tr.split_segments(tokens, BEGIN, time_offset=30.0, segment_frames=N_FRAMES)
    assert [(s, e) for s, e, _ in segments] == [(30.0, 32.0), (32.5, 35.0)]
    assert [TOKENIZER.decode(t) for _, _, t in segments] == [" Hi.", " There."]
    assert advance == 500 and not single  # 5.0 s = 500 mel frames: the unfinished text is decoded again


def test_split_segments_single_timestamp_ending_consumes_the_window():
    tokens = [ts(0), *words(" Hi."), ts(2.0), ts(2.5), *words(" There."), ts(5.0)]
    segments, advance, single = tr.split_segments(tokens, BEGIN, time_offset=0.0, segment_frames=2400)
    assert [(s, e) for s, e, _ in segments] == [(0.0, 2.0), (2.5, 5.0)]
    assert advance == 2400 and single


def test_split_segments_without_pairs_gives_one_segment():
    tokens = words(" No timestamps at all.")
    segments, advance, _ = tr.split_segments(tokens, BEGIN, time_offset=10.0, segment_frames=1234)
    assert segments == [(10.0, 10.0 + 12.34, tokens)] and advance == 1234
    tokens = [ts(0), *words(" Only an end."), ts(7.0)]
    segments, advance, single = tr.split_segments(tokens, BEGIN, time_offset=0.0, segment_frames=N_FRAMES)
    assert [(s, e) for s, e, _ in segments] == [(0.0, 7.0)] and advance == N_FRAMES and single


# --- features window by window -------------------------------------------------------------------


def reference_log_mel(audio: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """faster-whisper's whole-file features, written out plainly in float64: (len(audio) // HOP_LENGTH, n_mels).

    One hop of zeros is appended, the STFT is centred (reflect padding) with a periodic Hann window
    and loses its last frame, and the log10 is floored 8 below the loudest frame of the whole file.
    """
    n_frames = len(audio) // HOP_LENGTH
    padded = np.pad(np.pad(audio.astype(np.float64), (0, HOP_LENGTH)), N_FFT // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    starts = range(0, len(padded) - N_FFT + 1, HOP_LENGTH)
    spectrum = np.fft.rfft(np.stack([padded[i : i + N_FFT] * window for i in starts]), axis=-1)[:-1]
    log_spec = np.log10(np.maximum(np.abs(spectrum) ** 2 @ mel_filters(n_mels).T, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)  # the zero hop's frame counts for the peak
    return ((log_spec + 4.0) / 4.0)[:n_frames]


def test_mel_windows_equal_the_whole_file_features(tmp_path):
    audio = noise(65.3)
    audio[: SAMPLE_RATE * 5] *= 4  # the loudest part sits in the first window only ...
    audio[SAMPLE_RATE * 40 : SAMPLE_RATE * 44] = 0  # ... and digital silence is floored 8 below it
    whole = reference_log_mel(audio)
    windows = MelWindows(ArraySource(audio))
    assert windows.content_frames == len(whole) == len(audio) // HOP_LENGTH
    for seek in (0, 1234, 3000, len(whole) - 500):
        np.testing.assert_allclose(windows.window(seek), pad_or_trim(whole[seek : seek + N_FRAMES]), atol=1e-5)
    np.testing.assert_allclose(log_mel_spectrogram(audio), whole, atol=1e-5)
    path = tmp_path / "long.wav"
    soundfile.write(path, audio, SAMPLE_RATE, subtype="FLOAT")
    lazy = open_audio(path, lazy_after_s=10)
    assert isinstance(lazy, SoundFileSource)
    np.testing.assert_array_equal(MelWindows(lazy).window(4321), windows.window(4321))


def test_open_audio_loads_short_files_and_reports_missing_ones(tmp_path):
    assert isinstance(open_audio(np.zeros(100, np.float32)), ArraySource)
    with pytest.raises(ValueError, match="nope.wav"):
        open_audio(tmp_path / "nope.wav")


# --- the seek loop with a scripted decoder ----------------------------------------------------------


class ScriptedTranscriber(tr.Transcriber):
    """The seek loop with the model calls replaced: each window's tokens come from `script(seek)`."""

    def __init__(self, model, options, script):
        super().__init__(model, options)
        self.script, self.calls = script, []

    def features_at(self, windows, seek):
        self.seek = seek  # the window decode_window is asked about next
        return mx.zeros((1500, 64))

    def decode_window(self, features, prompt):
        tokens, temperature, no_speech, *logprob = self.script(self.seek)
        self.calls.append((self.seek, prompt))
        return DecodingResult(
            language="en",
            tokens=tokens,
            text=TOKENIZER.decode(tokens),
            avg_logprob=logprob[0] if logprob else -0.2,
            no_speech_prob=no_speech,
            temperature=temperature,
            compression_ratio=1.0,
        )


def run_script(tiny_model, seconds, script, **options):
    transcriber = ScriptedTranscriber(tiny_model, TranscribeOptions(language="en", **options), script)
    # A quiet constant level, not digital silence: silent windows are skipped before decoding.
    return transcriber.run(np.full(int(seconds * SAMPLE_RATE), 0.01, np.float32)), transcriber.calls


def test_seek_loop_advances_by_timestamps_and_terminates(tiny_model):
    def script(seek):  # two full segments, then an unfinished one: resume at its start (12 s later)
        t = seek / 100
        return [ts(0), *words(f" At {t:g}."), ts(5), ts(6), *words(" More."), ts(12), ts(13), *words(" cut")], 0.0, 0.01

    result, calls = run_script(tiny_model, 70, script)
    seeks = [seek for seek, _ in calls]
    assert seeks == [0, 1200, 2400, 3600, 4800, 6000]
    starts = [s["start"] for s in result["segments"]]
    assert starts == sorted(starts) and result["segments"][-1]["end"] <= 70
    assert [s["id"] for s in result["segments"]] == list(range(len(result["segments"])))
    assert result["text"].startswith("At 0. More. At 12. More.")
    assert calls[1][1][-1] == ts(12)  # the previous window's tokens are the next prompt


def test_seek_loop_always_moves_forward(tiny_model):
    # A model stuck at <|0.00|> pairs would never advance the seek by its timestamps.
    result, calls = run_script(tiny_model, 45, lambda seek: ([ts(0), *words(" Stuck."), ts(0), ts(0)], 0.0, 0.0))
    assert [seek for seek, _ in calls] == [0, 3000]
    assert result["segments"] == []  # instantaneous segments carry no speech


def test_seek_loop_skips_silence_and_resets_the_prompt_after_hot_fallbacks(tiny_model):
    def script(seek):
        if seek == 3000:
            return words(" ghost"), 0.0, 0.9, -1.5  # likely silence, unlikely text: skipped
        temperature = 0.8 if seek == 0 else 0.0
        return [ts(0), *words(f" W{seek}."), ts(30)], temperature, 0.0

    result, calls = run_script(tiny_model, 85, script, initial_prompt="Glossary: Kenobi.")
    assert [seek for seek, _ in calls] == [0, 3000, 6000]
    assert TOKENIZER.decode(calls[0][1]).strip() == "Glossary: Kenobi."
    assert calls[1][1] is None or calls[1][1] == []  # after a high-temperature window, no prompt
    assert result["text"] == "W0. W6000."
    result, calls = run_script(tiny_model, 65, script, condition_on_previous_text=False)
    assert all(not prompt for _, prompt in calls)
    # Confident text is kept even when the no-speech probability is high.
    result, calls = run_script(tiny_model, 10, lambda seek: ([ts(0), *words(" Hm."), ts(2)], 0.0, 0.9, -0.5))
    assert result["text"] == "Hm."


def test_fallback_raises_the_temperature_until_the_thresholds_pass(monkeypatch):
    seen = []

    def fake_decode(model, features, options):
        seen.append(options)
        bad = options.temperature < 0.4
        return DecodingResult(
            language="en",
            tokens=[1],
            text="x",
            avg_logprob=-2.0 if bad else -0.1,
            no_speech_prob=0.0,
            temperature=options.temperature,
            compression_ratio=1.0,
        )

    monkeypatch.setattr(tr, "decode", fake_decode)
    options = TranscribeOptions(language="en", beam_size=5, best_of=3)
    result = tr.decode_with_fallback(None, None, options, prompt=[])
    assert [o.temperature for o in seen] == [0.0, 0.2, 0.4] and result.temperature == 0.4
    assert seen[0].beam_size == 5 and seen[0].best_of is None and seen[0].prompt is None
    assert seen[1].beam_size is None and seen[1].best_of == 3


# --- real (tiny, random) model end to end ---------------------------------------------------------------


def test_transcribe_runs_end_to_end_on_a_random_model(tiny_model):
    result = tr.transcribe(tiny_model, noise(40), language="en", temperature=0.0, word_timestamps=True)
    assert set(result) == {"text", "segments", "language"} and result["language"] == "en"
    starts = [s["start"] for s in result["segments"]]
    assert starts == sorted(starts)
    assert all(0 <= s["start"] < s["end"] <= 40.0 for s in result["segments"])
    times = [t for s in result["segments"] for w in s["words"] for t in (w["start"], w["end"])]
    assert times == sorted(times) and all(0 <= t <= 40.0 for t in times)


def test_transcribe_batch_matches_one_window_decoding_and_rejects_long_clips(tiny_model):
    clips = [noise(3, seed=1), noise(7, seed=2), noise(2, seed=3)]
    options = DecodingOptions(language="en", sample_len=8)
    batched = tr.transcribe_batch(tiny_model, clips, options, batch_size=2)
    single = [tr.transcribe_batch(tiny_model, [clip], options)[0] for clip in clips]
    assert [r["segments"][0]["tokens"] for r in batched] == [r["segments"][0]["tokens"] for r in single]
    assert [r["segments"][0]["end"] for r in batched] == [3.0, 7.0, 2.0]
    with pytest.raises(ValueError, match="longer than 30 s"):
        tr.transcribe_batch(tiny_model, [noise(31)], options)


# --- the CLI and its input expansion --------------------------------------------------------------


def test_find_inputs_expands_files_folders_and_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.wav", "sub/b.flac", "sub/notes.txt", "c.mp3"):
        (tmp_path / name).write_bytes(b"x")
    files, errors = find_inputs(
        [
            str(tmp_path / "sub"),
            str(tmp_path / "*.wav"),
            str(tmp_path / "missing.wav"),
            str(tmp_path / "*.ogg"),
            str(tmp_path / "c.mp3"),
        ]
    )
    assert [f.name for f in files] == ["b.flac", "a.wav", "c.mp3"]
    assert [(e[0].split("/")[-1], e[1]) for e in errors] == [
        ("missing.wav", "no such file or folder"),
        ("*.ogg", "no files match this pattern"),
    ]


def test_temperature_schedule_and_cli_options():
    assert temperature_schedule(0.0, 0.2) == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert temperature_schedule(0.5, None) == (0.5,)
    args = cli.build_parser().parse_args(
        [
            "x.wav",
            "--condition-on-previous-text",
            "False",
            "--logprob-threshold",
            "none",
            "--output-format",
            "srt,vtt",
            "--language",
            "English",
        ]
    )
    options = cli.options_from_args(args)
    assert not options.condition_on_previous_text and options.logprob_threshold is None
    assert options.language == "en" and args.output_format == ["srt", "vtt"]
    for bad in (["--patience", "2"], ["--language", "xx"]):  # meaningless together / unknown: the options say
        with pytest.raises(ValueError):
            cli.options_from_args(cli.build_parser().parse_args(["x.wav", *bad]))
    for bad in (["--beam-size", "0"], ["--length-penalty", "3"]):  # out of range: refused by the parser
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["x.wav", *bad])


@pytest.fixture
def canned(monkeypatch):
    """The CLI with a fake model whose transcript is fixed; files named 'bad*' fail to decode."""
    result = {
        "text": "Hello there. General Kenobi!",
        "language": "en",
        "segments": [
            {"id": 0, "seek": 0, "start": 0.0, "end": 1.5, "text": " Hello there.", "tokens": []},
            {"id": 1, "seek": 0, "start": 1.5, "end": 3.25, "text": " General Kenobi!", "tokens": []},
        ],
    }

    class FakeTranscriber:
        def __init__(self, model, options):
            pass

        def run(self, path, progress=False):
            if path.name.startswith("bad"):
                raise ValueError(f"{path}: could not decode audio")
            return result

    monkeypatch.setenv(NO_REEXEC_ENV, "1")
    monkeypatch.setattr(cli, "load", lambda *args: lambda path, options: (object(), options))
    monkeypatch.setattr(tr, "Transcriber", FakeTranscriber)
    return result


def test_cli_reports_bad_files_carries_on_and_exits_non_zero(tmp_path, canned, capsys):
    for name in ("good.wav", "bad.wav", "other.flac"):
        (tmp_path / name).write_bytes(b"x")
    out = tmp_path / "out"
    code = cli.main(
        [
            str(tmp_path / "good.wav"),
            str(tmp_path / "missing.wav"),
            str(tmp_path / "bad.wav"),
            str(tmp_path / "other.flac"),
            "--output-dir",
            str(out),
            "--output-format",
            "all",
        ]
    )
    assert code != 0
    err = capsys.readouterr().err
    assert "missing.wav: no such file or folder" in err and "bad.wav" in err and "could not decode" in err
    assert "Transcribed 2 of 3 file(s); 1 failed, 1 input(s) not found" in err
    for stem in ("good", "other"):
        assert {p.suffix for p in out.glob(f"{stem}.*")} == {".txt", ".srt", ".vtt", ".tsv", ".json"}
    assert not list(out.glob("bad.*"))


def test_cli_prints_the_text_and_writes_the_result(tmp_path, canned, capsys):
    # What each format looks like (and that srt/vtt parse) is test_writers.py's business.
    (tmp_path / "talk.wav").write_bytes(b"x")
    assert cli.main([str(tmp_path / "talk.wav"), "--output-dir", str(tmp_path), "--output-format", "json,txt"]) == 0
    assert capsys.readouterr().out.strip() == canned["text"]
    assert json.loads((tmp_path / "talk.json").read_text(encoding="utf-8")) == canned
    assert (tmp_path / "talk.txt").read_text(encoding="utf-8") == "Hello there.\nGeneral Kenobi!\n"


def test_cli_names_outputs_of_same_named_inputs_apart(tmp_path, canned):
    for name in ("a/x.wav", "b/x.flac"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert cli.main([str(tmp_path / "a"), str(tmp_path / "b"), "--output-dir", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x-2.txt", "x.txt"]


def test_cli_transcribes_with_a_real_model_folder(tmp_path, model_folder, monkeypatch):
    monkeypatch.setenv(NO_REEXEC_ENV, "1")
    soundfile.write(tmp_path / "tone.wav", noise(2), SAMPLE_RATE)
    code = cli.main(
        [
            str(tmp_path / "tone.wav"),
            "--model",
            str(model_folder),
            "--language",
            "en",
            "--temperature-increment-on-fallback",
            "none",
            "--output-format",
            "json",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "tone.json").read_text(encoding="utf-8"))
    assert result["language"] == "en" and isinstance(result["segments"], list)


def test_digitally_silent_windows_are_skipped_without_decoding():
    quiet = np.full(40 * SAMPLE_RATE, 0.01, np.float32)
    quiet[: 30 * SAMPLE_RATE] = 0.0  # the first window is digital silence, the rest is not
    windows = MelWindows(ArraySource(quiet))
    assert windows.is_silent(0) and not windows.is_silent(3000) and windows.is_silent(10**6)
