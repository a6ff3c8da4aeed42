"""Training labels and examples beyond plain transcripts: timestamps, prompts, segments, no speech,
replay mixing and SpecAugment, with token sequences checked by hand, and exact resume with all on."""

import json

import numpy as np
import pytest
import soundfile as sf

import lora as lora_cli
from conftest import make_clips
from models.audio import N_FRAMES, N_SAMPLES, SAMPLE_RATE
from models.tokenizer import get_tokenizer
from models.tuner.augment import SpecAugment, no_speech_audio
from models.tuner.batches import DropReport, Features, collate, iter_features, iterate_batches, label_tokens
from models.tuner.datasets import read_manifest
from models.tuner.labels import (
    MAX_PROMPT_TOKENS,
    Labeler,
    check_segments,
    no_speech_labels,
    segment_windows,
    timed_clip,
    timed_segments,
    timestamp_token,
)

TE = "బాల బాలికలను"  # "boys and girls"; vowel signs are separate code points
YO = "Ọjọ́ àìkú"


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(multilingual=True, num_languages=99)


def words(tok, text: str) -> list:
    return tok.encoding.encode(" " + text)


def speech(tok, text: str, duration: float, group=None, source="clip") -> Features:
    labels = label_tokens(tok, text, "te")
    mel = np.zeros((N_FRAMES, 80), np.float16)
    return Features(mel, labels, source, timed_clip(tok, labels, duration), group, int(duration * 100))


# ---------------------------------------------------------------- timestamps


def test_timestamp_tokens_come_from_each_vocabulary():
    v2, v3, english = (get_tokenizer(True, 99), get_tokenizer(True, 100), get_tokenizer(False))
    assert v2.timestamp_begin == 50364 and v3.timestamp_begin == 50365 and english.timestamp_begin == 50363
    for t in (v2, v3, english):
        assert timestamp_token(t, 0.0) == t.timestamp_begin
        assert t.decode_with_timestamps([timestamp_token(t, 1.234)]) == "<|1.24|>"  # rounded to the 0.02 s grid
        assert t.decode_with_timestamps([timestamp_token(t, 30.0)]) == "<|30.00|>"
    with pytest.raises(ValueError, match="30"):
        timestamp_token(v2, 30.5)


def test_timed_clip_label_by_hand(tok):
    labels = label_tokens(tok, TE, "te")
    te = tok.to_language_token("te")
    assert labels.tolist() == [tok.sot, te, tok.transcribe, tok.no_timestamps, *words(tok, TE), tok.eot]
    labeler = Labeler(tok, [speech(tok, TE, 2.345)], timestamp_prob=1.0)
    row, context = labeler.row(0, np.random.default_rng(0))
    end = tok.timestamp_begin + 117  # 2.345 s -> <|2.34|>, 117 steps of 0.02 s
    assert row.tolist() == [tok.sot, te, tok.transcribe, tok.timestamp_begin, *words(tok, TE), end, tok.eot]
    assert context == 0
    plain, _ = Labeler(tok, [speech(tok, TE, 2.345)], timestamp_prob=0.0).row(0, np.random.default_rng(0))
    assert plain.tolist() == labels.tolist()


def test_timestamp_prob_is_the_share_of_timed_labels(tok):
    labeler = Labeler(tok, [speech(tok, YO, 1.0)], timestamp_prob=0.3)
    timed = [tok.no_timestamps not in labeler.row(0, np.random.default_rng(i))[0] for i in range(2000)]
    assert 0.27 < np.mean(timed) < 0.33


def test_segments_are_cut_into_30_s_windows_with_relative_times(tok):
    segments = check_segments(
        [{"start": 0, "end": 10, "text": "a"}, {"start": 12, "end": 25.5, "text": "b"},
         {"start": 26, "end": 35, "text": "c"}, {"start": 40, "end": 56, "text": "d"}], "x.jsonl:1"
    )  # fmt: skip
    windows = segment_windows(segments)
    assert [(w[0], w[1], [s["text"] for s in w[2]]) for w in windows] == [(0, 25.5, ["a", "b"]), (26, 56, ["c", "d"])]
    tokens = timed_segments(tok, windows[1][2], offset=26)
    ts = tok.timestamp_begin
    assert tokens.tolist() == [ts + 0, *words(tok, "c"), ts + 450, ts + 700, *words(tok, "d"), ts + 1500]
    with pytest.raises(ValueError, match="segment 1"):
        check_segments([{"start": 0, "end": 5, "text": "a"}, {"start": 4, "end": 6, "text": "b"}], "x.jsonl:1")
    with pytest.raises(ValueError, match="more than 30"):
        segment_windows([{"start": 0, "end": 31, "text": "long"}])


def test_a_recording_with_segments_becomes_timestamped_windows(tmp_path, tok):
    t = np.arange(50 * SAMPLE_RATE) / SAMPLE_RATE
    sf.write(tmp_path / "talk.wav", (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), SAMPLE_RATE)
    rows = [
        {"audio": "talk.wav", "language": "te", "speaker_id": "s1",
         "segments": [{"start": 1, "end": 12, "text": "one"}, {"start": 14, "end": 29, "text": "two"},
                      {"start": 33, "end": 48, "text": "three"}]},
        {"audio": "talk.wav", "language": "te", "segments": [{"start": 40, "end": 52, "text": "past the end"}]},
    ]  # fmt: skip
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = read_manifest(tmp_path)
    assert examples[0].group == "s1" and examples[0].text == ""
    report = DropReport()
    found = list(iter_features(examples, tok, 80, None, report))
    assert [f.source.split("@")[1] for f in found] == ["1.00s", "33.00s"]
    assert found[0].frames == 2800 and found[1].frames == 1500  # each window's audio ends with its last segment
    ts = tok.timestamp_begin
    assert found[0].timed.tolist() == [ts, *words(tok, "one"), ts + 550, ts + 650, *words(tok, "two"), ts + 1400]
    assert found[0].labels.tolist()[4:-1] == words(tok, "one two")
    assert report.kept == 1 and report.counts == {"segments past the audio": 1}
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"audio": "talk.wav", "segments": [{"start": 1}]}) + "\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: segment 0"):
        read_manifest(tmp_path)


# ---------------------------------------------------------------- previous-text prompts


def test_prompt_is_the_previous_clip_of_the_same_group_and_is_not_trained_on(tok):
    pool = [speech(tok, "first", 1, "s1"), speech(tok, "other", 1, "s2"), speech(tok, TE, 1, "s1")]
    labeler = Labeler(tok, pool, prompt_prob=1.0)
    row, context = labeler.row(2, np.random.default_rng(0))
    te = tok.to_language_token("te")
    expected = [tok.sot_prev, *words(tok, "first"), tok.sot, te, tok.transcribe, tok.no_timestamps, *words(tok, TE)]
    assert row.tolist() == expected + [tok.eot] and context == 1 + len(words(tok, "first"))
    batch = collate([_with_context(pool[2], row, context)], pad_to_multiple=8)
    targets, mask = np.array(batch.targets[0]), np.array(batch.mask[0])
    assert targets[context - 1] == tok.sot and mask[context - 1] == 0  # the prompt and <|sot|>: context
    assert targets[context] == te and mask[context] == 1  # from the language token on: trained
    assert mask[: len(row) - 1].sum() == len(row) - 1 - context == batch.n_tokens


def test_without_a_previous_clip_the_prompt_is_another_random_clip(tok):
    pool = [speech(tok, f"clip {i}", 1) for i in range(5)]
    labeler = Labeler(tok, pool, prompt_prob=1.0)
    prompts = set()
    for seed in range(40):
        row, context = labeler.row(2, np.random.default_rng(seed))
        prompt = tok.decode(row[1:context].tolist()).strip()
        assert prompt != "clip 2"
        prompts.add(prompt)
    assert prompts == {"clip 0", "clip 1", "clip 3", "clip 4"}


def test_a_long_prompt_keeps_its_last_tokens(tok):
    long_text = " ".join(f"w{i}" for i in range(150))  # about 300 tokens
    pool = [speech(tok, long_text, 1, "g"), speech(tok, "short", 1, "g")]
    row, context = Labeler(tok, pool, prompt_prob=1.0).row(1, np.random.default_rng(0))
    previous = pool[0].labels[4:-1].tolist()
    assert context == 1 + MAX_PROMPT_TOKENS and row[1:context].tolist() == previous[-MAX_PROMPT_TOKENS:]


def _with_context(f: Features, labels, context):
    from models.tuner.batches import _Row

    return _Row(f.mel, labels, f.source, f.timed, f.group, f.frames, context=context)


# ---------------------------------------------------------------- no speech, SpecAugment, mixing


def test_no_speech_windows_are_labelled_nospeech(tok):
    assert no_speech_labels(tok).tolist() == [tok.sot, tok.no_speech, tok.eot]
    kinds = set()
    for i in range(40):
        kind, audio = no_speech_audio(np.random.default_rng(i))
        kinds.add(kind)
        assert SAMPLE_RATE <= len(audio) <= 30 * SAMPLE_RATE and np.abs(audio).max() <= 1.0
        rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
        assert rms == 0.0 if kind == "silence" else 10 ** (-61 / 20) < rms < 10 ** (-19 / 20)
    assert kinds == {"silence", "white noise", "brown noise", "hum"}


def test_spec_augment_masks_inside_the_clip_and_repeats_with_the_seed():
    mel = np.random.default_rng(0).standard_normal((N_FRAMES, 80)).astype(np.float32) + 5
    augment = SpecAugment()
    a, b = augment(mel, 800, np.random.default_rng(3)), augment(mel, 800, np.random.default_rng(3))
    assert np.array_equal(a, b) and not np.array_equal(a, augment(mel, 800, np.random.default_rng(4)))
    masked = a == 0
    assert np.array_equal(a[~masked], mel[~masked])
    frames_masked = np.flatnonzero(masked.all(axis=1))
    assert frames_masked.size and frames_masked.max() < 800  # time masks stay in the clip
    bins_masked = np.flatnonzero(masked[800:].all(axis=0))
    assert len(frames_masked) <= 2 * 80 and len(bins_masked) <= 2 * 27  # a tenth of 800 frames, 27 bins, twice
    assert masked.any()


def test_drawn_labels_depend_on_seed_epoch_and_batch_only(tok):
    pool = [speech(tok, f"clip {i}", 1 + i, f"s{i % 2}") for i in range(6)]
    labeler = Labeler(tok, pool, timestamp_prob=0.5, prompt_prob=0.5)

    def epoch(e, start=0):
        kw = dict(shuffle=True, seed=1, epoch=e, start_batch=start, labeler=labeler, spec_augment=SpecAugment())
        return [(np.array(b.inputs).tolist(), np.array(b.mask).tolist()) for b in iterate_batches(pool, 2, **kw)]

    assert epoch(0) == epoch(0) and epoch(0)[1:] == epoch(0, start=1) and epoch(0) != epoch(1)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return make_clips(tmp_path_factory.mktemp("clips"), "en")


def test_mix_data_and_no_speech_flags_add_examples_and_are_recorded(tmp_path, model_folder, clips, capsys):
    adapters = tmp_path / "a"
    argv = ["--model", str(model_folder), "--data", str(clips), "--language", "en", "--val-fraction", "0",
            "--adapter-path", str(adapters), "--batch-size", "2", "--steps-per-eval", "0", "--lora-rank", "4",
            "--iters", "2", "--mix-data", str(clips), "--mix-fraction", "0.5", "--no-speech-fraction", "0.5",
            "--timestamp-prob", "0.5", "--prompt-prob", "0.5", "--spec-augment"]  # fmt: skip
    assert lora_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "--mix-data: 4 of 4 clips mixed in (50% of training)" in out and "No-speech windows: 2" in out
    recipe = json.loads((adapters / "adapter_config.json").read_text())["recipe"]
    assert recipe == {"timestamp_prob": 0.5, "prompt_prob": 0.5, "no_speech_fraction": 0.5, "pack_fraction": 0.0,
                      "mix_data": str(clips), "mix_fraction": 0.5, "spec_augment": True}  # fmt: skip
    assert lora_cli.main([*argv, "--overwrite", "--freeze-encoder"]) == 1
    assert "--spec-augment masks the mel features" in capsys.readouterr().err


def test_resume_is_exact_with_drawn_labels_and_spec_augment(tmp_path, tok):
    from test_trainer import FULL_VOCAB, args_for, assert_same_weights, clip_mel, lora_model, read_weights, run_training

    rng = np.random.default_rng(0)
    texts = ["one", "two words", "three little words", "a b c", "go"]
    pool = []
    for i, text in enumerate(texts):
        labels = label_tokens(tok, text, "en")
        pool.append(Features(clip_mel(rng), labels, f"c{i}", timed_clip(tok, labels, 1 + i), f"s{i % 2}", 32))
    pool.append(Features(clip_mel(rng), no_speech_labels(tok), "no-speech", frames=32))
    drawn = dict(labeler=Labeler(tok, pool, timestamp_prob=0.5, prompt_prob=0.5), spec_augment=SpecAugment())
    args = dict(iters=6, warmup=2, learning_rate=1e-2)
    straight, parts = tmp_path / "straight", tmp_path / "parts"

    def model(lora_seed: int = 0):
        return lora_model(lora_seed=lora_seed, dropout=0.2, n_vocab=FULL_VOCAB)

    run_training(model(), straight, args_for(**args), pool, **drawn)
    run_training(model(), parts, args_for(stop_after=3, **args), pool, **drawn)
    run_training(model(lora_seed=5), parts, args_for(**args), pool, resume=True, **drawn)
    assert_same_weights(read_weights(straight / "adapters.safetensors"), read_weights(parts / "adapters.safetensors"))
    plain = tmp_path / "plain"  # the drawn labels and masks do reach the step
    run_training(model(), plain, args_for(**args), pool)
    with pytest.raises(AssertionError):
        assert_same_weights(
            read_weights(straight / "adapters.safetensors"), read_weights(plain / "adapters.safetensors")
        )


def test_packed_windows_join_clips_of_one_language_as_timestamped_segments(tmp_path, tok):
    from models.tuner.extras import packed_examples
    from models.tuner.pipeline import scan_examples

    clips = list(scan_examples(read_manifest(make_clips(tmp_path / "clips", "en")), tok, None, DropReport()))
    packed = packed_examples(clips, tok, 3, seed=0)
    again = packed_examples(clips, tok, 3, seed=0)
    assert len(packed) == 3 and [p.audio for p in packed] == [p.audio for p in again]
    for window in packed:
        audio = window.audio.read()
        assert len(window.audio.pieces) == 4 and len(audio) == window.n_samples
        gaps = [gap / SAMPLE_RATE for _, gap in window.audio.pieces]
        assert 0 <= gaps[0] <= 1.0 and all(0.2 <= g <= 1.0 for g in gaps[1:])
        times = [(t - tok.timestamp_begin) * 0.02 for t in window.timed.tolist() if t >= tok.timestamp_begin]
        assert len(times) == 8 and times == sorted(times)  # a <|start|> <|end|> pair per clip
        assert abs(times[0] - gaps[0]) <= 0.011 and abs(times[-1] - len(audio) / SAMPLE_RATE) <= 0.011
        assert (
            tok.decode(window.labels[4:-1].tolist()).split()
            == tok.decode([t for t in window.timed.tolist() if t < tok.timestamp_begin]).split()
        )  # the plain labels hold the same words in the same order
        assert sorted(tok.decode(window.labels[4:-1].tolist()).replace("clip", " ").split()) == ["0", "1", "2", "3"]
        loud = np.flatnonzero(np.abs(audio) > 0.01)  # the first clip's tone starts after the first gap
        assert abs(loud[0] / SAMPLE_RATE - gaps[0]) < 0.01


def test_a_packed_window_can_end_in_a_clip_cut_off_at_30_s_labelled_as_an_unfinished_segment(tmp_path, tok):
    from models.tuner.extras import packed_examples
    from models.tuner.pipeline import scan_examples

    folder, t = tmp_path / "long", np.arange(6 * SAMPLE_RATE) / SAMPLE_RATE
    folder.mkdir()
    rows = ["file_name,text,language"]
    for i in range(7):  # 6 s tones: four fit a window, a fifth runs past its end
        sf.write(folder / f"c{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), SAMPLE_RATE)
        rows.append(f"c{i}.wav,clip {i},en")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    clips = list(scan_examples(read_manifest(folder), tok, None, DropReport()))
    assert not any(len(w.audio.pieces) > 4 for w in packed_examples(clips, tok, 6, seed=0))  # tail_prob 0: none
    cut = [w for w in packed_examples(clips, tok, 6, seed=0, tail_prob=1.0) if len(w.audio.pieces) == 5]
    assert cut
    en = tok.to_language_token("en")
    for window in cut:
        audio = window.audio.read()
        assert len(audio) == N_SAMPLES and window.n_samples == N_SAMPLES and window.frames == N_FRAMES
        starts = np.cumsum([gap + 6 * SAMPLE_RATE * (k > 0) for k, (_, gap) in enumerate(window.audio.pieces)])
        assert 1.0 <= 30 - starts[-1] / SAMPLE_RATE <= 5.0  # at least 1 s of the last clip inside, 1 s cut off
        texts = [f"clip {clip.audio[-5]}" for clip, _ in window.audio.pieces]  # .../c<i>.wav
        expected = [tok.sot, en, tok.transcribe]
        for k, start in enumerate(starts[:4]):
            end = start + 6 * SAMPLE_RATE
            expected += [timestamp_token(tok, start / SAMPLE_RATE), *words(tok, texts[k])]
            expected.append(timestamp_token(tok, end / SAMPLE_RATE))
        expected += [timestamp_token(tok, starts[4] / SAMPLE_RATE), tok.eot]  # the cut-off clip: its start, no text
        row, context = Labeler(tok, [window], timestamp_prob=0.0).row(0, np.random.default_rng(0))
        assert context == 0 and row.tolist() == expected  # always timestamped: plain labels cannot say it
        plain = tok.decode(window.labels[4:-1].tolist()).split()
        assert plain == " ".join(texts[:4]).split()  # the plain text holds the four whole clips only


def test_resume_with_another_recipe_names_the_flag(tmp_path, model_folder, clips, capsys):
    argv = ["--model", str(model_folder), "--data", str(clips), "--val-fraction", "0", "--batch-size", "2",
            "--steps-per-eval", "0", "--lora-rank", "4", "--iters", "2",
            "--adapter-path", str(tmp_path / "a")]  # fmt: skip
    assert lora_cli.main([*argv, "--timestamp-prob", "0.5"]) == 0
    assert lora_cli.main([*argv, "--iters", "3", "--resume"]) == 1
    assert "recipe.timestamp_prob: 0.5 in the checkpoint, 0.0 now" in capsys.readouterr().err
    assert lora_cli.main([*argv, "--iters", "3", "--resume", "--timestamp-prob", "0.5"]) == 0


def test_no_speech_windows_also_learn_an_empty_transcript_in_the_given_language(tok):
    silence = Features(np.zeros((N_FRAMES, 80), np.float16), no_speech_labels(tok), "no-speech", frames=100)
    pool = [speech(tok, TE, 1.0), speech(tok, "other", 2.0), silence]
    te = tok.to_language_token("te")
    rows = {tuple(Labeler(tok, pool, timestamp_prob=0.5).row(2, np.random.default_rng(i))[0]) for i in range(60)}
    assert rows == {
        (tok.sot, tok.no_speech, tok.eot),
        (tok.sot, te, tok.transcribe, tok.no_timestamps, tok.eot),
        (tok.sot, te, tok.transcribe, tok.timestamp_begin, tok.eot),
    }
    assert Labeler(tok, pool[:2]).active is False and Labeler(tok, pool).active is True
