"""Encoding the lossy outputs through PyAV: MP3 (LAME), Opus (libopus in Ogg), M4A (FFmpeg's AAC in MP4).

Why PyAV for all three, although libsndfile 1.2 writes MP3 and Opus too: both give the right
length on read-back (measured: 220,500 samples in, 220,500 out of FFmpeg and libsndfile for MP3
with its LAME tag and for Opus with its pre-skip and final granule), but only PyAV writes AAC,
and it takes the bitrate in bits per second for each codec, where libsndfile maps a
"compression level" to a bitrate differently per format and version. One encoder path, one
meaning of ``output_bitrate``.

Lengths: frames carry timestamps from 0, so the encoders' priming (LAME's delay, Opus pre-skip,
AAC's 1024 samples) is declared in the file (LAME tag, Ogg pre-skip, MP4 edit list) and the
readers trim it: an output read back has the length written. A rate the codec does not code
(Opus: only 8/12/16/24/48 kHz) is resampled here to the one output_options.encoder_samplerate
chose; the writer says so in the job's warnings.

``AvSink`` has the two methods ``AtomicWriter`` calls on its file: ``write([n, channels] float32)``
and ``close()``. FFmpeg's failures become ``OSError`` with FFmpeg's errno, so the writer's rules
(disk full, permission) apply to them as to libsndfile's.
"""
from __future__ import annotations

import errno as errno_mod
from fractions import Fraction

import numpy as np

from .audio_decode_av import _import_av
from .resampling import StreamResampler

__all__ = ["AvSink", "MUXERS"]

# output format (output_options.OUTPUT_FORMATS) -> (FFmpeg muxer, encoder). Default bitrates and
# the rates each codec codes: output_options.py.
MUXERS = {"MP3": ("mp3", "libmp3lame"), "OPUS": ("ogg", "libopus"), "M4A": ("ipod", "aac")}

# FFmpeg layouts in the standard WAVE channel order that output_options' downmix assumes.
_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def _os_error(e: BaseException) -> OSError:
    code = getattr(e, "errno", None)
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return OSError(code if isinstance(code, int) and code > 0 else errno_mod.EIO, text)


class AvSink:
    """Encode float32 ``[n, channels]`` blocks at ``samplerate`` to ``path`` as ``fmt``, resampled
    to ``file_rate`` first when the codec does not code ``samplerate``."""

    def __init__(self, path: str, fmt: str, samplerate: int, file_rate: int, channels: int, kbps: int):
        av = _import_av()
        self._av = av
        muxer, encoder = MUXERS[fmt]
        self.rate = int(file_rate)
        self.channels = int(channels)
        self.layout = _LAYOUTS.get(self.channels, f"{self.channels} channels")
        self._rs = StreamResampler(self.channels, samplerate, self.rate) if self.rate != samplerate else None
        self._pts = 0
        try:
            # MP4 writes the edit list (which trims the priming and the end padding) in the movie's
            # timescale, 1/1000 s by default: 72,500 samples at 48 kHz would read back as 72,480.
            # The audio rate as the movie's timescale makes the declared length exact.
            options = {"movie_timescale": str(self.rate)} if muxer == "ipod" else {}
            self._c = av.open(path, "w", format=muxer, options=options)
            try:
                self._s = self._c.add_stream(encoder, rate=self.rate, layout=self.layout)
                self._s.bit_rate = int(kbps) * 1000
                self._s.codec_context.open()  # fails here, before any audio, on a rate/layout the codec refuses
            except BaseException:
                self._c.close()
                raise
        except (av.error.FFmpegError, ValueError) as e:
            raise ValueError(str(e)) from None

    def write(self, buf: np.ndarray) -> None:
        block = np.ascontiguousarray(buf.T, dtype=np.float32)
        if self._rs is not None:
            block = self._rs.process(block)
        self._encode(block)

    def _encode(self, block: np.ndarray | None) -> None:
        av = self._av
        try:
            if block is None:
                packets = self._s.encode(None)
            else:
                if block.shape[1] == 0:
                    return
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout=self.layout)
                frame.sample_rate = self.rate
                # Timestamps from 0 make the muxers declare the encoder's priming (see the module doc).
                frame.time_base = Fraction(1, self.rate)
                frame.pts = self._pts
                self._pts += block.shape[1]
                packets = self._s.encode(frame)
            for p in packets:
                self._c.mux(p)
        except av.error.FFmpegError as e:
            raise _os_error(e) from None

    def close(self) -> None:
        """Flush the encoder and finish the file (trailer, LAME tag, final granule)."""
        c = getattr(self, "_c", None)
        if c is None:
            return
        try:
            if self._rs is not None:
                rs, self._rs = self._rs, None
                self._encode(rs.process(np.empty((self.channels, 0), np.float32), last=True))
            self._encode(None)
        finally:
            self._c = None
            try:
                c.close()
            except self._av.error.FFmpegError as e:
                raise _os_error(e) from None

    def discard(self) -> None:
        """Close without finishing (the file is deleted by the caller)."""
        c, self._c = getattr(self, "_c", None), None
        if c is not None:
            try:
                c.close()
            except Exception:
                pass
