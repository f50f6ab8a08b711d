#!/usr/bin/env python
"""Benchmark dsu-audiosep the way its users run it, and print a table for BENCHMARKS.md.

    python scripts/benchmark.py                      # quick: start-up, load, text, 4 s and 40 s files
    python scripts/benchmark.py --long               # adds 10-minute and memory-vs-duration rows
    python scripts/benchmark.py --worker "python -m dsu_audiosep --worker"   # source instead of frozen
    python scripts/benchmark.py --backend torch      # the network on torch (default auto); network rows
                                                     # per backend and AVX2-only: scripts/bench_network.py

Everything goes through the worker over pipes (the `elapsed` field of its replies), except the
rows marked "API", which time the Python functions in this process. Model: the UNTRAINED demo
files in the real formats (speed does not depend on the weights' values). Peak RSS is the
worker's VmHWM from /proc (Linux), one fresh worker per row where the row measures memory.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from dsu_audiosep.worker.client import WorkerClient, default_argv  # noqa: E402  (the shared pipe client)

FROZEN = REPO / "dist" / "dsu-audiosep" / ("dsu-audiosep.exe" if os.name == "nt" else "dsu-audiosep")


class Worker(WorkerClient):
    """The worker over pipes (the package's client), timed from spawn: ``t_first`` to its first
    line, ``t_ready`` to "ready"; ``call`` waits as long as a job takes and raises on an error."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.t0 = time.perf_counter()
        super().__init__(argv, env=env, stderr=subprocess.DEVNULL, timeout=None)
        self.wait_ready()
        self.t_first = self.line_times[0]
        self.t_ready = self.line_times[-1]  # nothing else is said before the first command

    def call(self, cmd: dict) -> dict:
        return self.request(cmd, check=True)

    def peak_rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def close(self, timeout: float = 30) -> None:
        super().close(timeout)


def median(xs):
    return statistics.median(xs)


def make_input(path: Path, seconds: float, sr: int = 44100) -> Path:
    if path.exists():
        return path
    rng = np.random.default_rng(1)
    n = int(seconds * sr)
    with sf.SoundFile(path, "w", sr, 2, "PCM_16") as f:
        for start in range(0, n, sr * 10):
            m = min(sr * 10, n - start)
            t = (start + np.arange(m)) / sr
            x = 0.2 * np.sin(2 * np.pi * 440 * t)[:, None] + 0.05 * rng.standard_normal((m, 2))
            f.write(x.astype(np.float32))
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", default=None, help="worker command (default: the frozen build if present)")
    ap.add_argument("--long", action="store_true", help="add 10-minute and memory-vs-duration rows")
    ap.add_argument("--minutes", type=float, nargs="*", default=[1, 10], help="durations for the memory rows (with --long)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "dsu-audiosep-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", default="auto", help="the network's backend: auto, torch or openvino (load_model field)")
    args = ap.parse_args()
    argv = shlex.split(args.worker) if args.worker else ([str(FROZEN), "--worker"] if FROZEN.exists() else default_argv())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []

    def row(name, value):
        rows.append((name, value))
        print(f"{name:60s} {value}", flush=True)

    from dsu_audiosep.demo.command import prepare_demo
    from dsu_audiosep.model.checkpoints import load_model
    from dsu_audiosep.model.convert import convert

    paths = prepare_demo(work / "demo")
    conv_dir = work / "converted"
    if not (conv_dir / "config.json").exists():
        convert(checkpoint_path=paths["checkpoint_path"], roberta_dir=paths["roberta_dir"], out_dir=str(conv_dir))
    load_orig = {"cmd": "load_model", "checkpoint_path": paths["checkpoint_path"], "roberta_dir": paths["roberta_dir"],
                 "device": "cpu", "backend": args.backend}
    load_conv = {"cmd": "load_model", "model_dir": str(conv_dir), "device": "cpu", "backend": args.backend}

    from bench_network import cpu_line

    print(f"# machine: {platform.platform()}, {os.cpu_count()} CPUs; worker: {' '.join(argv)}", flush=True)
    print(f"# CPU: {cpu_line()}", flush=True)
    # bare torch import, for the start-up target
    t_torch = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        t_torch.append(time.perf_counter() - t)
    row("python -c 'import torch' (s, median)", f"{median(t_torch):.2f}")

    firsts, readies, loaded_orig, loaded_conv = [], [], [], []
    for _ in range(args.repeat):
        w = Worker(argv)
        firsts.append(w.t_first)
        readies.append(w.t_ready)
        r = w.call(load_conv)
        loaded_conv.append(time.perf_counter() - w.t0)
        w.close()
    row("spawn -> first line 'loading' (s, median)", f"{median(firsts):.3f}")
    row("spawn -> 'ready' (s, median)", f"{median(readies):.2f}")
    row("spawn -> 'model_loaded' from converted folder (s, median)", f"{median(loaded_conv):.2f}")

    w = Worker(argv)
    r1 = w.call(load_orig)
    row("load_model original .ckpt, cold in this worker (elapsed s)", f"{r1['elapsed']:.2f}")
    r2 = w.call(load_orig)
    row("load_model again: cache hit (elapsed s)", f"{r2['elapsed']:.3f} (cached={r2.get('cached')})")
    w.close()
    w = Worker(argv)
    r3 = w.call(load_conv)
    row("load_model converted folder (elapsed s)", f"{r3['elapsed']:.2f}")
    row(f"backend (asked {args.backend!r}; model_loaded reports)", r3.get("backend", "torch (not reported)"))

    inputs = {s: make_input(work / f"in_{s:g}s.wav", s) for s in (4, 40)}
    out = work / "out.wav"
    # text encoding: first separate with a new text minus one with a cached text, on a tiny file
    tiny = make_input(work / "in_0.5s.wav", 0.5)
    w.call({"cmd": "separate", "input": str(tiny), "output": str(out), "text": "warm up"})
    t_new, t_cached = [], []
    for i in range(args.repeat):
        t_new.append(w.call({"cmd": "separate", "input": str(tiny), "output": str(out), "text": f"a dog barking {i}"})["elapsed"])
        t_cached.append(w.call({"cmd": "separate", "input": str(tiny), "output": str(out), "text": "a dog barking 0"})["elapsed"])
    row("text encoding, new short query (ms, from elapsed difference)", f"{1000 * (median(t_new) - median(t_cached)):.0f}")

    for secs, p in inputs.items():
        cold = w.call({"cmd": "separate", "input": str(p), "output": str(out), "text": f"cold query {secs:g}"})["elapsed"]
        row(f"cold separate {secs:g} s stereo: first job on this file, new query (s)", f"{cold:.2f}")
        for chunk in (False, True):
            ts = [w.call({"cmd": "separate", "input": str(p), "output": str(out), "text": "vocals", "use_chunk": chunk})["elapsed"] for _ in range(args.repeat)]
            m = median(ts)
            row(f"warm separate {secs:g} s stereo 44.1 kHz, use_chunk={chunk} (s, median of {args.repeat})",
                f"{m:.2f}  ({m / secs:.3f} s per stereo second, {secs / m:.1f}x real time)")
    w.close()

    # The Python API in this process (no pipes, no worker): same model files, same inputs.
    from dsu_audiosep import separate_audio
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    api_model = load_model(model_dir=str(conv_dir), device="cpu")
    from dsu_audiosep.engine.backends import use_backend

    use_backend(api_model, args.backend)
    for secs in (4, 40):
        separate_audio(api_model, str(inputs[secs]), "vocals", str(out))
        ts = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            separate_audio(api_model, str(inputs[secs]), "vocals", str(out))
            ts.append(time.perf_counter() - t)
        row(f"API: warm separate_audio {secs:g} s stereo, full pass (s, median of {args.repeat})", f"{median(ts):.2f}")
    del api_model

    # spawn-per-job: a fresh process for one 4 s job (what a naive parent does)
    ts = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        w = Worker(argv)
        w.call(load_conv)
        w.call({"cmd": "separate", "input": str(inputs[4]), "output": str(out), "text": "vocals"})
        w.close()
        ts.append(time.perf_counter() - t)
    row("spawn-per-job 4 s stereo, converted model (wall s, median)", f"{median(ts):.2f}")

    if args.long:
        p = make_input(work / "in_1min.wav", 60)
        w = Worker(argv)
        w.call(load_orig)  # the worker's default mmap (true except on Windows)
        r = w.call({"cmd": "separate", "input": str(p), "output": str(out), "text": "vocals", "use_chunk": "auto"})
        row("1 min stereo, original .ckpt (default mmap), auto chunking: elapsed s / peak RSS MB",
            f"{r['elapsed']:.1f} s / {w.peak_rss_mb():.0f} MB")
        w.close()
        for minutes in args.minutes:
            p = make_input(work / f"in_{minutes:g}min.wav", minutes * 60)
            w = Worker(argv)
            w.call(load_conv)
            r = w.call({"cmd": "separate", "input": str(p), "output": str(out), "text": "vocals", "use_chunk": "auto"})
            row(f"{minutes:g} min stereo, auto chunking: elapsed s / peak RSS MB",
                f"{r['elapsed']:.1f} s ({minutes * 60 / r['elapsed']:.1f}x real time) / {w.peak_rss_mb():.0f} MB")
            w.close()
    print("\n| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
