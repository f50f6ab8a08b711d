"""The original network's formulation, as a stated proxy for the original code in benchmarks.

Our ``ResUNet30`` computes the same function as the original AudioSep separator, but faster:
BatchNorm folded into the convolutions, channels-last tensors, intermediates freed early. The
benchmarks compare against the original, whose code is not part of this project; what they run
instead is this module: the same weights and the same STFT, every block written the way the
original writes it (BatchNorm, then + beta, then leaky ReLU, then convolution; plain contiguous
tensors; the whole file in one pass, no chunking). It is bit-for-bit the original's arithmetic
up to the order in which the libraries sum, and ``tests/test_original_proxy.py`` checks it
against the original's own output (the fixtures) within the parity bound.

What it does not include, and the original also pays: reading and resampling with librosa,
and the 512-token text encoding (run twice by the fork). A comparison against it therefore
favours the original.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dsu_audiosep.model.constants import TIME_DOWNSAMPLE
from dsu_audiosep.model.resunet import LEAKY_SLOPE, ConvBlockRes, ResUNet30, ResUNet30Base


def _block(block: ConvBlockRes, x: torch.Tensor, betas: dict[str, torch.Tensor]) -> torch.Tensor:
    b1, b2 = betas[block.film_name + "->beta1"], betas[block.film_name + "->beta2"]
    h = block.conv1(F.leaky_relu(block.bn1(x) + b1, LEAKY_SLOPE))
    h = block.conv2(F.leaky_relu(block.bn2(h) + b2, LEAKY_SLOPE))
    return (block.shortcut(x) if block.shortcut is not None else x) + h


def plain_mask(base: ResUNet30Base, mag: torch.Tensor, betas: dict[str, torch.Tensor]) -> torch.Tensor:
    """``ResUNet30Base.mask`` in the original's formulation."""
    frames = mag.shape[2]
    x = base.bn0(mag.transpose(1, 3)).transpose(1, 3)
    pad = math.ceil(frames / TIME_DOWNSAMPLE) * TIME_DOWNSAMPLE - frames
    x = base.pre_conv(F.pad(x, (0, 0, 0, pad))[..., :-1])
    skips = []
    for enc in base.encoders():
        h = _block(enc.conv_block1, x, betas)
        skips.append(h)
        x = F.avg_pool2d(h, enc.pool)
    x = _block(base.conv_block7a.conv_block1, x, betas)
    for dec in base.decoders():
        a = F.leaky_relu(dec.bn1(x) + betas[dec.name + "->beta1"], LEAKY_SLOPE)
        x = _block(dec.conv_block2, torch.cat((dec.conv1(a), skips.pop()), dim=1), betas)
    x = F.pad(base.after_conv(x), (0, 1))
    return x[:, :, :frames, :]


@torch.inference_mode()
def original_separate(ss_model: ResUNet30, wav: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """wav [B, N] at 32 kHz, condition [512] -> [B, N], as the original network computes it."""
    base = ss_model.base
    betas = ss_model.film(condition.reshape(1, -1).to(wav.device))
    mag, cos_in, sin_in = base.spectrogram(wav)
    maps = plain_mask(base, mag.to(base.pre_conv.weight.dtype), betas).float()
    return base.apply_maps(maps, mag, cos_in, sin_in, wav.shape[-1])
