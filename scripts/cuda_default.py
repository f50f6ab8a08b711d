"""How the CUDA default precision is chosen from one measured run (issue 15), as a rule a test
can check without a GPU.

The candidates are our strict ``fp32`` and ``tf32``. The yardstick is the original network as
the original runs it on CUDA: PyTorch's defaults, which let cuDNN compute convolutions in TF32
on Ampere and newer (``scripts/original_proxy.py`` stands in for the original's network). A
candidate qualifies when it is

- at least as fast: our worker's whole job (read, resample, network, write) on the longest file
  takes no longer than the original's network alone on the same file (which favours the
  original: it pays reading and text encoding on top), and
- no further from the exact CPU reference: its SNR against the original's CPU output (the
  fixtures) is at least the original's own SNR on that GPU.

Strict fp32 is preferred when it qualifies (it is the exact mode); otherwise tf32 if it
qualifies; otherwise nothing qualifies and the default stays strict fp32, reported as such.
GPUs older than Ampere (compute capability < 8.0) have no TF32: fp32 is their only float32 mode.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dsu_audiosep.engine.resolve import TF32_MIN_CAPABILITY  # noqa: E402

CANDIDATES = ("fp32", "tf32")


@dataclass(frozen=True)
class Measured:
    """One row of the quick run."""

    name: str  # "original" (the proxy) or a precision
    seconds: float  # the original: its network on the longest file; ours: the worker's elapsed there
    snr_vs_cpu_reference_db: float


def choose_cuda_default(original: Measured, ours: dict[str, Measured],
                        capability: tuple[int, int]) -> tuple[str, list[str]]:
    """(the default precision for this GPU, one line of reasons per candidate)."""
    if tuple(capability) < TF32_MIN_CAPABILITY:
        return "fp32", [f"compute capability {capability[0]}.{capability[1]} has no TF32: fp32 is the only float32 mode"]
    reasons, qualified = [], []
    for name in CANDIDATES:
        m = ours.get(name)
        if m is None:
            reasons.append(f"{name}: not measured")
            continue
        fast = m.seconds <= original.seconds
        faithful = m.snr_vs_cpu_reference_db >= original.snr_vs_cpu_reference_db
        reasons.append(
            f"{name}: {m.seconds:.3f} s vs the original's {original.seconds:.3f} s ({'as fast or faster' if fast else 'slower'}), "
            f"{m.snr_vs_cpu_reference_db:.1f} dB vs its {original.snr_vs_cpu_reference_db:.1f} dB from the CPU reference "
            f"({'as close or closer' if faithful else 'further'})"
        )
        if fast and faithful:
            qualified.append(name)
    if qualified:
        return qualified[0], reasons
    return "fp32", reasons + ["neither qualifies: the default stays strict fp32 (the exact mode)"]
