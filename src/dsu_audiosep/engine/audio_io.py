"""Audio input and output for the engine: reading, resampling and atomic writing.

Everything here works on float32 arrays shaped ``[channels, frames]``; the engine separates each
channel on its own at the model rate (32 kHz).

Reading (``probe``, ``read_audio``, ``BlockReader``)
    Anything libsndfile (through ``soundfile``) decodes: WAV (8/16/24/32-bit integer, 32/64-bit
    float), FLAC, OGG/Vorbis, AIFF, MP3 and the rest, at any rate and channel count. Failures a user
    can cause become ``AudioSepError`` with a stable code: ``FILE_NOT_FOUND`` (missing path or broken
    link), ``PERMISSION_DENIED`` (cannot be opened for reading), ``INVALID_AUDIO`` (a folder, a
    device or pipe, not audio, damaged, truncated, or without samples).
    Truncation: a WAV or AIFF file cut short still opens in libsndfile (it trusts the file length),
    so we compare the data size its header announces with what is present and refuse the file when
    the header claims more. Placeholder sizes written by recorders that never finished (0 or
    >= 0x7FFF0000) are accepted. A FLAC file cut short fails while decoding and is refused as well.
    Ogg has no announced length, so a cut Ogg file is read up to where it ends.
    Non-finite samples (NaN, +-Inf, possible in float files) are replaced by 0: the STFT would
    spread a single NaN over the whole chunk. How many were replaced is logged as a warning on the
    ``dsu_audiosep.engine.audio_io`` logger (stderr unless configured, never stdout) and, when the
    caller passes a ``warnings`` list, appended to it as a sentence. Values beyond +-1 (float files)
    are kept as they are: no normalisation. An empty (0-byte) file is refused as such; a stream
    whose header does not announce its length (libsndfile then reports 2^63-1 frames) is counted
    by decoding it once, so ``frames`` is always exact.

Resampling (``resample``, ``StreamResampler``)
    We use soxr: it is fast (40 s of stereo 32 k -> 44.1 k in ~30 ms here), high quality (the "HQ"
    preset is a linear-phase filter with >= 120 dB of stop band), streams through
    ``soxr.ResampleStream`` with the one-shot result (measured bit-identical here; the tests require
    a max abs difference < 1e-5), and is a tiny wheel without the librosa / numba / llvmlite /
    scipy chain. The original reads with soxr HQ to 32 kHz, as we do, but writes back with scipy's
    ``resample_poly``; our 32 k -> 44.1 k path therefore differs from the original's output by
    about 30 dB SNR (inaudible, not bit-identical), while 32 kHz in and out is exact (identity).
    Output length is ``resampled_length(n, sr_in, sr_out)`` = round(n * sr_out / sr_in) with
    halves rounded up (what soxr itself produces), enforced by padding or trimming; librosa, which
    the original calls, uses ceil instead, so the 32 kHz signal can be one sample shorter than
    the original's at the very end.

Writing (``OutputOptions``, ``prepare_output``, ``AtomicWriter``, ``write_audio``)
    The container comes from the output extension: .wav, .flac, .ogg/.oga (Vorbis), .aiff/.aif.
    Sample formats: PCM_16 (default), PCM_24, FLOAT. FLAC cannot store float samples: FLOAT with
    .flac is refused with INVALID_FIELD (silently writing 24-bit integers would clip values above
    full scale without the user having chosen it). Ogg/Vorbis is lossy and has no sample format:
    the option is ignored there and the file is Vorbis, clipped like PCM.
    Clipping: PCM and Vorbis outputs are hard-clipped to [-1, 1] before libsndfile sees them, so
    full scale is [-1, 1) in practice (libsndfile scales by 2^(bits-1) and saturates +1.0 to the
    largest positive code, 32767 for 16 bits; clipping ourselves makes the count, and the absence
    of wrap-around, independent of its version). Clipped samples are counted, logged and reported
    in ``WriteStats.clipped``. FLOAT keeps values as they are. NaN/Inf are never written: they
    become 0 first (counted in ``WriteStats.nonfinite``), so +Inf is not counted as clipped.
    Limits checked before opening: FLAC holds 1..8 channels up to 655350 Hz; Ogg/Vorbis up to
    200 kHz (the bundled libvorbis crashes the whole process above that, measured) - both refused
    with INVALID_FIELD.
    Channels: ``"input"`` keeps the channel count. ``"stereo"`` writes two channels: mono is
    duplicated, stereo kept, and more channels are downmixed with the usual coefficients for the
    standard WAVE channel order (front left/right at 1, centre and surrounds at -3 dB to their
    side or both sides, LFE dropped), each output row normalised so that its coefficients sum to 1,
    which means the downmix itself can never clip. Downmixing before separating is cheaper (fewer
    channels to separate) and gives a comparable result; the engine chooses where to call it.
    Atomicity: the file is written to a hidden ``.<name>.<owner>_<random>.partial<ext>`` in the
    target folder (the owner token names the writing process, see partials.py, so that files a
    killed writer left behind are swept before the next write into that folder) and
    moved onto the target with ``os.replace`` (atomic on POSIX and Windows) after an fsync; any
    exception, KeyboardInterrupt included, deletes the temporary file and leaves a pre-existing
    target untouched. ``cleanup_partial_files()`` deletes every temporary file still being
    written, for a SIGTERM handler. Disk full (ENOSPC/EDQUOT, recognised from the OS error, the
    libsndfile system error or an almost empty disk) becomes DISK_FULL; a missing output folder or
    other write failures become OUTPUT_ERROR, a folder without write permission PERMISSION_DENIED.
    WAV outputs expected to exceed 4 GiB are written as RF64 (plain WAV cannot hold them).
"""
from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import re
import shutil
import stat
import threading
from dataclasses import dataclass
from typing import Iterator, Union

import numpy as np
import soundfile as sf
import soxr

from dsu_audiosep.engine import partials
from dsu_audiosep.errors import (
    CANCELLED,
    DISK_FULL,
    FILE_NOT_FOUND,
    INVALID_AUDIO,
    INVALID_FIELD,
    OUTPUT_ERROR,
    PERMISSION_DENIED,
    AudioSepError,
)

__all__ = [
    "AudioInfo",
    "probe",
    "read_audio",
    "BlockReader",
    "sanitize",
    "resampled_length",
    "resample",
    "StreamResampler",
    "OUTPUT_FORMATS",
    "OutputOptions",
    "OutputPlan",
    "prepare_output",
    "output_format_for",
    "map_channels",
    "output_channel_count",
    "WriteStats",
    "AtomicWriter",
    "write_audio",
    "cleanup_partial_files",
    "same_file",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# Frames per read/write call: large enough that per-call overhead vanishes, small enough that the
# temporary [frames, channels] buffer stays a few MB.
_BLOCK = 1 << 16


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AudioInfo:
    frames: int
    samplerate: int
    channels: int
    duration: float  # seconds
    format: str      # libsndfile major format, e.g. "WAV", "FLAC"
    subtype: str     # e.g. "PCM_16", "FLOAT", "VORBIS"


def sanitize(x: np.ndarray) -> int:
    """Replace NaN and +-Inf by 0 in place; return how many samples were replaced."""
    finite = np.isfinite(x)
    if finite.all():
        return 0
    bad = ~finite
    count = int(np.count_nonzero(bad))
    x[bad] = 0.0
    return count


def _report(message: str, warnings: list[str] | None) -> None:
    log.warning("%s", message)
    if warnings is not None:
        warnings.append(message)


def _check_input_path(path: PathLike) -> str:
    p = os.fsdecode(os.fspath(path))
    if not p:
        raise AudioSepError(FILE_NOT_FOUND, "no input file was given (empty path)")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.lexists(p):
            raise AudioSepError(FILE_NOT_FOUND, f"input file '{p}' is a link to a file that does not exist") from None
        raise AudioSepError(FILE_NOT_FOUND, f"input file '{p}' does not exist") from None
    except PermissionError:
        raise AudioSepError(PERMISSION_DENIED, f"no permission to access input file '{p}'") from None
    except (OSError, ValueError) as e:
        raise AudioSepError(FILE_NOT_FOUND, f"input file '{p}' cannot be accessed: {_why(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioSepError(INVALID_AUDIO, f"input '{p}' is a folder, not an audio file")
    if not stat.S_ISREG(st.st_mode):
        # Opening a FIFO or a device could block the worker forever.
        raise AudioSepError(INVALID_AUDIO, f"input '{p}' is not a regular file (a device, pipe or socket)")
    if st.st_size == 0:
        raise AudioSepError(INVALID_AUDIO, f"input file '{p}' is empty (0 bytes)")
    # libsndfile reports a permission problem as a generic "System error"; open it ourselves first
    # to give the user the real reason.
    try:
        with open(p, "rb"):
            pass
    except PermissionError:
        raise AudioSepError(PERMISSION_DENIED, f"no permission to read input file '{p}'") from None
    except FileNotFoundError:
        raise AudioSepError(FILE_NOT_FOUND, f"input file '{p}' does not exist") from None
    except OSError as e:
        raise AudioSepError(INVALID_AUDIO, f"cannot open input file '{p}': {_why(e)}") from None
    return p


def _why(e: BaseException) -> str:
    if isinstance(e, sf.LibsndfileError):
        return e.error_string.rstrip(".")
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


_SHORT_CHUNK = re.compile(r"^\s*(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _truncation(f: sf.SoundFile) -> tuple[int, int] | None:
    """(announced, present) data bytes when a WAV/AIFF header announces more than the file holds."""
    try:
        log_text = f.extra_info
    except Exception:  # the log is a diagnostic aid only; never fail a read because of it
        return None
    for m in _SHORT_CHUNK.finditer(log_text):
        announced, present = int(m.group(2)), int(m.group(3))
        # 0 and huge values are placeholders left by recorders that never rewrote the header.
        if announced == 0 or announced >= 0x7FFF0000:
            continue
        if announced > present:
            return announced, present
    return None


# libsndfile reports SF_COUNT_MAX frames when a header does not say how long the stream is
# (e.g. a FLAC file encoded from a pipe).
_UNKNOWN_FRAMES = 1 << 62


def _count_frames(f: sf.SoundFile, p: str) -> int:
    buf = np.empty((_BLOCK, f.channels), dtype=np.float32)
    total = 0
    try:
        while True:
            k = f.read(_BLOCK, dtype="float32", always_2d=True, out=buf).shape[0]
            if k == 0:
                break
            total += k
        f.seek(0)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioSepError(
            INVALID_AUDIO, f"'{p}' is damaged or truncated: decoding failed after {total} frames ({_why(e)})"
        ) from None
    return total


def _open_input(p: str) -> tuple[sf.SoundFile, int]:
    """Open and validate; returns the file and its frame count (counted when not announced)."""
    try:
        f = sf.SoundFile(p)
    except sf.LibsndfileError as e:
        why = _why(e)
        if "does not exist" in why or "not a regular file" in why:  # libsndfile's text for any unknown format
            why = "format not recognised"
        raise AudioSepError(
            INVALID_AUDIO,
            f"'{p}' is not a readable audio file ({why}); it may not be audio, or it may be "
            "damaged or cut short",
        ) from None
    except PermissionError:
        raise AudioSepError(PERMISSION_DENIED, f"no permission to read input file '{p}'") from None
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        raise AudioSepError(INVALID_AUDIO, f"'{p}' is not a readable audio file ({_why(e)})") from None
    try:
        if f.samplerate <= 0 or f.channels <= 0:
            raise AudioSepError(
                INVALID_AUDIO, f"'{p}' has an invalid header ({f.samplerate} Hz, {f.channels} channels)"
            )
        frames = int(f.frames)
        if frames >= _UNKNOWN_FRAMES:
            frames = _count_frames(f, p)
        if frames <= 0:
            raise AudioSepError(INVALID_AUDIO, f"'{p}' contains no samples")
        cut = _truncation(f)
        if cut is not None:
            raise AudioSepError(
                INVALID_AUDIO,
                f"'{p}' is truncated: its header announces {cut[0]} bytes of audio but only "
                f"{cut[1]} are present (was it cut short while copying or recording?)",
            )
    except BaseException:
        f.close()
        raise
    return f, frames


def _info_of(f: sf.SoundFile, frames: int) -> AudioInfo:
    return AudioInfo(
        frames=frames,
        samplerate=int(f.samplerate),
        channels=int(f.channels),
        duration=frames / float(f.samplerate),
        format=str(f.format),
        subtype=str(f.subtype),
    )


def probe(path: PathLike) -> AudioInfo:
    """Describe an input file without decoding it (except to count the frames of a stream whose
    header does not announce them); raises what ``read_audio`` would raise on open (missing,
    unreadable, not audio, truncated WAV/AIFF, no samples)."""
    p = _check_input_path(path)
    f, frames = _open_input(p)
    with f:
        return _info_of(f, frames)


class BlockReader:
    """Read an input file block by block without loading it whole.

    Iterating yields fresh float32 arrays shaped ``[channels, n]`` with ``n <= blocksize`` (only the
    last block is shorter), sanitised like ``read_audio``. ``nonfinite_replaced`` counts replaced
    samples so far; the total is logged (and appended to ``warnings``) when the file is exhausted.
    A decoding failure in the middle (a cut FLAC file) raises INVALID_AUDIO.
    """

    def __init__(self, path: PathLike, blocksize: int = _BLOCK, *, warnings: list[str] | None = None):
        if int(blocksize) <= 0:
            raise ValueError("blocksize must be positive")
        self.path = _check_input_path(path)
        self.blocksize = int(blocksize)
        self._warnings = warnings
        self._f: sf.SoundFile | None
        self._f, frames = _open_input(self.path)
        self.info = _info_of(self._f, frames)
        self.samplerate = self.info.samplerate
        self.channels = self.info.channels
        self.frames = self.info.frames
        self.position = 0
        self.nonfinite_replaced = 0
        self._reported = False
        self._buf = np.empty((min(self.blocksize, self.frames), self.channels), dtype=np.float32)

    def read(self, n: int | None = None) -> np.ndarray:
        """Up to ``n`` (default ``blocksize``) next frames as ``[channels, k]``; k == 0 at the end."""
        if self._f is None:
            raise ValueError("BlockReader is closed")
        n = self.blocksize if n is None else int(n)
        n = max(0, min(n, self.frames - self.position))
        if n == 0:
            self._finish()
            return np.empty((self.channels, 0), dtype=np.float32)
        if self._buf.shape[0] < n:
            self._buf = np.empty((n, self.channels), dtype=np.float32)
        try:
            got = self._f.read(n, dtype="float32", always_2d=True, out=self._buf[:n])
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            raise AudioSepError(
                INVALID_AUDIO,
                f"'{self.path}' is damaged or truncated: decoding failed after {self.position} of "
                f"{self.frames} frames ({_why(e)})",
            ) from None
        k = got.shape[0]
        if k == 0:
            # Fewer frames than announced without a decoding error (estimated lengths, e.g. MP3):
            # the file simply ends here.
            if self.position == 0:
                raise AudioSepError(INVALID_AUDIO, f"'{self.path}' contains no samples")
            self.frames = self.position
            self._finish()
            return np.empty((self.channels, 0), dtype=np.float32)
        # A real copy: the buffer is reused, and ascontiguousarray would return a view for a
        # single channel or a single frame.
        block = np.array(got.T, dtype=np.float32, order="C", copy=True)
        self.nonfinite_replaced += sanitize(block)
        self.position += k
        return block

    def seek(self, frame: int) -> None:
        if self._f is None:
            raise ValueError("BlockReader is closed")
        frame = int(frame)
        if not 0 <= frame <= self.frames:
            raise ValueError(f"frame {frame} outside 0..{self.frames}")
        self._f.seek(frame)
        self.position = frame

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            block = self.read()
            if block.shape[1] == 0:
                return
            yield block

    def _finish(self) -> None:
        if self.nonfinite_replaced and not self._reported:
            self._reported = True
            _report(
                f"'{self.path}': replaced {self.nonfinite_replaced} non-finite samples (NaN/Inf) by 0",
                self._warnings,
            )

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "BlockReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - safety net only
        try:
            self.close()
        except Exception:
            pass


def read_audio(path: PathLike, *, warnings: list[str] | None = None) -> tuple[np.ndarray, int]:
    """Decode a whole file to ``(float32 [channels, frames], samplerate)``.

    Integer files are scaled to [-1, 1); float files keep their values, even far beyond +-1.
    NaN and +-Inf samples are replaced by 0; their count is logged as a warning (stderr by default,
    never stdout) and appended to ``warnings`` when a list is given. Errors: see the module doc.
    The result is filled block by block, so peak memory is the array plus one small block.
    """
    with BlockReader(path, warnings=warnings) as r:
        out = np.empty((r.channels, r.frames), dtype=np.float32)
        pos = 0
        for block in r:
            out[:, pos : pos + block.shape[1]] = block
            pos += block.shape[1]
        if pos < out.shape[1]:
            out = np.ascontiguousarray(out[:, :pos])
        return out, r.samplerate


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------

_QUALITIES = ("VHQ", "HQ", "MQ", "LQ", "QQ")


def resampled_length(n: int, sr_in: int, sr_out: int) -> int:
    """round(n * sr_out / sr_in) with halves rounded up, in exact integer arithmetic."""
    return (2 * int(n) * int(sr_out) + int(sr_in)) // (2 * int(sr_in))


def _check_rates(sr_in: int, sr_out: int, quality: str) -> str:
    for name, v in (("sr_in", sr_in), ("sr_out", sr_out)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    q = str(quality).upper()
    if q not in _QUALITIES:
        raise ValueError(f"quality must be one of {_QUALITIES}, got {quality!r}")
    return q


def _fit(y: np.ndarray, length: int) -> np.ndarray:
    n = y.shape[-1]
    if n == length:
        return y
    if n > length:
        return np.ascontiguousarray(y[..., :length])
    pad = np.zeros(y.shape[:-1] + (length - n,), dtype=y.dtype)
    return np.concatenate([y, pad], axis=-1)


def resample(
    x: np.ndarray, sr_in: int, sr_out: int, quality: str = "HQ", *, length: int | None = None
) -> np.ndarray:
    """Resample ``x`` ([channels, frames] or 1-D) from ``sr_in`` to ``sr_out`` with soxr.

    Output length is ``length`` when given (to restore an exact original length after a round
    trip), else ``resampled_length(frames, sr_in, sr_out)``; padding/trimming enforces it. Equal
    rates return the input (as float32) untouched, apart from that length fitting.
    """
    q = _check_rates(sr_in, sr_out, quality)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"expected [channels, frames] or [frames], got shape {x.shape}")
    n = x.shape[-1]
    target = resampled_length(n, sr_in, sr_out) if length is None else int(length)
    if sr_in == sr_out:
        return _fit(x, target)
    if n == 0:
        return np.zeros(x.shape[:-1] + (target,), dtype=np.float32)
    if x.ndim == 1:
        return _fit(np.asarray(soxr.resample(x, sr_in, sr_out, q), dtype=np.float32), target)
    out = np.zeros((x.shape[0], target), dtype=np.float32)
    # One contiguous channel at a time: no [frames, channels] transposed copies, same result as
    # soxr's interleaved multi-channel call (channels are filtered independently).
    for c in range(x.shape[0]):
        y = soxr.resample(np.ascontiguousarray(x[c]), sr_in, sr_out, q)
        m = min(target, y.shape[0])
        out[c, :m] = y[:m]
    return out


class StreamResampler:
    """Block-wise resampler whose concatenated output equals ``resample`` of the whole signal.

    ``process(block [channels, n], last=False)`` returns the output available so far; the call with
    ``last=True`` (its block may be empty) flushes the filter and pads/trims so that the total is
    exactly ``resampled_length(total_in, sr_in, sr_out)`` (or ``length`` if given then).
    """

    def __init__(self, channels: int, sr_in: int, sr_out: int, quality: str = "HQ", parallel: bool = False):
        """``parallel``: one soxr stream per channel, run in threads (soxr releases the GIL; the
        output is identical, each channel is filtered on its own either way)."""
        if int(channels) <= 0:
            raise ValueError("channels must be positive")
        self.channels = int(channels)
        self.sr_in, self.sr_out = int(sr_in), int(sr_out)
        q = _check_rates(self.sr_in, self.sr_out, quality)
        self._stream = None
        self._streams: list = []
        if self.sr_in != self.sr_out:
            if parallel and self.channels > 1:
                self._streams = [soxr.ResampleStream(self.sr_in, self.sr_out, 1, dtype="float32", quality=q)
                                 for _ in range(self.channels)]
            else:
                self._stream = soxr.ResampleStream(self.sr_in, self.sr_out, self.channels, dtype="float32", quality=q)
        self.total_in = 0
        self.total_out = 0
        self._held = np.empty((self.channels, 0), dtype=np.float32)
        self._done = False

    def process(self, block: np.ndarray, last: bool = False, *, length: int | None = None) -> np.ndarray:
        if self._done:
            raise RuntimeError("StreamResampler already received its last block")
        block = np.asarray(block, dtype=np.float32)
        if block.ndim == 1 and self.channels == 1:
            block = block[None, :]
        if block.ndim != 2 or block.shape[0] != self.channels:
            raise ValueError(f"expected a [{self.channels}, n] block, got shape {block.shape}")
        self.total_in += block.shape[1]
        if self._streams:
            y = self._parallel_chunk(block, last)
        elif self._stream is None:
            y = np.array(block, dtype=np.float32, copy=True)
        else:
            y = self._stream.resample_chunk(np.ascontiguousarray(block.T), last=last)
            y = np.ascontiguousarray(np.asarray(y, dtype=np.float32).reshape(-1, self.channels).T)
        if self._held.shape[1]:
            y = np.concatenate([self._held, y], axis=1)
            self._held = self._held[:, :0]
        if last:
            self._done = True
            target = resampled_length(self.total_in, self.sr_in, self.sr_out) if length is None else int(length)
            y = _fit(y, max(0, target - self.total_out))
        else:
            # Never emit more than the final length can be; soxr does not do that in practice, but
            # holding back keeps the total exact whatever the block sizes.
            room = resampled_length(self.total_in, self.sr_in, self.sr_out) - self.total_out
            if y.shape[1] > room:
                self._held = np.ascontiguousarray(y[:, max(room, 0):])
                y = np.ascontiguousarray(y[:, : max(room, 0)])
        self.total_out += y.shape[1]
        return y

    def _parallel_chunk(self, block: np.ndarray, last: bool) -> np.ndarray:
        rows = [np.ascontiguousarray(block[c]) for c in range(self.channels)]
        if block.shape[1] >= PARALLEL_MIN_FRAMES:
            futures = [_resample_pool().submit(s.resample_chunk, r, last) for s, r in zip(self._streams, rows)]
            outs = [f.result() for f in futures]
        else:
            outs = [s.resample_chunk(r, last) for s, r in zip(self._streams, rows)]
        n = min(len(o) for o in outs)  # equal in practice: same filter, same input lengths
        out = np.empty((self.channels, n), np.float32)
        for c, o in enumerate(outs):
            out[c] = np.asarray(o, dtype=np.float32).reshape(-1)[:n]
        return out


PARALLEL_MIN_FRAMES = 4096  # below this a thread hand-off costs more than the filtering
_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _resample_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                                          thread_name_prefix="dsu-resample")
        return _POOL


# --------------------------------------------------------------------------------------------
# Output options and channel mapping
# --------------------------------------------------------------------------------------------

OUTPUT_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".oga": "OGG", ".aiff": "AIFF", ".aif": "AIFF"}
_SUBTYPE_ALIASES = {
    "PCM_16": "PCM_16", "PCM16": "PCM_16", "16": "PCM_16", "INT16": "PCM_16",
    "PCM_24": "PCM_24", "PCM24": "PCM_24", "24": "PCM_24", "INT24": "PCM_24",
    "FLOAT": "FLOAT", "FLOAT32": "FLOAT", "F32": "FLOAT", "32F": "FLOAT",
}
_MIN_SR, _MAX_SR = 1000, 768000


def output_format_for(path: PathLike) -> str:
    """libsndfile container for an output path, from its extension (case-insensitive)."""
    p = os.fsdecode(os.fspath(path))
    ext = os.path.splitext(p)[1].lower()
    fmt = OUTPUT_FORMATS.get(ext)
    if fmt is None:
        shown = f"'{ext}'" if ext else "no extension"
        raise AudioSepError(
            INVALID_FIELD,
            f"output '{p}' has {shown}; the output type comes from the extension: use one of "
            + ", ".join(sorted(OUTPUT_FORMATS)),
        )
    return fmt


# Limits libsndfile enforces (FLAC) or, worse, crashes on (libvorbis segfaults above 200 kHz with
# the bundled libsndfile 1.2.2, measured): checked before opening anything.
_FORMAT_LIMITS = {"FLAC": (8, 655350), "OGG": (255, 200000)}


def _check_format_limits(fmt: str, samplerate: int, channels: int, path: str) -> None:
    if fmt not in _FORMAT_LIMITS:
        return
    max_ch, max_sr = _FORMAT_LIMITS[fmt]
    if channels > max_ch:
        raise AudioSepError(
            INVALID_FIELD,
            f"output '{path}': {fmt} holds at most {max_ch} channels, not {channels}; use "
            "output_channels \"stereo\" or a .wav output",
        )
    if samplerate > max_sr:
        raise AudioSepError(
            INVALID_FIELD,
            f"output '{path}': {fmt} supports sample rates up to {max_sr} Hz, not {samplerate}; "
            "choose a lower output_sr or a .wav output",
        )


def _container_subtype(fmt: str, subtype: str, path: str) -> str:
    if fmt == "OGG":
        return "VORBIS"  # lossy: the requested sample format does not apply
    if fmt == "FLAC" and subtype == "FLOAT":
        raise AudioSepError(
            INVALID_FIELD,
            f"output '{path}': FLAC cannot store 32-bit float samples; choose output_subtype "
            "PCM_16 or PCM_24, or a .wav/.aiff output for FLOAT",
        )
    return subtype


@dataclass
class OutputOptions:
    """How separated audio is written. ``validate()`` normalises aliases in place and returns self."""

    samplerate: int | str = 44100   # Hz, or "input" for the input's rate
    subtype: str = "PCM_16"         # "PCM_16" | "PCM_24" | "FLOAT" (aliases "16", "24", "float")
    channels: str = "stereo"        # "stereo" | "input"

    def validate(self) -> "OutputOptions":
        sr = self.samplerate
        if isinstance(sr, str) and sr.strip().lower() == "input":
            self.samplerate = "input"
        else:
            value = None
            if isinstance(sr, (int, np.integer)) and not isinstance(sr, bool):
                value = int(sr)
            elif isinstance(sr, float) and sr.is_integer():
                value = int(sr)
            elif isinstance(sr, str) and sr.strip().isdigit():
                value = int(sr.strip())
            if value is None or not _MIN_SR <= value <= _MAX_SR:
                raise AudioSepError(
                    INVALID_FIELD,
                    f"output_sr must be an integer from {_MIN_SR} to {_MAX_SR} Hz or \"input\", got {sr!r}",
                )
            self.samplerate = value
        st = self.subtype
        key = str(st).strip().upper() if isinstance(st, (str, int)) and not isinstance(st, bool) else None
        if key not in _SUBTYPE_ALIASES:
            raise AudioSepError(
                INVALID_FIELD, f"output_subtype must be \"PCM_16\", \"PCM_24\" or \"FLOAT\", got {st!r}"
            )
        self.subtype = _SUBTYPE_ALIASES[key]
        ch = self.channels
        mode = ch.strip().lower() if isinstance(ch, str) else None
        if mode not in ("stereo", "input"):
            raise AudioSepError(INVALID_FIELD, f"output_channels must be \"stereo\" or \"input\", got {ch!r}")
        self.channels = mode
        return self

    def resolved_samplerate(self, input_samplerate: int) -> int:
        return int(input_samplerate) if self.samplerate == "input" else int(self.samplerate)

    def resolved_channels(self, input_channels: int) -> int:
        return output_channel_count(input_channels, self.channels)


def output_channel_count(input_channels: int, mode: str) -> int:
    return int(input_channels) if mode == "input" else 2


_C = float(np.sqrt(0.5))  # -3 dB

# Stereo downmix rows (left, right) for the standard WAVE channel orders; LFE gets 0.
_DOWNMIX = {
    3: ([1, 0, _C], [0, 1, _C]),                                            # FL FR FC
    4: ([1, 0, _C, 0], [0, 1, 0, _C]),                                      # FL FR BL BR (quad)
    5: ([1, 0, _C, _C, 0], [0, 1, _C, 0, _C]),                              # FL FR FC BL BR
    6: ([1, 0, _C, 0, _C, 0], [0, 1, _C, 0, 0, _C]),                        # 5.1
    7: ([1, 0, _C, 0, _C, _C, 0], [0, 1, _C, 0, _C, 0, _C]),                # 6.1: ... BC SL SR
    8: ([1, 0, _C, 0, _C, 0, _C, 0], [0, 1, _C, 0, 0, _C, 0, _C]),          # 7.1: ... BL BR SL SR
}


def _downmix_matrix(n: int) -> np.ndarray:
    if n in _DOWNMIX:
        m = np.array(_DOWNMIX[n], dtype=np.float64)
    else:  # unknown layout: first two are left/right, the rest go to both sides at -3 dB
        m = np.full((2, n), _C)
        m[:, :2] = [[1, 0], [0, 1]]
    return (m / m.sum(axis=1, keepdims=True)).astype(np.float32)


def map_channels(x: np.ndarray, mode: str) -> np.ndarray:
    """Apply the channel rule to ``x`` [channels, n]: "input" keeps it, "stereo" gives 2 channels."""
    if mode == "input":
        return x
    if mode != "stereo":
        raise AudioSepError(INVALID_FIELD, f"output_channels must be \"stereo\" or \"input\", got {mode!r}")
    c = x.shape[0]
    if c == 2:
        return x
    if c == 1:
        return np.concatenate([x, x], axis=0)
    return _downmix_matrix(c) @ np.asarray(x, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

@dataclass
class WriteStats:
    path: str
    format: str
    subtype: str
    samplerate: int
    channels: int
    frames: int = 0
    clipped: int = 0     # samples hard-clipped to [-1, 1] (PCM/Vorbis only)
    nonfinite: int = 0   # NaN/Inf samples written as 0


# Temporary files being written, by path, so a signal handler can delete them. A plain dict (no
# lock): a Python signal handler runs in the main thread between bytecodes and must never wait for
# a lock the interrupted code holds; single dict operations are atomic under the GIL.
_PARTIALS: dict[str, "AtomicWriter"] = {}

_CLOSING = False  # set by cleanup_partial_files: the process is shutting down
_SFE_SYSTEM = 2  # libsndfile's "System error" code: the OS refused a read/write
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())
_NEARLY_FULL_BYTES = 1 << 20


def cleanup_partial_files(final: bool = False) -> int:
    """Delete every temporary output file still being written; return how many were removed.

    Safe to call from a signal handler or another thread: it only unlinks (closing first only where
    the OS refuses to delete an open file, i.e. Windows). The interrupted writer then fails with
    CANCELLED instead of renaming a deleted file onto the target.
    """
    global _CLOSING
    if final:  # the process is exiting: writers opened from now on delete their file at once
        _CLOSING = True
    removed = 0
    for tmp, writer in list(_PARTIALS.items()):
        writer._aborted = True
        try:
            os.remove(tmp)
            removed += 1
        except FileNotFoundError:
            pass
        except OSError:
            try:
                writer._close_quietly()
                os.remove(tmp)
                removed += 1
            except OSError:
                pass
        _PARTIALS.pop(tmp, None)
    return removed


def _sf_system_error(sfobj: sf.SoundFile | None) -> tuple[int | None, str]:
    """errno and libsndfile's detailed text for its last "System error" (private API, guarded)."""
    code: int | None = None
    text = ""
    try:
        code = int(sf._ffi.errno) or None
    except Exception:
        pass
    try:
        if sfobj is not None and getattr(sfobj, "_file", None) is not None:
            text = sf._ffi.string(sf._snd.sf_strerror(sfobj._file)).decode("utf-8", "replace")
    except Exception:
        pass
    return code, text


def _nearly_full(folder: str) -> bool:
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def _write_error(exc: BaseException, path: str, folder: str, sfobj: sf.SoundFile | None = None) -> AudioSepError:
    if isinstance(exc, AudioSepError):
        return exc
    code: int | None = None
    detail = _why(exc)
    if isinstance(exc, OSError):
        code = exc.errno
    elif isinstance(exc, sf.LibsndfileError) and exc.code == _SFE_SYSTEM:
        code, text = _sf_system_error(sfobj)
        detail = text or detail
    full_texts = (os.strerror(errno.ENOSPC).lower(), os.strerror(errno.EFBIG).lower())
    if code in _DISK_FULL_ERRNOS or any(t in detail.lower() for t in full_texts) or _nearly_full(folder):
        return AudioSepError(DISK_FULL, f"the disk holding '{folder}' is full: could not write '{path}'")
    if isinstance(exc, PermissionError) or code in (errno.EACCES, errno.EPERM):
        return AudioSepError(PERMISSION_DENIED, f"no permission to write '{path}' ({detail})")
    return AudioSepError(OUTPUT_ERROR, f"could not write '{path}': {detail}")


def _check_output_target(path: PathLike) -> tuple[str, str]:
    """(absolute path, folder) after the checks that need no write: extension, folder, not a dir."""
    p = os.fsdecode(os.fspath(path))
    if not p:
        raise AudioSepError(OUTPUT_ERROR, "no output file was given (empty path)")
    output_format_for(p)
    full = os.path.abspath(p)
    folder = os.path.dirname(full)
    if not os.path.exists(folder):
        raise AudioSepError(OUTPUT_ERROR, f"output folder '{folder}' does not exist (for output '{p}')")
    if not os.path.isdir(folder):
        raise AudioSepError(OUTPUT_ERROR, f"output folder '{folder}' is not a folder (for output '{p}')")
    if os.path.isdir(full):
        raise AudioSepError(OUTPUT_ERROR, f"output '{p}' is an existing folder, not a file name")
    return full, folder


_WAV_LIMIT = 0xFFFFFFFF - (1 << 20)  # RIFF sizes are 32-bit; keep a margin for the header


class AtomicWriter:
    """Stream float32 blocks ``[channels, n]`` to ``path`` so that it appears whole or not at all.

    Use as a context manager (or ``open()`` / ``commit()`` / ``abort()``). ``stats`` (WriteStats)
    counts frames, clipped and non-finite samples. See the module doc for the policies.
    """

    def __init__(
        self,
        path: PathLike,
        samplerate: int,
        channels: int,
        subtype: str = "PCM_16",
        *,
        expected_frames: int | None = None,
        fsync: bool = True,
        warnings: list[str] | None = None,
    ):
        self.path, self.folder = _check_output_target(path)
        self.format = output_format_for(self.path)
        if not (self.format == "OGG" and subtype == "VORBIS"):  # an OutputPlan's resolved Ogg subtype
            subtype = OutputOptions(samplerate=int(samplerate), subtype=subtype).validate().subtype
        self.subtype = _container_subtype(self.format, subtype, self.path)
        if int(channels) <= 0:
            raise ValueError("channels must be positive")
        self.samplerate = int(samplerate)
        self.channels = int(channels)
        _check_format_limits(self.format, self.samplerate, self.channels, self.path)
        if self.format == "WAV" and expected_frames is not None:
            bytes_per_sample = {"PCM_16": 2, "PCM_24": 3, "FLOAT": 4}[self.subtype]
            if int(expected_frames) * self.channels * bytes_per_sample > _WAV_LIMIT:
                self.format = "RF64"
        self._clip = self.subtype != "FLOAT"
        self._fsync = fsync
        self._warnings = warnings
        self.tmp_path: str | None = None
        self._sf: sf.SoundFile | None = None
        self._aborted = False
        self._finished = False
        self.stats = WriteStats(self.path, self.format, self.subtype, self.samplerate, self.channels)

    # -- lifecycle ----------------------------------------------------------------------------
    def open(self) -> "AtomicWriter":
        if self.tmp_path is not None:
            raise RuntimeError("AtomicWriter already opened")
        name = os.path.basename(self.path)
        # Before adding a partial file here, remove those that writers killed outright (SIGKILL,
        # power loss) left behind; a live writer's, another host's or an unknown one stay.
        partials.sweep(self.folder, keep=set(_PARTIALS))
        for _ in range(16):
            tmp = os.path.join(self.folder, partials.partial_name(name))
            try:
                # Reserve the name; 0o666 lets the umask decide the final permissions, as for any
                # normally created file (mkstemp would leave 0o600).
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue
            except PermissionError:
                raise AudioSepError(
                    PERMISSION_DENIED, f"no permission to write in output folder '{self.folder}'"
                ) from None
            except OSError as e:
                raise _write_error(e, self.path, self.folder) from None
            os.close(fd)
            break
        else:  # pragma: no cover - 16 collisions of 32 random bits
            raise AudioSepError(OUTPUT_ERROR, f"could not create a temporary file in '{self.folder}'")
        self.tmp_path = tmp
        _PARTIALS[tmp] = self
        if _CLOSING:  # cleanup ran while the file was being created: it must not outlive us
            self.abort()
            raise AudioSepError(CANCELLED, "the worker is shutting down")
        try:
            self._sf = sf.SoundFile(
                tmp, "w", samplerate=self.samplerate, channels=self.channels,
                subtype=self.subtype, format=self.format,
            )
        except BaseException as e:
            self.abort()
            if isinstance(e, sf.LibsndfileError) and e.code != _SFE_SYSTEM:
                raise AudioSepError(
                    INVALID_FIELD,
                    f"cannot write '{self.path}' as {self.format} {self.subtype}, {self.channels} "
                    f"channels at {self.samplerate} Hz ({_why(e)})",
                ) from None
            if isinstance(e, Exception):
                raise _write_error(e, self.path, self.folder) from None
            raise
        return self

    def write(self, block: np.ndarray) -> None:
        if self._aborted:
            raise AudioSepError(CANCELLED, f"writing '{self.path}' was interrupted; the partial file was removed")
        if self._sf is None:
            raise RuntimeError("AtomicWriter is not open")
        block = np.asarray(block)
        if block.ndim == 1 and self.channels == 1:
            block = block[None, :]
        if block.ndim != 2 or block.shape[0] != self.channels:
            raise ValueError(f"expected a [{self.channels}, n] block, got shape {block.shape}")
        # A private [n, channels] copy: soundfile wants frames first, and sanitising/clipping must
        # not touch the caller's array.
        buf = np.array(block.T, dtype=np.float32, order="C", copy=True)
        if buf.size == 0:
            return
        self.stats.nonfinite += sanitize(buf)
        if self._clip and (buf.max() > 1.0 or buf.min() < -1.0):
            self.stats.clipped += int(np.count_nonzero((buf > 1.0) | (buf < -1.0)))
            np.clip(buf, -1.0, 1.0, out=buf)
        try:
            self._sf.write(buf)
        except Exception as e:
            err = _write_error(e, self.path, self.folder, self._sf)
            self.abort()
            raise err from None
        self.stats.frames += buf.shape[0]

    def commit(self) -> WriteStats:
        """Finish the file, fsync it and move it onto the target."""
        if self._aborted:
            raise AudioSepError(CANCELLED, f"writing '{self.path}' was interrupted; the partial file was removed")
        if self._sf is None or self.tmp_path is None:
            raise RuntimeError("AtomicWriter is not open")
        tmp = self.tmp_path
        try:
            sfobj, self._sf = self._sf, None
            try:
                sfobj.close()  # writes the final header
            except Exception as e:
                raise _write_error(e, self.path, self.folder, sfobj) from None
            if self._fsync:
                fd = os.open(tmp, os.O_RDWR | getattr(os, "O_BINARY", 0))
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if self._aborted:  # cleanup_partial_files ran meanwhile
                raise AudioSepError(CANCELLED, f"writing '{self.path}' was interrupted; the partial file was removed")
            os.replace(tmp, self.path)
        except BaseException as e:
            self.abort()
            if isinstance(e, Exception) and not isinstance(e, AudioSepError):
                raise _write_error(e, self.path, self.folder) from None
            raise
        _PARTIALS.pop(tmp, None)
        self._finished = True
        self._sync_folder()
        if self.stats.nonfinite:
            _report(f"'{self.path}': wrote {self.stats.nonfinite} non-finite samples (NaN/Inf) as 0", self._warnings)
        if self.stats.clipped:
            _report(f"'{self.path}': clipped {self.stats.clipped} samples beyond full scale", self._warnings)
        return self.stats

    def abort(self) -> None:
        """Discard the temporary file (idempotent); the target is never touched."""
        self._aborted = True
        self._close_quietly()
        tmp = self.tmp_path
        if tmp is not None and not self._finished:
            try:
                os.remove(tmp)
            except OSError:
                pass
            _PARTIALS.pop(tmp, None)

    def _close_quietly(self) -> None:
        sfobj, self._sf = self._sf, None
        if sfobj is not None:
            try:
                sfobj.close()
            except Exception:
                pass

    def _sync_folder(self) -> None:
        # Makes the rename itself durable on POSIX; Windows cannot open folders this way.
        if not self._fsync or os.name != "posix":
            return
        try:
            fd = os.open(self.folder, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "AtomicWriter":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


@dataclass(frozen=True)
class OutputPlan:
    """A checked output: everything ``AtomicWriter`` needs, resolved against the input."""

    path: str
    format: str
    subtype: str
    samplerate: int
    channels: int
    channel_mode: str

    def writer(self, *, expected_frames: int | None = None, warnings: list[str] | None = None) -> AtomicWriter:
        return AtomicWriter(
            self.path, self.samplerate, self.channels, self.subtype,
            expected_frames=expected_frames, warnings=warnings,
        )


def prepare_output(
    path: PathLike, options: OutputOptions, input_samplerate: int, input_channels: int
) -> OutputPlan:
    """Validate an output before any work: options, extension, folder, permission, and whether
    libsndfile accepts this format/rate/channel count (by opening and discarding a trial file).
    Does not check that ``path`` differs from the input: use ``same_file`` for that."""
    options.validate()
    sr = options.resolved_samplerate(input_samplerate)
    ch = options.resolved_channels(input_channels)
    trial = AtomicWriter(path, sr, ch, options.subtype, fsync=False)
    trial.open()
    trial.abort()
    return OutputPlan(trial.path, trial.format, trial.subtype, sr, ch, options.channels)


def write_audio(
    path: PathLike,
    x: np.ndarray,
    sr: int,
    options: OutputOptions | None = None,
    *,
    input_samplerate: int | None = None,
    length: int | None = None,
    warnings: list[str] | None = None,
) -> WriteStats:
    """Write ``x`` ([channels, frames] at ``sr``) atomically, applying ``options``.

    ``options.samplerate == "input"`` means ``input_samplerate`` (or ``sr`` if not given);
    ``length`` forces the output frame count (e.g. exactly the input's length after a round trip).
    """
    opts = (options or OutputOptions()).validate()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    out_sr = opts.resolved_samplerate(input_samplerate or sr)
    out_ch = opts.resolved_channels(x.shape[0])
    # Resampling and channel mapping commute (both linear per channel): do the cheaper order.
    if out_ch < x.shape[0]:
        y = resample(map_channels(x, opts.channels), sr, out_sr, length=length)
    else:
        y = map_channels(resample(x, sr, out_sr, length=length), opts.channels)
    with AtomicWriter(path, out_sr, y.shape[0], opts.subtype, expected_frames=y.shape[1], warnings=warnings) as w:
        for start in range(0, y.shape[1], _BLOCK * 4):
            w.write(y[:, start : start + _BLOCK * 4])
    return w.stats


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file, through links, relative spellings, ``..`` or
    letter case on case-insensitive file systems; paths that do not exist compare by their
    resolved absolute spelling."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        pass
    ra = os.path.normcase(os.path.realpath(os.fspath(a)))
    rb = os.path.normcase(os.path.realpath(os.fspath(b)))
    return ra == rb
