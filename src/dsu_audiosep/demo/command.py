"""A demo for people without the released weights: untrained model files + a mixture to separate.

    dsu-audiosep demo --out demo        # writes demo/ and prints the JSON lines to pipe into --worker

The model files have the real formats (so the real loading code runs) but deterministic random
weights: the output is a real run of the network, not a meaningful separation. Everything written
says UNTRAINED in its name.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def write_demo_mixture(path: Path, seconds: float = 4.0, sr: int = 44100) -> Path:
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    melody = sum(0.12 * np.sin(2 * np.pi * f * t) * (np.sin(2 * np.pi * 0.5 * t + i) > 0) for i, f in enumerate((262, 330, 392, 523)))
    rng = np.random.default_rng(7)
    bursts = 0.08 * rng.standard_normal(t.size) * (np.sin(2 * np.pi * 3 * t) > 0.7)
    mix = np.stack([melody + bursts, 0.8 * melody + 1.2 * bursts], axis=1).astype(np.float32)
    sf.write(path, mix, sr, subtype="PCM_16")
    return path


def prepare_demo(out: Path) -> dict[str, str]:
    from .model_files import write_demo_model

    out.mkdir(parents=True, exist_ok=True)
    paths = write_demo_model(out)
    paths["input"] = str(write_demo_mixture(out / "demo_mixture.wav"))
    paths["output"] = str(out / "demo_separated_UNTRAINED.wav")
    return paths


def demo_commands(paths: dict[str, str], text: str = "piano melody") -> list[dict]:
    return [
        {"cmd": "load_model", "checkpoint_path": paths["checkpoint_path"], "roberta_dir": paths["roberta_dir"], "device": "cpu"},
        {"cmd": "separate", "input": paths["input"], "output": paths["output"], "text": text},
        {"cmd": "exit"},
    ]


def demo_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsu-audiosep demo", description="Write an UNTRAINED demo model and a demo mixture.")
    ap.add_argument("--out", default="demo", help="folder to write (default: ./demo)")
    ap.add_argument("--text", default="piano melody")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    paths = prepare_demo(out)
    print(f"dsu-audiosep demo: wrote UNTRAINED demo model and mixture to {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print("dsu-audiosep demo: pipe these lines into 'dsu-audiosep --worker':", file=sys.stderr)
    for cmd in demo_commands(paths, args.text):
        print(json.dumps(cmd))
    return 0
