"""LoRA training-step throughput: our MLX Trainer against PyTorch + PEFT on the same shapes.

Every (framework, size, batch) runs in its own subprocess, so peak memory is clean and one
out-of-memory configuration does not end the run. Workload (the anchor's): random weights of
the real Whisper sizes in bfloat16, LoRA rank 8 (alpha 16) on attn.query / attn.value of every
encoder and decoder block and cross_attn.query / cross_attn.value of every decoder block, 30 s
of mel frames, 64 target tokens per clip, AdamW, gradient clipping at 1.0, loss in float32.

    python benchmarks/train_step.py --sizes medium --batch-sizes 8,32 --steps 10
    python benchmarks/train_step.py --sizes tiny --batch-sizes 2 --steps 2 --smoke   # CPU check

Writes train_step.json / train_step.md under --out-dir or $OUT when set.
"""

import argparse
import sys
import warnings
from typing import Optional

from common import (
    fmt,
    markdown_table,
    out_dir,
    run_worker,
    seconds_left,
    summary,
    time_calls,
    torch_setup,
    transformers_whisper,
    worker_command,
    worker_main,
    write_results,
)
from flops import DEFAULT_TARGETS, H100_BF16_DENSE, SHAPES, lora_step_flops

# mlx-unfused: our step without the query padding that keeps attention's backward on cuDNN's fused
# kernel (models/kernels.py, cudnn_query_padding): MLX's unfused backward, the A/B.
FRAMEWORKS = ("mlx", "mlx-unfused", "torch-sdpa", "torch-eager")
LORA_RANK, LORA_ALPHA, LEARNING_RATE = 8, 16.0, 1e-4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="medium", help="comma list of " + ",".join(SHAPES))
    p.add_argument("--batch-sizes", default="8,32")
    p.add_argument("--frameworks", default="mlx,torch-sdpa", help="comma list of " + ",".join(FRAMEWORKS))
    p.add_argument("--tokens", type=int, default=64, help="target tokens per clip")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="base weights (float32 for CPU smoke runs: MLX's CPU bfloat16 matmul is slow)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--stages", action="store_true", help="also time forward-only and uncompiled stages")
    p.add_argument("--stage-steps", type=int, default=5)
    p.add_argument(
        "--kernels",
        action="store_true",
        help="MLX: GPU time per kernel over --stage-steps steps (needs torch, for its CUDA profiler)",
    )
    p.add_argument("--torch-python", default=sys.executable, help="interpreter with torch/transformers/peft")
    p.add_argument("--timeout", type=float, default=300, help="seconds per configuration")
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="Unix time: start no configuration within 30 s of it, and stop a running one there",
    )
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE / 1e12, help="for MFU (H100 SXM bf16 dense)")
    p.add_argument("--smoke", action="store_true", help="allow CPU and skip PyTorch when it is not installed")
    p.add_argument("--out-dir", default=None, help="default: $OUT when set")
    p.add_argument("--name", default="train_step", help="result file stem")
    # worker mode (internal)
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    return p


def random_batch_numpy(shape, batch: int, tokens: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    mel = rng.standard_normal((batch, 3000, shape.n_mels), dtype=np.float32)  # (B, frames, n_mels)
    ids = rng.integers(0, shape.n_vocab - 1, size=(batch, tokens + 1), dtype=np.int32)
    return mel, ids[:, :-1], ids[:, 1:]


# ----------------------------------------------------------------------------- MLX worker
def mlx_worker(args) -> dict:
    import mlx.core as mx
    import mlx.nn as nn

    from models import kernels
    from models.backend import limit_cuda_queue_memory
    from models.tokenizer import get_tokenizer
    from models.tuner.batches import Batch
    from models.tuner.lora import LoRAConfig, linear_to_lora_layers
    from models.tuner.trainer import Trainer, TrainingArgs, loss_fn
    from models.whisper import ModelDimensions, Whisper

    limit_cuda_queue_memory()  # as lora.py does

    if args.worker == "mlx-unfused":
        kernels.CUDNN_BLOCK = 1  # every length is a multiple of 1: no padding
    device = str(mx.default_device())
    if not args.smoke and "gpu" not in device:
        raise SystemExit(f"MLX runs on {device}; the benchmark needs the GPU (or pass --smoke)")
    shape = SHAPES[args.size]
    mx.random.seed(0)
    dtype = getattr(mx, args.dtype)
    model = Whisper(ModelDimensions(**shape.dims()), dtype=dtype)
    model.set_dtype(dtype)
    linear_to_lora_layers(model, LoRAConfig(rank=LORA_RANK, alpha=LORA_ALPHA, targets=list(DEFAULT_TARGETS)))
    mx.eval(model.parameters())
    model.train()
    tokenizer = get_tokenizer(True, num_languages=shape.n_vocab - 51765 - 1)
    trainer = Trainer(
        model, tokenizer, TrainingArgs(batch_size=args.batch, learning_rate=LEARNING_RATE), log=lambda *a, **k: None
    )
    mel, inputs, targets = random_batch_numpy(shape, args.batch, args.tokens)
    mask = mx.ones(inputs.shape, dtype=mx.float32)
    batch = Batch(
        mel=mx.array(mel),
        inputs=mx.array(inputs),
        targets=mx.array(targets),
        mask=mask,
        n_tokens=int(mask.size),
        sources=[],
    )
    mx.eval(batch.mel, batch.inputs, batch.targets, batch.mask)
    weights_gb = mx.get_active_memory() / 1e9

    def step():
        loss, n_tokens = trainer.train_step([batch])
        mx.eval(loss, n_tokens, model.state, trainer.optimizer.state)
        mx.synchronize()

    mx.reset_peak_memory()
    times = time_calls(step, args.warmup, args.steps)
    result = {
        "device": device,
        "mlx": mx.__version__,
        "weights_gb": weights_gb,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "step": summary(times),
    }
    if args.stages:
        result["stages"] = mlx_stages(args, model, trainer, batch, loss_fn, nn)
    if args.kernels:
        result["kernels"] = kernel_profile(step, args.stage_steps, result["step"]["median_s"])
    return result


def kernel_profile(step, steps: int, step_s: float, top: int = 30) -> dict:
    """GPU time per step of the kernels `step` launches, read through PyTorch's profiler (CUPTI sees
    every CUDA kernel of the process, MLX's included): top kernels and the GPU's busy share."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return {"error": "torch is not installed (its profiler reads the CUDA kernels)"}
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
    except (AssertionError, RuntimeError) as error:  # no CUDA for the profiler: the step's numbers stand
        return {"error": f"{type(error).__name__}: {error}"}
    kernels = []
    for event in prof.key_averages():
        total_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total_us:
            kernels.append(
                {"name": event.key[:120], "ms_per_step": total_us / 1e3 / steps, "calls_per_step": event.count / steps}
            )
    kernels.sort(key=lambda k: -k["ms_per_step"])
    busy_ms = sum(k["ms_per_step"] for k in kernels)
    return {"busy_ms_per_step": busy_ms, "step_ms": 1e3 * step_s, "top": kernels[:top]}


def mlx_stages(args, model, trainer, batch, loss_fn, nn) -> dict:
    """Encoder forward, decoder forward (+loss), whole forward, forward+backward, uncompiled step."""
    import mlx.core as mx
    import mlx.optimizers as optim

    mel = batch.mel.astype(trainer.dtype)
    features = model.embed_audio(mel)
    mx.eval(mel, features)
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def uncompiled_step():
        (loss, _), grads = loss_and_grad(model, mel, batch.inputs, batch.targets, batch.mask)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        trainer.optimizer.update(model, grads)
        mx.eval(loss, model.state, trainer.optimizer.state)

    stages = {
        "encoder_forward": lambda: mx.eval(model.embed_audio(mel)),
        "decoder_forward": lambda: mx.eval(loss_fn(model, features, batch.inputs, batch.targets, batch.mask)[0]),
        "forward": lambda: mx.eval(loss_fn(model, mel, batch.inputs, batch.targets, batch.mask)[0]),
        "forward_backward": lambda: mx.eval(loss_and_grad(model, mel, batch.inputs, batch.targets, batch.mask)),
        "step_uncompiled": uncompiled_step,
    }
    out = {}
    for name, fn in stages.items():
        mx.clear_cache()
        mx.reset_peak_memory()
        try:
            times = time_calls(lambda fn=fn: (fn(), mx.synchronize()), 2, args.stage_steps)
        except Exception as error:  # out of memory in one stage keeps the others
            out[name] = {"error": f"{type(error).__name__}: {str(error)[:120]}"}
            continue
        out[name] = dict(summary(times), peak_gb=mx.get_peak_memory() / 1e9)
        print(
            f"  mlx {args.size} b{args.batch} {name}: {1e3 * out[name]['median_s']:.1f} ms, "
            f"peak {out[name]['peak_gb']:.2f} GB",
            file=sys.stderr,
            flush=True,
        )
    return out


# ----------------------------------------------------------------------------- PyTorch worker
def torch_worker(args) -> dict:
    setup = torch_setup(args.smoke, "peft")
    if isinstance(setup, dict):
        return setup
    torch, device, sync = setup
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore", category=FutureWarning)
    cuda = device.type == "cuda"
    shape, attn, dtype = SHAPES[args.size], args.worker.split("-", 1)[1], getattr(torch, args.dtype)
    model = transformers_whisper(shape, attn, device, dtype)
    lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.01)
    mel, inputs, targets = random_batch_numpy(shape, args.batch, args.tokens)
    mel = torch.from_numpy(mel).to(device).transpose(1, 2).contiguous().to(dtype)  # (B, n_mels, frames)
    inputs = torch.from_numpy(inputs).long().to(device)
    targets = torch.from_numpy(targets).long().to(device)

    def loss_of_batch():
        logits = model(input_features=mel, decoder_input_ids=inputs, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def step():
        loss = loss_of_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    weights_gb = torch.cuda.memory_allocated() / 1e9 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = time_calls(step, args.warmup, args.steps)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "attn": attn,
        "lora_dtype": str(trainable[0].dtype),
        "weights_gb": weights_gb,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "step": summary(times),
    }
    if args.stages:
        encoder = model.get_base_model().model.encoder
        stages = {"encoder_forward": lambda: encoder(mel), "forward": loss_of_batch}
        result["stages"] = {}
        for name, fn in stages.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                with torch.no_grad():
                    times = time_calls(lambda fn=fn: (fn(), sync()), 2, args.stage_steps)
            except Exception as error:  # out of memory in one stage keeps the others
                result["stages"][name] = {"error": f"{type(error).__name__}: {str(error)[:120]}"}
                continue
            result["stages"][name] = dict(
                summary(times), peak_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else None
            )
    return result


# ----------------------------------------------------------------------------- parent
def add_rates(result: dict, size: str, batch: int, tokens: int, peak_tflops: float) -> dict:
    if "step" not in result:
        return result
    flops = lora_step_flops(SHAPES[size], batch, tokens)
    seconds = result["step"]["median_s"]
    result.update(
        samples_per_s=batch / seconds,
        tokens_per_s=batch * tokens / seconds,
        step_tflop=flops["total"] / 1e12,
        tflops=flops["total"] / seconds / 1e12,
        mfu=flops["total"] / seconds / (peak_tflops * 1e12),
    )
    stage_flops = {
        "encoder_forward": flops["encoder_forward"],
        "forward": flops["forward"],
        "decoder_forward": flops["decoder_forward"],
        "forward_backward": flops["total"],
    }
    for name, stage in result.get("stages", {}).items():
        if name in stage_flops and "median_s" in stage:
            stage["tflops"] = stage_flops[name] / stage["median_s"] / 1e12
    return result


def run_all(args, save) -> list:
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    for value, known in ((sizes, SHAPES), (frameworks, FRAMEWORKS)):
        unknown = [v for v in value if v not in known]
        if unknown:
            raise SystemExit(f"unknown {unknown}; choose from {list(known)}")
    rows = []
    for size in sizes:
        for batch in batches:
            for framework in frameworks:
                row = {"framework": framework, "size": size, "batch": batch}
                if seconds_left(args.deadline) < 30:
                    rows.append(dict(row, skipped="deadline reached"))
                    continue
                python = sys.executable if framework.startswith("mlx") else args.torch_python
                cmd = worker_command(
                    python,
                    __file__,
                    framework,
                    size=size,
                    batch=batch,
                    tokens=args.tokens,
                    dtype=args.dtype,
                    warmup=args.warmup,
                    steps=args.steps,
                    stage_steps=args.stage_steps,
                    stages=bool(args.stages),
                    smoke=bool(args.smoke),
                    kernels=bool(args.kernels),
                )
                result = run_worker(cmd, min(args.timeout, seconds_left(args.deadline)))
                rows.append(add_rates(dict(row, **result), size, batch, args.tokens, args.peak_tflops))
                print(f"{framework} {size} b{batch}: {one_line(rows[-1])}", file=sys.stderr, flush=True)
                save(rows)  # after every configuration: a killed run keeps what it measured
    return rows


def one_line(row: dict) -> str:
    if "samples_per_s" not in row:
        return row.get("error") or row.get("skipped") or "no result"
    return (
        f"{row['samples_per_s']:.2f} samples/s, {row['tokens_per_s']:.0f} tokens/s, "
        f"peak {fmt(row.get('peak_gb'), '.2f')} GB, {row['tflops']:.3g} TFLOP/s, MFU {100 * row['mfu']:.1f}%"
    )


STAGES = ["encoder_forward", "decoder_forward", "forward", "forward_backward", "step_uncompiled"]


def _stage_cell(stage: Optional[dict]) -> str:
    if stage is None:
        return "–"
    if "error" in stage:
        return "error"
    tflops = f", {stage['tflops']:.0f} TFLOP/s" if stage.get("tflops") else ""
    return f"{1e3 * stage['median_s']:.1f} ({fmt(stage.get('peak_gb'), '.1f')} GB{tflops})"


def tables(rows: list, peak_tflops: float) -> str:
    main = [
        [
            r["size"],
            r["batch"],
            r["framework"],
            fmt(r.get("samples_per_s"), ".2f"),
            fmt(r.get("tokens_per_s"), ".0f"),
            fmt(r.get("peak_gb"), ".2f"),
            fmt(1e3 * r["step"]["median_s"] if "step" in r else None, ".1f"),
            fmt(r.get("tflops"), ".3g"),
            fmt(100 * r["mfu"] if "mfu" in r else None, ".1f"),
            (r.get("error") or r.get("skipped") or "")[:80],
        ]
        for r in rows
    ]
    text = markdown_table(
        [
            "size",
            "batch",
            "framework",
            "samples/s",
            "target tokens/s",
            "peak GB",
            "step ms",
            "TFLOP/s",
            f"MFU % (of {peak_tflops:.0f})",
            "note",
        ],
        main,
    )
    for r in rows:
        kernels = r.get("kernels", {})
        if kernels.get("top"):
            text += (
                f"\n\nGPU kernels, {r['framework']} {r['size']} batch {r['batch']}: busy "
                f"{kernels['busy_ms_per_step']:.1f} ms of a {kernels['step_ms']:.1f} ms step (profiled)\n\n"
            )
            text += markdown_table(
                ["kernel", "ms per step", "share of busy", "calls per step"],
                [
                    [
                        k["name"][:70],
                        f"{k['ms_per_step']:.2f}",
                        f"{100 * k['ms_per_step'] / kernels['busy_ms_per_step']:.1f}%",
                        f"{k['calls_per_step']:.0f}",
                    ]
                    for k in kernels["top"][:15]
                ],
            )
    staged = [r for r in rows if r.get("stages") and "step" in r]
    if not staged:
        return text
    stage_rows = []
    for r in staged:
        forward = r["stages"].get("forward", {})
        backward = r["step"]["median_s"] - forward["median_s"] if "median_s" in forward else None
        stage_rows.append(
            [
                r["size"],
                r["batch"],
                r["framework"],
                *(_stage_cell(r["stages"].get(n)) for n in STAGES),
                f"{1e3 * r['step']['median_s']:.1f}",
                fmt(1e3 * backward if backward else None, ".1f"),
            ]
        )
    text += (
        "\n\nStages, ms (peak GB, TFLOP/s): forward-only stages run without gradients; "
        "backward+update = step - forward\n\n"
    )
    return text + markdown_table(
        ["size", "batch", "framework", *STAGES, "step (MLX: compiled)", "backward+update"], stage_rows
    )


def main() -> int:
    args = build_parser().parse_args()
    if args.worker is not None:
        return worker_main(mlx_worker if args.worker.startswith("mlx") else torch_worker, args)
    folder = out_dir(args.out_dir)

    def save(rows):
        payload = {
            "args": {k: v for k, v in vars(args).items() if k not in ("worker", "size", "batch")},
            "flop_formula": "benchmarks/flops.py lora_step_flops",
            "rows": rows,
        }
        write_results(folder, args.name, payload, tables(rows, args.peak_tflops))

    rows = run_all(args, save)
    save(rows)
    print(tables(rows, args.peak_tflops))
    failed = [r for r in rows if "error" in r and "skipped" not in r]
    return 1 if failed and not args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
