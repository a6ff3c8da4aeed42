"""Writers: subtitle files parse with standard parsers, json round-trips, names stay inside, files get the umask."""

import json
import os
from datetime import timedelta

import pytest
import srt
import webvtt

from models.inference.writers import SUPPORTED_FORMATS, expand_formats, format_timestamp, output_stem, write_result

RESULT = {
    "text": " Hello there. Ọ̀rọ̀ Yorùbá --> ok",
    "language": "en",
    "segments": [
        {
            "id": 0,
            "start": 0.0,
            "end": 2.5,
            "text": " Hello there.",
            "tokens": [1, 2],
            "avg_logprob": -0.2,
            "no_speech_prob": 0.01,
            "compression_ratio": 1.1,
            "temperature": 0.0,
            "words": [
                {"word": " Hello", "start": 0.0, "end": 1.0, "probability": 0.9},
                {"word": " there.", "start": 1.0, "end": 2.5, "probability": 0.8},
            ],
        },
        {
            "id": 1,
            "start": 2.5,
            "end": 3.0,
            "text": "  ",
            "tokens": [],
            "avg_logprob": -1.0,
            "no_speech_prob": 0.9,
            "compression_ratio": 0.0,
            "temperature": 0.0,
        },
        {
            "id": 2,
            "start": 3661.0016,
            "end": 3725.5,
            "text": " Ọ̀rọ̀ Yorùbá -->\n\n\tok",
            "tokens": [3],
            "avg_logprob": -0.5,
            "no_speech_prob": 0.1,
            "compression_ratio": 1.0,
            "temperature": 0.2,
        },
    ],
}


def test_format_timestamp():
    assert format_timestamp(0) == "00:00:00.000"
    assert format_timestamp(3661.0016, ",") == "01:01:01,002"
    assert format_timestamp(59.9996) == "00:01:00.000"  # rounding carries into minutes
    assert format_timestamp(100 * 3600) == "100:00:00.000"
    with pytest.raises(ValueError):
        format_timestamp(-1)


def test_all_formats(tmp_path):
    paths = write_result(RESULT, tmp_path / "out", "audio/clip.one.flac", ["all"])
    assert [p.name for p in paths] == [f"clip.one.{f}" for f in SUPPORTED_FORMATS]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(p.name for p in paths)  # no temp files
    out = {p.suffix[1:]: p.read_text(encoding="utf-8") for p in paths}

    assert out["txt"] == "Hello there.\n\nỌ̀rọ̀ Yorùbá -->\n\n\tok\n"  # blank segment: empty line
    assert json.loads(out["json"]) == RESULT
    assert "Ọ̀rọ̀" in out["json"]  # written as UTF-8, not \u escapes
    assert out["tsv"].splitlines() == [
        "start\tend\ttext",
        "0\t2500\tHello there.",
        "2500\t3000\t",
        "3661002\t3725500\tỌ̀rọ̀ Yorùbá --> ok",
    ]

    subs = list(srt.parse(out["srt"]))  # the blank segment is skipped, '-->' defused
    assert [s.index for s in subs] == [1, 2]
    assert [s.content for s in subs] == ["Hello there.", "Ọ̀rọ̀ Yorùbá ->\nok"]
    assert subs[1].start == timedelta(seconds=3661.002) and subs[1].end == timedelta(seconds=3725.5)
    assert "01:01:01,002 --> 01:02:05,500" in out["srt"]

    assert out["vtt"].startswith("WEBVTT\n\n")
    cues = webvtt.from_string(out["vtt"])
    assert [(c.start, c.end) for c in cues] == [("00:00:00.000", "00:00:02.500"), ("01:01:01.002", "01:02:05.500")]
    assert cues[1].text == "Ọ̀rọ̀ Yorùbá ->\nok"


def test_overwrite_is_atomic_and_keeps_others(tmp_path):
    (tmp_path / "x.txt").write_text("old")
    (tmp_path / "x.srt").write_text("keep")
    write_result(RESULT, tmp_path, "x.wav", ["txt"])
    assert (tmp_path / "x.txt").read_text().startswith("Hello there.")
    assert (tmp_path / "x.srt").read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["x.srt", "x.txt"]


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    umask = os.umask(0o027)  # the temp file behind each write starts as 0600
    try:
        (path,) = write_result(RESULT, tmp_path, "x.wav", ["txt"])
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    "evil,stem",
    [
        ("../../evil.wav", "evil"),
        ("/etc/evil.wav", "evil"),
        ("..\\..\\evil.wav", "evil"),
        ("a/b/../evil.mp3", "evil"),
        ("evil", "evil"),
        (".hidden.wav", ".hidden"),
        ("dir/", "dir"),
        ("nul\0l.wav", "null"),
    ],
)
def test_names_stay_inside_output_dir(tmp_path, evil, stem):
    out_dir = tmp_path / "a" / "out"
    paths = write_result(RESULT, out_dir, evil, ["txt", "json"])
    assert [p.name for p in paths] == [f"{stem}.txt", f"{stem}.json"]
    for p in paths:
        assert p.resolve().parent == out_dir.resolve()
    assert sorted(os.listdir(tmp_path)) == ["a"] and os.listdir(tmp_path / "a") == ["out"]


@pytest.mark.parametrize("bad", ["..", "../..", "/", "", ".", "x/..", "..."])
def test_unusable_names_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="empty or only dots"):
        output_stem(bad)
    with pytest.raises(ValueError):
        write_result(RESULT, tmp_path / "out", bad, ["txt"])
    assert os.listdir(tmp_path) == []


def test_expand_formats():
    assert expand_formats(["srt", "all", "srt"]) == ["srt", "txt", "vtt", "tsv", "json"]
    with pytest.raises(ValueError, match="unknown output format 'docx'"):
        expand_formats(["txt", "docx"])
