"""AudioSep = text encoder (CLAP text branch) + ResUNet30 separator, as one loaded object."""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Mapping

import torch
from torch import nn

from ..errors import INVALID_FIELD, AudioSepError
from .constants import N_FFT, SAMPLE_RATE
from .no_init import no_init
from .resunet import ResUNet30
from .stft import dft_kernels

# "tf32" keeps float32 tensors but lets CUDA's matrix units round the convolution inputs to TF32
# (10-bit mantissa): about 3x faster on an H100 at about 48 dB SNR. "fp32" is strict IEEE float32
# everywhere, also on CUDA where PyTorch would otherwise allow TF32 in cuDNN convolutions.
PRECISION_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> torch.dtype:
    """The weights' dtype for a precision name; an unknown name is INVALID_FIELD."""
    if precision not in PRECISION_DTYPES:
        raise AudioSepError(INVALID_FIELD, f"precision must be one of {sorted(PRECISION_DTYPES)}, got {precision!r}")
    return PRECISION_DTYPES[precision]


def materialize(factory: Callable[[], nn.Module], weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """Build ``factory()`` around ``weights`` without paying for a random initialisation.

    The tensors are assigned, not copied, so memory-mapped checkpoint tensors stay mapped; strict
    loading guarantees that no uninitialised parameter or buffer survives.
    """
    with no_init():
        module = factory()
    module.load_state_dict(weights, strict=True, assign=True)
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class AudioSep(nn.Module):
    sample_rate = SAMPLE_RATE

    def __init__(self, ss_model: ResUNet30, text_encoder: nn.Module, tokenizer, conv_kernels: dict[str, torch.Tensor] | None):
        super().__init__()
        self.ss_model = ss_model
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        # Kept so that switching to the conv STFT later uses the checkpoint's own kernels.
        self._conv_kernels = conv_kernels
        self.precision = "fp32"
        self.backend = "torch"  # the runtime of the separator's body (engine/backends.py sets it)
        self.sources: dict[str, str | None] = {}  # the files it was loaded from, as resolved
        # Where the CLAP audio branch is read from on the first audio query (None: nowhere).
        self.audio_source = None
        # Audio-query embeddings, keyed by the engine (file identity and span); see engine/query.py.
        self.audio_cache: OrderedDict = OrderedDict()

    @classmethod
    def from_weights(cls, ss: Mapping[str, torch.Tensor], conv: Mapping[str, torch.Tensor] | None,
                     text: Mapping[str, torch.Tensor], tokenizer, roberta_cfg, use_torch_stft: bool = False) -> "AudioSep":
        from .text import TextEncoder

        weights = dict(ss)
        if use_torch_stft:
            window = torch.hann_window(N_FFT)
            weights["base.stft.window"] = window
            weights["base.istft.window"] = window.clone()
        else:
            conv = dict(conv) if conv is not None else dft_kernels()
            weights.update({"base." + k: v for k, v in conv.items()})
        ss_model = materialize(lambda: ResUNet30(use_torch_stft=use_torch_stft), weights)
        text_encoder = materialize(lambda: TextEncoder(roberta_cfg), text)
        text_encoder.set_tokenizer(tokenizer)
        return cls(ss_model, text_encoder, tokenizer, dict(conv) if conv is not None else None)

    @property
    def device(self) -> torch.device:
        return self.ss_model.base.pre_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.ss_model.base.pre_conv.weight.dtype

    @property
    def use_torch_stft(self) -> bool:
        return self.ss_model.use_torch_stft

    def to_device(self, device: str | torch.device, precision: str = "fp32") -> "AudioSep":
        """Move to ``device`` in ``precision``: "fp32" (exact), "tf32", "bf16" or "fp16"."""
        self.to(device)
        dtype = PRECISION_DTYPES[precision]
        if dtype != torch.float32:
            # The STFT stays in float32 (torch.stft has no bf16 on CPU, and its cost is small);
            # only the U-Net and FiLM run in reduced precision.
            for name, child in self.ss_model.base.named_children():
                if name not in ("stft", "istft"):
                    child.to(dtype)
            self.ss_model.film.to(dtype)
        self.precision = precision
        return self

    def set_stft(self, use_torch_stft: bool) -> None:
        if use_torch_stft == self.use_torch_stft:
            return
        if not use_torch_stft and self._conv_kernels is None:
            self._conv_kernels = dft_kernels()
        self.ss_model.base.set_stft(use_torch_stft, self._conv_kernels)

    @torch.inference_mode()
    def embed_text(self, text: str) -> torch.Tensor:
        """The 512-d L2-normalised query embedding (cached per text), on the model's device."""
        return self.text_encoder.embed_one(text)

    def release_text_pages(self) -> int:
        """Give the text encoder's memory-mapped pages back until the next new query (see process_memory.py)."""
        if self.device.type != "cpu":
            return 0
        from ..process_memory import page_out

        return page_out(self.text_encoder.state_dict().values())

    @property
    def audio_branch_loaded(self) -> bool:
        return self.audio_source is not None and self.audio_source.loaded

    def load_audio_branch(self):
        """The CLAP audio encoder, read from the model's files on first use (AudioSepError if absent)."""
        if self.audio_source is None:
            from ..errors import NO_AUDIO_BRANCH

            raise AudioSepError(NO_AUDIO_BRANCH, "this model was loaded without a source for the CLAP audio branch")
        return self.audio_source.load(self.device)

    def embed_audio(self, clips: torch.Tensor) -> torch.Tensor:
        """[B, 480000] 48 kHz clips -> [B, 512] L2-normalised CLAP audio embeddings (float32)."""
        encoder = self.load_audio_branch()
        with torch.inference_mode():
            out = encoder(clips.to(device=self.device, dtype=torch.float32))
        return out.clone()  # outside inference mode: a normal tensor callers may use anywhere

    def release_audio_pages(self) -> int:
        """Give the audio branch's memory-mapped pages back until the next new audio query."""
        if self.device.type != "cpu" or not self.audio_branch_loaded:
            return 0
        from ..process_memory import page_out

        return page_out(self.audio_source.load(self.device).state_dict().values())

    @torch.inference_mode()
    def separate(self, wav: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """wav [B, N] float32 at 32 kHz on the model's device, condition [512] -> [B, N]."""
        cond = condition.reshape(1, -1).to(device=self.device, dtype=self.dtype)
        if self.device.type != "cuda":
            return self.ss_model(wav, cond)
        with _tf32(self.precision == "tf32"):
            return self.ss_model(wav, cond)


@contextmanager
def _tf32(allowed: bool):
    """cuDNN's TF32 switch is process-wide (and on by default): set it for this forward pass only."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before
