#!/usr/bin/env python
"""Whole jobs on this CPU, per backend, against the original network's full pass, in one run.

    python scripts/bench_cpu.py                  # this CPU's kernels
    python scripts/bench_cpu.py --avx2           # again under scripts/avx2_only.env (subprocess)
    python scripts/bench_cpu.py --breakdown      # where a 40 s job's time goes, per stage (in-process)

Rows (warm, stereo 44.1 kHz, "vocals", medians of --repeat, the three interleaved round by round):
- ``ours, backend auto``: the worker's ``elapsed`` with its defaults (the backend ``auto`` picks
  here; full pass), and with ``use_chunk: "auto"`` (the memory-bounded mode; 40 s is chunked);
- ``ours, backend torch``: the same worker command with ``backend: "torch"``;
- ``original (proxy)``: scripts/original_proxy.original_separate, the original network's
  formulation on the same weights, whole file in one pass, one channel at a time, timed around the
  network and its STFT only: reading, resampling and text encoding, which the original also pays,
  are not counted, so the ratios favour the original.
Model: the UNTRAINED demo files in the real formats (speed does not depend on the weights' values).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import soundfile as sf  # noqa: E402
import soxr  # noqa: E402
import torch  # noqa: E402
from bench_network import avx2_env, cpu_line  # noqa: E402
from benchmark import Worker, make_input  # noqa: E402
from original_proxy import original_separate  # noqa: E402

from dsu_audiosep.worker.client import default_argv  # noqa: E402

DURATIONS = (4, 40)


def prepare(work: Path) -> Path:
    """The demo model converted into a folder (written once, reused)."""
    from dsu_audiosep.demo.command import prepare_demo
    from dsu_audiosep.model.convert import convert

    paths = prepare_demo(work / "demo")
    folder = work / "converted"
    if not (folder / "config.json").exists():
        convert(checkpoint_path=paths["checkpoint_path"], roberta_dir=paths["roberta_dir"], out_dir=str(folder))
    return folder


def original_timer(folder: Path, inputs: dict[int, Path]):
    """A function timing the proxy's full pass on one input (resampled to 32 kHz beforehand)."""
    from dsu_audiosep.model.checkpoints import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(model_dir=str(folder), device="cpu")
    condition = model.embed_text("vocals")
    wavs = {}
    for secs, path in inputs.items():
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
        wavs[secs] = torch.from_numpy(soxr.resample(audio, sr, 32000).T.copy())

    def run(secs: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for channel in wavs[secs]:
                original_separate(model.ss_model, channel[None], condition)
        return time.perf_counter() - t

    return run


def breakdown(folder: Path, path: Path, repeat: int) -> None:
    """One chunked 40 s job through the engine in this process (backend auto), each stage of the
    model timed where it is called: the text encoder, the STFT, the network, masks and ISTFT; the
    rest of ``elapsed`` is reading, resampling, writing and the pipeline itself."""
    from dsu_audiosep.engine.backends import use_backend
    from dsu_audiosep.engine.resolve import SeparateOptions
    from dsu_audiosep.engine.separate import separate_file
    from dsu_audiosep.model.checkpoints import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(model_dir=str(folder), device="cpu")
    backend = use_backend(model, "auto")
    spent: dict[str, float] = {}

    def timed(owner, method: str, stage: str) -> None:  # wraps this instance's method only
        inner = getattr(owner, method)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - t

        setattr(owner, method, wrapper)

    base = model.ss_model.base
    timed(model, "embed_text", "text encoding (new query)")
    timed(base, "spectrogram", "STFT")
    timed(base, "mask", "network")
    timed(base, "apply_maps", "masks and ISTFT")
    print(f"\n| 40 s stereo, chunked, backend {backend}, stage | seconds per job (median of {repeat}) | of the network |\n|---|---|---|")
    runs = []
    for i in range(repeat + 1):
        spent.clear()
        t = time.perf_counter()
        separate_file(model, str(path), str(path.with_name("bench_cpu_breakdown.wav")), f"query {i}",
                      SeparateOptions(use_chunk="auto"))
        total = time.perf_counter() - t
        if i:  # the first job compiles the window shapes
            runs.append({**spent, "read, resample, write, pipeline": total - sum(spent.values()), "whole job": total})
    network = statistics.median(r["network"] for r in runs)
    for stage in runs[0]:
        m = statistics.median(r[stage] for r in runs)
        print(f"| {stage} | {m:.2f} | {100 * m / network:.1f}% |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--avx2", action="store_true", help="run under scripts/avx2_only.env (AVX-512/AMX off)")
    ap.add_argument("--breakdown", action="store_true", help="only the per-stage times of a 40 s job, in this process")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "dsu-audiosep-bench"))
    args = ap.parse_args()
    if args.avx2 and "ONEDNN_MAX_CPU_ISA" not in os.environ:
        return subprocess.call([sys.executable, __file__, "--repeat", str(args.repeat), "--avx2", "--work", args.work],
                               env=avx2_env())
    limit = " (AVX2-only: scripts/avx2_only.env)" if args.avx2 else ""
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.platform()}; torch {torch.__version__}", flush=True)
    print(f"# CPU: {cpu_line()}{limit}; worker: {' '.join(default_argv())}", flush=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = prepare(work)
    inputs = {secs: make_input(work / f"in_{secs}s.wav", secs) for secs in DURATIONS}
    if args.breakdown:
        breakdown(folder, inputs[40], args.repeat)
        return 0
    out = str(work / "bench_cpu_out.wav")

    workers, backends = {}, {}
    for name in ("auto", "torch"):
        workers[name] = Worker(default_argv())
        backends[name] = workers[name].call({"cmd": "load_model", "model_dir": str(folder), "device": "cpu",
                                             "backend": name})["backend"]
    print(f"# backends in use: auto -> {backends['auto']}, torch -> {backends['torch']}", flush=True)
    original = original_timer(folder, inputs)
    modes = {"ours, backend auto": ("auto", {}), "ours, backend auto, use_chunk auto": ("auto", {"use_chunk": "auto"}),
             "ours, backend torch": ("torch", {})}
    times: dict[tuple[str, int], list[float]] = {}
    try:
        for round_ in range(args.repeat + 1):  # round 0 warms up (compiles, first reads)
            for secs, path in inputs.items():
                for label, (worker, extra) in modes.items():
                    job = {"cmd": "separate", "input": str(path), "output": out, "text": "vocals", **extra}
                    elapsed = workers[worker].call(job)["elapsed"]
                    if round_:
                        times.setdefault((label, secs), []).append(elapsed)
                elapsed = original(secs)
                if round_:
                    times.setdefault(("original (proxy), full pass", secs), []).append(elapsed)
            print(f"# round {round_} done", flush=True)
    finally:
        for w in workers.values():
            w.close()

    print(f"\n| warm, stereo 44.1 kHz{limit} | seconds (median of {args.repeat}) | original (proxy) / this |\n|---|---|---|")
    for secs in DURATIONS:
        base = statistics.median(times[("original (proxy), full pass", secs)])
        for (label, s), ts in times.items():
            if s == secs:
                m = statistics.median(ts)
                print(f"| {secs} s, {label} | {m:.2f} ({', '.join(f'{t:.2f}' for t in ts)}) | {base / m:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
