"""Smoke tests of benchmarks/: the FLOP counter, and each MLX worker on a micro model (CPU, seconds)."""

from argparse import Namespace

import pytest

import cpu_speedups
import flops
import gpu_transcribe
import train_step
import transcribe_speed
from conftest import ROOT, tiny_whisper

# 30 s of audio through a one-block model 64 wide: the real sequence lengths, tiny matrices.
MICRO = flops.Shape(n_mels=80, n_state=64, n_head=2, n_layer=1, n_vocab=51865)


@pytest.mark.parametrize(
    "size, forward, backward",
    [
        # torch.utils.flop_counter.FlopCounterMode on transformers' Whisper + PEFT (eager attention, batch 1,
        # 64 tokens, LoRA r=8 on q_proj/v_proj), forward then loss.backward(): the same numbers exactly.
        ("tiny", 44_928_516_096, 54_583_971_840),
        ("base", 104_713_682_944, 126_162_550_784),
    ],
)
def test_lora_step_flops_match_pytorch_flop_counter(size, forward, backward):
    counted = flops.lora_step_flops(flops.SHAPES[size], batch=1, n_tokens=64)
    assert counted["forward"] == forward
    assert counted["backward"] == backward
    assert flops.lora_step_flops(flops.SHAPES[size], batch=8)["total"] == 8 * (forward + backward)


def test_encoder_flops_match_the_device_readme():
    # ../shared/device/README.md: medium, batch 16, 61.9 ms at 291 TFLOP/s
    assert 16 * flops.encoder_forward(flops.SHAPES["medium"]) / 61.9e-3 / 1e12 == pytest.approx(291, rel=0.02)


def test_train_step_mlx_worker_times_a_step_and_its_stages(monkeypatch):
    monkeypatch.setitem(flops.SHAPES, "micro", MICRO)
    args = Namespace(
        size="micro",
        batch=2,
        tokens=8,
        dtype="float32",
        warmup=1,
        steps=2,
        stages=True,
        stage_steps=1,
        smoke=True,
        worker="mlx",
        kernels=False,
    )
    result = train_step.mlx_worker(args)
    assert result["step"]["n"] == 2 and result["step"]["median_s"] > 0
    assert result["peak_gb"] > result["weights_gb"] > 0
    assert set(result["stages"]) == set(train_step.STAGES)
    row = train_step.add_rates(dict(result, framework="mlx", size="micro", batch=2), "micro", 2, 8, 989.0)
    assert row["tokens_per_s"] == pytest.approx(8 * row["samples_per_s"])
    assert row["mfu"] == pytest.approx(row["tflops"] / 989.0)
    table = train_step.tables([row, {"framework": "torch-sdpa", "size": "micro", "batch": 2, "error": "OOM"}], 989)
    assert "| micro | 2 | mlx |" in table and "OOM" in table and "backward+update" in table


def test_gpu_transcribe_mlx_worker_forces_the_token_count(monkeypatch):
    monkeypatch.setitem(flops.SHAPES, "micro", MICRO)
    args = Namespace(size="micro", batch=1, tokens=4, dtype="float32", warmup=1, runs=1, smoke=True)
    result = gpu_transcribe.mlx_worker(args)
    assert result["tokens"] == 4  # end of text suppressed: every run decodes exactly --tokens
    row = gpu_transcribe.derived(dict(result, framework="mlx", size="micro", batch=1), "micro", 1, 4)
    assert row["ms_per_token"] > 0 and row["total_s"] > row["encoder"]["median_s"]


def test_benchmark_clip_is_28_seconds_of_en_read_speech():
    audio, names = transcribe_speed.build_clip()
    assert len(audio) == 28 * 16000 and audio.dtype.name == "float32"
    assert len(names) >= 3 and all(n.startswith("hifitts6097_") for n in names)
    assert abs(audio[: 16000 * 20]).max() > 0.05  # speech, not silence


def test_cpu_speedups_imports_a_git_revision_beside_the_working_tree(tmp_path):
    import models.whisper
    from models.inference import transcribe

    folder = cpu_speedups.revision_copy("HEAD", tmp_path)
    assert (folder / "whisper.py").is_file() and (folder / "inference" / "transcribe.py").is_file()
    revision = cpu_speedups.load_package("revision_models", folder)
    assert revision.whisper.__file__.startswith(str(tmp_path))
    assert revision.transcribe.__file__.startswith(str(tmp_path))
    assert revision.whisper.Whisper is not models.whisper.Whisper
    working_tree = cpu_speedups.load_package("models", ROOT / "models")
    assert working_tree.whisper is models.whisper and working_tree.transcribe is transcribe
    with revision.buffer_cache(tiny_whisper()):  # the CPU buffer cache transcribe() runs under
        pass
