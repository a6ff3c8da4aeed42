"""Data layer: manifests and splits, label tokens, drops, deterministic padded batches, Hub rows."""

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf

from conftest import SHARED
from models.audio import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    MelWindows,
    load_audio,
    log_mel_spectrogram,
    open_audio,
    pad_or_trim,
)
from models.tokenizer import get_tokenizer
from models.tuner import batches
from models.tuner.batches import (
    collate,
    epoch_batches,
    iterate_batches,
    label_tokens,
    prepare_examples,
    stream_batches,
    training_batches,
)
from models.tuner.datasets import DropReport, Example, load_hf_dataset, load_local_dataset, read_manifest

TE_DATA = SHARED / "data" / "te"


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(multilingual=True, num_languages=99)


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def flac_bytes(seconds: float) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, tone(seconds), SAMPLE_RATE, format="FLAC")
    return buffer.getvalue()


def write_csv_folder(folder: Path, rows, header="file_name,transcription,language") -> Path:
    """Write a FLAC file for each (name, text, language, seconds) row plus metadata.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [header]
    for name, text, language, seconds in rows:
        if seconds is not None:
            sf.write(folder / name, tone(seconds), SAMPLE_RATE)
        lines.append(f"{name},{text},{language}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def make_features(lengths, n_mels=80):
    """Features with label sequences of the given lengths (ending in eot) and tiny random mels."""
    rng = np.random.default_rng(0)
    return [
        batches.Features(
            rng.standard_normal((N_FRAMES, n_mels)).astype(np.float16),
            np.array(list(range(1, n)) + [50257], dtype=np.int32),
            f"row{i}",
        )
        for i, n in enumerate(lengths)
    ]


# ---------------------------------------------------------------- local folders


def test_real_telugu_folder_has_train_and_validation_splits():
    if not TE_DATA.is_dir():
        pytest.skip(f"{TE_DATA} not found: the shared data folder must sit beside the repo")
    splits = load_local_dataset(TE_DATA)
    assert set(splits) == {"train", "validation"}
    assert (len(splits["train"]), len(splits["validation"])) == (76, 19)
    first = splits["train"][0]
    assert first.language == "te" and first.text and Path(first.audio).is_file()
    assert first.source == f"{TE_DATA / 'train' / 'metadata.csv'}:2"


def test_flat_folder_is_split_by_val_fraction_and_seed(tmp_path):
    rows = [(f"clip{i}.flac", f"words {i}", "en", None) for i in range(20)]
    write_csv_folder(tmp_path, rows)
    first = load_local_dataset(tmp_path, val_fraction=0.25, seed=3)
    again = load_local_dataset(tmp_path, val_fraction=0.25, seed=3)
    other = load_local_dataset(tmp_path, val_fraction=0.25, seed=4)
    texts = lambda split: [e.text for e in split]  # noqa: E731
    assert (len(first["train"]), len(first["validation"])) == (15, 5)
    assert texts(first["validation"]) == texts(again["validation"])
    assert texts(first["validation"]) != texts(other["validation"])
    assert sorted(texts(first["train"]) + texts(first["validation"])) == sorted(f"words {i}" for i in range(20))
    assert set(load_local_dataset(tmp_path, val_fraction=0.0)) == {"train"}


def test_jsonl_manifest_and_split_folder_aliases(tmp_path):
    for split, folder in (("train", "train"), ("validation", "dev")):
        (tmp_path / folder).mkdir()
        sf.write(tmp_path / folder / "a.flac", tone(0.2), SAMPLE_RATE)
        rows = [
            {"audio": "a.flac", "text": f"{split} one", "locale": "sw"},
            {"path": "a.flac", "normalized_text": f"{split} two"},
        ]
        (tmp_path / folder / "clips.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    splits = load_local_dataset(tmp_path)
    assert [e.text for e in splits["validation"]] == ["validation one", "validation two"]
    assert [e.language for e in splits["train"]] == ["sw", None]
    assert splits["train"][1].audio == str(tmp_path / "train" / "a.flac")
    assert splits["train"][1].source.endswith("clips.jsonl:2")


def test_missing_text_column_names_the_file_and_columns(tmp_path):
    write_csv_folder(tmp_path, [("a.flac", "hi", "en", None)], header="file_name,words,language")
    with pytest.raises(ValueError, match=r"metadata\.csv:2: no transcript column.*transcription.*words"):
        read_manifest(tmp_path)
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file": "a.flac", "text": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1: no audio file column.*file_name"):
        read_manifest(tmp_path)


def test_folder_without_manifest_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        load_local_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_local_dataset(tmp_path / "nope")


# ---------------------------------------------------------------- labels and drops


def test_label_tokens_for_hello_in_english(tokenizer):
    expected = [50258, 50259, 50359, 50363] + tokenizer.encode(" hello") + [50257]
    assert tokenizer.encode(" hello") == [7751]
    assert label_tokens(tokenizer, "  hello ", "en").tolist() == expected
    assert label_tokens(tokenizer, "hello", "English").tolist() == expected
    assert label_tokens(tokenizer, "hello", "te")[1] == tokenizer.to_language_token("te")
    english_only = get_tokenizer(multilingual=False)
    assert label_tokens(english_only, "hello", None).tolist() == [50257, 50362, 23748, 50256]  # gpt2 " hello"
    with pytest.raises(batches.DroppedExample, match="English-only"):
        label_tokens(english_only, "hello", "te")
    with pytest.raises(batches.DroppedExample, match="no default language"):
        label_tokens(tokenizer, "hello", None)
    assert label_tokens(tokenizer, "olá", "pt-BR")[1] == tokenizer.to_language_token("pt")


def test_prepare_examples_drops_and_counts_each_reason(tmp_path, tokenizer):
    write_csv_folder(
        tmp_path,
        [
            ("ok.flac", "good clip", "en", 0.5),
            ("long.flac", "too long", "en", 31.0),
            ("gone.flac", "missing file", "en", None),
            ("empty.flac", " ", "en", 0.5),
            ("fr.flac", "unknown", "xx", 0.5),
            ("wordy.flac", "word " * 500, "en", 0.5),
        ],
    )
    (tmp_path / "broken.flac").write_bytes(b"not audio at all")
    examples = read_manifest(tmp_path) + [Example(str(tmp_path / "broken.flac"), "text", "en", "broken:1")]
    features, report = prepare_examples(examples, tokenizer, n_mels=80, default_language="en")
    assert [f.source for f in features] == [examples[0].source]
    assert report.counts == {
        "audio longer than 30 s": 1,
        "unreadable audio": 2,
        "empty transcript": 1,
        "unknown language": 1,
        "transcript too long": 1,
    }
    assert (report.total, report.kept, report.dropped) == (7, 1, 6)
    assert any("gone.flac" in s and "no such audio file" in s for s in report.samples["unreadable audio"])
    summary = str(report)
    assert "\n" not in summary and summary.startswith("kept 1 of 7 examples; dropped 6")


def test_features_are_the_first_window_transcription_sees(tmp_path, tokenizer):
    sf.write(tmp_path / "a.flac", tone(1.0), SAMPLE_RATE)
    example = Example(str(tmp_path / "a.flac"), "hi", None, "a")
    (feature,), report = prepare_examples([example], tokenizer, n_mels=128, default_language="en")
    assert feature.mel.shape == (N_FRAMES, 128) and feature.mel.dtype == np.float16
    expected = MelWindows(open_audio(example.audio), 128).window(0)  # what transcribe() decodes first
    np.testing.assert_allclose(feature.mel, expected, atol=2e-3)
    assert feature.frames == 100 and not feature.mel[100:].any()  # zero-padded log-mel past the clip
    padded = log_mel_spectrogram(pad_or_trim(load_audio(example.audio), N_SAMPLES), 128)[:N_FRAMES]
    assert np.abs(feature.mel[110:] - padded[110:]).min() > 0.5  # not the padded-audio policy (-0.63)
    assert feature.labels[1] == tokenizer.to_language_token("en")  # the default language
    assert str(report) == "kept 1 of 1 examples"


# ---------------------------------------------------------------- batching


def test_collate_shifts_pads_and_masks():
    features = make_features([5, 12])
    batch = collate(features, pad_to_multiple=8)
    assert batch.mel.shape == (2, N_FRAMES, 80) and batch.inputs.shape == (2, 16)
    inputs, targets, mask = np.array(batch.inputs), np.array(batch.targets), np.array(batch.mask)
    assert inputs[0, :4].tolist() == [1, 2, 3, 4] and targets[0, :4].tolist() == [2, 3, 4, 50257]
    assert (inputs[0, 4:] == 50257).all() and mask[0].tolist() == [1] * 4 + [0] * 12
    assert targets[1, :11].tolist() == list(range(2, 12)) + [50257] and mask[1].sum() == 11
    assert batch.n_tokens == 15
    np.testing.assert_array_equal(np.array(batch.mel[1]), features[1].mel.astype(np.float32))
    assert collate(make_features([431]), pad_to_multiple=10).inputs.shape == (1, 430)
    assert collate(make_features([445]), pad_to_multiple=10).inputs.shape == (1, 448)  # not 450


def test_batch_order_depends_only_on_seed_and_epoch():
    lengths = list(range(3, 40))
    order = lambda **kw: [b.tolist() for b in epoch_batches(lengths, 4, shuffle=True, **kw)]  # noqa: E731
    assert order(seed=1, epoch=2) == order(seed=1, epoch=2)
    assert order(seed=1, epoch=2) != order(seed=1, epoch=3) != order(seed=2, epoch=2)
    assert sorted(sum(order(seed=1, epoch=0), [])) == list(range(len(lengths)))
    dropped = order(seed=1, epoch=0, drop_last=True)
    assert len(dropped) == 9 and all(len(b) == 4 for b in dropped)
    windows = order(seed=1, epoch=0, sort_window=3)
    assert windows == order(seed=1, epoch=0, sort_window=3)
    assert sorted(sum(windows, [])) == list(range(len(lengths)))

    # sorting by length within windows leaves less padding than a plain shuffle
    def spread(batches):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)

    assert spread(windows) < spread(order(seed=1, epoch=0))
    assert epoch_batches(lengths, 4, shuffle=False)[0].tolist() == [0, 1, 2, 3]


def test_iterate_batches_skips_ahead_and_shards_by_rank():
    features = make_features(np.random.default_rng(1).integers(5, 30, size=23).tolist())
    kw = dict(shuffle=True, seed=5, epoch=1)
    full = [b.sources for b in iterate_batches(features, 4, **kw)]
    assert [b.sources for b in iterate_batches(features, 4, start_batch=3, **kw)] == full[3:]
    ranks = [[b.sources for b in iterate_batches(features, 4, rank=r, world_size=2, **kw)] for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == full
    assert all(len(b) == 2 for b in ranks[0]) and len(full[-1]) == 3
    tiny = [b for b in iterate_batches(features[:5], 4, shuffle=False, rank=3, world_size=4)]
    assert tiny[-1].n_tokens == 0 and float(tiny[-1].mask.sum()) == 0  # nothing left for rank 3
    with pytest.raises(ValueError, match="divisible"):
        next(iterate_batches(features, 4, shuffle=False, world_size=3))


def test_training_batches_resume_equals_uninterrupted_run():
    features = make_features([6] * 10)

    def take(start, n):
        return [batch.sources for _, batch in zip(range(n), training_batches(features, 3, seed=7, start_step=start))]

    run = take(0, 10)  # 3 batches an epoch: steps 3, 6 and 9 start new epochs in new orders
    assert len({tuple(s) for s in run[:3]}) == 3 and run[3:6] != run[:3]
    assert take(4, 6) == run[4:]
    with pytest.raises(ValueError, match="lower --batch-size"):
        next(training_batches(features, 11, seed=0))


# ---------------------------------------------------------------- Hugging Face datasets


def hub_dataset():
    audio = [{"bytes": flac_bytes(0.3), "path": f"clip{i}.flac"} for i in range(3)]
    table = {"audio": audio, "sentence": ["one", "two", ""], "locale": ["te", "sw", "te"]}
    # Decoding Audio, as Hub datasets declare it: load_hf_dataset must switch decoding off.
    return datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio(sampling_rate=16000))


def test_hub_rows_become_examples_with_bytes_and_language(tokenizer):
    examples = load_hf_dataset(hub_dataset(), split="train")
    assert [(e.text, e.language, e.source) for e in examples] == [
        ("one", "te", "dataset/train:0"),
        ("two", "sw", "dataset/train:1"),
        ("", "te", "dataset/train:2"),
    ]
    assert isinstance(examples[0].audio, bytes)
    features, report = prepare_examples(examples, tokenizer, 80, default_language=None)
    assert report.counts == {"empty transcript": 1} and len(features) == 2
    assert features[1].labels[1] == tokenizer.to_language_token("sw")
    with pytest.raises(ValueError, match=r"no transcript column.*words"):
        load_hf_dataset(hub_dataset(), text_column="words")
    with pytest.raises(ValueError, match=r"no audio column 'speech'"):
        load_hf_dataset(hub_dataset(), audio_column="speech")


def test_hub_streaming_gives_the_same_batches(tokenizer):
    stream = load_hf_dataset(hub_dataset().to_iterable_dataset(), streaming=True)
    assert [e.text for e in stream] == ["one", "two", ""]  # re-iterable
    report = DropReport()
    streamed = list(stream_batches(stream, tokenizer, 80, None, 2, report=report))
    features, _ = prepare_examples(load_hf_dataset(hub_dataset()), tokenizer, 80, None)
    (batch,) = list(iterate_batches(features, 2, shuffle=False))
    assert len(streamed) == 1 and report.counts == {"empty transcript": 1}
    np.testing.assert_array_equal(np.array(streamed[0].inputs), np.array(batch.inputs))
    np.testing.assert_array_equal(np.array(streamed[0].mel), np.array(batch.mel))


def test_hub_stream_shuffle_is_a_permutation_fixed_by_seed_and_epoch():
    table = {"audio": [f"clip{i}.flac" for i in range(30)], "text": [str(i) for i in range(30)]}
    for dataset in (datasets.Dataset.from_dict(table), datasets.Dataset.from_dict(table).to_iterable_dataset()):
        stream = load_hf_dataset(dataset, streaming=True)
        order = lambda seed, epoch, stream=stream: [e.text for e in stream.shuffled(seed, epoch, buffer_size=8)]  # noqa: E731
        assert order(0, 1) == order(0, 1) and sorted(order(0, 1), key=int) == table["text"]
        assert order(0, 1) != order(0, 2) and order(0, 1) != table["text"]
        assert [e.audio for e in stream][:2] == ["clip0.flac", "clip1.flac"]


def test_unreachable_hub_dataset_error_says_what_to_check(monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append(kwargs)
        raise ConnectionError("Couldn't reach 'someone/speech' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"'someone/speech'.*network.*HF_TOKEN"):
        load_hf_dataset("someone/speech", split="train")
    assert "trust_remote_code" not in calls[0]
