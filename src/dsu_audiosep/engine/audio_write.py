"""Writing audio files atomically: ``AtomicWriter``, ``prepare_output``, ``write_audio``, partial-file cleanup.

Encoders: libsndfile for WAV/RF64, FLAC, Ogg Vorbis and AIFF; PyAV for MP3, Opus and M4A/AAC
(audio_encode_av.py, imported only for those), behind the same open/write/commit/abort.

Clipping: PCM, Vorbis and the lossy outputs are hard-clipped to [-1, 1] before libsndfile sees them, so
full scale is [-1, 1) in practice (libsndfile scales by 2^(bits-1) and saturates +1.0 to the
largest positive code, 32767 for 16 bits; clipping ourselves makes the count, and the absence
of wrap-around, independent of its version). Clipped samples are counted, logged and reported
in ``WriteStats.clipped``. FLOAT keeps values as they are. NaN/Inf are never written: they
become 0 first (counted in ``WriteStats.nonfinite``), so +Inf is not counted as clipped.
Containers, sample formats, their limits and the channel rule: see output_options.py.

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

import errno
import logging
import os
import shutil
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from dsu_audiosep.options import BY_NAME
from dsu_audiosep.errors import (
    CANCELLED,
    DISK_FULL,
    INVALID_FIELD,
    OUTPUT_ERROR,
    PERMISSION_DENIED,
    AudioSepError,
)

from . import partials
from .audio_read import BLOCK, PathLike, describe_error, report, sanitize
from .output_options import (
    LOSSY_SUBTYPES,
    OutputOptions,
    check_format_limits,
    container_subtype,
    encoder_samplerate,
    map_channels,
    output_format_for,
    resolved_kbps,
)
from .resampling import resample

__all__ = [
    "OutputPlan",
    "prepare_output",
    "WriteStats",
    "AtomicWriter",
    "write_audio",
    "cleanup_partial_files",
    "same_file",
]

log = logging.getLogger(__name__)


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
    detail = describe_error(exc)
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
        bitrate: int | str = "auto",
    ):
        self.path, self.folder = _check_output_target(path)
        self.format = output_format_for(self.path)
        resolved = {"OGG": "VORBIS", **LOSSY_SUBTYPES}.get(self.format)
        if subtype != resolved:  # not an OutputPlan's resolved subtype of a lossy container
            subtype = OutputOptions(samplerate=int(samplerate), subtype=subtype).validate().subtype
        self.subtype = container_subtype(self.format, subtype, self.path)
        if int(channels) <= 0:
            raise ValueError("channels must be positive")
        self.samplerate = int(samplerate)
        self.channels = int(channels)
        check_format_limits(self.format, self.samplerate, self.channels, self.path)
        # Lossy outputs (PyAV): the rate the codec codes and the bitrate (output_options.py).
        self.file_samplerate = encoder_samplerate(self.format, self.samplerate)
        self.kbps = resolved_kbps(self.format, BY_NAME["output_bitrate"].from_python(bitrate), self.path) \
            if self.format in LOSSY_SUBTYPES else None
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
            self._sf = self._open_file(tmp)
        except BaseException as e:
            self.abort()
            if isinstance(e, ValueError) and self.kbps is not None:  # the encoder refused the settings
                raise AudioSepError(
                    INVALID_FIELD,
                    f"cannot write '{self.path}' as {self.subtype} at {self.kbps} kbit/s, {self.channels} "
                    f"channels at {self.file_samplerate} Hz ({e})",
                ) from None
            if isinstance(e, ImportError):
                raise AudioSepError(
                    INVALID_FIELD, f"cannot write '{self.path}': {self.subtype} outputs need PyAV, which is not installed"
                ) from None
            if isinstance(e, sf.LibsndfileError) and e.code != _SFE_SYSTEM:
                raise AudioSepError(
                    INVALID_FIELD,
                    f"cannot write '{self.path}' as {self.format} {self.subtype}, {self.channels} "
                    f"channels at {self.samplerate} Hz ({describe_error(e)})",
                ) from None
            if isinstance(e, Exception):
                raise _write_error(e, self.path, self.folder) from None
            raise
        return self

    def _open_file(self, tmp: str):
        """libsndfile for PCM, FLAC and Vorbis; PyAV's encoders for MP3, Opus and AAC."""
        if self.kbps is None:
            return sf.SoundFile(tmp, "w", samplerate=self.samplerate, channels=self.channels,
                                subtype=self.subtype, format=self.format)
        from .audio_encode_av import AvSink

        return AvSink(tmp, self.format, self.samplerate, self.file_samplerate, self.channels, self.kbps)

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
            report(f"'{self.path}': wrote {self.stats.nonfinite} non-finite samples (NaN/Inf) as 0", self._warnings, log)
        if self.stats.clipped:
            report(f"'{self.path}': clipped {self.stats.clipped} samples beyond full scale", self._warnings, log)
        if self.file_samplerate != self.samplerate:
            report(f"'{self.path}': {self.subtype} does not code {self.samplerate} Hz; written at "
                   f"{self.file_samplerate} Hz", self._warnings, log)
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
                # an encoder is dropped without flushing: its file is deleted anyway
                getattr(sfobj, "discard", sfobj.close)()
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
    bitrate: int | str = "auto"  # kbit/s of a lossy output

    def writer(self, *, expected_frames: int | None = None, warnings: list[str] | None = None) -> AtomicWriter:
        return AtomicWriter(
            self.path, self.samplerate, self.channels, self.subtype,
            expected_frames=expected_frames, warnings=warnings, bitrate=self.bitrate,
        )


def prepare_output(
    path: PathLike, options: OutputOptions, input_samplerate: int, input_channels: int
) -> OutputPlan:
    """Validate an output before any work: options, extension, folder, permission, and whether
    libsndfile accepts this format/rate/channel count (by opening and discarding a trial file).
    Does not check that ``path`` differs from the input: use ``same_file`` for that."""
    options.validate()
    options.check_for(output_format_for(path), os.fsdecode(os.fspath(path)))
    sr = options.resolved_samplerate(input_samplerate)
    ch = options.resolved_channels(input_channels)
    trial = AtomicWriter(path, sr, ch, options.subtype, fsync=False, bitrate=options.bitrate)
    trial.open()
    trial.abort()
    return OutputPlan(trial.path, trial.format, trial.subtype, sr, ch, options.channels, options.bitrate)


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
    opts.check_for(output_format_for(path), os.fsdecode(os.fspath(path)))
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
    with AtomicWriter(path, out_sr, y.shape[0], opts.subtype, expected_frames=y.shape[1], warnings=warnings,
                      bitrate=opts.bitrate) as w:
        for start in range(0, y.shape[1], BLOCK * 4):
            w.write(y[:, start : start + BLOCK * 4])
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
