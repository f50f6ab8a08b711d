#!/usr/bin/env python
"""Issue 21's session, through the worker over pipes: before and after, interleaved.

    python scripts/bench_session.py                  # source worker (or the frozen one if dist/ is built)
    python scripts/bench_session.py --repeat 2 --long-seconds 60

Rows (the demo model, UNTRAINED, in the released format: speed and memory do not depend on the
weights' values; stereo 44.1 kHz inputs; backend auto):

- session: load_model, one job of another length (5 s), then eight clips of new lengths (1.3, 2.7,
  4.1, 5.9, 3.3, 7.6, 2.2, 6.4 s, the parent app's ``use_chunk: false``): each clip's ``elapsed``
  and how many window shapes the backend compiled for it (get_status ``compiles``);
- warm 4 s: the same 4 s file again and again after a first job (median);
- first job after load: a 30 s stereo file with ``use_chunk: false`` sent right after
  ``model_loaded``, under the default budget on both sides (so both run the same windows: the
  row isolates the load-time compile), and how many shapes the job compiled;
- ``use_chunk: false`` on a long stereo file (default 60 s): ``elapsed`` and the worker's peak RSS
  (VmHWM), one fresh worker per run.

"Before" is main's behaviour reproduced by settings, since only one worktree may exist: a
``memory_budget`` of 1,000,000 MiB (no budget: the full pass runs as before) and the load-time
compile switched off (the launcher replaces ``engine.backends.prepare_window`` with a no-op before
the worker starts; nothing else differs). "After" is the default settings. The two alternate
within each round, so a machine whose speed drifts affects both alike; report medians and ratios.
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

from dsu_audiosep.worker.client import WorkerClient  # noqa: E402  (the shared pipe client)

FROZEN = REPO / "dist" / "dsu-audiosep" / ("dsu-audiosep.exe" if os.name == "nt" else "dsu-audiosep")
SESSION = (1.3, 2.7, 4.1, 5.9, 3.3, 7.6, 2.2, 6.4)
NO_BUDGET_MIB = 1_000_000
# main's worker: no compile at load (the source tree only: a frozen binary cannot be patched)
BEFORE_LAUNCHER = ("import sys, runpy; import dsu_audiosep.engine.backends as b; b.prepare_window = lambda *a: False; "
                   "sys.argv = ['dsu-audiosep', '--worker']; runpy.run_module('dsu_audiosep', run_name='__main__')")


def write_input(path: Path, seconds: float, sr: int = 44100) -> str:
    if not path.exists():
        rng = np.random.default_rng(int(seconds * 100))
        t = np.arange(int(round(seconds * sr))) / sr
        x = 0.2 * np.sin(2 * np.pi * 440 * t)[:, None] + 0.05 * rng.standard_normal((t.size, 2))
        sf.write(str(path), x.astype(np.float32), sr, subtype="PCM_16")
    return str(path)


class Worker(WorkerClient):
    def __init__(self, argv: list[str]):
        super().__init__(argv, env=_env(), stderr=subprocess.DEVNULL, timeout=None)
        self.wait_ready()

    def call(self, cmd: dict) -> dict:
        return self.request(cmd, check=True)

    def compiles(self) -> int:
        return int(self.call({"cmd": "get_status"}).get("compiles", 0))

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOSEP_")}
    env["AUDIOSEP_DEVICE"] = "cpu"
    env["DSU_RUNTIME_POLICY_PATH"] = str(Path(tempfile.gettempdir()) / "dsu-bench-no-policy.json")
    return env


def session(w: Worker, load: dict, work: Path, budget: float | None) -> tuple[list[float], list[int], float]:
    """(elapsed per clip, compiles per clip, warm 4 s median) on a worker with the model loaded."""
    extra = {} if budget is None else {"memory_budget": budget}
    w.call(dict(load, **extra))
    job = {"cmd": "separate", "output": str(work / "out.wav"), "text": "vocals", "use_chunk": False, **extra}
    w.call(dict(job, input=write_input(work / "in_5.0.wav", 5.0)))
    times, compiles = [], []
    for s in SESSION:
        before = w.compiles()
        times.append(w.call(dict(job, input=write_input(work / f"in_{s}.wav", s)))["elapsed"])
        compiles.append(w.compiles() - before)
    four = write_input(work / "in_4.0.wav", 4.0)
    w.call(dict(job, input=four))
    warm = [w.call(dict(job, input=four))["elapsed"] for _ in range(3)]
    return times, compiles, statistics.median(warm)


def first_job(argv: list[str], load: dict, work: Path, pause: float = 0.0) -> tuple[float, int]:
    """A 30 s use_chunk false job (windows under the default budget) sent ``pause`` seconds after
    model_loaded (0: at once; a user's click comes later): (elapsed, shapes compiled by the job itself)."""
    w = Worker(argv)
    try:
        w.call(load)
        time.sleep(pause)
        r = w.call({"cmd": "separate", "input": write_input(work / "in_30.0.wav", 30.0), "output": str(work / "o.wav"),
                    "text": "vocals", "use_chunk": False})
        status = w.call({"cmd": "get_status"})
        return r["elapsed"], int(status.get("compiles", 0)) - int(status.get("prepared", 0))
    finally:
        w.close()


def long_full_pass(argv: list[str], load: dict, work: Path, seconds: float, budget: float | None) -> tuple[float, float, bool]:
    w = Worker(argv)
    try:
        extra = {} if budget is None else {"memory_budget": budget}
        w.call(dict(load, **extra))
        r = w.call({"cmd": "separate", "input": write_input(work / f"in_{seconds}.wav", seconds),
                    "output": str(work / "long.wav"), "text": "vocals", "use_chunk": False, **extra})
        return r["elapsed"], w.peak_rss_mib(), bool(r["chunked"])
    finally:
        w.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", default=None, help="worker command for 'after' (default: frozen build if present, else source)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "dsu-audiosep-bench-session"))
    ap.add_argument("--repeat", type=int, default=2, help="rounds of before/after")
    ap.add_argument("--long-seconds", type=float, default=60.0)
    ap.add_argument("--first-pause", type=float, default=0.0, help="seconds between model_loaded and the first job")
    ap.add_argument("--only-first", action="store_true", help="only the first-job row")
    args = ap.parse_args()
    after_argv = shlex.split(args.worker) if args.worker else ([str(FROZEN), "--worker"] if FROZEN.exists()
                                                                else [sys.executable, "-m", "dsu_audiosep", "--worker"])
    before_argv = [sys.executable, "-c", BEFORE_LAUNCHER]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from dsu_audiosep.demo.model_files import write_demo_model

    paths = write_demo_model(work / "model") if not (work / "model" / "README.txt").exists() else {
        "checkpoint_path": str(next((work / "model").glob("*.ckpt"))), "roberta_dir": str(work / "model" / "roberta-base")}
    load = {"cmd": "load_model", "checkpoint_path": paths["checkpoint_path"], "roberta_dir": paths["roberta_dir"], "device": "cpu"}
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu}; {os.cpu_count()} CPUs; {platform.platform()}")
    print(f"# after: {' '.join(after_argv)}; before: source worker, memory_budget {NO_BUDGET_MIB}, no compile at load")
    sides = {"before": (before_argv, NO_BUDGET_MIB), "after": (after_argv, None)}
    res: dict[str, dict[str, list]] = {k: {"clips": [], "compiles": [], "warm": [], "first": [], "first_compiles": [],
                                           "long": [], "long_rss": [], "long_chunked": []} for k in sides}
    for rnd in range(args.repeat):
        order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
        for side in order:
            argv, budget = sides[side]
            r = res[side]
            if args.only_first:
                elapsed, jobs_compiles = first_job(argv, load, work, args.first_pause)
                r["first"].append(elapsed), r["first_compiles"].append(jobs_compiles)
                print(f"round {rnd} {side}: first job {elapsed:.2f} s, {jobs_compiles} shapes compiled by it", flush=True)
                continue
            w = Worker(argv)
            try:
                times, compiles, warm = session(w, load, work, budget)
            finally:
                w.close()
            r["clips"].append(times), r["compiles"].append(compiles), r["warm"].append(warm)
            elapsed, jobs_compiles = first_job(argv, load, work, args.first_pause)
            r["first"].append(elapsed), r["first_compiles"].append(jobs_compiles)
            elapsed, rss, chunked = long_full_pass(argv, load, work, args.long_seconds, budget)
            r["long"].append(elapsed), r["long_rss"].append(rss), r["long_chunked"].append(chunked)
            print(f"round {rnd} {side}: session {sum(times):.2f} s {times} compiles {compiles}; warm 4 s {warm:.2f}; "
                  f"first chunked job {res[side]['first'][-1]:.2f} s ({jobs_compiles} compiled by it); "
                  f"{args.long_seconds:g} s use_chunk false {elapsed:.2f} s, peak {rss:.0f} MiB, chunked {chunked}", flush=True)
    med = statistics.median
    if args.only_first:
        b, a = med(res["before"]["first"]), med(res["after"]["first"])
        pairs = [x / y for x, y in zip(res["after"]["first"], res["before"]["first"])]
        print(f"| first job {args.first_pause:g} s after load, 30 s use_chunk false | {b:.2f} | {a:.2f} | {a / b:.2f} "
              f"(per pair {', '.join(f'{p:.2f}' for p in pairs)}) | compiled by the job: before "
              f"{res['before']['first_compiles']}, after {res['after']['first_compiles']} |")
        return 0
    print("\n| measurement | before | after | after / before |\n|---|---|---|---|")
    for name, key, fmt in (("8-clip session, sum of elapsed (s)", "clips", "{:.2f}"), ("warm 4 s stereo (s)", "warm", "{:.2f}"),
                           ("first job after load, 30 s use_chunk false, default budget (s)", "first", "{:.2f}"),
                           (f"{args.long_seconds:g} s stereo use_chunk false (s)", "long", "{:.2f}"),
                           (f"{args.long_seconds:g} s stereo use_chunk false, peak RSS (MiB)", "long_rss", "{:.0f}")):
        b = med([sum(v) if isinstance(v, list) else v for v in res["before"][key]])
        a = med([sum(v) if isinstance(v, list) else v for v in res["after"][key]])
        print(f"| {name} | {fmt.format(b)} | {fmt.format(a)} | {a / b:.2f} |")
    for side in sides:
        print(f"# {side}: compiles per clip {res[side]['compiles']}, shapes compiled by the first job {res[side]['first_compiles']}, "
              f"long job chunked {res[side]['long_chunked']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
