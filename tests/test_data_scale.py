"""benchmarks/data_scale.py: tiny generated sets (layout, perturbation, determinism, markers) and
the measurement of a short lora.py run with a tiny random model."""

import csv
import resource
import sys

import data_scale as ds
import numpy as np
import pytest
import soundfile

from conftest import SHARED, write_model_folder

needs_shared = pytest.mark.skipif(
    not all((SHARED / "data" / lang / "train" / "metadata.csv").is_file() for lang in ds.SOURCE_LANGUAGES),
    reason="needs ../shared/data/{te,yo,sw}/train",
)
N = 12


@pytest.fixture(scope="module")
def sources():
    """Three real clips (one in 64), so twelve copies use each source four times."""
    return ds.source_rows()[::64]


def metadata(folder):
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def clip_bytes(made):
    folder = ds.Path(made["path"])
    return [(folder / row["file_name"]).read_bytes() for row in metadata(folder)]


@needs_shared
def test_a_set_lists_n_readable_16k_clips_with_the_sources_labels(tmp_path, sources):
    made = ds.generate_set(tmp_path, N, 0, sources)
    rows = metadata(tmp_path / f"n{N}")
    assert made["size"] == len(rows) == N and made["clips_written"] == N and not made["reused"]
    assert list(rows[0]) == ["file_name", "transcription", "language"]
    for i, row in enumerate(rows):
        info = soundfile.info(tmp_path / f"n{N}" / row["file_name"])
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
        source = sources[i % len(sources)]
        assert (row["transcription"], row["language"]) == (source["transcription"], source["language"])
    assert made["disk_bytes"] == sum((tmp_path / f"n{N}" / r["file_name"]).stat().st_size for r in rows)


@needs_shared
def test_copies_differ_from_their_source_and_each_other_but_keep_its_length(tmp_path, sources):
    ds.generate_set(tmp_path, N, 0, sources)
    folder = tmp_path / f"n{N}"
    copies = [soundfile.read(folder / row["file_name"], dtype="float32")[0] for row in metadata(folder)]
    trims = []
    for i, copy in enumerate(copies):
        source = ds.read_source(sources[i % len(sources)]["audio"])
        assert len(source) - 2 * 1600 <= len(copy) <= len(source)  # at most 0.1 s trimmed at each end
        assert len(copy) < len(source) or not np.allclose(copy, source, atol=1e-4)
        rms = np.sqrt(np.mean(copy**2)) / np.sqrt(np.mean(source**2))
        assert 0.6 < rms < 1.5  # +-3 dB and a little noise
        middle = len(copy) // 2 - 4000  # the clip's ends may be silence: align on its middle half second
        found = np.correlate(source[middle : middle + 8000 + 1600], copy[middle : middle + 8000], "valid")
        start = int(np.argmax(found))  # where the copy begins in its source
        assert np.corrcoef(source[start : start + len(copy)], copy)[0, 1] > 0.95
        trims.append((start, len(source) - start - len(copy)))
    starts, ends = zip(*trims)
    assert min(ends) >= 0 and max(starts) > 0 and max(ends) > 0  # trimmed at both ends, within the source
    same_source = copies[0], copies[len(sources)]
    assert len(same_source[0]) != len(same_source[1]) or not np.array_equal(*same_source)


@needs_shared
def test_generation_is_deterministic_in_one_process_or_several(tmp_path, sources, monkeypatch):
    monkeypatch.setattr(ds, "PER_FOLDER", 5)  # three folders, so the worker pool is used (forked workers see it)
    serial = ds.generate_set(tmp_path / "a", N, 0, sources, workers=1)
    parallel = ds.generate_set(tmp_path / "b", N, 0, sources, workers=2)
    assert sorted(p.name for p in (tmp_path / "b" / "clips-s0").iterdir()) == ["000", "001", "002"]
    seed_0 = clip_bytes(serial)
    assert seed_0 == clip_bytes(parallel)
    other_seed = ds.generate_set(tmp_path / "a", N, 1, sources)  # the set is redone from its own pool
    assert not other_seed["reused"] and all(x != y for x, y in zip(seed_0, clip_bytes(other_seed)))
    back = ds.generate_set(tmp_path / "a", N, 0, sources)  # seed 0's pool was left as it was
    assert not back["reused"] and back["clips_written"] == 0 and clip_bytes(back) == seed_0


@needs_shared
def test_a_marked_set_is_reused_and_an_unmarked_folder_or_set_is_redone(tmp_path, sources):
    ds.generate_set(tmp_path, N, 0, sources)
    clip = tmp_path / "clips-s0" / ds.clip_name(3)
    original = clip.read_bytes()
    clip.write_bytes(b"not audio")  # left alone while every marker is there
    again = ds.generate_set(tmp_path, N, 0, sources)
    assert again["reused"] and again["clips_written"] == 0 and clip.read_bytes() == b"not audio"

    (clip.parent / ds.MARKER).unlink()  # an interrupted folder: written again
    again = ds.generate_set(tmp_path, N, 0, sources)
    assert not again["reused"] and again["clips_written"] == N and clip.read_bytes() == original

    (tmp_path / f"n{N}" / ds.MARKER).unlink()  # an interrupted set: its metadata is written again
    (tmp_path / f"n{N}" / "metadata.csv").write_text("file_name,transcription,language\n")
    again = ds.generate_set(tmp_path, N, 0, sources)
    assert not again["reused"] and again["clips_written"] == 0 and len(metadata(tmp_path / f"n{N}")) == N
    assert ds.generate_set(tmp_path, N, 0, sources)["reused"]

    bigger = ds.generate_set(tmp_path, N + 3, 0, sources)  # its folder holds too few clips: written again
    assert bigger["clips_written"] == N + 3 and ds.generate_set(tmp_path, N, 0, sources)["reused"]


def test_measure_reads_the_first_step_time_exit_status_and_peak_rss():
    # A forked child starts with its parent's high-water mark (Linux keeps it across exec): allocate
    # well past this test process's own peak so the child's figure is its own.
    big = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 + 400
    script = (
        "import time, numpy as np; print('Trainable parameters: 1'); time.sleep(0.3); "
        f"a = np.ones({big} * 2**20, np.uint8); print('Iter 1: train loss 1.0'); raise SystemExit(3)"
    )
    result = ds.measure([sys.executable, "-c", script], echo=False)
    assert result["returncode"] == 3 and result["peak_rss_mb"] >= big
    assert 0.3 <= result["phases_s"]["first_step"] <= result["wall_s"]
    assert result["phases_s"]["loaded"] < result["phases_s"]["first_step"]
    quiet = ds.measure([sys.executable, "-c", "print('no steps')"], echo=False)
    assert quiet["first_step_s"] is None and quiet["returncode"] == 0 and quiet["peak_rss_mb"] < big - 200


def row(size, rss, first_step, returncode=0):
    return {"size": size, "peak_rss_mb": rss, "first_step_s": first_step, "returncode": returncode,
            "disk_bytes": 0, "generation_s": 0.0, "reused": False, "phases_s": {}, "wall_s": 1.0}  # fmt: skip


def test_criteria_pass_and_fail_on_the_smallest_and_largest_sizes():
    checks = ds.criteria([row(1000, 1000.0, 5.0), row(50000, 1190.0, 14.0), row(10000, 5000.0, 99.0)])
    assert [c["passed"] for c in checks] == [True, True] and checks[0]["value"] == pytest.approx(1.19)
    checks = ds.criteria([row(1000, 1000.0, 5.0), row(50000, 1300.0, 16.0)])
    assert [c["passed"] for c in checks] == [False, False]
    assert "FAIL" in ds.report([row(1000, 1000.0, 5.0), row(50000, 1300.0, 16.0)], checks)
    crashed = ds.criteria([row(1000, 1000.0, 5.0), row(50000, 900.0, None, returncode=1)])
    assert [c["passed"] for c in crashed] == [False, False]


@needs_shared
def test_lora_runs_two_steps_on_a_generated_set(tmp_path, sources):
    made = ds.generate_set(tmp_path / "sets", N, 0, sources)
    model = write_model_folder(tmp_path / "tiny")
    result = ds.measure_set(made["path"], str(model), steps=2, batch_size=4, timeout=120, echo=False)
    assert result["returncode"] == 0, result["tail"]
    phases = result["phases_s"]
    assert phases["loaded"] <= phases["train_scanned"] <= phases["first_step"] < result["wall_s"]
    assert any(line.startswith("Iter 2: train loss") for line in result["tail"])
    assert any(line.startswith(f"train: kept {N} of {N}") for line in result["tail"]), result["tail"]
    assert result["peak_rss_mb"] > 100  # MLX and a model were loaded in the measured process
