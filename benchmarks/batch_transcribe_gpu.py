"""Batched transcription on the GPU: our transcribe.py path against transformers' ASR pipeline.

On the GPU machine (no internet; torch, transformers 5.x and mlx-cuda installed):

    python benchmarks/batch_transcribe_gpu.py --model ../shared/models/whisper-base-mlx \\
        --hf-model /tmp/whisper-base-hf --audio ../shared/data/en-read --long --out-dir $OUT
    python benchmarks/batch_transcribe_gpu.py --random-medium --limit 32 --model ../shared/models/whisper-base-mlx \\
        --hf-model /tmp/whisper-base-hf --audio ../shared/data/en-read --long 300 --out-dir $OUT

and on a CPU, to check that it runs (the 2 shortest of the first 20 clips, batch sizes 1 and 2,
float32, no warm-up):

    python benchmarks/batch_transcribe_gpu.py --smoke --out-dir outputs/batch_transcribe_smoke

--hf-model is a transformers folder of the same weights; when it does not exist it is written from
--model first (models.export.hf.save_hf_folder: what `fuse.py --export-hf` writes, which needs an
--adapter-path). Both sides get the same 16 kHz samples, decoded from the files beforehand (file
reading is not timed; log-mel features are, on both sides).

Workloads, each at every --batch-sizes value, both sides in the same run, one worker process per side:
- clips: the --audio files (first --limit). Ours: batch 1 is `Transcriber.run` file by file (what
  `transcribe.py --batch-size 1` runs), batch B is `transcribe_many(batch_size=B)` (`--batch-size B`).
  Theirs: pipeline("automatic-speech-recognition", model=HF, device=0, dtype=float16)(clips, batch_size=B).
- long (--long [SECONDS]): the clips joined with 0.5 s pauses into one recording. Ours: the seek loop
  (batch 1, the default) and `--chunked` at every batch size (fixed 30 s windows); theirs:
  chunk_length_s=30 (its default stride: 30 s windows every 20 s, so 1.5 times our window count).

Settings on both sides: language en, task transcribe, greedy (temperature 0 only, no fallback),
no timestamps (--timestamps: both with), float16 on the GPU (float32 with --smoke). Real mode reports
WER against the folder's metadata.csv and, per batch size, how many texts equal that side's batch-1 text.

--random-medium: whisper-medium shapes with random weights on both sides, timing only: every window
decodes exactly --tokens tokens (ours: end of text suppressed and sample_len = tokens; theirs:
min_new_tokens = max_new_tokens = tokens), so both do the same work. The tokenizer, feature extractor
and generation config come from --hf-model. (With --smoke the shapes are whisper-tiny's.)

Writes NAME.json and NAME.md (audio seconds per second; ours/theirs at each side's best batch) to
--out-dir or $OUT.
"""

import argparse
import csv
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common import SHARED, markdown_table, out_dir, run_worker, torch_setup, transformers_whisper, worker_command
from flops import SHAPES

EOT, SOT = 50257, 50258
GAP_SECONDS = 0.5
AUDIO_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg", ".m4a")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models" / "whisper-base-mlx"), help="MLX model folder")
    p.add_argument("--hf-model", default=None, help="transformers folder (written from --model when missing)")
    p.add_argument("--audio", nargs="+", default=[str(SHARED / "data" / "en-read")], help="audio folders or files")
    p.add_argument("--limit", type=int, default=None, help="use the first N clips (sorted by path)")
    p.add_argument(
        "--long", type=float, nargs="?", const=float("inf"), default=None, metavar="SECONDS",
        help="also one long recording: the clips joined with 0.5 s pauses (up to SECONDS; default all)",
    )  # fmt: skip
    p.add_argument("--batch-sizes", default="1,4,8,16,32")
    p.add_argument("--timestamps", action="store_true", help="decode with timestamps on both sides")
    p.add_argument("--random-medium", action="store_true", help="random whisper-medium weights, forced --tokens")
    p.add_argument("--tokens", type=int, default=100, help="tokens per window with --random-medium")
    p.add_argument("--torch-python", default=sys.executable, help="interpreter with torch + transformers")
    p.add_argument("--sides", default="ours,theirs")
    p.add_argument("--timeout", type=float, default=540, help="seconds per worker (one per side)")
    p.add_argument("--smoke", action="store_true", help="CPU check: 2 clips, batch sizes 1,2, float32")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--name", default=None, help="default: batch_transcribe[_medium]")
    p.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    return p


# --- the audio both sides get ----------------------------------------------------------------------


def find_clips(inputs) -> list:
    files = []
    for item in map(Path, inputs):
        found = sorted(f for f in item.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES) if item.is_dir() else [item]
        files += [f for f in found if f not in files]
    return files


def references(files) -> dict:
    """{file: transcript} from metadata.csv files beside the clips (file_name + transcription/text)."""
    refs = {}
    for folder in {f.parent for f in files}:
        if (folder / "metadata.csv").is_file():
            with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    text = row.get("transcription", row.get("text"))
                    if text is not None:
                        refs[str(folder / row["file_name"])] = text
    return refs


def write_workload(args, folder: Path) -> dict:
    """Decode the clips once, save them (and the long recording) for both workers; return the plan."""
    from models.audio import SAMPLE_RATE, load_audio

    files = find_clips(args.audio)
    if args.smoke:  # the two shortest of the first 20: PyTorch here took 3-4 s per second of speech
        import soundfile

        files = sorted(files[:20], key=lambda f: soundfile.info(str(f)).duration)
    files = files[: args.limit]
    if not files:
        raise SystemExit(f"no audio files in {args.audio}")
    clips = [load_audio(f) for f in files]
    arrays = {f"clip_{i:05d}": clip for i, clip in enumerate(clips)}
    refs = references(files)
    plan = {"clips": {"files": [str(f) for f in files], "refs": [refs.get(str(f)) for f in files]}}
    if args.long is not None:
        gap, parts, used = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), np.float32), [], []
        for f, clip in zip(files, clips):
            if used and (sum(len(p) for p in parts) + len(clip)) / SAMPLE_RATE > args.long:
                break
            parts += [clip, gap]
            used.append(str(f))
        arrays["long"] = np.concatenate(parts)
        joined = " ".join(refs[f] for f in used) if all(f in refs for f in used) else None
        plan["long"] = {"files": used, "refs": [joined]}
    for name, kind in (("clips", "clip_"), ("long", "long")):
        if name in plan:
            plan[name]["audio_s"] = sum(len(a) for k, a in arrays.items() if k.startswith(kind)) / SAMPLE_RATE
    np.savez(folder / "workload.npz", **arrays)
    return plan


def load_workload(path: str) -> dict:
    data = np.load(path)
    workload = {"clips": [data[k] for k in sorted(data.files) if k.startswith("clip_")]}
    if "long" in data.files:
        workload["long"] = [data["long"]]
    return workload


def runs(workload_name: str, batch_sizes, side: str):
    """(mode, batch) pairs to time: the seek loop at batch 1 and chunked windows for one long file (ours)."""
    if workload_name == "long" and side == "ours":
        return [("seek", 1)] + [("chunked", b) for b in batch_sizes]
    return [("chunked" if workload_name == "long" else "files", b) for b in batch_sizes]


def time_side(transcribe_fn, workload: dict, batch_sizes, side: str, result_file: str, smoke: bool) -> dict:
    """Time `transcribe_fn(audio_list, mode, batch)` on each workload and batch size, after a warm-up
    of the same shapes (none with --smoke); the results so far are in `result_file` after each run (a
    timeout keeps them)."""
    rows = []
    for name, audio in workload.items():
        for mode, batch in runs(name, batch_sizes, side):
            if not smoke:
                transcribe_fn(audio[:batch] if name == "clips" else [audio[0][: 16000 * 30 * batch]], mode, batch)
            tic = time.perf_counter()
            texts = transcribe_fn(audio, mode, batch)
            rows.append({"workload": name, "mode": mode, "batch": batch, "wall_s": time.perf_counter() - tic})
            rows[-1]["texts"] = texts
            Path(result_file).write_text(json.dumps({"rows": rows}))
            print(f"{side} {name} {mode} batch {batch}: {rows[-1]['wall_s']:.2f} s", file=sys.stderr, flush=True)
    return {"rows": rows}


# --- ours: models.inference (the code transcribe.py runs) -------------------------------------------


def ours_model(args):
    """(model, options): whisper from --model, or random weights of the medium shape (forced length)."""
    import mlx.core as mx

    from models.backend import compute_dtype
    from models.inference.options import TranscribeOptions
    from models.loading import load_model
    from models.whisper import ModelDimensions, Whisper

    dtype = compute_dtype(None, training=False)  # float16 on a GPU, float32 on the CPU
    options = dict(language="en", temperature=0.0, without_timestamps=not args.timestamps)
    if not args.random_medium:
        return load_model(args.model, dtype=dtype), TranscribeOptions(**options)

    @dataclass(frozen=True)
    class ForcedLength(TranscribeOptions):
        tokens: int = 100

        def decoding_options(self, temperature, prompt):
            forced = dict(sample_len=self.tokens, suppress_tokens=f"-1,{EOT}")
            return replace(super().decoding_options(temperature, prompt), **forced)

    mx.random.seed(0)
    model = Whisper(ModelDimensions(**random_shape(args).dims()), dtype)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    model.eval()
    options.update(without_timestamps=True, no_speech_threshold=None, tokens=args.tokens)
    return model, ForcedLength(**options)


def random_shape(args):
    return SHAPES["tiny" if args.smoke else "medium"]


def ours_worker(args) -> dict:
    import mlx.core as mx

    from models.inference.batched import transcribe_many
    from models.inference.transcribe import Transcriber

    device = str(mx.default_device())
    if not args.smoke and "gpu" not in device:
        raise SystemExit(f"MLX runs on {device}; this benchmark needs the GPU (or pass --smoke)")
    model, options = ours_model(args)

    def transcribe_fn(audio, mode, batch):
        if mode == "seek" or (mode == "files" and batch == 1):  # transcribe.py --batch-size 1
            return [Transcriber(model, options).run(a)["text"] for a in audio]
        texts = [None] * len(audio)
        for outcome in transcribe_many(model, audio, options, batch_size=batch, chunked=mode == "chunked"):
            if outcome.error is not None:
                raise outcome.error
            texts[outcome.index] = outcome.result["text"]
        return texts

    result = time_side(
        transcribe_fn, load_workload(args.workload), batch_list(args), "ours", args.result_file, args.smoke
    )
    return dict(result, device=device, mlx=mx.__version__, dtype=str(model.dtype))


# --- theirs: transformers' pipeline ------------------------------------------------------------------


def theirs_pipeline(args, torch, device):
    from transformers import AutoFeatureExtractor, AutoTokenizer, GenerationConfig, pipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    where = 0 if device.type == "cuda" else "cpu"
    task = "automatic-speech-recognition"
    generate_kwargs = {"language": "en", "task": "transcribe"}
    if not args.random_medium:
        return pipeline(task, model=args.hf_model, device=where, dtype=dtype), generate_kwargs
    ids = dict(decoder_start_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT, bos_token_id=EOT)
    model = transformers_whisper(random_shape(args), "sdpa", device, dtype, **ids).eval()
    model.generation_config = GenerationConfig.from_pretrained(args.hf_model)
    pipe = pipeline(
        task,
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(args.hf_model),
        feature_extractor=AutoFeatureExtractor.from_pretrained(args.hf_model),
        device=where,
        dtype=dtype,
    )
    return pipe, dict(generate_kwargs, min_new_tokens=args.tokens, max_new_tokens=args.tokens)


def theirs_worker(args) -> dict:
    setup = torch_setup(args.smoke)
    if isinstance(setup, dict):
        return setup
    torch, device, sync = setup
    import transformers

    pipe, generate_kwargs = theirs_pipeline(args, torch, device)
    timestamps = {"return_timestamps": True} if args.timestamps else {}

    @torch.inference_mode()
    def transcribe_fn(audio, mode, batch):
        inputs = [{"raw": a, "sampling_rate": 16000} for a in audio]
        chunking = {"chunk_length_s": 30} if mode == "chunked" else {}
        out = pipe(inputs, batch_size=batch, generate_kwargs=generate_kwargs, **chunking, **timestamps)
        sync()
        return [o["text"] for o in out]

    result = time_side(
        transcribe_fn, load_workload(args.workload), batch_list(args), "theirs", args.result_file, args.smoke
    )
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return dict(result, device=name, torch=torch.__version__, transformers=transformers.__version__)


# --- the report -----------------------------------------------------------------------------------


def batch_list(args) -> list:
    return [int(b) for b in args.batch_sizes.split(",") if b.strip()]


def score(rows: list, plan: dict, side: str) -> list:
    """Add audio seconds per second, WER (when there are references) and agreement with batch 1."""
    from models.tuner.metrics import wer

    first = {(r["workload"], r["mode"]): r["texts"] for r in rows if r["batch"] == 1}
    for row in rows:
        work = plan[row["workload"]]
        row.update(side=side, audio_s=work["audio_s"], audio_s_per_s=work["audio_s"] / row["wall_s"])
        if all(ref is not None for ref in work["refs"]):
            row["wer"] = wer(work["refs"], row["texts"])
        same = first.get((row["workload"], row["mode"]))
        if same is not None:
            row["same_as_batch1"] = f"{sum(a == b for a, b in zip(same, row['texts']))}/{len(same)}"
    return rows


def best_ratios(rows: list) -> list:
    """Per workload: each side's fastest row, and ours / theirs of them."""
    out = []
    for workload in sorted({r["workload"] for r in rows}):
        best = {}
        for side in ("ours", "theirs"):
            done = [r for r in rows if r["workload"] == workload and r["side"] == side and "audio_s_per_s" in r]
            if done:
                best[side] = max(done, key=lambda r: r["audio_s_per_s"])
        if len(best) == 2:
            ratio = best["ours"]["audio_s_per_s"] / best["theirs"]["audio_s_per_s"]
            out.append({"workload": workload, "ours": best["ours"], "theirs": best["theirs"], "ratio": ratio})
    return out


def report(rows: list, ratios: list, notes: list) -> str:
    body = [
        [
            r["workload"],
            r["side"],
            r["mode"],
            r["batch"],
            f"{r['audio_s']:.1f}",
            f"{r['wall_s']:.2f}",
            f"{r['audio_s_per_s']:.1f}",
            f"{100 * r['wer']:.2f}%" if "wer" in r else "–",
            r.get("same_as_batch1", "–"),
        ]
        for r in rows
    ]
    headers = ["workload", "side", "mode", "batch", "audio s", "wall s", "audio s / s", "WER", "text = batch 1"]
    lines = [markdown_table(headers, body), ""]
    for r in ratios:
        o, t = r["ours"], r["theirs"]
        lines.append(
            f"- {r['workload']}: ours {o['audio_s_per_s']:.1f} audio s/s ({o['mode']}, batch {o['batch']}) / "
            f"theirs {t['audio_s_per_s']:.1f} ({t['mode']}, batch {t['batch']}) = {r['ratio']:.2f}x"
        )
    return "\n".join(lines + [f"- {n}" for n in notes])


def prepare(args) -> None:
    if args.smoke:
        args.limit = 2 if args.limit is None else args.limit
        args.batch_sizes = "1,2"
    if args.hf_model is None:
        args.hf_model = str(Path(tempfile.gettempdir()) / "batch_transcribe_hf" / Path(args.model).name)
    if "theirs" in args.sides and not (Path(args.hf_model) / "config.json").is_file():
        from models.export.hf import save_hf_folder
        from models.loading import load_model

        card = f"{args.model} in the transformers layout, written by benchmarks/batch_transcribe_gpu.py.\n"
        save_hf_folder(load_model(args.model, dtype=None), Path(args.hf_model), card, "en")
        print(f"wrote {args.hf_model}", file=sys.stderr)


def main() -> int:
    args = build_parser().parse_args()
    if args.worker is not None:
        from common import worker_main

        return worker_main(ours_worker if args.worker == "ours" else theirs_worker, args)
    prepare(args)
    folder, name = (
        out_dir(args.out_dir),
        args.name or ("batch_transcribe_medium" if args.random_medium else "batch_transcribe"),
    )
    rows, notes, workers = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        plan = write_workload(args, Path(tmp))
        if args.random_medium:  # random weights: the texts are noise, only the times count
            for work in plan.values():
                work["refs"] = [None] * len(work["refs"])
        for side in [s for s in args.sides.split(",") if s]:
            result_file = Path(tmp) / f"{side}.json"
            flags = dict(
                workload=Path(tmp) / "workload.npz", result_file=result_file, model=args.model,
                hf_model=args.hf_model, batch_sizes=args.batch_sizes, tokens=args.tokens,
                timestamps=args.timestamps, random_medium=args.random_medium, smoke=args.smoke,
            )  # fmt: skip
            python = sys.executable if side == "ours" else args.torch_python
            workers[side] = run_worker(worker_command(python, __file__, side, **flags), args.timeout)
            partial = json.loads(result_file.read_text())["rows"] if result_file.is_file() else []
            rows += score(partial, plan, side)
            problem = workers[side].get("error") or workers[side].get("skipped")
            if problem:
                notes.append(f"{side}: {problem}")
    ratios = best_ratios(rows)
    if args.random_medium:
        notes.append(f"random {'tiny' if args.smoke else 'medium'} weights, {args.tokens} tokens forced per window")
    info = {side: {k: v for k, v in w.items() if k != "rows"} for side, w in workers.items()}
    table = report(rows, ratios, notes)
    print(table)
    if folder is not None:
        payload = {"args": vars(args), "workers": info, "plan": plan, "rows": rows, "ratios": ratios}
        (folder / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        (folder / f"{name}.md").write_text(table + "\n")
        print(f"wrote {folder / (name + '.json')} and {name}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
