"""Decoding what libsndfile cannot, through PyAV: AAC (ADTS, MP4/M4A/MOV), ALAC, Opus and Vorbis
in WebM/Matroska, WMA, AC-3/E-AC-3, and the soundtrack of a video (.mp4 .mov .mkv .webm .avi).

Why PyAV: its wheels carry FFmpeg's libraries, so nothing is needed on the system (no ffmpeg
program here, in CI or on users' machines), it decodes packet by packet (a 2-hour soundtrack is
never held whole) and it has the encoders the lossy outputs need (audio_encode_av.py).
``av`` is imported only when such a file arrives, so the worker's start does not wait for it.

``AvSource`` offers the subset of ``soundfile.SoundFile`` that ``audio_read.BlockReader`` uses
(samplerate, channels, format, subtype, ``read(n, dtype, always_2d, out)``, ``seek``, ``close``),
so both decoders stream through the same reader.

Length (``frames``), decided once when the file is opened:
- MP4/M4A/MOV declare the true length of a track (its duration, edit list applied: encoder
  priming skipped, end padding excluded). FFmpeg's decoder already drops the priming; we stop at
  the declared count, which drops the end padding too (an AAC file made from 220,500 samples
  declares 220,500; FFmpeg's tool decodes 221,184).
- Every other container is counted by decoding it once (frames only, nothing kept), which is
  exactly what FFmpeg's own tool outputs: Matroska/WebM and Ogg apply Opus pre-skip and the end
  trimming themselves; ADTS, AC-3, WMA have no declared length to trust. The count is cached
  for the file (path, size, mtime), so planning and reading decode it once, not twice.
A declared length that the data does not reach by more than one codec frame is a truncated file.
"""
from __future__ import annotations

import logging
import os
from typing import Iterator

import numpy as np

from dsu_audiosep.errors import INVALID_AUDIO, AudioSepError

__all__ = ["AvSource", "open_av", "av_available"]

log = logging.getLogger(__name__)

# Containers we hand to FFmpeg. Anything else FFmpeg might guess from arbitrary bytes (a picture,
# a text file taken for "tty" art, raw streams) stays "not recognised".
_CONTAINERS = ("mov", "mp4", "m4a", "matroska", "webm", "asf", "ac3", "eac3", "aac", "avi", "ogg",
               "mp3", "caf", "mpegts", "mpeg", "flac", "wav", "aiff", "w64")
# Declared track lengths we trust (see the module doc).
_DECLARED = ("mov", "mp4")
# How far short of its declared length a file may end before it counts as truncated.
_SLACK_FRAMES = 2048
_COUNT_CACHE: dict[tuple[str, int, int], int] = {}
_COUNT_CACHE_SIZE = 32

_av = None


def _import_av():
    """``av``, imported on first use; FFmpeg's own log is routed through Python logging at ERROR."""
    global _av
    if _av is None:
        import av
        import av.logging

        # FFmpeg logs to the process's stderr by itself; through Python logging it never reaches
        # stdout (the worker's protocol channel) and warnings about damaged frames stay quiet.
        av.logging.set_level(av.logging.ERROR)
        _av = av
    return _av


def av_available() -> bool:
    try:
        _import_av()
    except ImportError:
        return False
    return True


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.split(": '", 1)[0].rstrip(".")  # drop the file name FFmpeg repeats


def _to_float(a: np.ndarray, fmt: str) -> np.ndarray:
    """A decoded frame's samples as float32 in [-1, 1) for integer formats (libsndfile's scaling)."""
    if fmt.startswith("s16"):
        return a.astype(np.float32) / np.float32(1 << 15)
    if fmt.startswith("s32"):
        return (a.astype(np.float64) / float(1 << 31)).astype(np.float32)
    if fmt.startswith("s64"):
        return (a.astype(np.float64) / float(1 << 63)).astype(np.float32)
    if fmt.startswith("u8"):
        return (a.astype(np.float32) - 128.0) / 128.0
    return a.astype(np.float32, copy=False)


class AvSource:
    """One audio stream of a file FFmpeg reads, decoded on demand; see the module doc."""

    def __init__(self, path: str, warnings_out: list[str] | None = None):
        self.path = path
        self.av = _import_av()
        self._container = None
        self._open()
        try:
            self._describe(warnings_out)
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------------------------
    def _open(self) -> None:
        av = self.av
        try:
            self._container = av.open(self.path, "r", metadata_errors="ignore")
        except (av.error.FFmpegError, OSError, ValueError, UnicodeError) as e:
            raise AudioSepError(INVALID_AUDIO, f"'{self.path}' is not a readable audio file ({_reason(e)}); it may "
                                "not be audio, or it may be damaged or cut short") from None
        names = set(self._container.format.name.split(","))
        if not names & set(_CONTAINERS):
            self.close()
            raise AudioSepError(INVALID_AUDIO, f"'{self.path}' is not a readable audio file (format not recognised)")

    def _describe(self, warnings_out: list[str] | None) -> None:
        c = self._container
        audio = list(c.streams.audio)
        if not audio:
            kinds = "a video without sound" if c.streams.video else "no sound at all"
            raise AudioSepError(INVALID_AUDIO, f"'{self.path}' has no audio stream ({kinds}); nothing to separate")
        try:
            stream = c.streams.best("audio") or audio[0]
        except Exception:  # best() asks FFmpeg; a damaged stream table falls back to the first
            stream = audio[0]
        self.stream_index = stream.index
        if len(audio) > 1:
            msg = (f"'{self.path}' has {len(audio)} audio streams; using stream #{stream.index} (the default), "
                   "the others are ignored")
            log.warning("%s", msg)
            if warnings_out is not None:
                warnings_out.append(msg)
        try:
            ctx = stream.codec_context
        except Exception:  # PyAV raises when FFmpeg has no decoder for the stream's codec
            ctx = None
        codec = getattr(ctx, "name", None) or getattr(getattr(stream, "codec", None), "name", None) or "unknown"
        if ctx is None or getattr(ctx, "codec", None) is None:
            raise AudioSepError(INVALID_AUDIO, f"'{self.path}': its audio codec ({codec}) is not supported")
        self.samplerate = int(ctx.sample_rate or 0)
        layout = getattr(ctx, "layout", None)
        self.channels = int(layout.nb_channels if layout is not None else 0)
        if self.samplerate <= 0 or self.channels <= 0:
            raise AudioSepError(INVALID_AUDIO, f"'{self.path}' has an invalid audio stream ({codec}, "
                                f"{self.samplerate} Hz, {self.channels} channels)")
        self.format = c.format.name.split(",")[0].upper()
        self.subtype = codec.upper()
        self._declared = self._declared_frames(stream)
        self.frames = self._declared if self._declared is not None else self._counted_frames()
        self._rewind()

    def _declared_frames(self, stream) -> int | None:
        if not set(self._container.format.name.split(",")) & set(_DECLARED):
            return None
        if not stream.duration or stream.duration <= 0 or stream.time_base is None:
            return None
        return int(round(stream.duration * stream.time_base * self.samplerate))

    def _counted_frames(self) -> int:
        try:
            st = os.stat(self.path)
            key = (os.path.abspath(self.path), st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
        if key is not None and key in _COUNT_CACHE:
            return _COUNT_CACHE[key]
        self._rewind()
        total = 0
        for frame in self._frames():
            total += frame.samples
        if key is not None:
            if len(_COUNT_CACHE) >= _COUNT_CACHE_SIZE:
                _COUNT_CACHE.pop(next(iter(_COUNT_CACHE)))
            _COUNT_CACHE[key] = total
        return total

    # -- decoding -----------------------------------------------------------------------------
    def _rewind(self) -> None:
        """Back to the first sample: reopened, since seeking in a compressed stream is not exact."""
        if self._container is not None:
            self._container.close()
        self._open()
        self._stream = self._container.streams[self.stream_index]
        self._decoded = 0
        self._ended = False
        self._pending = np.empty((0, self.channels), dtype=np.float32)
        self._blocks = self._frame_blocks()

    def _frames(self) -> Iterator:
        """Decoded frames of the chosen stream; FFmpeg's failures become INVALID_AUDIO."""
        av = self.av
        done = 0
        try:
            for packet in self._container.demux(self._stream):
                for frame in packet.decode():
                    done += frame.samples
                    yield frame
        except (av.error.FFmpegError, OSError, ValueError, MemoryError) as e:
            raise AudioSepError(INVALID_AUDIO, f"'{self.path}' is damaged or truncated: decoding failed after "
                                f"{done} frames ({_reason(e)})") from None

    def _frame_blocks(self) -> Iterator[np.ndarray]:
        """[k, channels] float32 blocks, stopped at ``frames``."""
        for frame in self._frames():
            if frame.sample_rate != self.samplerate or frame.layout.nb_channels != self.channels:
                raise AudioSepError(INVALID_AUDIO, f"'{self.path}' changes its sample rate or channel count "
                                    "midstream, which is not supported")
            fmt = frame.format.name
            a = frame.to_ndarray()
            # planar: [channels, k]; packed: [1, k * channels] interleaved
            a = a.T if frame.format.is_planar else a.reshape(-1, self.channels)
            block = _to_float(a, fmt)
            room = self.frames - self._decoded
            if block.shape[0] > room:
                block = block[:room]  # end padding beyond the declared length
            self._decoded += block.shape[0]
            if block.shape[0]:
                yield block
            if self._decoded >= self.frames:
                return
        if self._declared is not None and self._decoded + _SLACK_FRAMES < self._declared:
            raise AudioSepError(INVALID_AUDIO, f"'{self.path}' is truncated: it declares {self._declared} frames "
                                f"but its data ends after {self._decoded}")

    def read(self, frames: int, dtype: str = "float32", always_2d: bool = True, out: np.ndarray | None = None):
        """Like ``SoundFile.read`` with ``out``: fills ``out[:k]`` and returns that view."""
        if out is None:
            out = np.empty((frames, self.channels), dtype=np.float32)
        k = 0
        while k < frames:
            if self._pending.shape[0] == 0:
                if self._ended:
                    break
                nxt = next(self._blocks, None)
                if nxt is None:
                    self._ended = True
                    break
                self._pending = nxt
            take = min(frames - k, self._pending.shape[0])
            out[k : k + take] = self._pending[:take]
            self._pending = self._pending[take:]
            k += take
        return out[:k]

    def seek(self, frame: int) -> None:
        """Exact positioning: from the start, decoding and dropping what precedes ``frame``."""
        self._rewind()
        skip = int(frame)
        buf = np.empty((min(skip, 1 << 16), self.channels), dtype=np.float32) if skip else None
        while skip > 0:
            got = self.read(min(skip, buf.shape[0]), out=buf).shape[0]
            if got == 0:
                break
            skip -= got

    def close(self) -> None:
        c, self._container = self._container, None
        if c is not None:
            try:
                c.close()
            except Exception:
                pass

    def __enter__(self) -> "AvSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_av(path: str, warnings_out: list[str] | None = None) -> AvSource:
    """Open ``path`` with FFmpeg, or raise INVALID_AUDIO saying why (not audio, no audio stream,
    codec not supported, damaged); without PyAV installed, the format is not recognised."""
    try:
        _import_av()
    except ImportError:
        raise AudioSepError(INVALID_AUDIO, f"'{path}' is not a readable audio file (format not recognised; "
                            "PyAV, which reads AAC, M4A, WebM, WMA and video soundtracks, is not installed)") from None
    return AvSource(path, warnings_out)
