"""benchmarks/peer_finetune.py (PyTorch + PEFT) against our own code on a tiny random model: the same
LoRA layers, schedule, loss and greedy tokens. Skipped without torch, transformers and peft."""

import re

import mlx.core as mx
import numpy as np
import peer_finetune
import pytest

from conftest import tiny_whisper
from models.export.hf import save_hf_folder
from models.inference.decoding import DecodingOptions, decode_batches
from models.tokenizer import tokenizer_for
from models.tuner.batches import Features, collate, label_tokens
from models.tuner.lora import VALID_TARGETS
from models.tuner.trainer import TrainingArgs, build_schedule, loss_fn

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

TEXTS = ["hello there", "a somewhat longer sentence than the first one", "short"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(ours, transformers') of one tiny random model, two blocks per stack, float32."""
    from transformers import WhisperForConditionalGeneration

    ours = tiny_whisper(seed=3, n_audio_layer=2, n_text_layer=2)
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    save_hf_folder(ours, folder, "tiny test model\n", "te")
    theirs = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, theirs


@pytest.fixture(scope="module")
def features(models):
    tokenizer = tokenizer_for(models[0], "te")
    rng = np.random.default_rng(0)
    mels = [rng.standard_normal((3000, 80)).astype(np.float16) for _ in TEXTS]
    return [Features(mel, label_tokens(tokenizer, t, "te"), f"clip{i}") for i, (mel, t) in enumerate(zip(mels, TEXTS))]


def adapted(model, targets, freeze_encoder=False):
    pattern = peer_finetune.peft_target_regex(targets, freeze_encoder)
    return [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]


def test_lora_targets_pick_the_right_transformers_layers(models):
    theirs = models[1]
    assert adapted(theirs, ["attn.query"]) == [
        f"model.{stack}.layers.{i}.self_attn.q_proj" for stack in ("encoder", "decoder") for i in (0, 1)
    ]
    assert adapted(theirs, ["cross_attn.value", "mlp2"], freeze_encoder=True) == [
        f"model.decoder.layers.{i}.{name}" for i in (0, 1) for name in ("encoder_attn.v_proj", "fc2")
    ]
    every = adapted(theirs, list(VALID_TARGETS))
    assert len(every) == 2 * 6 + 2 * 10 and not any(".encoder.layers." in n and "encoder_attn" in n for n in every)
    assert not any(".encoder." in n for n in adapted(theirs, list(VALID_TARGETS), freeze_encoder=True))


def test_schedule_is_ours():
    args = TrainingArgs(iters=30, warmup=5, learning_rate=2e-4)
    ours = build_schedule(args)
    for step in range(args.iters + 2):
        expected = float(ours(mx.array(step)))
        assert peer_finetune.lr_factor(step, 5, 30) * 2e-4 == pytest.approx(expected, rel=1e-5, abs=1e-12)
    assert peer_finetune.lr_factor(0, 0, 10) == 1.0 and peer_finetune.lr_factor(10, 0, 10) == pytest.approx(0)


def test_loss_equals_ours(models, features):
    ours, theirs = models
    batch = collate(features)  # pads to a multiple of 8 as peer_finetune does
    expected, n_tokens = loss_fn(ours, batch.mel, batch.inputs, batch.targets, batch.mask)
    mel, inputs, targets, mask = peer_finetune.to_tensors(features, int(features[0].labels[-1]), "cpu")
    assert int(mask.sum()) == int(n_tokens) == sum(len(f.labels) - 1 for f in features)
    with torch.no_grad():
        loss = peer_finetune.masked_loss(theirs(input_features=mel, decoder_input_ids=inputs).logits, targets, mask)
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)


def test_greedy_tokens_equal_ours(models, features):
    ours, theirs = models
    tokenizer = tokenizer_for(ours, "te")
    options = DecodingOptions(language="te", without_timestamps=True, sample_len=12)
    expected = [r.tokens for r in decode_batches(ours, [f.mel.astype(np.float32) for f in features], options, 8)]
    mel, *_ = peer_finetune.to_tensors(features, tokenizer.eot, "cpu")
    prompt = peer_finetune.prompt_of(tokenizer, features[0].labels)
    assert prompt == tokenizer.sot_sequence_including_notimestamps
    with torch.no_grad():
        tokens = peer_finetune.greedy_batch(theirs, mel, prompt, tokenizer, sample_len=12)
    assert tokens == expected and all(len(t) > 0 for t in tokens)


def test_fresh_adapters_change_nothing_and_only_they_train(models, features):
    import copy

    theirs = copy.deepcopy(models[1])
    mel, inputs, targets, mask = peer_finetune.to_tensors(features, int(features[0].labels[-1]), "cpu")
    with torch.no_grad():
        before = theirs(input_features=mel, decoder_input_ids=inputs).logits
    settings = peer_finetune.PeerSettings(lora_targets=["attn.query", "mlp1"], lora_rank=4)
    peft_model, trainable = peer_finetune.add_lora(theirs, settings)
    with torch.no_grad():
        after = peft_model(input_features=mel, decoder_input_ids=inputs).logits
    assert torch.equal(before, after)
    n_state, rank = 64, 4
    per_stack = 2 * (rank * (n_state + n_state) + rank * (n_state + 4 * n_state))  # 2 blocks: query, mlp1
    assert sum(p.numel() for p in trainable) == 2 * per_stack


class ScriptedDecoder(torch.nn.Module):
    """A stand-in model whose logits at step s for row r are `script[s][r]` ({token: logit}): the
    suppressed token no_speech always scores highest, so the logit rules are what the output shows."""

    def __init__(self, tokenizer, script):
        super().__init__()
        self.tokenizer, self.script, self.step = tokenizer, script, 0

    def get_encoder(self):
        return lambda input_features: type("Out", (), {"last_hidden_state": input_features})()

    def forward(self, encoder_outputs=None, decoder_input_ids=None, use_cache=None, cache=None):
        logits = torch.zeros(len(decoder_input_ids), decoder_input_ids.shape[1], self.tokenizer.encoding.n_vocab)
        for row, scores in enumerate(self.script[self.step]):
            logits[row, -1, self.tokenizer.no_speech] = 100.0
            for token, value in scores.items():
                logits[row, -1, token] = value
        self.step += 1
        return type("Out", (), {"logits": logits, "cache": cache})()


def test_greedy_suppresses_our_tokens_and_stops_at_eot(models):
    tokenizer = tokenizer_for(models[0], "te")
    eot, blank = tokenizer.eot, tokenizer.encode(" ")[0]
    a, b = tokenizer.encode(" a")[0], tokenizer.encode(" b")[0]
    script = [
        [{eot: 9, blank: 8, a: 7}] * 2,  # first step: blank and eot suppressed as well
        [{eot: 9, b: 1}, {b: 9}],
        [{b: 9}, {eot: 9}],  # row 0 has finished: it stays at eot
    ]
    mel = torch.zeros(2, 80, 3000)
    prompt = tokenizer.sot_sequence_including_notimestamps
    tokens = peer_finetune.greedy_batch(ScriptedDecoder(tokenizer, script), mel, prompt, tokenizer, sample_len=5)
    assert tokens == [[a], [a, b]]
