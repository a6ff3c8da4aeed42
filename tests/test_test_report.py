"""The before/after report of `lora.py --test`: corpus rates, per-clip CER worst first, the plot."""

import re
import sys

import pytest

from models.tuner.report import rates_table, write_test_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (source, ref, base hyp, adapter hyp). CER by hand, on normalised text (spaces count):
#   te1  "బాల బాలికలను" is 12 code points; the base drops న: 1/12 = 8.3%; the adapter is exact: 0.0%
#   yo1  "ọjọ́ àìkú" is 9 (ọ́ is ọ + U+0301); "ojo aiku": 5 substitutions + the lost accent = 6/9 = 66.7%;
#        the adapter's "aìkú" misses one tone mark: 1/9 = 11.1%
#   en1  "abcd": base exact 0.0%; adapter "abed" 1/4 = 25.0%
#   en2  "one | two" -> "one two" (7); both say "too": 1/7 = 14.3% (the adapter splits the line)
#   en3  "hello": both exact once case and punctuation are dropped
CLIPS = [
    ("clips/te/te1.wav", "బాల బాలికలను", "బాల బాలికలు", "బాల బాలికలను"),
    ("clips/yo/yo1.wav", "Ọjọ́ àìkú", "ojo aiku", "Ọjọ́ aìkú"),
    ("clips/en/en1.wav", "abcd", "abcd", "abed"),
    ("clips/en/en2.wav", "one | two", "one | too", "one\ntoo"),
    ("clips/en/en3.wav", "hello", "hello", "Hello!"),
]
BASE_SUMMARY = {"split": "test", "clips": 5, "loss": 1.25, "wer": 0.5, "cer": 0.2, "wer_orthographic": 0.625,
                "cer_orthographic": 0.3}  # fmt: skip
ADAPTED_SUMMARY = {"split": "test", "clips": 5, "loss": 0.875, "wer": 0.25, "cer": 0.125, "wer_orthographic": 0.5,
                   "cer_orthographic": 0.2}  # fmt: skip


def run(summary: dict, hyp_column: int, clips=CLIPS) -> dict:
    predictions = [{"source": c[0], "language": None, "ref": c[1], "hyp": c[hyp_column]} for c in clips]
    return {"summary": summary, "predictions": predictions}


def table_rows(markdown: str, header: str) -> list:
    """Cells of the table under the line starting with `header`, split on unescaped pipes."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


@pytest.fixture
def report(tmp_path):
    markdown, png = write_test_report(
        run(BASE_SUMMARY, 2), run(ADAPTED_SUMMARY, 3), tmp_path / "report.md", tmp_path / "cer.png", "Telugu test"
    )
    return tmp_path, markdown, png


def test_corpus_rates_and_their_change(report):
    _, markdown, _ = report
    text = markdown.read_text(encoding="utf-8")
    assert text.startswith("# Telugu test\n")
    assert table_rows(text, "| | base") == [
        ["WER", "50.0%", "25.0%", "-25.0 points"],
        ["CER", "20.0%", "12.5%", "-7.5 points"],
        ["WER as written", "62.5%", "50.0%", "-12.5 points"],
        ["CER as written", "30.0%", "20.0%", "-10.0 points"],
        ["loss (per token)", "1.250", "0.875", "-0.375"],
    ]


def test_clips_worst_first_with_cer_by_hand(report):
    _, markdown, _ = report
    rows = table_rows(markdown.read_text(encoding="utf-8"), "| clip")
    assert [row[:3] for row in rows] == [
        ["en1.wav", "0.0", "25.0"],
        ["en2.wav", "14.3", "14.3"],
        ["yo1.wav", "66.7", "11.1"],
        ["te1.wav", "8.3", "0.0"],  # ties keep the split's order
        ["en3.wav", "0.0", "0.0"],
    ]
    assert rows[2][3:] == ["Ọjọ́ àìkú", "ojo aiku", "Ọjọ́ aìkú"]
    assert rows[3][3:] == ["బాల బాలికలను", "బాల బాలికలు", "బాల బాలికలను"]


def test_pipes_and_line_breaks_stay_inside_their_cell(report):
    _, markdown, _ = report
    text = markdown.read_text(encoding="utf-8")
    assert "| en2.wav | 14.3 | 14.3 | one \\| two | one \\| too | one<br>too |" in text.splitlines()


def test_counts_better_worse_unchanged(report):
    _, markdown, _ = report
    assert "Per clip (CER): 2 better, 1 worse, 2 unchanged with the adapter." in markdown.read_text(encoding="utf-8")


def test_the_plot_is_a_png_linked_from_the_report(report):
    folder, markdown, png = report
    assert png == folder / "cer.png" and png.read_bytes()[:8] == PNG_MAGIC
    assert "](cer.png)" in markdown.read_text(encoding="utf-8")
    assert sorted(p.name for p in folder.iterdir()) == ["cer.png", "report.md"]  # no temp files left


def test_without_matplotlib_only_the_markdown_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    markdown, png = write_test_report(
        run(BASE_SUMMARY, 2), run(ADAPTED_SUMMARY, 3), tmp_path / "report.md", tmp_path / "cer.png", "no plot"
    )
    assert png is None and not (tmp_path / "cer.png").exists()
    text = markdown.read_text(encoding="utf-8")
    assert "Per clip (CER): 2 better" in text and ".png)" not in text


def test_a_rate_missing_from_one_run_reads_n_a():
    base = dict(BASE_SUMMARY, cer_orthographic=None)
    assert "| CER as written | n/a | 20.0% |  |" in rates_table(base, ADAPTED_SUMMARY)


def test_different_clips_are_refused_naming_the_first(tmp_path):
    swapped = CLIPS[:1] + [CLIPS[2], CLIPS[1]] + CLIPS[3:]
    paths = (tmp_path / "report.md", tmp_path / "cer.png", "t")
    with pytest.raises(ValueError, match="clip 2: clips/yo/yo1.wav against clips/en/en1.wav"):
        write_test_report(run(BASE_SUMMARY, 2), run(ADAPTED_SUMMARY, 3, swapped), *paths)
    with pytest.raises(ValueError, match="5 base predictions but 4 adapter predictions: clips/en/en3.wav"):
        write_test_report(run(BASE_SUMMARY, 2), run(ADAPTED_SUMMARY, 3, CLIPS[:4]), *paths)
    assert list(tmp_path.iterdir()) == []


def test_lora_test_with_adapters_writes_the_report_beside_the_predictions(tmp_path, model_folder):
    from test_labels import make_clips

    import lora as lora_cli

    clips = make_clips(tmp_path / "clips")
    adapters = tmp_path / "a"
    argv = ["--model", str(model_folder), "--data", str(clips), "--language", "en", "--val-fraction", "0",
            "--adapter-path", str(adapters), "--batch-size", "2", "--steps-per-eval", "0", "--lora-rank", "4",
            "--iters", "1"]  # fmt: skip
    assert lora_cli.main(argv) == 0
    assert lora_cli.main([*argv, "--test"]) == 0
    report = (adapters / "test_report.md").read_text(encoding="utf-8")
    assert "| | base | adapter | change |" in report and "4 unchanged with the adapter" in report
    assert report.count("| metadata.csv:2 |") == 1 and (adapters / "test_report.png").read_bytes().startswith(PNG_MAGIC)
    other = tmp_path / "other.jsonl"
    assert lora_cli.main([*argv, "--test", "--no-report", "--test-output", str(other)]) == 0
    assert other.exists() and not other.with_suffix(".md").exists()
    # A folder holding only what lora.py wrote (the report included) can be trained over again.
    assert lora_cli.main([*argv, "--overwrite"]) == 0
