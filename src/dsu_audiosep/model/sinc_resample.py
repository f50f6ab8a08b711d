"""Band-limited resampling by a Hann-windowed sinc: the one the original query path runs (32 -> 48 kHz).

AudioSep hands CLAP a 32 kHz query and CLAP resamples it to 48 kHz with torchaudio's default
resampler. torchaudio has no build for our torch, and other resamplers (polyphase, soxr) move the
embedding by about 3e-5, so the same filter is evaluated here from its formula:

    y[j] = sum_i x[i] * h(i / orig - j / new),  h(d) = s * sinc(pi * b * d) * cos^2(pi * b * d / (2 * L))

with the rates reduced by their gcd (``orig``, ``new``), ``b = min(orig, new) * rolloff`` the
cut-off (rolloff 0.99 keeps 1% below the lower Nyquist rate), ``L = 6`` zero crossings each side
(``b * d`` clamped to [-L, L], where the window is zero), and ``s = b / orig`` the gain. Output j
depends on ``x`` from ``floor(j * orig / new) - width`` on, with ``width = ceil(L * orig / b)``; the
signal is zero outside its ends, and ``ceil(n * new / orig)`` samples come out.

Because ``h`` only depends on ``j mod new`` after shifting ``x`` by ``orig``, the filter is ``new``
kernels of ``2 * width + orig`` taps applied with stride ``orig`` (a single conv1d). The taps are
computed in the waveform's dtype in the same order of operations as the original, so a float32
query sees the same float32 kernel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ZERO_CROSSINGS = 6
ROLLOFF = 0.99


def sinc_kernel(orig: int, new: int, *, zero_crossings: int = ZERO_CROSSINGS, rolloff: float = ROLLOFF,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """[new, 1, 2 * width + orig] filter taps and ``width``, for rates already divided by their gcd."""
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zero_crossings * orig / cutoff)
    inputs = torch.arange(-width, width + orig, dtype=dtype)[None, None] / orig  # input instants
    outputs = torch.arange(0, -new, -1, dtype=dtype)[:, None, None] / new  # minus output instants
    d = (outputs + inputs) * cutoff  # distance in cut-off periods
    d = d.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(d * math.pi / zero_crossings / 2) ** 2
    d = d * math.pi
    taps = torch.where(d == 0, torch.tensor(1.0, dtype=dtype), d.sin() / d)
    taps *= window * (cutoff / orig)
    return taps, width


def sinc_resample(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """[..., n] at ``orig_rate`` -> [..., ceil(n * new / orig)] at ``new_rate`` (float tensors)."""
    if orig_rate <= 0 or new_rate <= 0 or int(orig_rate) != orig_rate or int(new_rate) != new_rate:
        raise ValueError(f"sample rates must be positive integers, got {orig_rate} and {new_rate}")
    if orig_rate == new_rate:
        return wav
    g = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // g, int(new_rate) // g
    taps, width = sinc_kernel(orig, new, dtype=wav.dtype)
    shape = wav.shape
    x = wav.reshape(-1, 1, shape[-1])
    y = F.conv1d(F.pad(x, (width, width + orig)), taps.to(wav.device), stride=orig)  # [B, new, steps]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    # The original rounds the output length through a float32 tensor; same here for long inputs.
    n_out = int(torch.ceil(torch.tensor(new * shape[-1] / orig, dtype=torch.float32)))
    return y[:, :n_out].reshape(*shape[:-1], -1)


__all__ = ["sinc_kernel", "sinc_resample", "ZERO_CROSSINGS", "ROLLOFF"]
