"""Where to cut a long signal so that chunked separation equals the full pass.

ResUNet30 has no attention and its BatchNorms are affine at inference, so every output sample
depends on a bounded stretch of input: about +-3.2 s at 32 kHz, measured once by perturbing the
input (tests/test_engine.py checks the consequence: EXACT_CONTEXT_S reproduces the full pass).
Two conditions make a chunk reproduce the full pass on its kept centre:

1. Alignment. The U-Net pools time by 2 five times, so frames are grouped in blocks of 32 STFT
   frames = 32 * 320 = 10240 samples (``GRID``, from model/constants.py). A window that starts
   on a multiple of GRID sees the same frames and the same pooling blocks as the full pass. A window that ends at the file's
   end gets the same zero padding as the full pass, so the last window is exact too.
2. Context. Samples within ``context`` of a window's cut edge see the chunk's reflect padding and
   zero padding instead of the real neighbours; only the centre beyond the context is kept.

With full context (EXACT_CONTEXT_S) the result equals the full pass to float rounding; shorter
context trades a tiny error (measured in tests and BENCHMARKS.md) for speed and memory. Kept
centres tile the signal exactly, so no crossfade is needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..model.constants import GRID, SAMPLE_RATE

EXACT_CONTEXT_S = 3.52  # 11 grid blocks: covers the measured +-3.2 s receptive field
# The default context (options.py, context_seconds) is 2 grid blocks, 0.64 s. Against the full pass
# (synthetic weights, 30 s signal, 7.68-9.6 s chunks): 68 dB at 0.32 s, 80 dB at 0.64 s, 92 dB at
# 0.96 s, about 12 dB per grid block; tests ask >= 60 dB.


@dataclass(frozen=True)
class Window:
    start: int  # samples fed to the network: [start, end)
    end: int
    keep_start: int  # samples of its output that are kept: [keep_start, keep_end)
    keep_end: int


def round_up_to_grid(samples: float) -> int:
    return max(GRID, int(math.ceil(samples / GRID)) * GRID)


def plan_windows(n_samples: int, chunk_samples: int | None, context_samples: int) -> list[Window]:
    """Windows covering ``n_samples``; ``chunk_samples`` None means one window (the full pass)."""
    if n_samples <= 0:
        return []
    if chunk_samples is None:
        return [Window(0, n_samples, 0, n_samples)]
    core = round_up_to_grid(chunk_samples)
    ctx = 0 if context_samples <= 0 else round_up_to_grid(context_samples)
    if n_samples <= core + ctx:
        return [Window(0, n_samples, 0, n_samples)]
    windows = []
    for keep_start in range(0, n_samples, core):
        keep_end = min(n_samples, keep_start + core)
        start = max(0, keep_start - ctx)
        end = min(n_samples, keep_end + ctx)
        windows.append(Window(start, end, keep_start, keep_end))
    return windows


def seconds_to_samples(seconds: float, sr: int = SAMPLE_RATE) -> int:
    return int(round(seconds * sr))
