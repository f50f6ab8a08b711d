"""The seed-compatible Python API: ``build_audiosep`` and ``separate_audio``.

    from dsu_audiosep import build_audiosep, separate_audio
    model = build_audiosep("config/audiosep_base.yaml", "checkpoint/audiosep_base_4M_steps.ckpt", "cpu",
                           roberta_dir="checkpoint/roberta-base")
    separate_audio(model, "mix.wav", "a dog barking", "dog.wav")
    separate_audio(model, "mix.wav", None, "kick.wav", query_audio="kick_example.wav")   # by example
    vec = embed_query(model, query_audio=["kick1.wav", "kick2.wav"])                     # a preset
    separate_audio(model, "mix.wav", None, "kick.wav", query_embedding=vec)

Both are thin wrappers over :func:`dsu_audiosep.model.checkpoints.load_model` and
:func:`dsu_audiosep.engine.separate.separate_file`. For audio in memory (arrays, tensors, file
objects) and stems, see :class:`dsu_audiosep.Separator` (api.py; ``Separator.from_model(model)``
wraps a model built here); both run the same pipeline.
"""
from __future__ import annotations

from typing import Any

from . import options
from .engine.backends import use_backend
from .engine.query import Query
from .engine.query import query_embedding as condition_of
from .engine.separate import SeparateOptions, SeparationResult, separate_file
from .model.audiosep import AudioSep
from .model.checkpoints import load_model


def build_audiosep(config_yaml: str | None, checkpoint_path: str, device: str = "cpu", mmap: bool = False,
                   clap_checkpoint_path: str | None = None, roberta_dir: str | None = None,
                   use_torch_stft: bool = False, precision: str = "fp32", load_audio_branch: bool = False,
                   backend: str = "auto") -> AudioSep:
    """``backend``: "auto" (the measured choice for this CPU), "torch" or "openvino" (see docs/backends.md)."""
    model = load_model(config_path=config_yaml, checkpoint_path=checkpoint_path, device=device, mmap=mmap,
                       clap_checkpoint_path=clap_checkpoint_path, roberta_dir=roberta_dir,
                       use_torch_stft=use_torch_stft, precision=precision)
    if load_audio_branch:
        model.load_audio_branch()
    use_backend(model, options.BY_NAME["backend"].from_python(backend))
    return model


def embed_query(model: AudioSep, text: str | None = None, query_audio: str | list[str] | None = None,
                query_start: float | None = None, query_end: float | None = None,
                query_weight: float | None = None) -> list[float]:
    """The 512 numbers of a query (text and/or example audio), to store and pass as ``query_embedding``."""
    query = Query.from_fields(text, query_audio, query_start, query_end, query_weight)
    return [float(v) for v in condition_of(model, query)]


def separate_audio(model: AudioSep, audio_file: str, text: str | None, output_file: str, device: Any = None,
                   use_chunk: bool | str = False, *, query_audio: str | list[str] | None = None,
                   query_start: float | None = None, query_end: float | None = None,
                   query_weight: float | None = None, query_embedding: list[float] | None = None,
                   **output_options: Any) -> SeparationResult:
    """``device`` is accepted for seed compatibility; the model's own device is used.

    The query: ``text``, and/or ``query_audio`` (a file or a list of files; ``query_start`` /
    ``query_end`` pick a span of one file; ``query_weight`` is the audio share when both are given),
    or ``query_embedding`` (512 numbers from :func:`embed_query`). See engine/query.py.

    ``output_options``: output_sr, output_subtype, output_channels, mode, residual_output,
    chunk_seconds, chunk_length, context_seconds (see SeparateOptions).
    """
    unknown = set(output_options) - set(SeparateOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    query = Query.from_fields(text, query_audio, query_start, query_end, query_weight, query_embedding)
    return separate_file(model, audio_file, output_file, query.text, SeparateOptions(use_chunk=use_chunk, **output_options),
                         query=query)
