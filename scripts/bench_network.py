#!/usr/bin/env python
"""The separator body alone, per backend, interleaved in one run (same noise for each).

    python scripts/bench_network.py                  # this CPU's kernels
    python scripts/bench_network.py --avx2           # again under scripts/avx2_only.env (subprocess)

Rows: seconds per mono audio-second of the body (magnitude windows of 9.6 s, the CPU chunk, plus
context), and the GFLOP/s that makes against the network's 46.7 GFLOP per mono second, next to this
machine's measured fp32 GEMM rate (torch matmul, 4096^2). Three bodies:
- ``plain``: the stated proxy for the original network: our weights run in its plain formulation
  (contiguous tensors, BatchNorm, FiLM and activation as separate passes; no channels-last, no folding);
- ``torch``: ours (channels-last, folded);
- ``openvino``: ours exported and compiled by OpenVINO in strict fp32.
Model: the UNTRAINED demo weights (speed does not depend on the values).
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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from original_proxy import plain_body  # noqa: E402  (the stated proxy for the original network)

GFLOP_PER_MONO_SECOND = 46.7
FRAMES_PER_SECOND = 100  # hop 320 at 32 kHz
WINDOW_SECONDS = 9.6 + 2 * 0.64  # the CPU chunk with its context


def cpu_line() -> str:
    from dsu_audiosep.engine.backends import cpu_info

    info = cpu_info()
    isa = sorted(f for f in info.flags if f.startswith(("avx", "amx", "fma", "sse4")))
    return f"{info.model} ({info.arch}, {os.cpu_count()} CPUs); ISA: {' '.join(isa) or 'unknown'}"


def gemm_gflops(repeat: int) -> float:
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 4096**3 / statistics.median(times) / 1e9


def run(repeat: int) -> list[tuple[str, str]]:
    from dsu_audiosep.demo.command import prepare_demo
    from dsu_audiosep.engine.backends import use_backend
    from dsu_audiosep.model.checkpoints import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    paths = prepare_demo(Path(tempfile.gettempdir()) / "dsu-audiosep-bench" / "demo")
    model = load_model(checkpoint_path=paths["checkpoint_path"], roberta_dir=paths["roberta_dir"], device="cpu")
    assert use_backend(model, "openvino") == "openvino", "OpenVINO did not load (see the warning)"
    runner = model.ss_model.body_runner
    frames = int(WINDOW_SECONDS * FRAMES_PER_SECOND) // 32 * 32 + 32
    x = torch.rand(1, 1, frames, 1024) * 2
    cond = F.normalize(torch.randn(1, 512), dim=-1)
    bodies = {"plain": lambda: plain_body(model.ss_model, x, cond),
              "torch": lambda: model.ss_model.body_with_film(x, cond),
              "openvino": lambda: runner(x, cond)}
    with torch.inference_mode():
        ref = bodies["plain"]()
        for name, body in bodies.items():  # warm up (compiles), and check every body computes the same maps
            err = float((body() - ref).abs().max() / ref.abs().max())
            print(f"# {name}: max difference to plain {err:.2e} of the peak", flush=True)
        times: dict[str, list[float]] = {name: [] for name in bodies}
        gemm = []
        for _ in range(repeat):  # interleaved: each round times every body once
            gemm.append(gemm_gflops(1))
            for name, body in bodies.items():
                t = time.perf_counter()
                body()
                times[name].append(time.perf_counter() - t)
    seconds = frames / FRAMES_PER_SECOND
    rate = statistics.median(gemm)
    rows = [("fp32 GEMM rate, torch 4096^2 (GFLOP/s, median)", f"{rate:.0f}")]
    per_second = {n: statistics.median(ts) / seconds for n, ts in times.items()}
    for name, s in per_second.items():
        achieved = GFLOP_PER_MONO_SECOND / s
        rows.append((f"body {name}: s per mono second (median of {repeat})",
                     f"{s:.3f}  ({achieved:.0f} GFLOP/s = {100 * achieved / rate:.0f}% of GEMM; "
                     f"{per_second['plain'] / s:.2f}x plain)"))
    return rows


def avx2_env() -> dict[str, str]:
    env = dict(os.environ)
    for line in (REPO / "scripts" / "avx2_only.env").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            key, value = line.split("=", 1)
            env[key] = value
    return env


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--avx2", action="store_true", help="run under scripts/avx2_only.env (AVX-512/AMX off)")
    args = ap.parse_args()
    if args.avx2 and "ONEDNN_MAX_CPU_ISA" not in os.environ:
        return subprocess.call([sys.executable, __file__, "--repeat", str(args.repeat), "--avx2"], env=avx2_env())
    limit = " (AVX2-only: scripts/avx2_only.env)" if args.avx2 else ""
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.platform()}; torch {torch.__version__}", flush=True)
    print(f"# CPU: {cpu_line()}{limit}", flush=True)
    rows = run(args.repeat)
    print("\n| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name}{limit} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
