"""benchmarks/longform_check.py: its validators on hand-made results, join_clips on real clips, one real run."""

import csv
import json

import numpy as np
import pytest
import soundfile

import longform_check as lc
from conftest import BASE_MODEL, SHARED
from models.audio import SAMPLE_RATE, load_audio
from models.backend import NO_REEXEC_ENV
from models.inference.writers import format_srt, format_vtt

EN_READ = SHARED / "data" / "en-read"
needs_shared = pytest.mark.skipif(
    not (BASE_MODEL / "config.json").is_file() or not (EN_READ / "metadata.csv").is_file(),
    reason="needs ../shared/models/whisper-base-mlx and ../shared/data/en-read",
)


def segment(start, end, text, words=None):
    words = words if words is not None else [{"word": " " + text, "start": start, "end": end, "probability": 0.9}]
    return {"start": start, "end": end, "text": " " + text, "words": words}


def good_result():
    """Three segments over three clips at 0-2, 2.5-4 and 4.5-6 s of a 6 s recording."""
    segments = [segment(0.0, 2.0, "one two"), segment(2.0, 4.1, "three"), segment(4.09, 6.0, "four five")]
    return {"text": " one two three four five", "segments": segments, "language": "en"}


SPANS = [(0, 0.0, 2.0), (1, 2.5, 4.0), (2, 4.5, 6.0)]
REFS = ["one two", "three", "four five"]


def checks_of(result, srt_text=None, vtt_text=None, duration=6.0):
    srt_text = format_srt(result) if srt_text is None else srt_text
    vtt_text = format_vtt(result) if vtt_text is None else vtt_text
    return lc.run_checks(result, SPANS, duration, REFS, REFS, srt_text, vtt_text, max_cer_gap=3.0)


def test_a_good_result_passes_every_check():
    checks = checks_of(good_result())
    assert all(c["passed"] for c in checks.values()), checks
    assert checks["srt"]["cues"] == checks["vtt"]["cues"] == 3
    assert checks["word_timestamps"]["words"] == 3
    assert checks["cer"]["long_form_cer"] == checks["cer"]["clip_by_clip_cer"] == 0.0


def test_an_overlapping_or_backward_segment_fails():
    result = good_result()
    result["segments"][2]["start"] = 4.0  # 0.1 s before the previous segment ends
    checks = lc.check_segments(result["segments"])
    assert not checks["passed"] and checks["problems"][0]["segment"] == 2
    result["segments"][2].update(start=1.0)
    assert checks_of(result)["segments_monotonic"]["problems"][0]["problem"] == "starts earlier"
    result["segments"][2].update(start=6.5)  # after its end
    assert not lc.check_segments(result["segments"])["passed"]


def test_a_word_past_the_end_of_the_audio_fails():
    result = good_result()
    result["segments"][2]["words"][0]["end"] = 6.2
    checks = checks_of(result)["word_timestamps"]
    assert not checks["passed"] and checks["problems"] == [
        {"segment": 2, "word": " four five", "start": 4.09, "end": 6.2}
    ]
    result["segments"][0]["words"][0]["start"] = -0.1
    assert checks_of(result)["word_timestamps"]["n_problems"] == 2


def test_an_uncovered_clip_and_an_early_end_fail_coverage():
    result = good_result()
    result["segments"] = result["segments"][:1]
    checks = lc.check_coverage(result["segments"], SPANS, 6.0)
    assert not checks["passed"]
    assert [c["clip"] for c in checks["uncovered_clips"]] == [1, 2]
    assert any("last segment ends" in p for p in checks["problems"])
    assert not lc.check_coverage([], SPANS, 6.0)["passed"]


def test_srt_with_a_bad_timestamp_or_cues_out_of_order_fails():
    srt_text = format_srt(good_result())
    assert [c[:2] for c in lc.parse_srt(srt_text)] == [(0.0, 2.0), (2.0, 4.1), (4.09, 6.0)]
    for broken in (
        srt_text.replace("00:00:02,000 --> 00:00:04,100", "00:00:02.000 --> 00:00:04,100"),  # vtt's marker
        srt_text.replace("00:00:04,090", "00:00:4,090"),
        srt_text.replace("00:00:04,090", "00:00:01,000"),  # cue 3 starts before cue 2
        srt_text.replace("\n2\n", "\n7\n"),  # numbering
        srt_text.replace("three", ""),  # a cue without text
    ):
        with pytest.raises(ValueError):
            lc.parse_srt(broken)
        assert not checks_of(good_result(), srt_text=broken)["srt"]["passed"]
    # a cue lost: parses, but no longer one cue per segment
    assert not checks_of(good_result(), srt_text=srt_text.split("\n3\n")[0])["srt"]["passed"]


def test_vtt_without_its_header_or_with_a_reversed_cue_fails():
    vtt_text = format_vtt(good_result())
    assert len(lc.parse_vtt(vtt_text)) == 3
    for broken in (
        vtt_text.replace("WEBVTT", "WEBVT"),
        vtt_text.replace("00:00:04.090 --> 00:00:06.000", "00:00:06.090 --> 00:00:06.000"),
        vtt_text.replace("00:00:00.000", "00:00:00,000"),
    ):
        with pytest.raises(ValueError):
            lc.parse_vtt(broken)
        assert not checks_of(good_result(), vtt_text=broken)["vtt"]["passed"]


def test_a_worse_long_form_transcript_fails_the_cer_check():
    result = good_result()
    result["text"] = " one two three for five"
    checks = checks_of(result)["cer"]
    assert not checks["passed"] and checks["gap_points"] > 3.0


def en_read_rows(n: int):
    with open(EN_READ / "metadata.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))[:n]


@needs_shared
def test_join_clips_places_clips_and_gaps_in_order():
    clips = [load_audio(EN_READ / row["file_name"]) for row in en_read_rows(3)]
    lengths = [len(c) / SAMPLE_RATE for c in clips]
    audio, spans = lc.join_clips(clips, gap=0.5, min_seconds=lengths[0] + lengths[1] + 1.1)  # into clip 3
    assert len(audio) / SAMPLE_RATE == pytest.approx(sum(lengths) + 2 * 0.5)
    starts = [0.0, lengths[0] + 0.5, lengths[0] + lengths[1] + 1.0]
    assert [s[0] for s in spans] == [0, 1, 2]
    assert [s[1] for s in spans] == pytest.approx(starts)
    assert [s[2] - s[1] for s in spans] == pytest.approx(lengths)
    assert np.array_equal(audio[round(spans[1][1] * SAMPLE_RATE) :][: len(clips[1])], clips[1])
    assert not audio[round(spans[0][2] * SAMPLE_RATE) : round(spans[1][1] * SAMPLE_RATE)].any()

    assert len(lc.join_clips(clips, gap=0.5, min_seconds=0)[1]) == 1

    audio, spans = lc.join_clips(clips, gap=0.5, min_seconds=20)
    duration = len(audio) / SAMPLE_RATE
    assert [s[0] for s in spans] == [i % 3 for i in range(len(spans))]  # the list, repeated
    assert duration >= 20 and spans[-2][2] < 20  # and no more of it than needed
    assert spans[-1][2] == pytest.approx(duration)


def run_script(tmp_path, capsys, min_seconds: float):
    """main() over the first three en-read clips; (exit status, printed summary, output folder)."""
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "transcription", "language"])
        for row in en_read_rows(3):
            writer.writerow([str(EN_READ / row["file_name"]), row["transcription"], row["language"]])
    out = tmp_path / "out"
    argv = ["--data", str(data), "--model", str(BASE_MODEL), "--dtype", "float32", "--output-dir", str(out)]
    code = lc.main(argv + ["--min-seconds", str(min_seconds)])
    return code, json.loads(capsys.readouterr().out), out


def check_summary(code, summary, out):
    assert code == 0, summary
    assert summary == json.loads((out / "longform_check.json").read_text(encoding="utf-8"))
    assert summary["passed"] and summary["failed"] == [] and summary["language"] == "en"
    assert set(summary["checks"]) == {"segments_monotonic", "coverage", "srt", "vtt", "word_timestamps", "cer"}
    assert summary["checks"]["srt"]["cues"] == summary["checks"]["vtt"]["cues"] == summary["segments"] >= 1
    assert summary["checks"]["coverage"]["uncovered_clips"] == []
    assert summary["checks"]["cer"]["long_form_cer"] < 15
    assert all((out / name).is_file() for name in ("longform.wav", "longform.srt", "longform.vtt", "longform.json"))


@needs_shared
def test_the_script_passes_on_three_english_clips(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(NO_REEXEC_ENV, "1")
    first_two = sum(soundfile.info(str(EN_READ / row["file_name"])).duration for row in en_read_rows(2))
    code, summary, out = run_script(tmp_path, capsys, min_seconds=first_two + 0.6)  # each clip once
    check_summary(code, summary, out)
    assert summary["audio"]["clips"] == summary["audio"]["distinct_clips"] == 3
    assert summary["max_temperature"] == 0.0


@needs_shared
@pytest.mark.slow
def test_the_script_passes_on_three_english_clips_repeated(tmp_path, monkeypatch, capsys):
    """~2 min: the same three sentences over and over trip the compression-ratio fallback, and each
    window is sampled at every temperature up to 1.0."""
    monkeypatch.setenv(NO_REEXEC_ENV, "1")
    code, summary, out = run_script(tmp_path, capsys, min_seconds=20)
    check_summary(code, summary, out)
    assert summary["audio"]["duration_s"] >= 20
    assert summary["audio"]["clips"] > summary["audio"]["distinct_clips"] == 3
