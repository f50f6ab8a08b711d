"""CLAP's audio branch (HTSAT-base, no fusion): a 48 kHz clip -> the L2-normalised 512-d query embedding.

Written from the published architecture facts; module names reproduce the CLAP checkpoint's key
names (``audio_branch.*``, ``audio_projection.*``), nothing else of the original class layout.

Data flow (one 10 s clip = 480,000 samples at 48 kHz):
  waveform -> log-mel (STFT window 1024, hop 480, periodic Hann, centred with reflect padding;
  power -> 64 Slaney mel bands 50-14000 Hz -> 10*log10, floor 1e-10) -> BatchNorm over the mel
  bins -> the 1001 x 64 image stretched to 1024 x 64 (bicubic, corners aligned) and folded into
  256 x 256 (four 256-frame strips stacked along frequency) -> 4 x 4 patches (128 channels) ->
  four Swin stages (depths 2, 2, 12, 2; heads 4, 8, 16, 32; window 8; every odd block shifted by 4
  except in the last stage, whose 8 x 8 grid is a single window) -> LayerNorm -> mean over the
  8 x 8 tokens (CLAP's "embedding" output; the token-semantic classification head is not used)
  -> audio_projection (1024 -> 512, ReLU, 512 -> 512) -> L2 normalisation.

The STFT kernels, mel filterbank, relative-position indices and shift masks are constants of the
architecture: they are computed here (non-persistent buffers), never read from a checkpoint.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .constants import CONDITION_SIZE
from .stft import hann_periodic

QUERY_RATE = 48000  # Hz: the rate the audio branch was trained at
CLIP_SAMPLES = 480000  # 10 s: every clip is padded (repeatpad) or cut to this
WINDOW = 1024
HOP = 480
MEL_BINS = 64
FMIN, FMAX = 50.0, 14000.0
LOG_FLOOR = 1e-10
SPEC_SIZE = 256  # the square image the Swin encoder sees
FREQ_RATIO = SPEC_SIZE // MEL_BINS  # 4 strips of 256 frames stacked along frequency
PATCH = 4
EMBED_DIM = 128
DEPTHS = (2, 2, 12, 2)
HEADS = (4, 8, 16, 32)
SWIN_WINDOW = 8
AUDIO_FEATURES = EMBED_DIM * 2 ** (len(DEPTHS) - 1)  # 1024
MASK_VALUE = -100.0  # what the shifted-window mask adds between regions that must not attend

# Checkpoint keys of the audio branch that inference never reads: constants we compute ourselves
# (filterbanks, masks, indices) and the sound-event classification head.
UNUSED_KEY_PARTS = ("spectrogram_extractor.", "logmel_extractor.", ".attn_mask", ".relative_position_index",
                    "tscam_conv.", "head.")


def is_unused_key(key: str) -> bool:
    """True for an ``audio_branch.*`` key the embedding does not depend on."""
    return key.startswith("audio_branch.") and any(part in key for part in UNUSED_KEY_PARTS)


# --------------------------------------------------------------------------------------------
# Front end


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic (27 steps per x6.4) above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-300) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=1)
def mel_filterbank(sr: int = QUERY_RATE, n_fft: int = WINDOW, n_mels: int = MEL_BINS,
                   fmin: float = FMIN, fmax: float = FMAX) -> torch.Tensor:
    """[n_fft // 2 + 1, n_mels] triangular Slaney-normalised filters (area-normalised), float32.

    Triangles span three consecutive of ``n_mels + 2`` points equally spaced on the mel scale;
    each row is rounded to float32 and then scaled by 2 / (bandwidth in Hz), in float32 storage,
    which is the rounding sequence of the filterbank the model was trained with.
    """
    freqs = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    edges = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))
    widths = np.diff(edges)
    dist = edges[:, None] - freqs[None, :]
    weights = np.zeros((n_mels, freqs.size), dtype=np.float32)
    for i in range(n_mels):
        rising = -dist[i] / widths[i]
        falling = dist[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return torch.from_numpy(np.ascontiguousarray(weights.T))


@functools.lru_cache(maxsize=1)
def stft_kernels(n_fft: int = WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary [bins, 1, n_fft] float32 kernels of the windowed DFT, element for element
    the values the model's own STFT was built with (``exp(-2j*pi/n) ** (n*f)`` times a periodic
    Hann, in complex128); only the bins the forward transform uses are evaluated."""
    bins = n_fft // 2 + 1
    n, f = np.meshgrid(np.arange(n_fft), np.arange(bins), indexing="ij")
    w = np.power(np.exp(-2j * np.pi / n_fft), n * f) * hann_periodic(n_fft)[:, None]  # [n, f]
    return (torch.from_numpy(np.ascontiguousarray(np.real(w).T.astype(np.float32)))[:, None, :],
            torch.from_numpy(np.ascontiguousarray(np.imag(w).T.astype(np.float32)))[:, None, :])


class LogMel(nn.Module):
    """[B, samples] at 48 kHz -> [B, 1, frames, 64] log-mel power in dB (frames = samples // 480 + 1)."""

    def __init__(self):
        super().__init__()
        real, imag = stft_kernels()
        self.register_buffer("stft_real", real, persistent=False)
        self.register_buffer("stft_imag", imag, persistent=False)
        self.register_buffer("mel", mel_filterbank(), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = F.pad(wav[:, None, :], (WINDOW // 2, WINDOW // 2), mode="reflect")
        # The STFT as the convolution with fixed DFT kernels, as the model was trained: an FFT agrees
        # to float rounding, but near-silent bins (repeatpad's zero tail) sit at the log floor.
        real = F.conv1d(x, self.stft_real, stride=HOP)
        imag = F.conv1d(x, self.stft_imag, stride=HOP)
        power = (real ** 2 + imag ** 2).transpose(1, 2)  # [B, frames, bins]
        mel = torch.matmul(power, self.mel)
        return (10.0 * torch.log10(torch.clamp(mel, min=LOG_FLOOR)))[:, None]


def spectrogram_image(logmel: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1001, 64] -> [B, 1, 256, 256]: stretch time to 1024 frames, fold into 4 strips."""
    b, c, frames, bins = logmel.shape
    target_t = SPEC_SIZE * FREQ_RATIO
    if frames > target_t or bins != MEL_BINS:
        raise ValueError(f"log-mel of shape {tuple(logmel.shape)} does not fit the {SPEC_SIZE}x{SPEC_SIZE} input")
    x = logmel
    if frames < target_t:
        x = F.interpolate(x, (target_t, bins), mode="bicubic", align_corners=True)
    x = x.transpose(2, 3).reshape(b, c, bins, FREQ_RATIO, target_t // FREQ_RATIO)  # [B, C, 64, 4, 256]
    return x.transpose(2, 3).reshape(b, c, bins * FREQ_RATIO, target_t // FREQ_RATIO)


# --------------------------------------------------------------------------------------------
# Swin transformer


def relative_position_index(window: int) -> torch.Tensor:
    """[w*w, w*w]: row of the bias table for each (query, key) pair of a window (dy, dx offsets)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * windows, window * window, C], windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def from_windows(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``to_windows``: [B * windows, window * window, C] -> [B, H, W, C]."""
    c = x.shape[-1]
    b = x.shape[0] // ((h // window) * (w // window))
    x = x.view(b, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shifted_window_mask(size: int, window: int, shift: int) -> torch.Tensor:
    """[windows, w*w, w*w]: 0 within a region, MASK_VALUE across the regions a cyclic shift joins."""
    labels = torch.zeros(1, size, size, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    region = 0
    for rows in bands:
        for cols in bands:
            labels[:, rows, cols, :] = region
            region += 1
    per_window = to_windows(labels, window).squeeze(-1)  # [windows, w*w]
    differs = per_window[:, None, :] != per_window[:, :, None]
    return torch.zeros(differs.shape).masked_fill(differs, MASK_VALUE)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window - 1) ** 2, heads))
        self.register_buffer("rel_index", relative_position_index(window).flatten(), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        bias = self.relative_position_bias_table[self.rel_index].view(n, n, -1).permute(2, 0, 1)
        attn = q @ k.transpose(-2, -1) + bias[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.heads, n, n) + mask[None, :, None]).view(bw, self.heads, n, n)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, size: int, heads: int, window: int, shift: int):
        super().__init__()
        if size <= window:  # one window covers the grid: nothing to shift
            window, shift = size, 0
        self.size, self.window, self.shift = size, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        mask = shifted_window_mask(size, window, shift) if shift else None
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        s = self.shift
        y = self.norm1(x).view(b, self.size, self.size, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(to_windows(y, self.window), self.mask)
        y = from_windows(y, self.window, self.size, self.size)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2 x 2 neighbouring tokens -> one token of twice the width."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.size = size
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.size, self.size, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class Stage(nn.Module):
    def __init__(self, dim: int, size: int, depth: int, heads: int, merge: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, size, heads, SWIN_WINDOW, 0 if i % 2 == 0 else SWIN_WINDOW // 2) for i in range(depth))
        self.downsample = PatchMerging(dim, size) if merge else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(1, EMBED_DIM, kernel_size=PATCH, stride=PATCH)
        self.norm = nn.LayerNorm(EMBED_DIM)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(image).flatten(2).transpose(1, 2))


class HTSAT(nn.Module):
    """HTSAT-base up to its clip embedding: [B, 480000] at 48 kHz -> [B, 1024]."""

    def __init__(self):
        super().__init__()
        self.front_end = LogMel()
        self.bn0 = nn.BatchNorm2d(MEL_BINS)
        self.patch_embed = PatchEmbed()
        grid = SPEC_SIZE // PATCH
        self.layers = nn.ModuleList(
            Stage(EMBED_DIM * 2 ** i, grid // 2 ** i, DEPTHS[i], HEADS[i], merge=i < len(DEPTHS) - 1)
            for i in range(len(DEPTHS)))
        self.norm = nn.LayerNorm(AUDIO_FEATURES)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = self.front_end(wav)  # [B, 1, T, 64]
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # normalised per mel bin
        x = self.patch_embed(spectrogram_image(x))
        for stage in self.layers:
            x = stage(x)
        return self.norm(x).mean(dim=1)


class AudioEncoder(nn.Module):
    """The CLAP audio branch and projection: [B, 480000] at 48 kHz -> [B, 512], L2-normalised."""

    def __init__(self, embed_dim: int = CONDITION_SIZE):
        super().__init__()
        self.audio_branch = HTSAT()
        self.audio_projection = nn.Sequential(
            nn.Linear(AUDIO_FEATURES, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.dim() != 2 or clips.shape[1] != CLIP_SAMPLES:
            raise ValueError(f"clips must be [batch, {CLIP_SAMPLES}], got {tuple(clips.shape)}")
        return F.normalize(self.audio_projection(self.audio_branch(clips)), dim=-1)


def repeatpad(wav: torch.Tensor, length: int = CLIP_SAMPLES) -> torch.Tensor:
    """A 1-D clip shorter than ``length`` repeated int(length / n) times, then zero-padded to ``length``."""
    n = wav.shape[-1]
    if n == 0:
        raise ValueError("cannot pad an empty clip")
    if n >= length:
        return wav
    return F.pad(wav.repeat(length // n), (0, length - (length // n) * n))


__all__ = ["QUERY_RATE", "CLIP_SAMPLES", "AudioEncoder", "HTSAT", "mel_filterbank", "repeatpad", "is_unused_key"]
