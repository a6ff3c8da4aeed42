"""GPU transcription speed: our encoder + greedy decode against transformers' Whisper generate.

Real whisper-base weights (138 MB) are more than one device call carries, so both sides use
random weights of the real shapes (float16) and a forced length: every run generates exactly
--tokens tokens (ours: end-of-text suppressed and sample_len = tokens; transformers:
min_new_tokens = max_new_tokens = tokens). That compares the encoder pass and the per-token
decoder cost, not transcripts. Greedy, no timestamps, batch of one 30 s window, language given.

    python benchmarks/gpu_transcribe.py --sizes base,medium --tokens 100

Writes gpu_transcribe.json / .md under --out-dir or $OUT when set.
"""

import argparse
import sys

from common import (
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
from flops import SHAPES, encoder_forward

SOT_SEQUENCE = [50258, 50259, 50359, 50363]  # <|startoftranscript|><|en|><|transcribe|><|notimestamps|>
EOT = 50257


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="base,medium")
    p.add_argument("--frameworks", default="mlx,torch")
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--torch-python", default=sys.executable)
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--deadline", type=float, default=None, help="Unix time: start nothing within 30 s of it")
    p.add_argument("--smoke", action="store_true", help="allow CPU, skip PyTorch when missing")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--name", default="gpu_transcribe")
    p.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    return p


def random_mel(shape, batch: int):
    import numpy as np

    return np.random.default_rng(0).standard_normal((batch, 3000, shape.n_mels), dtype=np.float32)


def mlx_worker(args) -> dict:
    import mlx.core as mx

    from models.inference.decoding import DecodingOptions, decode
    from models.whisper import ModelDimensions, Whisper

    device = str(mx.default_device())
    if not args.smoke and "gpu" not in device:
        raise SystemExit(f"MLX runs on {device}; this benchmark needs the GPU (or pass --smoke)")
    shape, dtype = SHAPES[args.size], getattr(mx, args.dtype)
    mx.random.seed(0)
    model = Whisper(ModelDimensions(**shape.dims()), dtype)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    model.eval()
    mel = mx.array(random_mel(shape, args.batch)).astype(dtype)
    features = model.embed_audio(mel)
    mx.eval(features)
    # "-1": the usual non-speech symbols; the end of text too, so that every run has `tokens` tokens.
    options = DecodingOptions(
        language="en", without_timestamps=True, sample_len=args.tokens, suppress_tokens=f"-1,{EOT}"
    )
    produced = []

    def run_decode():
        results = decode(model, features, options)
        produced.append(len(results[0].tokens))

    def run_encoder():
        mx.eval(model.embed_audio(mel))
        mx.synchronize()

    encoder = time_calls(run_encoder, args.warmup, args.runs)
    decoding = time_calls(run_decode, args.warmup, args.runs)
    mx.reset_peak_memory()
    run_decode()
    return {
        "device": device,
        "mlx": mx.__version__,
        "encoder": summary(encoder),
        "decode": summary(decoding),
        "tokens": produced[-1],
        "peak_gb": mx.get_peak_memory() / 1e9,
    }


def torch_worker(args) -> dict:
    setup = torch_setup(args.smoke)
    if isinstance(setup, dict):
        return setup
    torch, device, sync = setup
    import transformers

    cuda = device.type == "cuda"
    shape, dtype = SHAPES[args.size], getattr(torch, args.dtype)
    model = transformers_whisper(
        shape,
        "sdpa",
        device,
        dtype,
        decoder_start_token_id=SOT_SEQUENCE[0],
        eos_token_id=EOT,
        pad_token_id=EOT,
        bos_token_id=EOT,
    ).eval()
    mel = torch.from_numpy(random_mel(shape, args.batch)).to(device).transpose(1, 2).contiguous().to(dtype)
    prompt = torch.tensor([SOT_SEQUENCE] * args.batch, device=device)
    produced = []

    @torch.no_grad()
    def run_decode():
        out = model.generate(
            input_features=mel,
            decoder_input_ids=prompt,
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            do_sample=False,
            num_beams=1,
        )
        sync()
        produced.append(out.shape[-1])

    @torch.no_grad()
    def run_encoder():
        model.model.encoder(mel)
        sync()

    encoder = time_calls(run_encoder, args.warmup, args.runs)
    generate = time_calls(run_decode, args.warmup, args.runs)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run_decode()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "encoder": summary(encoder),
        "generate (encoder + decode)": summary(generate),
        "tokens": produced[-1],
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
    }


def derived(result: dict, size: str, batch: int, tokens: int) -> dict:
    """Per-token decoder time: ours times decode alone; transformers' generate includes the encoder."""
    if "encoder" not in result:
        return result
    enc = result["encoder"]["median_s"]
    if "decode" in result:
        decode_s = result["decode"]["median_s"]
        result["total_s"] = enc + decode_s
    else:
        result["total_s"] = result["generate (encoder + decode)"]["median_s"]
        decode_s = result["total_s"] - enc
    n = result.get("tokens") or tokens
    result["ms_per_token"] = 1e3 * decode_s / n
    result["encoder_tflops"] = batch * encoder_forward(SHAPES[size]) / enc / 1e12
    result["real_time_factor"] = result["total_s"] / 30.0 / batch
    return result


def table(rows: list) -> str:
    body = []
    for r in rows:
        ok = "ms_per_token" in r
        body.append(
            [
                r["size"],
                r["batch"],
                r["framework"],
                f"{1e3 * r['encoder']['median_s']:.1f}" if ok else "–",
                f"{r['encoder_tflops']:.0f}" if ok else "–",
                f"{r['ms_per_token']:.2f}" if ok else "–",
                r.get("tokens", "–"),
                f"{r['total_s']:.3f}" if ok else "–",
                f"{r['real_time_factor']:.4f}" if ok else "–",
                (r.get("error") or r.get("skipped") or "")[:80],
            ]
        )
    return markdown_table(
        [
            "size",
            "batch",
            "framework",
            "encoder ms",
            "encoder TFLOP/s",
            "decode ms/token",
            "tokens",
            "encoder + decode s",
            "RTF (per 30 s window)",
            "note",
        ],
        body,
    )


def main() -> int:
    args = build_parser().parse_args()
    if args.worker is not None:
        return worker_main(mlx_worker if args.worker == "mlx" else torch_worker, args)
    rows, folder = [], out_dir(args.out_dir)
    for size in [s for s in args.sizes.split(",") if s]:
        for batch in [int(b) for b in args.batch_sizes.split(",") if b]:
            for framework in [f for f in args.frameworks.split(",") if f]:
                row = {"framework": framework, "size": size, "batch": batch}
                if seconds_left(args.deadline) < 30:
                    rows.append(dict(row, skipped="deadline reached"))
                    continue
                python = sys.executable if framework == "mlx" else args.torch_python
                cmd = worker_command(
                    python,
                    __file__,
                    framework,
                    size=size,
                    batch=batch,
                    tokens=args.tokens,
                    dtype=args.dtype,
                    warmup=args.warmup,
                    runs=args.runs,
                    smoke=bool(args.smoke),
                )
                result = run_worker(cmd, min(args.timeout, seconds_left(args.deadline)))
                rows.append(derived(dict(row, **result), size, batch, args.tokens))
                write_results(folder, args.name, {"args": vars(args), "rows": rows}, table(rows))
    write_results(folder, args.name, {"args": vars(args), "rows": rows}, table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
