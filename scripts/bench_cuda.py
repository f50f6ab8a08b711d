#!/usr/bin/env python
"""CUDA checks and benchmark rows, for a machine with an NVIDIA GPU.

    python scripts/bench_cuda.py --fixtures tests/fixtures --out results/
    python scripts/bench_cuda.py --quick --out results/    # issue 15: <= 6 min on an H100/H200

Runs from a source checkout (PYTHONPATH=src is set for the worker it spawns) with whatever torch
the machine has. Sections, each independent (a failing one is reported and the rest go on):

- parity: the fixture separation (sep_6p4s) on the GPU in each precision mode, error vs the
  original implementation's output;
- network: forward passes of the separator alone (random input, CUDA events, median), per
  precision mode, STFT implementation and batch shape: seconds per stereo second, peak memory;
- e2e: ``separate_file`` on 4 s, 40 s and 10 min stereo 44.1 kHz files (warm, median), with the
  time spent in forward passes split out;
- worker: the worker over pipes (``python -m dsu_audiosep --worker``, device cuda), the
  ``elapsed`` of its replies;
- quick (``--quick``, alone): the original network under PyTorch's defaults (the proxy of
  scripts/original_proxy.py) against our worker in each precision, on a 40 s and a 10-minute file,
  with fidelity against the exact CPU reference and against the original, and the CUDA default
  that scripts/cuda_default.py's rule picks from them. With ``--device cpu`` it runs on 4 s and
  8 s files as a dry run of the command.

The model is written from the checkpoint manifests with the deterministic synthetic weights
(speed does not depend on the weights' values). Prints a table last; JSON rows go to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

from benchmark import Worker, default_argv, make_input  # noqa: E402  (the CPU rows' pipe client and inputs)

import torch  # noqa: E402

ROWS: list[dict] = []


def row(section: str, name: str, value, **extra) -> None:
    ROWS.append({"section": section, "name": name, "value": value, **extra})
    print(f"[{section}] {name}: {value} {json.dumps(extra) if extra else ''}", flush=True)


# load_model precisions; the model sets cuDNN's TF32 switch itself for each forward pass.
MODES = ("fp32", "tf32", "bf16", "fp16")


def peak_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))


def snr_db(ref: np.ndarray, est: np.ndarray) -> float:
    err = np.sum((ref.astype(np.float64) - est) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / err))


def prepare_model(work: Path, fixtures: Path, device: str) -> dict[str, str]:
    from dsu_audiosep.model.convert import convert
    from dsu_audiosep.demo.model_files import write_audiosep_checkpoint, write_roberta_dir

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "audiosep_base_4M_steps.ckpt"
    if not ckpt.exists():
        write_audiosep_checkpoint(ckpt, manifest=fixtures / "manifest_audiosep_ckpt.json")
    rdir = work / "roberta-base"
    if not (rdir / "vocab.json").exists():
        write_roberta_dir(rdir)
    conv = work / "converted"
    if not (conv / "config.json").exists():
        convert(checkpoint_path=str(ckpt), roberta_dir=str(rdir), out_dir=str(conv))
    return {"checkpoint_path": str(ckpt), "roberta_dir": str(rdir), "model_dir": str(conv)}


def load(paths, device: str, mode: str, use_torch_stft: bool = False):
    from dsu_audiosep.model.checkpoints import load_model

    return load_model(model_dir=paths["model_dir"], device=device, precision=mode, use_torch_stft=use_torch_stft)


def section_parity(paths, device, fixtures: Path) -> None:
    fx = dict(np.load(fixtures / "public" / "sep_6p4s.npz"))
    x = torch.from_numpy(fx["mixture"])[None].to(device)
    c = torch.from_numpy(fx["condition"])
    for mode in MODES:
        for torch_stft in (False, True):
            m = load(paths, device, mode, torch_stft)
            y = m.separate(x, c)[0].float().cpu().numpy()
            ref = fx["out_torchstft" if torch_stft else "out_torchlibrosa"]
            row("parity", f"{mode} {'torch.stft' if torch_stft else 'conv STFT'} vs original",
                f"peak err {peak_err(y, ref):.2e}, SNR {snr_db(ref, y):.1f} dB")
            del m


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_median(fn, reps: int) -> float:
    fn()
    sync()
    ts = []
    for _ in range(reps):
        if not torch.cuda.is_available():
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1000)
    return statistics.median(ts)


def section_network(paths, device, shapes, modes, reps: int) -> None:
    for mode in modes:
        for torch_stft in (False, True):
            m = load(paths, device, mode, torch_stft)
            cond = m.embed_text("vocals")
            for batch, secs in shapes:
                x = (0.1 * torch.randn(batch, int(secs * 32000), device=device))
                cuda = torch.cuda.is_available()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if cuda else 0
                try:
                    t = gpu_median(lambda: m.separate(x, cond), reps)
                except torch.OutOfMemoryError:
                    row("network", f"{mode} {'torch' if torch_stft else 'conv'} B={batch} {secs:g}s", "OOM")
                    torch.cuda.empty_cache()
                    continue
                peak = (torch.cuda.max_memory_allocated() - base) / (batch * secs) if cuda else float("nan")
                stereo_s = batch * secs / 2
                row("network", f"{mode} {'torch' if torch_stft else 'conv'} B={batch} {secs:g}s",
                    f"{t / stereo_s * 1000:.2f} ms per stereo s ({stereo_s / t:.0f}x real time)",
                    seconds=t, peak_bytes_per_mono_s=peak)
                del x
                torch.cuda.empty_cache()
            del m
            torch.cuda.empty_cache()


def section_e2e(paths, device, work: Path, durations, modes, reps: int, chunks=(None,)) -> None:
    from dsu_audiosep.engine import separate as sep

    spent = {"forward": 0.0}
    orig = sep._run_window

    def timed(model, x, cond):
        sync()
        t = time.perf_counter()
        y = orig(model, x, cond)
        spent["forward"] += time.perf_counter() - t
        return y

    sep._run_window = timed
    try:
        for mode in modes:
            m = load(paths, device, mode)
            for secs in durations:
                p = make_input(work / f"in_{secs:g}s.wav", secs)
                out = work / "out.wav"
                variants = [("auto", c) for c in chunks] if secs > 60 else [(False, None), (True, None)]
                for chunk, length in variants:
                    opt = sep.SeparateOptions(use_chunk=chunk, chunk_length=length)
                    sep.separate_file(m, str(p), str(out), "vocals", opt)  # warm
                    ts, fw = [], []
                    for _ in range(reps):
                        spent["forward"] = 0.0
                        t = time.perf_counter()
                        r = sep.separate_file(m, str(p), str(out), "vocals", opt)
                        ts.append(time.perf_counter() - t)
                        fw.append(spent["forward"])
                    t = statistics.median(ts)
                    row("e2e", f"{mode} separate_file {secs:g}s stereo use_chunk={chunk} chunk_length={length}",
                        f"{t:.3f} s ({secs / t:.0f}x real time), forward passes {statistics.median(fw):.3f} s, windows {r.windows}, chunk {r.chunk_length}",
                        seconds=t, forward=statistics.median(fw), all=ts)
            del m
            torch.cuda.empty_cache()
    finally:
        sep._run_window = orig


def section_io(work: Path) -> None:
    """CPU-side cost of the audio path for the 10-minute file: read, resample both ways."""
    import concurrent.futures as cf

    import soundfile as sf
    import soxr

    p = make_input(work / "in_600s.wav", 600)
    t = time.perf_counter()
    x, sr = sf.read(p, dtype="float32")
    row("io", "read 600 s stereo PCM_16 wav", f"{time.perf_counter() - t:.3f} s")
    t = time.perf_counter()
    y = soxr.resample(x, sr, 32000, quality="HQ")
    row("io", "soxr HQ 44.1k->32k 600 s stereo, one call", f"{time.perf_counter() - t:.3f} s")
    t = time.perf_counter()
    soxr.resample(y, 32000, sr, quality="HQ")
    row("io", "soxr HQ 32k->44.1k 600 s stereo, one call", f"{time.perf_counter() - t:.3f} s")
    with cf.ThreadPoolExecutor(2) as ex:
        t = time.perf_counter()
        list(ex.map(lambda c: soxr.resample(np.ascontiguousarray(x[:, c]), sr, 32000, quality="HQ"), range(2)))
        row("io", "soxr HQ 44.1k->32k, two channels in two threads", f"{time.perf_counter() - t:.3f} s")


def section_worker(paths, work: Path, durations, reps: int, device: str, precisions=("fp32",), long_durations=()) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    w = Worker(default_argv(), env=env)
    row("worker", "spawn -> ready (python source, this machine)", f"{w.t_ready:.2f} s")
    r = w.call({"cmd": "load_model", "checkpoint_path": paths["checkpoint_path"], "roberta_dir": paths["roberta_dir"], "device": device})
    row("worker", "load_model original .ckpt on the device (elapsed)", f"{r['elapsed']:.2f} s")
    for precision in precisions:
        r = w.call({"cmd": "load_model", "model_dir": paths["model_dir"], "device": device, "precision": precision})
        row("worker", f"load_model converted folder, {precision} (elapsed)", f"{r['elapsed']:.2f} s", device=r.get("device"))
        for secs in durations:
            inp = make_input(work / f"in_{secs:g}s.wav", secs)
            cmd = {"cmd": "separate", "input": str(inp), "output": str(work / "wout.wav"), "text": "vocals", "use_chunk": "auto"}
            w.call(cmd)
            ts = [w.call(cmd)["elapsed"] for _ in range(reps)]
            t = statistics.median(ts)
            row("worker", f"{precision}: warm separate {secs:g}s stereo 44.1k via worker (elapsed, median of {reps})",
                f"{t:.3f} s ({secs / t:.0f}x real time)", all=ts)
        for secs in long_durations:
            inp = make_input(work / f"in_{secs:g}s.wav", secs)
            cmd = {"cmd": "separate", "input": str(inp), "output": str(work / "wout.wav"), "text": "vocals", "use_chunk": "auto"}
            t = w.call(cmd)["elapsed"]
            row("worker", f"{precision}: separate {secs:g}s stereo 44.1k via worker (elapsed, once)",
                f"{t:.2f} s ({secs / t:.0f}x real time), worker peak RSS so far {w.peak_rss_mb():.0f} MB")
    w.close()


QUICK_DURATIONS = {"cuda": "40,600", "cpu": "4,8"}  # the CPU fallback only proves the command runs


def _stereo_32k(path: Path, device: str) -> torch.Tensor:
    from dsu_audiosep.engine.audio_read import read_audio
    from dsu_audiosep.engine.resampling import resample

    x, sr = read_audio(path)
    return torch.from_numpy(resample(x, sr, 32000)).to(device)


def _per_channel(fn, x: torch.Tensor) -> torch.Tensor:
    """The original separates one mono signal per call: run each channel through ``fn``."""
    return torch.cat([fn(x[c : c + 1]) for c in range(x.shape[0])])


def section_quick(paths, device: str, work: Path, fixtures: Path, durations, reps: int) -> None:
    """Issue 15 in one run: (a) the original network as the original runs it on CUDA (PyTorch's
    defaults, torch.stft; scripts/original_proxy.py), (b) our worker in each precision, (c) each
    one's SNR against the exact CPU reference and against (a); then the default the rule picks."""
    from cuda_default import CANDIDATES, Measured, choose_cuda_default
    from original_proxy import original_separate

    cuda = device.startswith("cuda")
    precisions = list(MODES) if cuda else list(CANDIDATES)  # bf16/fp16 are CUDA modes
    row("quick", "PyTorch defaults the original runs under",
        f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    fx = dict(np.load(fixtures / "public" / "sep_6p4s.npz"))
    fx_x, fx_ref = torch.from_numpy(fx["mixture"])[None].to(device), fx["out_torchstft"]
    cond = torch.from_numpy(fx["condition"])
    inputs = {secs: make_input(work / f"in_{secs:g}s.wav", secs) for secs in durations}
    longest = max(durations)
    snr_ref, net, orig_out = {}, {}, {}
    for name in ["original"] + precisions:  # in-process network rows, one model at a time
        m = load(paths, device, "fp32" if name == "original" else name, use_torch_stft=True)
        fn = (lambda w: original_separate(m.ss_model, w, cond)) if name == "original" else (lambda w: m.separate(w, cond))
        snr_ref[name] = snr_db(fx_ref, fn(fx_x)[0].float().cpu().numpy())
        row("quick", f"{name}: SNR vs the exact CPU reference (sep_6p4s)", f"{snr_ref[name]:.1f} dB")
        for secs, path in inputs.items():
            x = _stereo_32k(path, device)
            try:
                net[name, secs] = gpu_median(lambda: _per_channel(fn, x), reps)
                y = _per_channel(fn, x).float().cpu().numpy()
            except torch.OutOfMemoryError:
                row("quick", f"{name}: network, whole {secs:g} s file per channel", "OOM")
                torch.cuda.empty_cache()
                continue
            extra = ""
            if name == "original":
                orig_out[secs] = y
            elif secs in orig_out:
                extra = f", SNR vs (a) {snr_db(orig_out[secs], y):.1f} dB"
            row("quick", f"{name}: network, whole {secs:g} s stereo file one channel at a time",
                f"{net[name, secs]:.3f} s ({secs / net[name, secs]:.1f}x real time){extra}", seconds=net[name, secs])
            del x
        del m
        if cuda:
            torch.cuda.empty_cache()
    elapsed = _quick_worker_rows(paths, device, work, inputs, precisions, reps, net)
    if ("original", longest) not in net:
        row("quick", "decision", "the original's network did not run on the longest file: no decision")
        return
    capability = torch.cuda.get_device_capability() if cuda else (8, 0)
    choice, reasons = choose_cuda_default(
        Measured("original", net["original", longest], snr_ref["original"]),
        {p: Measured(p, elapsed[p], snr_ref[p]) for p in CANDIDATES if p in elapsed}, capability)
    where = f"compute capability {capability[0]}.{capability[1]}" if cuda else "CPU dry run, rule applied as on an Ampere GPU"
    row("quick", f"decision ({where}, {longest:g} s file)", f"default precision: {choice}", reasons=reasons)


def _quick_worker_rows(paths, device, work, inputs, precisions, reps, net) -> dict[str, float]:
    """(b): the worker over pipes, warm, each precision; the whole job against its network time."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    w = Worker(default_argv(), env=env)
    longest, elapsed = max(inputs), {}
    try:
        for p in precisions:
            w.call({"cmd": "load_model", "model_dir": paths["model_dir"], "device": device, "precision": p})
            for secs, path in inputs.items():
                cmd = {"cmd": "separate", "input": str(path), "output": str(work / "quick_out.wav"), "text": "vocals",
                       "use_chunk": "auto"}
                w.call(cmd)
                t = statistics.median(w.call(cmd)["elapsed"] for _ in range(reps))
                ratio = f", {t / net[p, secs]:.2f}x its network time" if (p, secs) in net else ""
                row("quick", f"{p}: worker, warm separate {secs:g} s stereo 44.1 kHz (elapsed)",
                    f"{t:.3f} s ({secs / t:.1f}x real time){ratio}", seconds=t)
                if secs == longest:
                    elapsed[p] = t
    finally:
        w.close()
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=str(REPO / "tests" / "fixtures"))
    ap.add_argument("--work", default="/tmp/dsu-bench-cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sections", default="parity,io,network,e2e,worker")
    ap.add_argument("--modes", default="fp32,tf32,bf16,fp16")
    ap.add_argument("--shapes", default="2x10,2x60,2x120,4x60,8x30")
    ap.add_argument("--durations", default="4,40,600")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunks", default="default", help="chunk_length values for the long e2e rows ('default': the engine's)")
    ap.add_argument("--worker-precisions", default="fp32,tf32,fp16")
    ap.add_argument("--long-durations", default="", help="worker rows run once per precision (e.g. 3600)")
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="issue 15's one prepared run: the original's network vs our worker in each precision, "
                         "fidelity, and the CUDA default the rule picks (40 s and 10 min files; 4 s and 8 s on CPU)")
    args = ap.parse_args()
    if args.quick:
        args.sections = "quick"
        if "--durations" not in sys.argv:
            args.durations = QUICK_DURATIONS["cuda" if args.device.startswith("cuda") else "cpu"]
    work, fixtures = Path(args.work), Path(args.fixtures)
    modes = args.modes.split(",")
    durations = [float(s) for s in args.durations.split(",")]
    chunks = [None if c == "default" else float(c) for c in args.chunks.split(",")]
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    shapes = [(int(a), float(b)) for a, b in (s.split("x") for s in args.shapes.split(","))]
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "default_cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "default_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    row("info", "machine", info)
    t = time.perf_counter()
    paths = prepare_model(work, fixtures, args.device)
    row("info", "model files written", f"{time.perf_counter() - t:.1f} s")
    sections = {
        "quick": lambda: section_quick(paths, args.device, work, fixtures, durations, args.reps),
        "parity": lambda: section_parity(paths, args.device, fixtures),
        "io": lambda: section_io(work),
        "network": lambda: section_network(paths, args.device, shapes, modes, args.reps),
        "e2e": lambda: section_e2e(paths, args.device, work, durations, modes, args.reps, chunks),
        "worker": lambda: section_worker(paths, work, durations, args.reps, args.device, args.worker_precisions.split(","),
                                          [float(d) for d in args.long_durations.split(",") if d]),
    }
    for name in args.sections.split(","):
        t = time.perf_counter()
        try:
            sections[name]()
        except Exception:
            row(name, "FAILED", traceback.format_exc()[-2000:])
        row(name, "section wall time", f"{time.perf_counter() - t:.1f} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_cuda.json").write_text(json.dumps(ROWS, indent=1, default=str))
    print("\n| section | measurement | value |\n|---|---|---|")
    for r in ROWS:
        if r["section"] != "info" or r["name"] != "machine":
            print(f"| {r['section']} | {r['name']} | {r['value']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
