"""Audio-query costs (issue 12), in one process, things compared interleaved in the same run.

    .venv/bin/python scripts/bench_audio_query.py [--repeats 3]

Model: the UNTRAINED weights in the released AudioSep checkpoint format, written from
tests/fixtures/manifest_audiosep_ckpt.json (speed and memory do not depend on the values).
Rows: loading the audio branch (time, resident memory); embedding a 10 s query (first call, which
loads the branch; later calls, uncached and cached); a 25 s query (three 10 s windows); a 10 s mono
separation with a text query, a stored embedding and an audio query once its embedding is cached.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    import soundfile as sf
    import torch

    from dsu_audiosep import build_audiosep, embed_query, separate_audio
    from dsu_audiosep.demo.model_files import write_audiosep_checkpoint, write_roberta_dir

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="bench-aq-"))
    ckpt = write_audiosep_checkpoint(tmp / "audiosep.ckpt", manifest=ROOT / "tests/fixtures/manifest_audiosep_ckpt.json")
    roberta = write_roberta_dir(tmp / "roberta-base")
    rng = np.random.default_rng(0)
    q10, q25, mix = tmp / "q10.wav", tmp / "q25.wav", tmp / "mix.wav"
    sf.write(q10, (0.2 * rng.standard_normal(480000)).astype(np.float32), 48000, subtype="FLOAT")
    sf.write(q25, (0.2 * rng.standard_normal(25 * 48000)).astype(np.float32), 48000, subtype="FLOAT")
    sf.write(mix, (0.1 * rng.standard_normal(10 * 32000)).astype(np.float32), 32000)

    rows: list[tuple[str, str]] = []
    t = time.perf_counter()
    model = build_audiosep(None, str(ckpt), "cpu", mmap=True, roberta_dir=str(roberta))
    rows.append(("load_model (text only, mmap)", f"{time.perf_counter() - t:.3f} s, RSS {rss_mb():.0f} MB"))
    before = rss_mb()
    t = time.perf_counter()
    model.load_audio_branch()
    rows.append(("load the audio branch (mapped, untouched)", f"{time.perf_counter() - t:.3f} s, RSS +{rss_mb() - before:.0f} MB"))
    t = time.perf_counter()
    embed_query(model, query_audio=str(q10))
    rows.append(("embed 10 s query, first call (pages the branch in)", f"{time.perf_counter() - t:.3f} s, RSS +{rss_mb() - before:.0f} MB"))

    timings: dict[str, list[float]] = {k: [] for k in ("uncached10", "cached10", "uncached25", "text", "embedding", "audio")}
    vec = embed_query(model, query_audio=str(q10))
    model.embed_text("a dog barking")
    for _ in range(args.repeats):  # interleaved: the same noise for every row
        model.audio_cache.clear()
        t = time.perf_counter(); embed_query(model, query_audio=str(q10)); timings["uncached10"].append(time.perf_counter() - t)
        t = time.perf_counter(); embed_query(model, query_audio=str(q10)); timings["cached10"].append(time.perf_counter() - t)
        t = time.perf_counter(); embed_query(model, query_audio=str(q25)); timings["uncached25"].append(time.perf_counter() - t)
        for kind, kw in (("text", {"text": "a dog barking"}), ("embedding", {"text": None, "query_embedding": vec}),
                         ("audio", {"text": None, "query_audio": str(q10)})):
            text = kw.pop("text")
            t = time.perf_counter()
            separate_audio(model, str(mix), text, str(tmp / f"out_{kind}.wav"), **kw)
            timings[kind].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in timings.items()}
    rows += [
        ("embed 10 s query, uncached (1 window)", f"{med['uncached10']:.3f} s"),
        ("embed 10 s query, cached", f"{med['cached10'] * 1000:.2f} ms"),
        ("embed 25 s query, uncached (3 windows, 10 s hop)", f"{med['uncached25']:.3f} s ({med['uncached25'] / med['uncached10']:.2f}x the 10 s query)"),
        ("separate 10 s mono, text query (cached)", f"{med['text']:.3f} s"),
        ("separate 10 s mono, query_embedding", f"{med['embedding']:.3f} s ({med['embedding'] / med['text']:.2f}x text)"),
        ("separate 10 s mono, query_audio (embedding cached)", f"{med['audio']:.3f} s ({med['audio'] / med['text']:.2f}x text)"),
        ("peak-ish RSS at the end", f"{rss_mb():.0f} MB"),
    ]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, medians of {args.repeats}, pid {os.getpid()}")
    print("| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
