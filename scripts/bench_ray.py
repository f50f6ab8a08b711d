"""Files per minute of a folder run on Ray with 1 and 2 actors of one CPU each, and the local
(single-process) folder run for reference, interleaved in ONE run so that all see the same noise.

    .venv/bin/python scripts/bench_ray.py [--files 8] [--seconds 3] [--rounds 2] [--out DIR]

Needs the ray extra. Starts one local Ray instance (2 CPUs) in this process; each Ray run is the
CLI joining it with --ray-address, so the instance's start-up is paid once and reported apart.
Per run: wall time of the whole command, files/min over the whole command, and the steady rate
between the first and the last finished file (what a long library run approaches; it leaves out
the actors' start: torch import and model load). Medians per mode are printed as JSON lines.
Model: the UNTRAINED demo model (same network and cost as the real one).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

FINISHED = re.compile(r"\[\d+/\d+\] ")


def make_inputs(folder: Path, files: int, seconds: float) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    n = int(44100 * seconds)
    for i in range(files):
        sf.write(folder / f"clip{i:03d}.wav", (0.1 * rng.standard_normal((n, 2))).astype(np.float32), 44100)


def run_once(args: list[str], cwd: Path) -> dict:
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "dsu_audiosep", "separate", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finished = []
    for line in proc.stderr:  # "[n/N] input: ..." per finished file (stderr is not a terminal here)
        if FINISHED.match(line):
            finished.append(time.monotonic() - started)
    out = proc.stdout.read()
    proc.wait()
    wall = time.monotonic() - started
    summary = json.loads(out.strip().splitlines()[-1])
    steady = 60.0 * (len(finished) - 1) / (finished[-1] - finished[0]) if len(finished) > 1 else float("nan")
    return {"wall_s": round(wall, 2), "files_per_min": round(60.0 * summary["written"] / wall, 2),
            "steady_files_per_min": round(steady, 2), "first_file_s": round(finished[0], 2) if finished else None,
            "written": summary["written"], "rc": proc.returncode}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()

    import ray

    from dsu_audiosep.demo.model_files import write_audiosep_checkpoint, write_roberta_dir

    work = Path(opts.out or tempfile.mkdtemp(prefix="bench_ray_"))
    make_inputs(work / "in", opts.files, opts.seconds)
    ckpt = write_audiosep_checkpoint(work / "demo.ckpt")
    roberta = write_roberta_dir(work / "roberta-base")
    t = time.monotonic()
    context = ray.init(num_cpus=2, object_store_memory=128 * 1024 * 1024, include_dashboard=False,
                       logging_level=logging.ERROR)
    print(json.dumps({"ray_instance_start_s": round(time.monotonic() - t, 2)}), flush=True)
    address = context.address_info["gcs_address"]
    common = [str(work / "in"), "--checkpoint", str(ckpt), "--roberta-dir", str(roberta), "--text", "noise"]
    modes = {
        "local (1 process, 2 torch threads)": [],
        "ray, 1 actor x 1 CPU": ["--ray", "--ray-address", address, "--actors", "1", "--cpus-per-actor", "1"],
        "ray, 2 actors x 1 CPU": ["--ray", "--ray-address", address, "--actors", "2", "--cpus-per-actor", "1"],
    }
    order = list(modes)
    results: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        for r in range(opts.rounds):
            for mode in (order if r % 2 == 0 else order[::-1]):  # ABC CBA: drifts in the load cancel
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                row = run_once([*common, "--out-dir", str(out), *modes[mode]], work)
                results[mode].append(row)
                print(json.dumps({"round": r, "mode": mode, **row}), flush=True)
    finally:
        ray.shutdown()
    for mode, rows in results.items():
        print(json.dumps({"mode": mode, "files": opts.files, "seconds_each": opts.seconds,
                          "median_files_per_min": statistics.median(x["files_per_min"] for x in rows),
                          "median_steady_files_per_min": statistics.median(x["steady_files_per_min"] for x in rows),
                          "median_wall_s": statistics.median(x["wall_s"] for x in rows)}), flush=True)
    os.environ.pop("RAY_AUTH_MODE", None)


if __name__ == "__main__":
    main()
