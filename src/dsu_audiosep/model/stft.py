"""The two STFT front-ends of ResUNet30, interchangeable at load time.

``ConvSTFT``/``ConvISTFT`` compute the transform as convolutions with fixed DFT kernels. The released
checkpoint stores those kernels (12.6 M values) under ``ss_model.base.stft.*`` / ``istft.*``, so this
variant's ``state_dict`` has exactly the released key set. ``TorchSTFT``/``TorchISTFT`` use the FFT
(``torch.stft``/``torch.istft``); their ``state_dict`` holds a ``window`` buffer each, which is what
the seed fork writes. Both give the same output to about 1e-6 (see tests/test_parity.py).

Shared conventions: n_fft 2048, hop 320, periodic Hann window, centred frames with reflect padding.
Spectra are passed around as (real, imag), each shaped [batch, 1, frames, bins].
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .constants import HOP, N_FFT


def hann_periodic(n: int) -> np.ndarray:
    """Periodic Hann in float64, evaluated as scipy's ``get_window('hann', n)`` does (same rounding)."""
    fac = np.linspace(-np.pi, np.pi, n + 1)[:-1]
    return 0.5 + 0.5 * np.cos(fac)


def dft_kernels(n_fft: int = N_FFT) -> dict[str, torch.Tensor]:
    """The constructor values of the conv kernels, as float32, computed the way the released ones were.

    Computed once per process (about 3 s) and shared: the tensors are constants, never written.
    """
    return dict(_dft_kernels(n_fft))


@functools.lru_cache(maxsize=2)
def _dft_kernels(n_fft: int) -> dict[str, torch.Tensor]:
    w = hann_periodic(n_fft)
    idx = np.arange(n_fft)
    x, y = np.meshgrid(idx, idx)
    forward = np.power(np.exp(-2j * np.pi / n_fft), x * y)  # [n, f]
    bins = n_fft // 2 + 1
    fw = (forward[:, :bins] * w[:, None]).T  # [f, n]
    inverse = np.power(np.exp(2j * np.pi / n_fft), x * y) / n_fft  # [i, o]
    iw = (inverse * w[None, :]).T  # [o, i]
    return {
        "stft.conv_real.weight": torch.from_numpy(np.real(fw).astype(np.float32))[:, None, :],
        "stft.conv_imag.weight": torch.from_numpy(np.imag(fw).astype(np.float32))[:, None, :],
        "istft.conv_real.weight": torch.from_numpy(np.real(iw).astype(np.float32))[:, :, None],
        "istft.conv_imag.weight": torch.from_numpy(np.imag(iw).astype(np.float32))[:, :, None],
        "istft.ola_window": torch.from_numpy((w**2).astype(np.float32)),
    }


def _reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(x[:, None, :], (pad, pad), mode="reflect")[:, 0, :]


class ConvSTFT(nn.Module):
    def __init__(self, n_fft: int = N_FFT, hop: int = HOP):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        bins = n_fft // 2 + 1
        # Held as conv modules so the keys read stft.conv_real.weight as in the released file.
        self.conv_real = nn.Conv1d(1, bins, n_fft, stride=hop, bias=False)
        self.conv_imag = nn.Conv1d(1, bins, n_fft, stride=hop, bias=False)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _reflect_pad(x, self.n_fft // 2)[:, None, :]
        real = self.conv_real(x).transpose(1, 2)[:, None]
        imag = self.conv_imag(x).transpose(1, 2)[:, None]
        return real, imag


class ConvISTFT(nn.Module):
    def __init__(self, n_fft: int = N_FFT, hop: int = HOP):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.conv_real = nn.Conv1d(n_fft, n_fft, 1, bias=False)
        self.conv_imag = nn.Conv1d(n_fft, n_fft, 1, bias=False)
        self.register_buffer("ola_window", torch.zeros(n_fft))
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, real: torch.Tensor, imag: torch.Tensor, length: int) -> torch.Tensor:
        real = real[:, 0].transpose(1, 2)  # [B, bins, T]
        imag = imag[:, 0].transpose(1, 2)
        # Hermitian symmetry gives the negative-frequency half of the full spectrum.
        full_real = torch.cat([real, real[:, 1:-1].flip(1)], dim=1)
        full_imag = torch.cat([imag, -imag[:, 1:-1].flip(1)], dim=1)
        frames = self.conv_real(full_real) - self.conv_imag(full_imag)  # [B, n_fft, T]
        n_frames = frames.shape[-1]
        total = (n_frames - 1) * self.hop + self.n_fft
        y = F.fold(frames, (1, total), (1, self.n_fft), stride=(1, self.hop))[:, 0, 0]
        win = self.ola_window[None, :, None].expand(1, self.n_fft, n_frames)
        norm = F.fold(win, (1, total), (1, self.n_fft), stride=(1, self.hop))[0, 0, 0]
        y = y / norm.clamp(min=1e-11)
        start = self.n_fft // 2
        return y[:, start : start + length]


class TorchSTFT(nn.Module):
    def __init__(self, n_fft: int = N_FFT, hop: int = HOP):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = torch.stft(
            x, self.n_fft, self.hop, window=self.window, center=True, pad_mode="reflect", return_complex=True
        ).transpose(1, 2)[:, None]
        return spec.real, spec.imag


class TorchISTFT(nn.Module):
    def __init__(self, n_fft: int = N_FFT, hop: int = HOP):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft))

    def forward(self, real: torch.Tensor, imag: torch.Tensor, length: int) -> torch.Tensor:
        spec = torch.complex(real[:, 0], imag[:, 0]).transpose(1, 2)
        return torch.istft(spec, self.n_fft, self.hop, window=self.window, center=True, length=length)


def make_stft_pair(use_torch_stft: bool) -> tuple[nn.Module, nn.Module]:
    if use_torch_stft:
        return TorchSTFT(), TorchISTFT()
    return ConvSTFT(), ConvISTFT()
