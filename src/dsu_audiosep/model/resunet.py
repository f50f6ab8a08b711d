"""ResUNet30 with FiLM conditioning: the AudioSep separator network, and nothing else.

Module and parameter names reproduce the released checkpoint's ``ss_model.*`` keys, so a
``state_dict`` loads without renaming: ``base.*`` is the U-Net, ``film.*`` the 512 -> C linear maps
whose outputs are added after BatchNorm. FiLM layer names contain ``->`` (e.g.
``film.encoder_block1->conv_block1->beta1.weight``), as in the released file.

Shapes (per mono signal): waveform [B, N] at 32 kHz -> spectrum [B, 1, T, 1025]; the network sees
[B, C, T', 1024] with T' a multiple of 32, and emits three maps: a magnitude mask and the two
components of a phase rotation.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .constants import BINS, CONDITION_SIZE, ENCODER_POOL, TIME_DOWNSAMPLE
from .stft import make_stft_pair

LEAKY_SLOPE = 0.01
ENCODER_CHANNELS = (32, 64, 128, 256, 384, 384)
DECODER_CHANNELS = (384, 384, 256, 128, 64, 32)
DECODER_UPSAMPLE = ((1, 2), (2, 2), (2, 2), (2, 2), (2, 2), (2, 2))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, momentum=0.01)


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm at inference is the affine map x * s + t."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return s, bn.bias - bn.running_mean * s


def _folded(module: nn.Module, make):
    """Inference constants derived from a block's weights, computed once; ResUNet30 clears them
    whenever weights, device or dtype change."""
    cached = module.__dict__.get("_folded_cache")
    if cached is None:
        cached = module.__dict__["_folded_cache"] = make()
    return cached


def clear_folded(root: nn.Module) -> None:
    for m in root.modules():
        m.__dict__.pop("_folded_cache", None)


class ConvBlockRes(nn.Module):
    """Pre-activation residual block: two BN -> +beta -> leaky ReLU -> 3x3 conv stages."""

    def __init__(self, c_in: int, c_out: int, film_name: str):
        super().__init__()
        self.film_name = film_name
        self.bn1 = _bn(c_in)
        self.bn2 = _bn(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def film_sites(self) -> list[tuple[str, int]]:
        return [(self.film_name + "->beta1", self.bn1.num_features), (self.film_name + "->beta2", self.bn2.num_features)]

    def _fold(self):
        s1, t1 = bn_affine(self.bn1)
        s2, t2 = bn_affine(self.bn2)
        w = self.conv1.weight
        fmt = torch.channels_last if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return s1, t1, (w * s2[:, None, None, None]).contiguous(memory_format=fmt), t2

    def forward(self, x: torch.Tensor, betas: dict[str, torch.Tensor]) -> torch.Tensor:
        b1, b2 = betas[self.film_name + "->beta1"], betas[self.film_name + "->beta2"]
        if b1.shape[0] != 1 or self.training:  # per-item conditions: the plain formulation
            h = self.conv1(F.leaky_relu(self.bn1(x) + b1, LEAKY_SLOPE))
            h = self.conv2(F.leaky_relu(self.bn2(h) + b2, LEAKY_SLOPE))
            return (self.shortcut(x) if self.shortcut is not None else x) + h
        # Inference with one condition: BN1 + beta1 is one multiply-add, and BN2 + beta2 folds
        # into conv1's weights and bias, so each stage costs one pass over memory besides its conv.
        # Intermediates are dropped as soon as they are consumed: at full resolution each one is
        # 13 MB per channel-group and audio-second, and they set the peak memory of a window.
        s1, t1, w1, t2 = _folded(self, self._fold)
        a = F.leaky_relu_(torch.addcmul((t1 + b1[0, :, 0, 0])[None, :, None, None], x, s1[None, :, None, None]), LEAKY_SLOPE)
        h = F.conv2d(a, w1, t2 + b2[0, :, 0, 0], padding=1)
        del a
        h = self.conv2(F.leaky_relu_(h, LEAKY_SLOPE))
        return h.add_(self.shortcut(x) if self.shortcut is not None else x)


class EncoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, pool: tuple[int, int], name: str):
        super().__init__()
        self.pool = pool
        self.conv_block1 = ConvBlockRes(c_in, c_out, name + "->conv_block1")

    def forward(self, x: torch.Tensor, betas: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv_block1(x, betas)
        pooled = F.avg_pool2d(h, self.pool) if self.pool != (1, 1) else h
        return pooled, h


class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, upsample: tuple[int, int], name: str):
        super().__init__()
        self.name = name
        self.conv1 = nn.ConvTranspose2d(c_in, c_out, upsample, stride=upsample, bias=False)
        self.bn1 = _bn(c_in)
        self.conv_block2 = ConvBlockRes(2 * c_out, c_out, name + "->conv_block2")
        # Present in the released checkpoint (with a FiLM layer "->beta2") but never used by the
        # forward pass: loaded so the file matches, ignored otherwise.
        self.bn2 = _bn(c_in)

    def film_sites(self) -> list[tuple[str, int]]:
        return [(self.name + "->beta1", self.bn1.num_features), (self.name + "->beta2", self.bn2.num_features)]

    def forward(self, x: torch.Tensor, skip: torch.Tensor, betas: dict[str, torch.Tensor]) -> torch.Tensor:
        b1 = betas[self.name + "->beta1"]
        if b1.shape[0] != 1 or self.training:
            a = F.leaky_relu(self.bn1(x) + b1, LEAKY_SLOPE)
        else:
            s1, t1 = _folded(self, lambda: bn_affine(self.bn1))
            a = F.leaky_relu_(torch.addcmul((t1 + b1[0, :, 0, 0])[None, :, None, None], x, s1[None, :, None, None]), LEAKY_SLOPE)
        up = self.conv1(a)
        del a, x
        joined = torch.cat((up, skip), dim=1)
        del up, skip
        return self.conv_block2(joined, betas)


class ResUNet30Base(nn.Module):
    def __init__(self, input_channels: int = 1, output_channels: int = 1, use_torch_stft: bool = False):
        super().__init__()
        self.output_channels = output_channels
        self.stft, self.istft = make_stft_pair(use_torch_stft)
        self.bn0 = _bn(BINS)
        self.pre_conv = nn.Conv2d(input_channels, 32, 1)
        c_prev = 32
        for i, (c, pool) in enumerate(zip(ENCODER_CHANNELS, ENCODER_POOL), start=1):
            self.add_module(f"encoder_block{i}", EncoderBlock(c_prev, c, pool, f"encoder_block{i}"))
            c_prev = c
        self.conv_block7a = EncoderBlock(384, 384, (1, 1), "conv_block7a")
        for i, (c, up) in enumerate(zip(DECODER_CHANNELS, DECODER_UPSAMPLE), start=1):
            self.add_module(f"decoder_block{i}", DecoderBlock(c_prev, c, up, f"decoder_block{i}"))
            c_prev = c
        self.after_conv = nn.Conv2d(32, output_channels * 3, 1)

    def encoders(self) -> list[EncoderBlock]:
        return [getattr(self, f"encoder_block{i}") for i in range(1, 7)]

    def decoders(self) -> list[DecoderBlock]:
        return [getattr(self, f"decoder_block{i}") for i in range(1, 7)]

    def film_sites(self) -> list[tuple[str, int]]:
        """(name, channels) of every FiLM layer, in the order of the released checkpoint."""
        sites: list[tuple[str, int]] = []
        for enc in self.encoders() + [self.conv_block7a]:
            sites += enc.conv_block1.film_sites()
        for dec in self.decoders():
            sites += dec.film_sites() + dec.conv_block2.film_sites()
        return sites

    def set_stft(self, use_torch_stft: bool, conv_kernels: dict[str, torch.Tensor] | None = None) -> None:
        """Swap the STFT front-end; the network weights stay where they are."""
        device = self.pre_conv.weight.device
        stft, istft = make_stft_pair(use_torch_stft)
        if not use_torch_stft:
            if conv_kernels is None:
                from .stft import dft_kernels

                conv_kernels = dft_kernels()
            stft.conv_real.weight.data = conv_kernels["stft.conv_real.weight"]
            stft.conv_imag.weight.data = conv_kernels["stft.conv_imag.weight"]
            istft.conv_real.weight.data = conv_kernels["istft.conv_real.weight"]
            istft.conv_imag.weight.data = conv_kernels["istft.conv_imag.weight"]
            istft.ola_window.data = conv_kernels["istft.ola_window"]
        self.stft, self.istft = stft.to(device), istft.to(device)

    def spectrogram(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, N] -> magnitude, cos, sin, each [B, 1, T, 1025]."""
        real, imag = self.stft(wav)
        mag = torch.clamp(real**2 + imag**2, min=1e-10) ** 0.5
        return mag, real / mag, imag / mag

    def mask_input(self, mag: torch.Tensor) -> torch.Tensor:
        """Magnitude [B, 1, T, 1025] -> the body's input [B, 1, T', 1024] (BatchNorm over bins,
        time padded to the pooling grid, the last bin dropped so frequency halves evenly)."""
        frames = mag.shape[2]
        x = self.bn0(mag.transpose(1, 3)).transpose(1, 3)
        pad = math.ceil(frames / TIME_DOWNSAMPLE) * TIME_DOWNSAMPLE - frames
        return F.pad(x, (0, 0, 0, pad))[..., :-1]

    def body(self, x: torch.Tensor, betas: dict[str, torch.Tensor]) -> torch.Tensor:
        """The U-Net proper: [B, 1, T', 1024] -> three maps [B, 3, T', 1024]. This is the part
        an inference runtime may run instead of torch (engine/backends.py)."""
        # channels-last is what oneDNN's convolutions run fastest on (about 1.25x here). The 1-channel
        # input is made plainly contiguous first: the conv STFT leaves it time-major, and such
        # strides on a 1-channel tensor made oneDNN's result vary from run to run.
        x = self.pre_conv(x.contiguous()).contiguous(memory_format=torch.channels_last)
        skips = []
        for enc in self.encoders():
            x, h = enc(x, betas)
            skips.append(h)
        x, _ = self.conv_block7a(x, betas)
        for dec in self.decoders():
            x = dec(x, skips.pop(), betas)  # pop: each skip is freed once its decoder has used it
        return self.after_conv(x)

    def mask(self, mag: torch.Tensor, betas: dict[str, torch.Tensor] | None,
             body: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The network: magnitude [B, 1, T, 1025] -> three maps [B, 3, T, 1025]. ``body``, when
        given, replaces ``self.body(x, betas)`` (a compiled copy of it)."""
        frames = mag.shape[2]
        x = self.mask_input(mag)
        x = body(x) if body is not None else self.body(x, betas)
        x = F.pad(x, (0, 1))  # the dropped bin comes back as zeros
        return x[:, :, :frames, :]

    def forward(self, wav: torch.Tensor, betas: dict[str, torch.Tensor] | None,
                body: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """[B, N] mono mixtures -> [B, N] separated waveforms."""
        length = wav.shape[-1]
        mag, cos_in, sin_in = self.spectrogram(wav)
        # In reduced precision only the U-Net runs in bf16/fp16; spectra and masks stay float32.
        maps = self.mask(mag.to(self.pre_conv.weight.dtype), betas, body).float()
        return self.apply_maps(maps, mag, cos_in, sin_in, length)

    def apply_maps(self, maps: torch.Tensor, mag: torch.Tensor, cos_in: torch.Tensor, sin_in: torch.Tensor,
                   length: int) -> torch.Tensor:
        """The network's three maps applied to the mixture's spectrum: magnitude mask and phase
        rotation, then the inverse STFT back to ``length`` samples."""
        mask_mag = torch.sigmoid(maps[:, 0:1])
        rot_real = torch.tanh(maps[:, 1:2])
        rot_imag = torch.tanh(maps[:, 2:3])
        rot_norm = torch.clamp((rot_real**2 + rot_imag**2) ** 0.5, min=1e-10)
        mask_cos, mask_sin = rot_real / rot_norm, rot_imag / rot_norm
        out_cos = cos_in * mask_cos - sin_in * mask_sin
        out_sin = sin_in * mask_cos + cos_in * mask_sin
        out_mag = F.relu(mag * mask_mag)
        return self.istft(out_mag * out_cos, out_mag * out_sin, length)


class FiLM(nn.Module):
    """One Linear(condition -> C) per conditioned BatchNorm, named by its path in the U-Net."""

    def __init__(self, sites: list[tuple[str, int]], condition_size: int = CONDITION_SIZE):
        super().__init__()
        for name, channels in sites:
            self.add_module(name, nn.Linear(condition_size, channels))

    def forward(self, condition: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, 512] -> {site: [B, C, 1, 1]} additive biases."""
        return {name: layer(condition)[:, :, None, None] for name, layer in self.named_children()}


class ResUNet30(nn.Module):
    """The separator: ``base`` U-Net plus its ``film`` conditioning (checkpoint prefix ``ss_model.``)."""

    def __init__(self, input_channels: int = 1, output_channels: int = 1, condition_size: int = CONDITION_SIZE,
                 use_torch_stft: bool = False):
        super().__init__()
        self.base = ResUNet30Base(input_channels, output_channels, use_torch_stft)
        self.film = FiLM(self.base.film_sites(), condition_size)
        # Set by the engine to run the body on another runtime: (x, condition) -> maps, with the
        # FiLM layers inside it. None: torch (the reference).
        self.body_runner: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def _apply(self, fn, recurse: bool = True):  # .to(device/dtype/memory format): re-derive constants
        clear_folded(self)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        clear_folded(self)
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def use_torch_stft(self) -> bool:
        from .stft import TorchSTFT

        return isinstance(self.base.stft, TorchSTFT)

    def forward(self, wav: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """wav [B, N] at 32 kHz, condition [B or 1, 512] -> [B, N]."""
        runner = self.body_runner
        if runner is None:
            return self.base(wav, self.film(condition))
        return self.base(wav, None, lambda x: runner(x, condition))

    def body_with_film(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The body as one function of (input, condition): what a runtime compiles."""
        return self.base.body(x, self.film(condition))
