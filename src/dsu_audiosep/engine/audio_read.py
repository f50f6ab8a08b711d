"""Reading audio files: input checks, truncation detection, ``probe``, ``BlockReader``, ``read_audio``.

Everything here works on float32 arrays shaped ``[channels, frames]``.

Anything libsndfile (through ``soundfile``) decodes is read: WAV (8/16/24/32-bit integer, 32/64-bit
float), FLAC, OGG/Vorbis, AIFF, MP3 and the rest, at any rate and channel count. What libsndfile
does not recognise goes to FFmpeg through PyAV (audio_decode_av.py: AAC, ALAC, WebM, WMA, AC-3,
video soundtracks), streamed through the same ``BlockReader``. Failures a user
can cause become ``AudioSepError`` with a stable code: ``FILE_NOT_FOUND`` (missing path or broken
link), ``PERMISSION_DENIED`` (cannot be opened for reading), ``INVALID_AUDIO`` (a folder, a
device or pipe, not audio, damaged, truncated, or without samples).

Truncation: a WAV or AIFF file cut short still opens in libsndfile (it trusts the file length),
so we compare the data size its header announces with what is present and refuse the file when
the header claims more. Placeholder sizes written by recorders that never finished (0 or
>= 0x7FFF0000) are accepted. A FLAC file cut short fails while decoding and is refused as well.
Ogg has no announced length, so a cut Ogg file is read up to where it ends.

Non-finite samples (NaN, +-Inf, possible in float files) are replaced by 0: the STFT would
spread a single NaN over the whole chunk. How many were replaced is logged as a warning on this
module's logger (stderr unless configured, never stdout) and, when the caller passes a
``warnings`` list, appended to it as a sentence. Values beyond +-1 (float files) are kept as they
are: no normalisation. An empty (0-byte) file is refused as such; a stream whose header does not
announce its length (libsndfile then reports 2^63-1 frames) is counted by decoding it once, so
``frames`` is always exact.
"""
from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Union

import numpy as np
import soundfile as sf

from dsu_audiosep.errors import FILE_NOT_FOUND, INVALID_AUDIO, PERMISSION_DENIED, AudioSepError

if TYPE_CHECKING:
    from .audio_decode_av import AvSource

__all__ = ["AudioInfo", "probe", "read_audio", "BlockReader", "sanitize", "describe_error", "report", "BLOCK", "PathLike"]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# Frames per read/write call: large enough that per-call overhead vanishes, small enough that the
# temporary [frames, channels] buffer stays a few MB.
BLOCK = 1 << 16


@dataclass(frozen=True)
class AudioInfo:
    frames: int
    samplerate: int
    channels: int
    duration: float  # seconds
    format: str      # libsndfile major format, e.g. "WAV", "FLAC"; FFmpeg's container, e.g. "MOV", "MATROSKA"
    subtype: str     # e.g. "PCM_16", "FLOAT", "VORBIS"; FFmpeg's codec, e.g. "AAC", "ALAC"


def sanitize(x: np.ndarray) -> int:
    """Replace NaN and +-Inf by 0 in place; return how many samples were replaced."""
    finite = np.isfinite(x)
    if finite.all():
        return 0
    bad = ~finite
    count = int(np.count_nonzero(bad))
    x[bad] = 0.0
    return count


def report(message: str, warnings: list[str] | None, logger: logging.Logger = log) -> None:
    """Log a warning about a file (never on stdout) and add it to the caller's list, if any."""
    logger.warning("%s", message)
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
        raise AudioSepError(FILE_NOT_FOUND, f"input file '{p}' cannot be accessed: {describe_error(e)}") from None
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
        raise AudioSepError(INVALID_AUDIO, f"cannot open input file '{p}': {describe_error(e)}") from None
    return p


def describe_error(e: BaseException) -> str:
    """The reason an OS or libsndfile call failed, as a short phrase for a message."""
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
    buf = np.empty((BLOCK, f.channels), dtype=np.float32)
    total = 0
    try:
        while True:
            k = f.read(BLOCK, dtype="float32", always_2d=True, out=buf).shape[0]
            if k == 0:
                break
            total += k
        f.seek(0)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioSepError(
            INVALID_AUDIO, f"'{p}' is damaged or truncated: decoding failed after {total} frames ({describe_error(e)})"
        ) from None
    return total


def _open_input(p: str, warnings: list[str] | None = None) -> tuple["sf.SoundFile | AvSource", int]:
    """Open and validate; returns the file and its frame count (counted when not announced).
    libsndfile first (exact for WAV, FLAC, AIFF, Ogg, MP3); what it does not recognise goes to
    FFmpeg through PyAV (audio_decode_av.py), imported only then."""
    try:
        f = sf.SoundFile(p)
    except sf.LibsndfileError as e:
        why = describe_error(e)
        lowered = why.lower()
        # libsndfile's texts for a format it does not know: FFmpeg may
        if "does not exist" in lowered or "not a regular file" in lowered or "not recognised" in lowered:
            from .audio_decode_av import open_av

            src = open_av(p, warnings)
            if src.frames <= 0:
                src.close()
                raise AudioSepError(INVALID_AUDIO, f"'{p}' contains no samples") from None
            return src, src.frames
        raise AudioSepError(
            INVALID_AUDIO,
            f"'{p}' is not a readable audio file ({why}); it may not be audio, or it may be "
            "damaged or cut short",
        ) from None
    except PermissionError:
        raise AudioSepError(PERMISSION_DENIED, f"no permission to read input file '{p}'") from None
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        raise AudioSepError(INVALID_AUDIO, f"'{p}' is not a readable audio file ({describe_error(e)})") from None
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


def _info_of(f: "sf.SoundFile | AvSource", frames: int) -> AudioInfo:
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
    try:
        return _info_of(f, frames)
    finally:
        f.close()


class BlockSource:
    """What the pipeline reads from: ``read(n)`` gives the next ``[channels, k]`` float32 frames
    (k == 0 at the end); iterating yields the blocks in order; closing is a context manager's exit.
    Subclasses: ``BlockReader`` (a file) and ``audio_memory.ArrayReader`` (an array)."""

    def read(self, n: int | None = None) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            block = self.read()
            if block.shape[1] == 0:
                return
            yield block

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockReader(BlockSource):
    """Read an input file block by block without loading it whole.

    Iterating yields fresh float32 arrays shaped ``[channels, n]`` with ``n <= blocksize`` (only the
    last block is shorter), sanitised like ``read_audio``. ``nonfinite_replaced`` counts replaced
    samples so far; the total is logged (and appended to ``warnings``) when the file is exhausted.
    A decoding failure in the middle (a cut FLAC file) raises INVALID_AUDIO.
    """

    def __init__(self, path: PathLike, blocksize: int = BLOCK, *, warnings: list[str] | None = None):
        if int(blocksize) <= 0:
            raise ValueError("blocksize must be positive")
        self.path = _check_input_path(path)
        self.blocksize = int(blocksize)
        self._warnings = warnings
        self._f: sf.SoundFile | AvSource | None
        self._f, frames = _open_input(self.path, warnings)
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
                f"{self.frames} frames ({describe_error(e)})",
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

    def _finish(self) -> None:
        if self.nonfinite_replaced and not self._reported:
            self._reported = True
            report(
                f"'{self.path}': replaced {self.nonfinite_replaced} non-finite samples (NaN/Inf) by 0",
                self._warnings,
            )

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

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
