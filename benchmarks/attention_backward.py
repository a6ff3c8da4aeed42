"""Attention's backward pass on the GPU: MLX's unfused fallback against cuDNN's fused kernel.

MLX's CUDA backend differentiates `mx.fast.scaled_dot_product_attention` with cuDNN's fused
backward only when the query length is a multiple of 128. Whisper's lengths (1500 audio
frames, 64-token batches) are not, so training fell back to the unfused product, which keeps
every (batch, heads, T_q, T_k) weight matrix. `models.kernels.cudnn_query_padding` says how
many zero queries `models.kernels.attention` appends in training. This script times
value-and-gradient of `kernels.attention` both ways (training=False: no padding, training=True:
padding) for the three attentions of whisper-medium and checks that the gradients agree.

    python benchmarks/attention_backward.py --batch 8

Writes attention_backward.json / .md under --out-dir or $OUT when set.
"""

import argparse
import sys
from functools import partial

from common import markdown_table, out_dir, summary, time_calls, write_results

# (name, query length, key length, mask) for whisper-medium: 16 heads of 64.
CASES = [
    ("encoder self-attention", 1500, 1500, None),
    ("decoder self-attention", 64, 64, "causal"),
    ("decoder cross-attention", 64, 1500, None),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--name", default="attention_backward")
    return p


def measure(args, t_q: int, t_k: int, mask) -> dict:
    import mlx.core as mx

    from models import kernels

    dtype, scale = getattr(mx, args.dtype), args.head_dim**-0.5
    mx.random.seed(0)
    # (batch, heads, T, head_dim), as MultiHeadAttention hands them to kernels.attention
    q = mx.random.normal((args.batch, args.heads, t_q, args.head_dim)).astype(dtype)
    k = mx.random.normal((args.batch, args.heads, t_k, args.head_dim)).astype(dtype)
    v = mx.random.normal((args.batch, args.heads, t_k, args.head_dim)).astype(dtype)
    cotangent = mx.random.normal(q.shape).astype(mx.float32)

    def loss(q, k, v, training: bool):
        return (kernels.attention(q, k, v, scale, mask, training).astype(mx.float32) * cotangent).sum()

    result = {}
    for mode, train in (("unfused", False), ("fused", True)):
        grad = mx.grad(partial(loss, training=train), argnums=(0, 1, 2))
        grads = grad(q, k, v)
        mx.eval(grads)
        mx.clear_cache()
        mx.reset_peak_memory()
        times = time_calls(lambda grad=grad: (mx.eval(grad(q, k, v)), mx.synchronize()), 2, args.steps)
        result[mode] = dict(
            summary(times),
            peak_gb=mx.get_peak_memory() / 1e9,
            padded=bool(kernels.cudnn_query_padding(t_q, dtype, mask, train)),
        )
        result[mode]["grads"] = grads
    differences = []
    for a, b in zip(result["unfused"].pop("grads"), result["fused"].pop("grads")):
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        differences.append((mx.abs(a - b).max() / mx.maximum(mx.abs(a).max(), 1e-12)).item())
    result["max_relative_difference_qkv"] = differences
    return result


def main() -> int:
    args = build_parser().parse_args()
    import mlx.core as mx

    rows, payload = [], {"args": vars(args), "device": str(mx.default_device()), "mlx": mx.__version__}
    for name, t_q, t_k, mask in CASES:
        result = measure(args, t_q, t_k, mask)
        payload[name] = result
        unfused, fused = result["unfused"], result["fused"]
        rows.append(
            [
                name,
                f"{t_q}×{t_k}",
                f"{1e3 * unfused['median_s']:.2f}",
                f"{1e3 * fused['median_s']:.2f}",
                f"{unfused['median_s'] / fused['median_s']:.2f}×",
                f"{unfused['peak_gb']:.2f}",
                f"{fused['peak_gb']:.2f}",
                "yes" if fused["padded"] else "no",
                " / ".join(f"{x:.1e}" for x in result["max_relative_difference_qkv"]),
            ]
        )
        print(name, rows[-1], flush=True)
    table = markdown_table(
        [
            "attention",
            "T_q×T_k",
            "unfused ms",
            "fused ms",
            "speed-up",
            "unfused peak GB",
            "fused peak GB",
            "padded",
            "max rel. diff dq / dk / dv",
        ],
        rows,
    )
    write_results(out_dir(args.out_dir), args.name, payload, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
