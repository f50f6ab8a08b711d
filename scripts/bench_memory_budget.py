#!/usr/bin/env python
"""The measurements behind issue 21's constants and decisions (BENCHMARKS.md, 2026-12-04).

    python scripts/bench_memory_budget.py rss [--seconds 3,8,14,20]    # worker peak RSS per backend and full-pass length
    python scripts/bench_memory_budget.py context [--seconds 30]       # windows vs full pass per context (parity)
    python scripts/bench_memory_budget.py dynamic [--repeat 3]         # OpenVINO: one dynamic compile vs static shapes
    python scripts/bench_memory_budget.py dynamic-rss static|dynamic   # their peak RSS, one process each
    python scripts/bench_memory_budget.py cost [--seconds 30]          # time: budget windows vs the full pass, interleaved

``rss``: the worker over pipes, one fresh worker per point (VmHWM only grows), ``use_chunk: false``
with no budget (1,000,000 MiB), stereo 44.1 kHz: the points engine/memory.py's COSTS are fitted to.
``context``: in process, the demo model on the default backend, a stereo demo mixture, output as
float at the input's rate; max abs error over the full pass's peak. ``dynamic``: in process, the
exported body compiled once with a dynamic time dimension (``-1`` and bounded 32..2048 frames)
against one static compile per shape, inferences interleaved and the order alternated per round;
max abs error against the torch body over its peak.
The model is the UNTRAINED demo model in the released format (speed and memory do not depend on
the weights' values; the context's error does, a little: measured on these weights).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
WORK = Path(tempfile.gettempdir()) / "dsu-audiosep-bench-memory"
WINDOWS_S = (1.3, 4.1, 7.6, 10.88)


def demo_files() -> dict[str, str]:
    from dsu_audiosep.demo.model_files import write_demo_model

    folder = WORK / "model"
    if (folder / "README.txt").exists():
        return {"checkpoint_path": str(next(folder.glob("*.ckpt"))), "roberta_dir": str(folder / "roberta-base")}
    return write_demo_model(folder)


def stereo_input(seconds: float) -> str:
    import soundfile as sf

    path = WORK / f"in_{seconds:g}.wav"
    if not path.exists():
        sr, rng = 44100, np.random.default_rng(1)
        t = np.arange(int(seconds * sr)) / sr
        x = 0.2 * np.sin(2 * np.pi * 440 * t)[:, None] + 0.05 * rng.standard_normal((t.size, 2))
        sf.write(str(path), x.astype(np.float32), sr, subtype="PCM_16")
    return str(path)


def vmhwm_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_points(seconds: list[float]) -> None:
    import os
    import subprocess

    from dsu_audiosep.worker.client import WorkerClient

    files = demo_files()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOSEP_")}
    env.update(AUDIOSEP_DEVICE="cpu", DSU_RUNTIME_POLICY_PATH=str(WORK / "no-policy.json"))
    print("| backend | full pass, s (stereo, one channel at a time) | worker peak RSS after load (MiB) | after the job (MiB) |")
    print("|---|---|---|---|")
    for backend in ("openvino", "torch"):
        for s in seconds:
            w = WorkerClient([sys.executable, "-m", "dsu_audiosep", "--worker"], env=env, stderr=subprocess.DEVNULL, timeout=None)
            try:
                w.wait_ready()
                w.request({"cmd": "load_model", **files, "backend": backend, "memory_budget": 1e6}, check=True)
                loaded = vmhwm_mib(w.proc.pid)
                r = w.request({"cmd": "separate", "input": stereo_input(s), "output": str(WORK / "out.wav"),
                               "use_chunk": False, "memory_budget": 1e6}, check=True)
                assert not r["chunked"]
                print(f"| {backend} | {s:g} | {loaded:.0f} | {vmhwm_mib(w.proc.pid):.0f} |", flush=True)
            finally:
                w.close()


def load_model(backend: str):
    from dsu_audiosep.process_memory import tune_allocator

    tune_allocator()  # as the worker does, before torch allocates
    import torch

    torch.set_num_threads(2)
    from dsu_audiosep import build_audiosep

    files = demo_files()
    return build_audiosep(None, files["checkpoint_path"], "cpu", roberta_dir=files["roberta_dir"], backend=backend, mmap=True)


def context_parity(seconds: float, core: float) -> None:
    import soundfile as sf

    from dsu_audiosep.demo.command import write_demo_mixture
    from dsu_audiosep.engine.resolve import SeparateOptions
    from dsu_audiosep.engine.separate import separate_file

    model = load_model("auto")
    src = WORK / f"mix_{seconds:g}.wav"
    if not src.exists():
        write_demo_mixture(src, seconds=seconds)
    common = dict(output_sr="input", output_subtype="FLOAT", output_channels="input")
    t = time.perf_counter()
    separate_file(model, str(src), str(WORK / "full.wav"), "piano", SeparateOptions(use_chunk=False, memory_budget=1e6, **common))
    full_s = time.perf_counter() - t
    ref = sf.read(str(WORK / "full.wav"), dtype="float64")[0]
    peak = np.abs(ref).max()
    print(f"# backend {model.backend}, {seconds:g} s stereo, full pass {full_s:.2f} s; kept centres {core:g} s")
    print("| context (s) | max abs error / peak | frames vs full pass | elapsed (s) |\n|---|---|---|---|")
    for ctx in (0.64, 0.96, 1.28, 1.92):
        t = time.perf_counter()
        r = separate_file(model, str(src), str(WORK / "win.wav"), "piano",
                          SeparateOptions(use_chunk=True, chunk_length=core, context_seconds=ctx, memory_budget=1e6, **common))
        elapsed = time.perf_counter() - t
        err = np.abs(sf.read(str(WORK / "win.wav"), dtype="float64")[0] - ref).max() / peak
        frames = (core + 2 * ctx) / core
        print(f"| {ctx:.2f} | {err:.2e} | {frames:.2f}x (middle windows; {r.windows} windows) | {elapsed:.2f} |", flush=True)


def window_cost(seconds: float, repeat: int) -> None:
    """What the windows that replace a full pass cost in time: the same mono file as a full pass (no
    budget) and under the default budget (use_chunk false -> windows with the parity context),
    alternating, the ratio taken per pair."""
    import soundfile as sf

    from dsu_audiosep.engine.resolve import SeparateOptions
    from dsu_audiosep.engine.separate import separate_file

    model = load_model("auto")
    src = WORK / f"mono_{seconds:g}.wav"
    if not src.exists():
        t = np.arange(int(seconds * 44100)) / 44100
        x = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(2).standard_normal(t.size)
        sf.write(str(src), x.astype(np.float32), 44100, subtype="PCM_16")
    runs = {"full pass": SeparateOptions(use_chunk=False, memory_budget=1e6), "budget windows": SeparateOptions(use_chunk=False)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rnd in range(repeat):
        for name in (list(runs) if rnd % 2 == 0 else list(runs)[::-1]):
            t = time.perf_counter()
            r = separate_file(model, str(src), str(WORK / "cost.wav"), "vocals", runs[name])
            times[name].append(time.perf_counter() - t)
            print(f"# round {rnd} {name}: {times[name][-1]:.2f} s, {r.windows} windows, {r.warnings}", flush=True)
    ratios = [w / f for w, f in zip(times["budget windows"], times["full pass"])]
    print(f"| {seconds:g} s mono, backend {model.backend} | full pass {statistics.median(times['full pass']):.2f} s | "
          f"budget windows {statistics.median(times['budget windows']):.2f} s | windows / full, per pair: "
          f"{statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)}) |")


def body_frames(seconds: float) -> int:
    from dsu_audiosep.engine.backends import body_shape

    return body_shape(int(round(seconds * 32000)))[2]


def _compile(runner, frames=None, bounded: bool = False):
    """The exported body compiled for one static shape (``frames``), or once with a dynamic time dimension."""
    import openvino as ov

    model = runner.core.read_model(str(runner.ir_path))
    if frames is not None:
        shape = ov.PartialShape([1, 1, frames, 1024])
    else:
        shape = ov.PartialShape([1, 1, ov.Dimension(32, 2048) if bounded else ov.Dimension(-1), 1024])
    model.reshape({"x": shape, "condition": [1, 512]})
    compiled = runner.core.compile_model(model, "CPU")
    return compiled, compiled.create_infer_request()


def _infer(entry, x, cond):
    import torch

    compiled, request = entry
    return torch.from_numpy(request.infer({"x": x.numpy(), "condition": cond.numpy()})[compiled.output(0)].copy())


def dynamic_vs_static(repeat: int) -> None:
    import torch

    model = load_model("openvino")
    runner = model.ss_model.body_runner.runner
    cond = model.embed_text("vocals").reshape(1, -1).float()
    gen = torch.Generator().manual_seed(0)
    xs = {s: torch.rand((1, 1, body_frames(s), 1024), generator=gen) for s in WINDOWS_S}
    with torch.no_grad():
        ref = {s: model.ss_model.body_with_film(xs[s], cond) for s in WINDOWS_S}
    dyn, bounded = _compile(runner), _compile(runner, bounded=True)
    times = {k: {s: [] for s in WINDOWS_S} for k in ("static", "dynamic", "bounded")}
    err = {k: {s: 0.0 for s in WINDOWS_S} for k in times}
    compiles = {s: [] for s in WINDOWS_S}
    for rnd in range(repeat):
        for s in WINDOWS_S:
            t = time.perf_counter()
            static = _compile(runner, body_frames(s))
            compiles[s].append(time.perf_counter() - t)
            _infer(static, xs[s], cond)  # the first inference of a fresh compile allocates
            order = [("static", static), ("dynamic", dyn), ("bounded", bounded)]
            for name, entry in (order if rnd % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                y = _infer(entry, xs[s], cond)
                times[name][s].append(time.perf_counter() - t)
                err[name][s] = max(err[name][s], float((y - ref[s]).abs().max() / ref[s].abs().max()))
            del static
    med = statistics.median
    print("| window (s) | T' | static compile (s) | static (s) | dynamic / static | bounded / static | error / peak (static, dynamic) |")
    print("|---|---|---|---|---|---|---|")
    for s in WINDOWS_S:
        ratio = {k: med([a / b for a, b in zip(times[k][s], times["static"][s])]) for k in ("dynamic", "bounded")}
        print(f"| {s:g} | {body_frames(s)} | {med(compiles[s]):.2f} | {med(times['static'][s]):.3f} | {ratio['dynamic']:.3f} "
              f"| {ratio['bounded']:.3f} | {err['static'][s]:.1e}, {err['dynamic'][s]:.1e} |")


def dynamic_rss(kind: str) -> None:
    import torch

    model = load_model("openvino")
    runner = model.ss_model.body_runner.runner
    cond = model.embed_text("vocals").reshape(1, -1).float()
    print(f"# {kind}: peak RSS after load {vmhwm_mib():.0f} MiB")
    entry = _compile(runner) if kind == "dynamic" else None
    for s in WINDOWS_S:
        x = torch.rand((1, 1, body_frames(s), 1024))
        if kind == "static":
            entry = None  # one static shape at a time, as the backend keeps them
            entry = _compile(runner, body_frames(s))
        _infer(entry, x, cond)
        print(f"| {kind} | {s:g} s window | peak RSS {vmhwm_mib():.0f} MiB |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("rss", "context", "dynamic", "dynamic-rss", "cost"))
    ap.add_argument("kind", nargs="?", default="static", help="dynamic-rss: static or dynamic")
    ap.add_argument("--seconds", default=None, help="rss: full-pass lengths (default 3,8,14,20); context: file length (30)")
    ap.add_argument("--core", type=float, default=9.6, help="context: kept centre of the windows")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.what == "rss":
        rss_points([float(s) for s in (args.seconds or "3,8,14,20").split(",")])
    elif args.what == "context":
        context_parity(float(args.seconds or 30), args.core)
    elif args.what == "cost":
        window_cost(float(args.seconds or 30), args.repeat)
    elif args.what == "dynamic":
        dynamic_vs_static(args.repeat)
    else:
        dynamic_rss(args.kind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
