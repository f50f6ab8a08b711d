#!/usr/bin/env python
"""Stems and folder runs, timed the way users run them; prints rows for BENCHMARKS.md.

    python scripts/bench_stems.py [--worker "python -m dsu_audiosep --worker"] [--files 50] [--file-seconds 2]

1. A 3-query stem split of one 40 s stereo file (one ``separate`` with ``queries``) against the
   same three queries as three single ``separate`` jobs, in one worker, interleaved A B A (same
   noise for both; each text embedded once in a warm-up first), from the replies' ``elapsed``.
2. A folder run: ``dsu-audiosep separate DIR --out-dir OUT --text ...`` over N short files, as a
   subprocess: files per minute (wall clock, model load included) and its peak RSS (ru_maxrss).
Model: the UNTRAINED demo model in the real formats (speed does not depend on the weights).
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

from dsu_audiosep.worker.client import WorkerClient, default_argv  # noqa: E402

TEXTS = ("vocals", "a dog barking", "drums")


def make_input(path: Path, seconds: float, seed: int = 0, sr: int = 44100) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = np.stack([0.2 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], axis=1)
    sf.write(str(path), (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), sr, subtype="PCM_16")
    return path


def stems_vs_singles(argv: list[str], model: dict, tmp: Path, seconds: float) -> tuple[list[float], list[float]]:
    mix = make_input(tmp / "mix40.wav", seconds)
    client = WorkerClient(argv, stderr=subprocess.DEVNULL, timeout=None)
    try:
        client.wait_ready()
        client.request({"cmd": "load_model", **model}, check=True)
        short = make_input(tmp / "warm.wav", 0.5)
        for t in TEXTS:  # warm-up: every text embedded once, first-call costs paid
            client.request({"cmd": "separate", "input": str(short), "output": str(tmp / "w.wav"), "text": t}, check=True)
        stems, singles = [], []

        def run_stems(i: int) -> None:
            queries = [{"text": t, "output": str(tmp / f"stem{i}_{k}.wav")} for k, t in enumerate(TEXTS)]
            stems.append(client.request({"cmd": "separate", "input": str(mix), "queries": queries}, check=True)["elapsed"])

        def run_singles(i: int) -> None:
            singles.append(sum(client.request({"cmd": "separate", "input": str(mix), "text": t,
                                               "output": str(tmp / f"single{i}_{k}.wav")}, check=True)["elapsed"]
                               for k, t in enumerate(TEXTS)))

        run_stems(0)
        run_singles(0)
        run_stems(1)
        return stems, singles
    finally:
        client.close()


def folder_run(model: dict, tmp: Path, files: int, seconds: float) -> tuple[float, float]:
    folder = tmp / "folder"
    folder.mkdir()
    for i in range(files):
        make_input(folder / f"f{i:03d}.wav", seconds, seed=i)
    cmd = [sys.executable, "-m", "dsu_audiosep", "separate", str(folder), "--out-dir", str(tmp / "out"),
           "--text", "vocals", "--checkpoint", model["checkpoint_path"], "--roberta-dir", model["roberta_dir"]]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # This child's own peak: RUSAGE_CHILDREN would report the largest of every child so far (the
    # stems worker's 40 s full pass included), which is what an earlier BENCHMARKS row showed.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return files / wall * 60, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", help="worker command line (default: this Python, -m dsu_audiosep --worker)")
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--file-seconds", type=float, default=2.0)
    args = ap.parse_args()
    argv = shlex.split(args.worker) if args.worker else default_argv()
    from dsu_audiosep.demo.model_files import write_demo_model

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = {k: str(v) for k, v in write_demo_model(tmp / "model").items()}
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, worker: {' '.join(argv)}")
        stems, singles = stems_vs_singles(argv, model, tmp, args.seconds)
        s, m = statistics.median(stems), statistics.median(singles)
        print(f"| 3-query stem split, {args.seconds:g} s stereo (runs {', '.join(f'{x:.1f}' for x in stems)} s) "
              f"| {s:.1f} s |")
        print(f"| the same 3 queries as 3 single jobs (sum) | {m:.1f} s |")
        print(f"| stems / singles | {s / m:.2f} |")
        per_minute, peak = folder_run(model, tmp, args.files, args.file_seconds)
        print(f"| folder run, {args.files} files x {args.file_seconds:g} s stereo, 1 query, model load included "
              f"| {per_minute:.1f} files/min, peak RSS {peak:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
