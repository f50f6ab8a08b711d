"""The network's fixed numbers, defined once: sample rate, STFT, pooling grid, condition size.

Whatever cuts, pads or resamples audio for the network (stft.py, resunet.py, the engine's chunking)
takes them from here; the pooling grid is derived, not written again.
"""
from __future__ import annotations

import math

SAMPLE_RATE = 32000  # Hz, what AudioSep was trained on
N_FFT = 2048  # STFT size and Hann window length
HOP = 320  # STFT hop (10 ms)
BINS = N_FFT // 2 + 1  # 1025 frequency bins
CONDITION_SIZE = 512  # the CLAP text embedding that conditions the separator

# Pooling (time, frequency) after each encoder block of ResUNet30.
ENCODER_POOL = ((2, 2), (2, 2), (2, 2), (2, 2), (2, 2), (1, 2))
TIME_DOWNSAMPLE = math.prod(t for t, _ in ENCODER_POOL)  # 32 STFT frames per deepest-level frame
GRID = HOP * TIME_DOWNSAMPLE  # 10240 samples: the pooling grid in samples
