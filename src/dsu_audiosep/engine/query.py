"""What is the query: one immutable record, and the one function that turns it into the 512-d condition.

A query is text, example audio (one file with an optional span, or several files), both mixed by
``weight``, or a stored embedding. ``Query.validate`` is the only place the combination is checked
(the protocol, the CLI and the API all call it before any work); ``query_embedding(model, query)``
is the only place the condition is computed (separate, embed, and per-stem queries reuse it).

Audio path, as the original feeds CLAP: the file is decoded and averaged to mono; a 48 kHz file is
used as it is (the encoder's own rate); any other rate is brought to 32 kHz like the mixture (soxr
HQ), then to 48 kHz by torchaudio's Hann-windowed sinc (model/sinc_resample.py), which is what the
original does to its 32 kHz query tensor. The span ``start``/``end`` (seconds) is cut at 48 kHz,
rounded to the nearest sample. A clip up to 10 s is "repeatpad"ed to 10 s; a longer one is
embedded as the normalised mean of 10 s windows with a 10 s hop, the last window ending at the
clip's end (the original crops one random 10 s window instead, so it is not deterministic), so
``ceil(seconds / 10)`` forward passes. A 10 s span is embedded exactly as the original embeds
that crop. An all-silent clip is valid: its log-mel sits at the floor and gives a fixed embedding.

Audio embeddings are cached per model (key: resolved path, size, mtime, span), like text ones.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import FILE_NOT_FOUND, INVALID_AUDIO, INVALID_FIELD, INVALID_QUERY, AudioSepError

EMBEDDING_SIZE = 512
DEFAULT_TEXT = "speech"  # the seed worker's query when none is given
DEFAULT_WEIGHT = 0.5
QUERY_RATE = 48000  # the CLAP audio branch's rate (model/audio_query.py)
MIX_RATE = 32000  # where the original's query tensor comes from
WINDOW_SECONDS = 10.0
WINDOW_HOP_SECONDS = 10.0
AUDIO_CACHE_SIZE = 64


@dataclass(frozen=True)
class Query:
    """``text`` and/or ``audio_paths`` (with ``start``/``end`` for a single file), or ``embedding``.

    ``weight`` is the audio embedding's share when text and audio are both given (0..1).
    """

    text: str | None = None
    audio_paths: tuple[str, ...] = ()
    start: float | None = None
    end: float | None = None
    weight: float = DEFAULT_WEIGHT
    embedding: tuple[float, ...] | None = None

    @classmethod
    def from_fields(cls, text: Any = None, query_audio: Any = None, query_start: Any = None, query_end: Any = None,
                    query_weight: Any = None, query_embedding: Any = None) -> "Query":
        """The query the fields of a command describe (``None``: not given), validated. Without any
        query field the text is the seed's default, "speech"."""
        paths: tuple[str, ...] = ()
        if query_audio is not None:
            paths = (query_audio,) if isinstance(query_audio, str) else tuple(query_audio)
        embedding = None if query_embedding is None else tuple(query_embedding)
        if text is None and query_audio is None and embedding is None:
            text = DEFAULT_TEXT
        q = cls(text=text, audio_paths=paths, start=query_start, end=query_end,
                weight=DEFAULT_WEIGHT if query_weight is None else query_weight, embedding=embedding)
        return q.validate(audio_given=query_audio is not None)

    def validate(self, audio_given: bool | None = None) -> "Query":
        audio_given = bool(self.audio_paths) if audio_given is None else audio_given
        if self.embedding is not None:
            if self.text is not None or audio_given:
                raise AudioSepError(INVALID_QUERY, "query_embedding replaces text and query_audio: give one or the other")
            check_embedding(self.embedding)
            return self
        if audio_given and not self.audio_paths:
            raise AudioSepError(INVALID_QUERY, "query_audio is an empty list: give at least one audio file")
        for p in self.audio_paths:
            if not isinstance(p, str) or not p.strip() or "\x00" in p:
                raise AudioSepError(INVALID_QUERY, f"query_audio entries must be file paths, got {p!r}")
        if (self.start is not None or self.end is not None) and len(self.audio_paths) != 1:
            raise AudioSepError(INVALID_QUERY, "query_start / query_end select a span of ONE query_audio file")
        for name, v in (("query_start", self.start), ("query_end", self.end)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
                raise AudioSepError(INVALID_QUERY, f"{name} must be a number of seconds >= 0, got {v!r}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise AudioSepError(INVALID_QUERY, f"query_end ({self.end} s) must be after query_start ({self.start} s)")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0 <= self.weight <= 1:
            raise AudioSepError(INVALID_FIELD, f"query_weight must be a number from 0 to 1, got {self.weight!r}")
        if self.text is None and not self.audio_paths:
            raise AudioSepError(INVALID_QUERY, "no query: give text, query_audio or query_embedding")
        return self

    @property
    def uses_audio(self) -> bool:
        return bool(self.audio_paths)

    def describe(self) -> str:
        """A short label for logs and replies."""
        if self.embedding is not None:
            return "embedding"
        parts = [f"text {self.text!r}"] if self.text is not None else []
        if self.audio_paths:
            parts.append(f"{len(self.audio_paths)} audio file(s)")
        return " + ".join(parts)


def check_embedding(values: Sequence[Any]) -> None:
    if len(values) != EMBEDDING_SIZE:
        raise AudioSepError(INVALID_QUERY, f"query_embedding must have {EMBEDDING_SIZE} numbers, got {len(values)}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise AudioSepError(INVALID_QUERY, f"query_embedding[{i}] must be a finite number, got {v!r}")
    if not any(values):
        raise AudioSepError(INVALID_QUERY, "query_embedding is all zeros: it has no direction to normalise")


# --------------------------------------------------------------------------------------------
# The condition


def query_embedding(model, query: Query):
    """The L2-normalised [512] float32 condition for ``query`` (text, audio, both, or given)."""
    import torch
    import torch.nn.functional as F

    if query.embedding is not None:
        return F.normalize(torch.tensor(query.embedding, dtype=torch.float32), dim=0)
    text_emb = model.embed_text(query.text).float().cpu() if query.text is not None else None
    if not query.audio_paths:
        return text_emb
    per_file = [embed_audio_file(model, p, query.start, query.end) for p in query.audio_paths]
    audio = _normalised_mean(per_file)
    if text_emb is None:
        return audio
    return _normalised(query.weight * audio + (1 - query.weight) * text_emb)


def _normalised(v):
    import torch

    norm = float(v.norm())
    if not norm > 0 or not math.isfinite(norm):
        raise AudioSepError(INVALID_QUERY, "the query embeddings cancel out (their weighted sum is zero)")
    return (v / torch.tensor(norm, dtype=v.dtype)).float()


def _normalised_mean(embeddings: list):
    import torch

    return embeddings[0] if len(embeddings) == 1 else _normalised(torch.stack(embeddings).mean(dim=0))


def cache_key(path: str, start: float | None, end: float | None) -> tuple:
    """Resolved path, size and mtime (a rewritten file is embedded again), and the span."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise AudioSepError(FILE_NOT_FOUND, f"query audio file '{path}' does not exist") from None
    except OSError as exc:
        raise AudioSepError(INVALID_AUDIO, f"query audio file '{path}' cannot be accessed: {exc.strerror or exc}") from None
    return (real, st.st_size, st.st_mtime_ns, start, end)


def embed_audio_file(model, path: str, start: float | None = None, end: float | None = None):
    """[512] embedding of one query file (or its span), from the model's cache when unchanged."""
    key = cache_key(os.path.expanduser(path), start, end)
    cache = model.audio_cache
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit.clone()
    clip = query_clip(os.path.expanduser(path), start, end)
    emb = embed_clip(model, clip)
    cache[key] = emb
    while len(cache) > AUDIO_CACHE_SIZE:
        cache.popitem(last=False)
    return emb.clone()


def query_clip(path: str, start: float | None, end: float | None):
    """The mono float32 48 kHz tensor of ``path`` (its span), as the encoder sees it."""
    import numpy as np
    import torch

    from ..model.sinc_resample import sinc_resample
    from .audio_read import read_audio
    from .resampling import resample

    try:
        audio, sr = read_audio(path)
    except AudioSepError as exc:
        raise AudioSepError(exc.code, f"query_audio: {exc.message}") from None
    if audio.shape[1] == 0:
        raise AudioSepError(INVALID_AUDIO, f"query_audio: '{path}' holds no samples")
    mono = audio.mean(axis=0, dtype=np.float32) if audio.shape[0] > 1 else audio[0]
    if sr == QUERY_RATE:
        wav = torch.from_numpy(np.ascontiguousarray(mono))
    else:
        at_mix_rate = mono if sr == MIX_RATE else resample(mono, sr, MIX_RATE)
        wav = sinc_resample(torch.from_numpy(np.ascontiguousarray(at_mix_rate)), MIX_RATE, QUERY_RATE)
    return cut_span(wav, start, end, path)


def _sample(seconds: float) -> int:
    return int(math.floor(seconds * QUERY_RATE + 0.5))  # nearest sample, halves up


def cut_span(wav, start: float | None, end: float | None, path: str = "query_audio"):
    """``wav[start:end]`` in 48 kHz samples; a span outside the file is INVALID_QUERY."""
    n = wav.shape[-1]
    duration = n / QUERY_RATE
    s = 0 if start is None else _sample(start)
    e = n if end is None else _sample(end)
    if s >= n:
        raise AudioSepError(INVALID_QUERY, f"query_start {start} s is not inside '{path}' ({duration:.3f} s long)")
    if e > n:
        raise AudioSepError(INVALID_QUERY, f"query_end {end} s is beyond the end of '{path}' ({duration:.3f} s long)")
    if e <= s:
        raise AudioSepError(INVALID_QUERY, f"the span {start}-{end} s of '{path}' holds no samples")
    return wav[s:e]


def window_starts(n: int, window: int, hop: int) -> list[int]:
    """Starts of the windows covering ``n`` samples: every ``hop``, the last one ending at ``n``."""
    if n <= window:
        return [0]
    starts = list(range(0, n - window, hop))
    return starts + [n - window]


def embed_clip(model, clip):
    """[512] embedding of a 48 kHz mono clip: repeatpad up to 10 s, mean of 10 s windows beyond."""
    import torch

    from ..model.audio_query import CLIP_SAMPLES, repeatpad

    hop = int(WINDOW_HOP_SECONDS * QUERY_RATE)
    starts = window_starts(clip.shape[-1], CLIP_SAMPLES, hop)
    if len(starts) == 1:
        return model.embed_audio(repeatpad(clip[:CLIP_SAMPLES])[None])[0].cpu()
    # One window at a time: memory stays that of a 10 s clip whatever the length.
    embs = [model.embed_audio(clip[s:s + CLIP_SAMPLES][None])[0].cpu() for s in starts]
    return _normalised(torch.stack(embs).mean(dim=0))


__all__ = ["Query", "query_embedding", "embed_audio_file", "embed_clip", "cut_span", "window_starts",
           "check_embedding", "EMBEDDING_SIZE"]
