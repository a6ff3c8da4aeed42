"""Training data of any size: lazy scanning, the feature loader (workers, prefetch, device log-mel),
the on-disk feature cache (damaged entries), frozen-encoder outputs on disk, and the drop report."""

import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from conftest import SHARED, tiny_whisper
from models.audio import N_FRAMES, SAMPLE_RATE, audio_length, load_audio
from models.tokenizer import get_tokenizer
from models.tuner.batches import iterate_batches, prepare_examples, stream_batches
from models.tuner.cache import HEADER, ArrayCache, content_key
from models.tuner.datasets import DropReport, load_local_dataset
from models.tuner.pipeline import ClipAudio, FeatureLoader, scan_examples

TE_VALIDATION = SHARED / "data" / "te" / "validation"


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(multilingual=True, num_languages=99)


@pytest.fixture(scope="module")
def shared_and_broken(tmp_path_factory) -> Path:
    """Eight real Telugu clips of the shared data, and beside them each kind of bad row."""
    folder = tmp_path_factory.mktemp("mixed")
    rows = list(load_local_dataset(TE_VALIDATION, val_fraction=0.0)["train"])[:8]
    lines = ["file_name,transcription,language"]
    for i, example in enumerate(rows):
        shutil.copy(example.audio, folder / f"te{i}.wav")
        lines.append(f'te{i}.wav,"{example.text}",te')
    sf.write(folder / "long.flac", np.zeros(31 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "text.wav").write_text("not audio at all")
    good = (folder / "te0.wav").read_bytes()
    (folder / "cut.wav").write_bytes(good[: len(good) // 2])  # a truncated WAV: its header says more
    (folder / "garbage.mp3").write_bytes(b"\xff\xfb" + bytes(range(256)) * 40)  # only decoding can tell
    lines += [
        "long.flac,too long,te",
        "empty.wav,empty,te",
        "text.wav,a text file,te",
        "cut.wav,cut short,te",
        "garbage.mp3,noise bytes,te",
        "missing.wav,no such file,te",
        f"te1.wav,{'చాలా ' * 300},te",
        "te2.wav,,te",
    ]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_flac_lengths_come_from_the_stream_info_as_the_decoder_reports_them(tmp_path):
    files = sorted(TE_VALIDATION.glob("*.flac"))[:5]
    for path in files:
        with sf.SoundFile(path) as sound:
            expected = round(sound.frames * SAMPLE_RATE / sound.samplerate)
        assert audio_length(path) == expected == len(load_audio(path))
    sf.write(tmp_path / "8k.flac", np.zeros(8000, np.float32), 8000)  # resampled: 1 s at 16 kHz
    assert audio_length(tmp_path / "8k.flac") == SAMPLE_RATE
    data = bytearray((tmp_path / "8k.flac").read_bytes())
    data[21:26] = bytes([data[21] & 0xF0, 0, 0, 0, 0])  # "length unknown": only decoding can tell
    (tmp_path / "unknown.flac").write_bytes(bytes(data))
    assert audio_length(tmp_path / "unknown.flac") is None
    (tmp_path / "garbage.flac").write_bytes(b"fLaC" + bytes(40))  # no sample rate: the decoder is asked
    report = DropReport()
    first = examples_of(TE_VALIDATION)[0]
    names = ("8k.flac", "unknown.flac", "garbage.flac")
    scanned = list(scan_examples([replace(first, audio=str(tmp_path / n)) for n in names], get_tokenizer(True), "te",
                                 report, verbose=False))  # fmt: skip
    assert [f.n_samples for f in scanned] == [SAMPLE_RATE]  # libsndfile decodes neither of the others: dropped
    assert (report.kept, report.total) == (1, 3) and "unreadable audio: 2" in str(report)


def examples_of(folder: Path):
    return load_local_dataset(folder, val_fraction=0.0)["train"]


# ---------------------------------------------------------------- scanning


def test_scanned_examples_hold_their_audio_not_their_features(tokenizer):
    report = DropReport()
    scanned = list(scan_examples(examples_of(TE_VALIDATION), tokenizer, None, report, verbose=False))
    assert len(scanned) == report.kept > 0
    for f in scanned:
        assert f.mel is None and isinstance(f.audio, ClipAudio)
        assert f.n_samples == len(sf.read(f.audio.audio)[0])  # the header's length is the decoded one
        assert f.frames == min(f.n_samples // 160, N_FRAMES)


def test_drop_report_of_scan_and_load_matches_the_eager_path(tokenizer, shared_and_broken):
    examples = examples_of(shared_and_broken)
    eager, eager_report = prepare_examples(examples, tokenizer, 80, None, verbose=False)

    report = DropReport()
    scanned = list(scan_examples(examples, tokenizer, None, report, verbose=False))
    loader = FeatureLoader(80, num_workers=2, verbose=False)
    rows, mel = loader.load(scanned)
    loader.close()
    decoded = [r for r in rows if not r.dropped]

    combined = report.counts + loader.report.counts
    assert combined == eager_report.counts
    assert report.total == eager_report.total == len(examples)
    assert report.kept - len(loader.dropped) == eager_report.kept == len(eager) == len(decoded)
    assert sum(combined.values()) == 8  # each bad row once
    assert [r.source for r in decoded] == [f.source for f in eager]
    for i, r in enumerate(rows):
        if r.dropped:
            assert not np.array(mel[i]).any()  # a dropped row is zeros (and fully masked in its batch)
    assert "dropped 1: unreadable audio: 1 (e.g. " in str(loader.report)  # found while loading


def test_loader_features_equal_the_eager_features(tokenizer):
    examples = examples_of(TE_VALIDATION)[:6]
    eager, _ = prepare_examples(examples, tokenizer, 80, None, verbose=False)
    scanned = list(scan_examples(examples, tokenizer, None, DropReport(), verbose=False))
    loader = FeatureLoader(80)
    rows, mel = loader.load(scanned)
    assert [r.source for r in rows] == [f.source for f in eager]
    for i, f in enumerate(eager):
        # device log-mel (float32, MLX's FFT) vs numpy's, both rounded to float16
        np.testing.assert_allclose(np.array(mel[i]), f.mel.astype(np.float32), atol=4e-3, rtol=0)


# ---------------------------------------------------------------- batches through the loader


def batches_of(features, loader, epoch=0, **kw):
    return list(iterate_batches(features, 3, shuffle=True, seed=5, epoch=epoch, loader=loader, **kw))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.sources == y.sources
        for name in ("mel", "inputs", "targets", "mask"):
            assert np.array_equal(np.array(getattr(x, name)), np.array(getattr(y, name))), name


def test_workers_and_prefetch_do_not_change_the_batches(tokenizer):
    scanned = list(scan_examples(examples_of(TE_VALIDATION)[:9], tokenizer, None, DropReport(), verbose=False))
    serial = batches_of(scanned, FeatureLoader(80, num_workers=0))
    for workers, prefetch in ((1, 0), (2, 2), (4, 8)):
        assert_same_batches(batches_of(scanned, FeatureLoader(80, num_workers=workers, prefetch=prefetch)), serial)


def test_feature_cache_is_reused_and_gives_the_computed_features(tokenizer, tmp_path):
    scanned = list(scan_examples(examples_of(TE_VALIDATION)[:6], tokenizer, None, DropReport(), verbose=False))
    first = FeatureLoader(80, num_workers=2, cache_dir=tmp_path)
    computed = batches_of(scanned, first)
    first.close()
    assert (first.mel_cache.hits, first.mel_cache.misses) == (0, 6)
    again = FeatureLoader(80, num_workers=2, cache_dir=tmp_path)
    assert_same_batches(batches_of(scanned, again), computed)
    assert (again.mel_cache.hits, again.mel_cache.misses) == (6, 0)
    assert again.cache_stats() == "features 6 read, 0 computed"
    other = FeatureLoader(128, cache_dir=tmp_path)  # other settings: another folder, nothing read
    assert other.mel_cache.folder != again.mel_cache.folder


def test_a_batch_of_cached_computed_and_dropped_rows_keeps_its_row_order(tokenizer, tmp_path):
    """Rows read from the cache, rows computed from audio and a row that fails to decode, interleaved:
    each row's features stay at its place (the collating thread groups them by kind)."""
    scanned = list(scan_examples(examples_of(TE_VALIDATION)[:6], tokenizer, None, DropReport(), verbose=False))
    _, expected = FeatureLoader(80).load(scanned)
    broken = tmp_path / "broken.mp3"
    broken.write_bytes(b"\xff\xfb" + bytes(range(256)) * 40)
    rows = list(scanned)
    rows[2] = replace(rows[2], audio=ClipAudio(str(broken)))
    for workers in (0, 2):
        warm = FeatureLoader(80, cache_dir=tmp_path / str(workers))
        warm.load(scanned[1::2])  # rows 1, 3, 5 cached
        warm.close()
        loader = FeatureLoader(80, num_workers=workers, cache_dir=tmp_path / str(workers), verbose=False)
        [(got_rows, got, _)] = list(loader.batches([(rows, False)]))
        loader.close()
        assert [r.source for r in got_rows] == [r.source for r in rows]
        assert loader.mel_cache.hits == 3 and got_rows[2].dropped
        for i in (0, 1, 3, 4, 5):
            assert np.array_equal(np.array(got[i]), np.array(expected[i])), i
        assert not np.array(got[2]).any()


def test_encoder_outputs_come_from_the_frozen_encoder_and_its_disk_cache(tokenizer, tmp_path):
    model = tiny_whisper()
    scanned = list(scan_examples(examples_of(TE_VALIDATION)[:4], tokenizer, None, DropReport(), verbose=False))
    loader = FeatureLoader(80, encoder=model, encoder_cache_dir=tmp_path)
    rows, encoded = loader.load(scanned)
    _, mel = FeatureLoader(80).load(scanned)
    expected = model.embed_audio(mel.astype(model.dtype)).astype(mx.float16).astype(mx.float32)
    assert encoded.shape == (4, 1500, 64)
    assert np.array_equal(np.array(encoded), np.array(expected))
    again = FeatureLoader(80, encoder=model, encoder_cache_dir=tmp_path)
    assert np.array_equal(np.array(again.load(scanned)[1]), np.array(encoded))
    assert (again.encoder_cache.hits, again.encoder_cache.misses) == (4, 0)
    changed = tiny_whisper(seed=1)  # other encoder weights never read these outputs
    other = FeatureLoader(80, encoder=changed, encoder_cache_dir=tmp_path)
    assert other.encoder_cache.folder != loader.encoder_cache.folder


def test_the_consumer_waiting_for_data_is_counted():
    class SlowAudio(ClipAudio):
        def read(self):
            time.sleep(0.3)
            return np.zeros(SAMPLE_RATE, np.float32)

    labels = np.array([1, 2, 3], np.int32)
    rows = [replace(_row(labels, i), audio=SlowAudio(f"slow{i}")) for i in range(4)]
    loader = FeatureLoader(80, num_workers=1, prefetch=1)
    out = list(loader.batches([([r], False) for r in rows]))
    loader.close()
    assert len(out) == 4 and loader.late == 3 and loader.waited > 0.5  # the first batch is not counted
    fast = FeatureLoader(80, num_workers=1)
    list(fast.batches([([replace(r, audio=ClipAudio(np.zeros(800, np.float32)))], False) for r in rows]))
    assert fast.waited < 0.5


def _row(labels, i):
    from models.tuner.batches import Features

    return Features(None, labels, f"row{i}", n_samples=SAMPLE_RATE, frames=100)


def test_streamed_batches_skip_ahead_without_decoding(tokenizer, monkeypatch):
    examples = examples_of(TE_VALIDATION)[:8]
    whole = list(stream_batches(examples, tokenizer, 80, None, 2))
    decoded, real_read = [], ClipAudio.read

    def counting_read(self):
        decoded.append(self.audio)
        return real_read(self)

    monkeypatch.setattr(ClipAudio, "read", counting_read)
    resumed = list(stream_batches(examples, tokenizer, 80, None, 2, start_batch=3))
    assert_same_batches(resumed, whole[3:])
    assert len(decoded) == 2  # the skipped batches were scanned, not decoded


# ---------------------------------------------------------------- the on-disk cache


def test_cache_entries_round_trip_memory_mapped(tmp_path):
    cache = ArrayCache(tmp_path, {"kind": "test"}, (4, 3))
    value = np.arange(12, dtype=np.float16).reshape(4, 3)
    key = content_key(b"clip bytes", 0, None)
    assert cache.get(key) is None
    cache.put(key, value)
    read = cache.get(key)
    assert isinstance(read, np.memmap) and np.array_equal(read, value)
    assert (cache.hits, cache.misses, cache.corrupt) == (1, 1, 0)
    assert not list(cache.folder.rglob("*.tmp"))
    with pytest.raises(ValueError, match=r"shape \(3, 4\), expected \(4, 3\)"):
        cache.put(key, value.reshape(3, 4))


@pytest.mark.parametrize("damage", ["half-written", "bit flip", "wrong magic", "empty"])
def test_a_damaged_cache_entry_is_detected_removed_and_recomputed(tmp_path, damage, tokenizer):
    scanned = list(scan_examples(examples_of(TE_VALIDATION)[:2], tokenizer, None, DropReport(), verbose=False))
    loader = FeatureLoader(80, cache_dir=tmp_path)
    _, computed = loader.load(scanned)
    path = loader.mel_cache.path(scanned[0].audio.key())
    data = bytearray(path.read_bytes())
    if damage == "half-written":
        data = data[: len(data) // 2]
    elif damage == "bit flip":
        data[HEADER + 1000] ^= 0x10
    elif damage == "wrong magic":
        data[:4] = b"XXXX"
    else:
        data = b""
    path.write_bytes(bytes(data))

    again = FeatureLoader(80, cache_dir=tmp_path)
    _, features = again.load(scanned)
    assert (again.mel_cache.corrupt, again.mel_cache.hits, again.mel_cache.misses) == (1, 1, 1)
    assert again.cache_stats() == "features 1 read, 1 computed, 1 damaged"
    assert np.array_equal(np.array(features), np.array(computed))
    assert path.stat().st_size == HEADER + N_FRAMES * 80 * 2  # written again, whole


def test_concurrent_writers_of_one_entry_leave_a_whole_entry(tmp_path):
    cache = ArrayCache(tmp_path, {"kind": "test"}, (1000, 100))
    values = [np.full((1000, 100), i, np.float16) for i in range(8)]
    threads = [threading.Thread(target=cache.put, args=("k" * 32, v)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read = cache.get("k" * 32)
    assert read is not None and len(np.unique(read)) == 1  # one writer's whole entry, never a mix
    assert not list(cache.folder.rglob("*.tmp"))


def test_content_key_tells_sample_ranges_and_audio_apart(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"RIFF....")
    assert ClipAudio(str(tmp_path / "a.wav")).key() == ClipAudio(b"RIFF....").key()  # by content, not by path
    assert ClipAudio(b"RIFF....", 0, 100).key() != ClipAudio(b"RIFF....").key()
    assert content_key(b"ab", b"c") != content_key(b"a", b"bc")
