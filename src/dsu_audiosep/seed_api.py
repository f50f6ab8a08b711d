"""The seed-compatible Python API: ``build_audiosep`` and ``separate_audio``.

    from dsu_audiosep import build_audiosep, separate_audio
    model = build_audiosep("config/audiosep_base.yaml", "checkpoint/audiosep_base_4M_steps.ckpt", "cpu",
                           roberta_dir="checkpoint/roberta-base")
    separate_audio(model, "mix.wav", "a dog barking", "dog.wav")

Both are thin wrappers over :func:`dsu_audiosep.model.checkpoints.load_model` and
:func:`dsu_audiosep.engine.separate.separate_file`.
"""
from __future__ import annotations

from typing import Any

from . import options
from .engine.backends import use_backend
from .engine.separate import SeparateOptions, SeparationResult, separate_file
from .model.audiosep import AudioSep
from .model.checkpoints import load_model


def build_audiosep(config_yaml: str | None, checkpoint_path: str, device: str = "cpu", mmap: bool = False,
                   clap_checkpoint_path: str | None = None, roberta_dir: str | None = None,
                   use_torch_stft: bool = False, precision: str = "fp32", backend: str = "auto") -> AudioSep:
    """``backend``: "auto" (the measured choice for this CPU), "torch" or "openvino" (see README)."""
    model = load_model(config_path=config_yaml, checkpoint_path=checkpoint_path, device=device, mmap=mmap,
                       clap_checkpoint_path=clap_checkpoint_path, roberta_dir=roberta_dir,
                       use_torch_stft=use_torch_stft, precision=precision)
    use_backend(model, options.BY_NAME["backend"].from_python(backend))
    return model


def separate_audio(model: AudioSep, audio_file: str, text: str, output_file: str, device: Any = None,
                   use_chunk: bool | str = False, **output_options: Any) -> SeparationResult:
    """``device`` is accepted for seed compatibility; the model's own device is used.

    ``output_options``: output_sr, output_subtype, output_channels, mode, residual_output,
    chunk_seconds, chunk_length, context_seconds (see SeparateOptions).
    """
    unknown = set(output_options) - set(SeparateOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return separate_file(model, audio_file, output_file, text, SeparateOptions(use_chunk=use_chunk, **output_options))
