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

import torch
import torch.nn.functional as F

from dsu_audiosep.model.resunet import LEAKY_SLOPE, ConvBlockRes, ResUNet30


def _conv(m, x: torch.Tensor) -> torch.Tensor:
    """A convolution on plainly contiguous weights (ours may be channels-last)."""
    return F.conv2d(x, m.weight.contiguous(), m.bias, m.stride, m.padding)


def _block(block: ConvBlockRes, x: torch.Tensor, betas: dict[str, torch.Tensor]) -> torch.Tensor:
    h = _conv(block.conv1, F.leaky_relu(block.bn1(x) + betas[block.film_name + "->beta1"], LEAKY_SLOPE))
    h = _conv(block.conv2, F.leaky_relu(block.bn2(h) + betas[block.film_name + "->beta2"], LEAKY_SLOPE))
    return (_conv(block.shortcut, x) if block.shortcut is not None else x) + h


def plain_body(ss_model: ResUNet30, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """``ResUNet30Base.body`` (input [B, 1, T', 1024] -> maps [B, 3, T', 1024]) in the original's
    formulation, conditioned by ``condition`` [1, 512]."""
    base, betas = ss_model.base, ss_model.film(condition)
    x = _conv(base.pre_conv, x.contiguous())
    skips = []
    for enc in base.encoders():
        h = _block(enc.conv_block1, x, betas)
        skips.append(h)
        x = F.avg_pool2d(h, enc.pool)
    x = _block(base.conv_block7a.conv_block1, x, betas)
    for dec in base.decoders():
        a = F.leaky_relu(dec.bn1(x) + betas[dec.name + "->beta1"], LEAKY_SLOPE)
        up = F.conv_transpose2d(a, dec.conv1.weight.contiguous(), None, dec.conv1.stride)
        x = _block(dec.conv_block2, torch.cat((up, skips.pop()), dim=1), betas)
    return _conv(base.after_conv, x)


@torch.inference_mode()
def original_separate(ss_model: ResUNet30, wav: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """wav [B, N] at 32 kHz, condition [512] -> [B, N], as the original network computes it."""
    base = ss_model.base
    cond = condition.reshape(1, -1).to(wav.device)
    mag, cos_in, sin_in = base.spectrogram(wav)
    maps = base.mask(mag.to(base.pre_conv.weight.dtype), None, body=lambda x: plain_body(ss_model, x, cond)).float()
    return base.apply_maps(maps, mag, cos_in, sin_in, wav.shape[-1])
