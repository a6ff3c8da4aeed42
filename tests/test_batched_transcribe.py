"""Batched transcription (models/inference/batched.py, transcribe.py --batch-size / --chunked).

Tiny random models check the batch dimension of decoding (prompts of different lengths,
languages, beams) and the fallback bookkeeping; whisper-base on real speech from ../shared checks
that batches give the sequential results, chunked or not, and that a bad file is only reported.
"""

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import soundfile

import transcribe as cli
from conftest import BASE_MODEL, SHARED, tiny_whisper
from models.audio import SAMPLE_RATE, load_audio
from models.backend import NO_REEXEC_ENV
from models.inference import batched
from models.inference.batched import chunk_segments, decode_windows, transcribe_many
from models.inference.decoding import DecodingOptions, DecodingResult, DecodingTask
from models.inference.options import TranscribeOptions
from models.inference.transcribe import transcribe
from models.tokenizer import get_tokenizer

EN_READ = SHARED / "data" / "en-read"
FAMOUS = SHARED / "data" / "famous-clips"
TOKENIZER = get_tokenizer(True, language="en", task="transcribe")
GREEDY = dict(temperature=0.0)  # no fallback: sampling at a higher temperature is random
needs_model = pytest.mark.skipif(
    not (BASE_MODEL / "config.json").is_file() or not EN_READ.is_dir(),
    reason="needs ../shared/models/whisper-base-mlx and ../shared/data",
)


def ts(seconds: float) -> int:
    return TOKENIZER.timestamp_begin + round(seconds / 0.02)


# --- the batch dimension of decoding, on a tiny random model -------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        DecodingOptions(sample_len=16),
        DecodingOptions(sample_len=16, without_timestamps=True),
        DecodingOptions(sample_len=10, beam_size=3),
    ],
    ids=["timestamps", "no-timestamps", "beam"],
)
def test_windows_with_different_prompts_and_languages_decode_as_they_would_alone(options):
    tiny_model = tiny_whisper(seed=1)
    # Random positions (a fresh model's are zeros): each row must be fed at its own positions.
    tiny_model.decoder.positional_embedding = mx.random.normal((448, 64), key=mx.random.key(2))
    features = mx.array(np.random.default_rng(0).standard_normal((3, 1500, 64)).astype(np.float32))
    prompts = [None, list(range(100, 140)), list(range(200, 207))]  # 0, 40 and 7 prompt tokens
    languages = ["en", "fr", "de"]
    task = DecodingTask(tiny_model, options)
    together = task.run(features, prompts, languages)
    alone = [task.run(features[i : i + 1], [prompts[i]], [languages[i]])[0] for i in range(3)]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.language for r in together] == languages
    np.testing.assert_allclose([r.avg_logprob for r in together], [r.avg_logprob for r in alone], atol=1e-5)
    np.testing.assert_allclose([r.no_speech_prob for r in together], [r.no_speech_prob for r in alone], rtol=1e-4)
    # The no-speech probability is read at each row's own <|startoftranscript|>, after its prompt.
    tokens = [TOKENIZER.sot_prev, *prompts[1], TOKENIZER.sot, TOKENIZER.to_language_token("fr"), TOKENIZER.transcribe]
    tokens += [TOKENIZER.no_timestamps] if options.without_timestamps else []
    logits = tiny_model.logits(mx.array([tokens]), features[1:2])
    expected = mx.softmax(logits[0, len(prompts[1]) + 1].astype(mx.float32))[TOKENIZER.no_speech].item()
    assert together[1].no_speech_prob == pytest.approx(expected, rel=1e-4)


def test_fallback_decodes_again_only_the_windows_that_failed(monkeypatch):
    calls = []

    class FakeTask:
        def __init__(self, model, options):
            self.temperature = options.temperature

        def run(self, features, prompts, languages):
            calls.append((self.temperature, list(prompts)))
            # Window "b" passes at 0.2, window "c" never passes: it keeps the last temperature's result.
            good = {"a": 0.0, "b": 0.2}
            return [
                DecodingResult(
                    language=language,
                    tokens=[1],
                    text=prompt[0],
                    avg_logprob=-0.1 if self.temperature >= good.get(prompt[0], 9) else -3.0,
                    no_speech_prob=0.0,
                    temperature=self.temperature,
                    compression_ratio=1.0,
                )
                for prompt, language in zip(prompts, languages)
            ]

    monkeypatch.setattr(batched, "DecodingTask", FakeTask)
    options = TranscribeOptions(temperature=(0.0, 0.2, 0.4))
    features = mx.zeros((3, 4, 2))
    results = decode_windows(None, features, options, [["a"], ["b"], ["c"]], ["en", "fr", "de"])
    assert calls == [(0.0, [["a"], ["b"], ["c"]]), (0.2, [["b"], ["c"]]), (0.4, [["c"]])]
    assert [(r.text, r.temperature, r.language) for r in results] == [
        ("a", 0.0, "en"),
        ("b", 0.2, "fr"),
        ("c", 0.4, "de"),
    ]


def test_a_chunk_keeps_the_text_after_its_last_complete_segment():
    tokens = [ts(0), *TOKENIZER.encode(" Hi."), ts(2), ts(2.5), *TOKENIZER.encode(" Unfini")]
    segments = chunk_segments(tokens, TOKENIZER.timestamp_begin, time_offset=30.0, segment_frames=2000)
    assert [(s, e, TOKENIZER.decode(t)) for s, e, t in segments] == [(30.0, 32.0, " Hi."), (32.5, 50.0, " Unfini")]
    single = [ts(0), *TOKENIZER.encode(" Done."), ts(3)]  # a single closing timestamp: nothing left over
    assert [(s, e) for s, e, _ in chunk_segments(single, TOKENIZER.timestamp_begin, 0.0, 3000)] == [(0.0, 3.0)]


# --- whisper-base on real speech ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from models.loading import load_model

    return load_model(str(BASE_MODEL))


@pytest.fixture(scope="module")
def clips():
    return sorted(EN_READ.glob("*.flac"))


def joined(folder, clips, seconds: float):
    """en-read clips joined with 0.5 s pauses until past `seconds` (../shared has no clip over 30 s)."""
    gap, parts = np.zeros(SAMPLE_RATE // 2, np.float32), []
    for clip in clips:
        parts += [load_audio(clip), gap]
        if sum(len(p) for p in parts) > seconds * SAMPLE_RATE:
            break
    path = folder / f"joined-{seconds:g}s.wav"
    soundfile.write(path, np.concatenate(parts), SAMPLE_RATE)
    return path


@pytest.fixture(scope="module")
def long_file(tmp_path_factory, clips):
    return joined(tmp_path_factory.mktemp("long"), clips, 62)


def by_index(outcomes):
    outcomes = list(outcomes)
    return {o.index: o for o in outcomes}, len(outcomes)


def timed_segments(result):
    return [(s["start"], s["end"], s["text"], s["tokens"]) for s in result["segments"]]


@needs_model
def test_greedy_batches_give_the_sequential_text_and_segments(model, clips, tmp_path):
    # Five files for a batch of four: the short ones finish after one round and the fifth joins.
    # The language is detected (in one batch); the long file advances by its own timestamps.
    long_file = joined(tmp_path, clips, 34)
    sources = [
        str(FAMOUS / "jfk.flac"),
        str(long_file),
        str(clips[20]),
        str(clips[40]),
        str(clips[30]),
    ]
    sequential = [transcribe(model, source, **GREEDY) for source in sources]
    outcomes, count = by_index(transcribe_many(model, sources, TranscribeOptions(**GREEDY), batch_size=4))
    assert count == len(sources) and all(o.error is None for o in outcomes.values())
    assert len(sequential[1]["segments"]) > 5 and sequential[1]["segments"][-1]["end"] > 30
    for i, expected in enumerate(sequential):
        got = outcomes[i].result
        assert (got["text"], got["language"]) == (expected["text"], expected["language"]), sources[i]
        assert timed_segments(got) == timed_segments(expected), sources[i]


@needs_model
def test_chunked_batches_give_the_chunked_text_of_one_window_at_a_time(model, long_file):
    options = TranscribeOptions(language="en", **GREEDY)
    one = list(transcribe_many(model, [str(long_file)], options, batch_size=1, chunked=True))[0].result
    three = list(transcribe_many(model, [str(long_file)], options, batch_size=3, chunked=True))[0].result
    assert one["text"] == three["text"] and timed_segments(one) == timed_segments(three)
    seeks = sorted({s["seek"] for s in one["segments"]})
    assert seeks == [0, 3000, 6000]  # fixed 30 s windows, times offset by the window's start
    assert all(s["seek"] / 100 <= s["start"] < s["end"] <= s["seek"] / 100 + 30 for s in one["segments"])


@needs_model
def test_a_bad_file_is_reported_and_the_others_are_transcribed(model, tmp_path, clips):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF, but not audio at all")
    sources = [str(bad), str(clips[30]), str(tmp_path / "missing.flac")]
    outcomes, count = by_index(
        transcribe_many(model, sources, TranscribeOptions(language="en", **GREEDY), batch_size=4)
    )
    assert count == 3
    assert "bad.wav" in str(outcomes[0].error) and "missing.flac" in str(outcomes[2].error)
    assert outcomes[1].error is None
    assert outcomes[1].result["text"] == transcribe(model, str(clips[30]), language="en", **GREEDY)["text"]


@needs_model
def test_cli_batch_sizes_write_the_same_files_and_report_bad_ones(tmp_path, clips, monkeypatch, capsys):
    monkeypatch.setenv(NO_REEXEC_ENV, "1")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    inputs = [str(FAMOUS / "jfk.flac"), str(bad), str(clips[30])]
    written = {}
    for size in ("1", "4"):
        out = tmp_path / f"out{size}"
        argv = [*inputs, "--model", str(BASE_MODEL), "--dtype", "float32", "--language", "en"]
        argv += ["--temperature-increment-on-fallback", "none", "--output-format", "all", "--output-dir", str(out)]
        assert cli.main(argv + ["--batch-size", size]) == 1
        err = capsys.readouterr().err
        assert f"error: {bad}" in err and "Transcribed 2 of 3 file(s); 1 failed" in err
        written[size] = {p.name: p.read_text(encoding="utf-8") for p in sorted(out.iterdir())}
    names = sorted(written["1"])
    assert names == sorted(written["4"]) and len(names) == 10 and not any(n.startswith("bad") for n in names)
    for name in names:
        if name.endswith(".json"):  # the log-probabilities may differ in the last float digits
            one, four = json.loads(written["1"][name]), json.loads(written["4"][name])
            assert one["text"] == four["text"] and timed_segments(one) == timed_segments(four)
            for a, b in zip(one["segments"], four["segments"]):
                assert a["avg_logprob"] == pytest.approx(b["avg_logprob"], abs=1e-4)
        else:
            assert written["1"][name] == written["4"][name], name


def test_cli_batches_only_files_of_one_model_together(tmp_path, monkeypatch):
    """Per-language adapters give files different models: each model gets its own batch run."""
    monkeypatch.setenv(NO_REEXEC_ENV, "1")
    models = {"en": tiny_whisper(seed=1), "fr": tiny_whisper(seed=2)}
    heard = {"a.wav": "en", "b.wav": "fr", "c.wav": "en"}
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    for name in heard:
        soundfile.write(tmp_path / name, (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), SAMPLE_RATE)

    def pick(path, options):
        language = heard[path.name]
        return models[language], replace(options, language=language)

    runs, real = [], batched.transcribe_many

    def spy(model, sources, options, batch_size, chunked, languages):
        runs.append((id(model), [p.name for p in sources], list(languages), batch_size, chunked))
        return real(model, sources, options, batch_size, chunked, languages)

    monkeypatch.setattr(cli, "load", lambda *args: pick)
    monkeypatch.setattr(batched, "transcribe_many", spy)
    argv = [str(tmp_path / n) for n in heard] + ["--output-dir", str(tmp_path / "out"), "--batch-size", "2"]
    argv += ["--temperature-increment-on-fallback", "none", "--chunked"]
    assert cli.main(argv) == 0
    en, fr = id(models["en"]), id(models["fr"])
    assert runs == [(en, ["a.wav", "c.wav"], ["en", "en"], 2, True), (fr, ["b.wav"], ["fr"], 2, True)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "b.txt", "c.txt"]
