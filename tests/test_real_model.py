"""whisper-base (float32) on real speech from ../shared: accuracy against the reference transcripts.

Default run (~3 min on 2 CPU cores): jfk.flac, the 20 longest en-read clips (exact match with
faster-whisper, long-form transcription of them joined), beam search on a few of them, the CLI.
`pytest -m slow` runs the whole en-read set (116 clips; greedy ~8 min, beam search longer).
"""

import csv
import json

import numpy as np
import pytest
import soundfile
import srt
import webvtt

import transcribe as cli
from conftest import BASE_MODEL, SHARED
from models.audio import SAMPLE_RATE, load_audio
from models.backend import NO_REEXEC_ENV
from models.inference.decoding import DecodingOptions
from models.inference.transcribe import transcribe, transcribe_batch
from models.loading import load_model
from models.tuner.metrics import normalize_text, wer

EN_READ = SHARED / "data" / "en-read"
REFERENCE = SHARED / "data" / "reference" / "en-read.jsonl"

pytestmark = pytest.mark.skipif(
    not (BASE_MODEL / "config.json").is_file() or not REFERENCE.is_file(),
    reason="needs ../shared/models/whisper-base-mlx and ../shared/data",
)
GREEDY = DecodingOptions(language="en", without_timestamps=True)


@pytest.fixture(scope="module")
def model():
    return load_model(str(BASE_MODEL))


@pytest.fixture(scope="module")
def reference():
    """(rows of file/ref/hyp, the reference implementation's corpus WER)."""
    lines = [json.loads(line) for line in REFERENCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    summary = next(line for line in lines if line.get("summary"))
    return [line for line in lines if "file" in line], summary["wer"]


@pytest.fixture(scope="module")
def longest(reference):
    """The 20 longest clips (~96 s of speech), in file order: the default subset."""
    rows, _ = reference
    duration = {r["file"]: soundfile.info(str(EN_READ / r["file"])).duration for r in rows}
    chosen = set(sorted(duration, key=lambda f: -duration[f])[:20])
    return [r for r in rows if r["file"] in chosen]


def run_batch(model, rows, options=GREEDY):
    return [r["text"] for r in transcribe_batch(model, [str(EN_READ / r["file"]) for r in rows], options, 4)]


@pytest.fixture(scope="module")
def longest_greedy(model, longest):
    return run_batch(model, longest)


@pytest.fixture(scope="module")
def all_greedy(model, reference):
    return run_batch(model, reference[0])


def exact_matches(rows, hyps):
    return sum(hyp == row["hyp"] for row, hyp in zip(rows, hyps))


def test_jfk_transcribes_to_the_reference(model):
    with open(SHARED / "data" / "famous-clips" / "metadata.csv", newline="", encoding="utf-8") as f:
        expected = {row["file_name"]: row["transcription"] for row in csv.DictReader(f)}["jfk.flac"]
    result = transcribe(model, str(SHARED / "data" / "famous-clips" / "jfk.flac"), word_timestamps=True)
    assert result["language"] == "en"
    assert normalize_text(result["text"]) == normalize_text(expected)
    words = [w for s in result["segments"] for w in s["words"]]
    assert normalize_text("".join(w["word"] for w in words)) == normalize_text(expected)
    assert 0 <= words[0]["start"] < 1.0 and 10.0 < words[-1]["end"] <= 11.0  # speech ends at ~10.5 s


def test_en_read_subset_matches_the_reference_implementation(longest, longest_greedy):
    print(f"en-read subset: {exact_matches(longest, longest_greedy)}/{len(longest)} exact")
    assert exact_matches(longest, longest_greedy) >= 19, [
        (row["hyp"], hyp) for row, hyp in zip(longest, longest_greedy) if hyp != row["hyp"]
    ]


@pytest.mark.slow
def test_en_read_matches_the_reference_implementation(reference, all_greedy):
    rows, reference_wer = reference
    matches = exact_matches(rows, all_greedy)
    print(f"en-read: {matches}/{len(rows)} exact, WER {wer([r['ref'] for r in rows], all_greedy):.4f}")
    assert matches >= 0.97 * len(rows)
    assert abs(wer([r["ref"] for r in rows], all_greedy) - reference_wer) <= 0.003


def beam_vs_greedy(model, rows, greedy_hyps):
    beam_hyps = run_batch(model, rows, DecodingOptions(language="en", without_timestamps=True, beam_size=5))
    refs = [r["ref"] for r in rows]
    return wer(refs, beam_hyps), wer(refs, greedy_hyps)


def test_beam_search_is_no_worse_than_greedy_on_a_subset(model, longest, longest_greedy):
    beam, greedy = beam_vs_greedy(model, longest[::3], longest_greedy[::3])
    print(f"subset of {len(longest[::3])}: beam-5 WER {beam:.4f}, greedy WER {greedy:.4f}")
    assert beam <= greedy + 0.02  # 7 clips (~100 words): a spelling variant or two is noise


@pytest.mark.slow
def test_beam_search_is_no_worse_than_greedy(model, reference, all_greedy):
    beam, greedy = beam_vs_greedy(model, reference[0], all_greedy)
    print(f"en-read: beam-5 WER {beam:.4f}, greedy WER {greedy:.4f}")
    assert beam <= greedy


def check_long_form(model, rows, per_clip_hyps):
    """Join the clips with 0.3 s pauses; transcribe with word timestamps; compare with per-clip results."""
    pause = np.zeros(int(0.3 * SAMPLE_RATE), np.float32)
    audio = np.concatenate([part for r in rows for part in (load_audio(EN_READ / r["file"]), pause)])
    duration = len(audio) / SAMPLE_RATE
    result = transcribe(model, audio, language="en", word_timestamps=True)
    segments = result["segments"]
    starts = [s["start"] for s in segments]
    assert starts == sorted(starts) and all(0 <= s["start"] < s["end"] <= duration for s in segments)
    assert segments[0]["start"] < 2.0 and segments[-1]["end"] > duration - 3.0  # covers the audio
    times = [t for s in segments for w in s["words"] for t in (w["start"], w["end"])]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= duration
    refs = [r["ref"] for r in rows]
    joined, per_clip = wer([" ".join(refs)], [result["text"]]), wer(refs, per_clip_hyps)
    print(f"long-form {duration:.1f} s, {len(segments)} segments: WER {joined:.4f} (per clip {per_clip:.4f})")
    assert joined <= per_clip + 0.02


def test_long_form_transcription_of_joined_clips(model, longest, longest_greedy):
    check_long_form(model, longest, longest_greedy)


@pytest.mark.slow
def test_long_form_transcription_of_the_whole_set(model, reference, all_greedy):
    check_long_form(model, reference[0], all_greedy)


def test_cli_writes_parseable_subtitles(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(NO_REEXEC_ENV, "1")
    jfk = SHARED / "data" / "famous-clips" / "jfk.flac"
    code = cli.main(
        [
            str(jfk),
            "--model",
            str(BASE_MODEL),
            "--language",
            "en",
            "--output-format",
            "srt,vtt,json",
            "--output-dir",
            str(tmp_path),
            "--dtype",
            "float32",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out.strip()
    assert normalize_text(text).startswith("and so my fellow americans")
    cues = list(srt.parse((tmp_path / "jfk.srt").read_text(encoding="utf-8")))
    vtt = list(webvtt.read(str(tmp_path / "jfk.vtt")))
    result = json.loads((tmp_path / "jfk.json").read_text(encoding="utf-8"))
    assert len(cues) == len(vtt) == len(result["segments"]) >= 1
    assert normalize_text(" ".join(c.content for c in cues)) == normalize_text(text)
    assert cues[-1].end.total_seconds() <= 11.1


def test_silence_and_noise_give_no_words(model):
    """30 s of digital silence (any language) and of white noise: no hallucinated words. whisper-base
    says "you" into silence unless the window is recognised as silent."""
    silence = np.zeros(30 * SAMPLE_RATE, np.float32)
    noise = (0.1 * np.random.default_rng(0).standard_normal(30 * SAMPLE_RATE)).astype(np.float32)
    cases = [(silence, None), (silence, "en"), (silence + 3e-5, "te"), (noise, None)]  # 3e-5: dither below -80 dBFS
    for audio, language in cases:
        result = transcribe(model, audio, language=language)
        assert result["text"] == "" and result["segments"] == [], (language, result["text"])


def test_lora_test_and_transcribe_give_the_same_text(tmp_path, monkeypatch, capsys):
    """One feature function and one decoder: `lora.py --test` scores the text `transcribe.py` writes
    (same clips, model and greedy settings without timestamps), here on four Telugu clips."""
    import shutil

    import lora

    monkeypatch.setenv(NO_REEXEC_ENV, "1")
    source = SHARED / "data" / "te" / "validation"
    rows = list(csv.DictReader(open(source / "metadata.csv", encoding="utf-8")))[:4]
    data = tmp_path / "te"
    data.mkdir()
    for row in rows:
        shutil.copy(source / row["file_name"], data / row["file_name"])
    with open(data / "metadata.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    predictions = tmp_path / "predictions.jsonl"
    argv = ["--test", "--model", str(BASE_MODEL), "--data", str(data), "--dtype", "float32",
            "--adapter-path", str(tmp_path / "none"), "--test-output", str(predictions)]  # fmt: skip
    assert lora.main(argv) == 0
    scored = {json.loads(line)["source"]: json.loads(line)["hyp"] for line in predictions.read_text().splitlines()[:-1]}
    files = [str(data / row["file_name"]) for row in rows]
    argv = [
        *files,
        "--model",
        str(BASE_MODEL),
        "--language",
        "te",
        "--without-timestamps",
        "--temperature",
        "0",
        "--temperature-increment-on-fallback",
        "none",
        "--no-speech-threshold",
        "none",  # lora.py --test decodes every clip; transcription may skip a window as no speech
        "--output-format",
        "txt",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert cli.main(argv) == 0
    for line, row in enumerate(rows, start=2):
        written = (tmp_path / "out" / (row["file_name"].rsplit(".", 1)[0] + ".txt")).read_text(encoding="utf-8")
        assert written.strip() == scored[f"{data / 'metadata.csv'}:{line}"].strip(), row["file_name"]
