"""Audio in memory: a checked mixture array with a ``BlockReader``-like reader, in-memory outputs
with the atomic writers' interface, and decoding an open file object.

The separation pipeline (separate.py) reads its mixture through a reader and writes through
writers; these let it run on arrays with no second code path. Like a file, an array is read block
by block: each block is converted to float32 on its own, so the extra memory is one block whatever
the array's length (the array itself is never copied whole). Outputs are filled in place into one
preallocated ``[channels, frames]`` float32 array each.

An array is checked before any work, and bad input raises (a file's NaN samples are replaced by 0
with a warning; an array's are refused, since the caller can fix them and nothing was decoded):

- shape: 1-D (mono) or 2-D ``[channels, frames]`` with at least one channel and one frame;
  more than ``MAX_CHANNELS`` channels is taken for a ``[frames, channels]`` array and refused;
- dtype: float16/32/64 (values kept as they are, even beyond +-1, like a float file), or integer
  PCM scaled like a file of that width: int8 and int16 by 2^7 and 2^15, int32 by 2^31, uint8 as
  8-bit WAV ((x - 128) / 128), int64 as 32-bit PCM (values outside the int32 range are refused);
- values: finite after the conversion to float32 (NaN, +-Inf and float64 beyond float32 refused);
- sample rate: a whole number of Hz in the range the outputs accept.
Every failure is an ``AudioSepError``: INVALID_AUDIO for the samples, INVALID_FIELD for the rate.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf

from dsu_audiosep.errors import INVALID_AUDIO, INVALID_FIELD, AudioSepError
from dsu_audiosep.options import OUTPUT_SR_RANGE

from .audio_read import BLOCK, AudioInfo, BlockSource, describe_error, report, sanitize

__all__ = ["MemoryAudio", "memory_audio", "ArrayReader", "MemoryOutput", "ArraySink", "read_file_object",
           "check_samplerate", "MAX_CHANNELS"]

# More channels than this is almost always a [frames, channels] array (soundfile's layout).
MAX_CHANNELS = 64

# dtype -> (offset, scale): float32 value = (x - offset) / scale, as libsndfile reads PCM files.
_PCM = {
    np.dtype(np.int8): (0, 2.0 ** 7),
    np.dtype(np.int16): (0, 2.0 ** 15),
    np.dtype(np.int32): (0, 2.0 ** 31),
    np.dtype(np.int64): (0, 2.0 ** 31),
    np.dtype(np.uint8): (128, 2.0 ** 7),
}
_INT32 = (-(2 ** 31), 2 ** 31 - 1)


def check_samplerate(samplerate: Any) -> int:
    """The sample rate of an array as an int; INVALID_FIELD when it is not a whole number of Hz in range."""
    low, high = OUTPUT_SR_RANGE
    value = samplerate
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= int(value) <= high:
        raise AudioSepError(INVALID_FIELD, f"sample_rate must be a whole number of Hz from {low} to {high}, got {samplerate!r}")
    return int(value)


def _to_float32(block: np.ndarray) -> np.ndarray:
    """A fresh float32 copy of ``block``, PCM integers scaled like a file of their width."""
    pcm = _PCM.get(block.dtype)
    if pcm is None:
        return np.array(block, dtype=np.float32, order="C", copy=True)
    offset, scale = pcm
    if block.dtype == np.int64:
        block = block.astype(np.int32)  # range checked beforehand; int32 -> float32 rounds like PCM_32 files
    out = np.array(block, dtype=np.float32, order="C", copy=True)
    if offset:
        out -= offset
    out *= np.float32(1.0 / scale)  # a power of two: exact
    return out


@dataclass(frozen=True)
class MemoryAudio:
    """A checked mixture: ``samples`` is the caller's array viewed as ``[channels, frames]`` (not
    copied). Has the fields planning reads from a probe (frames, samplerate, channels, duration)."""

    samples: np.ndarray
    samplerate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def frames(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration(self) -> float:
        return self.frames / float(self.samplerate)

    @property
    def info(self) -> AudioInfo:
        return AudioInfo(self.frames, self.samplerate, self.channels, self.duration, "MEMORY", str(self.samples.dtype))

    def reader(self, warnings: list[str] | None = None, blocksize: int = BLOCK) -> "ArrayReader":
        """A fresh reader from the first frame (``warnings``: the source interface; nothing to report)."""
        return ArrayReader(self, blocksize)


def _check_shape(x: np.ndarray) -> np.ndarray:
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise AudioSepError(INVALID_AUDIO, f"audio must be 1-D (mono) or 2-D [channels, frames], got shape {tuple(x.shape)}")
    channels, frames = x.shape
    if channels == 0 or frames == 0:
        raise AudioSepError(INVALID_AUDIO, f"audio contains no samples (shape {tuple(x.shape)})")
    if channels > MAX_CHANNELS:
        raise AudioSepError(INVALID_AUDIO, f"audio of shape {tuple(x.shape)} has {channels} channels (at most {MAX_CHANNELS}): "
                            "pass [channels, frames]; an array from soundfile is [frames, channels], use .T")
    return x


def _check_values(x: np.ndarray, blocksize: int) -> None:
    """One pass over the array, a block at a time (flat memory), before any work is done."""
    wide = x.dtype == np.int64
    for start in range(0, x.shape[1], blocksize):
        block = x[:, start : start + blocksize]
        if wide and (block.min() < _INT32[0] or block.max() > _INT32[1]):
            raise AudioSepError(INVALID_AUDIO, "int64 audio is read as 32-bit PCM: values must fit in int32 "
                                f"({_INT32[0]}..{_INT32[1]}); scale it to float in [-1, 1] instead")
        if x.dtype.kind == "f":
            with np.errstate(over="ignore"):  # float64 beyond float32 becomes Inf: refused just below
                converted = block.astype(np.float32)
            if not np.isfinite(converted).all():
                bad = int(np.count_nonzero(~np.isfinite(converted)))
                raise AudioSepError(INVALID_AUDIO, f"audio contains non-finite samples (NaN, Inf, or beyond float32) "
                                    f"from frame {start}: {bad} in that block; replace them (e.g. np.nan_to_num) first")


def memory_audio(samples: Any, samplerate: Any, blocksize: int = BLOCK) -> MemoryAudio:
    """Check an array (numpy, or anything ``np.asarray`` takes) and its rate; see the module doc."""
    rate = check_samplerate(samplerate)
    try:
        x = np.asarray(samples)
    except (TypeError, ValueError) as exc:
        raise AudioSepError(INVALID_AUDIO, f"audio is not an array of samples ({exc})") from None
    if x.dtype.kind not in "fiu" or (x.dtype.kind == "u" and x.dtype != np.uint8) or x.dtype.itemsize > 8:
        raise AudioSepError(INVALID_AUDIO, f"audio of dtype {x.dtype} is not supported: use float32/float64, "
                            "int16, int32, int8 or uint8")
    x = _check_shape(x)
    _check_values(x, blocksize)
    return MemoryAudio(x, rate)


class ArrayReader(BlockSource):
    """``BlockReader``'s interface over a ``MemoryAudio``: float32 ``[channels, n]`` blocks, in order."""

    def __init__(self, audio: MemoryAudio, blocksize: int = BLOCK):
        if int(blocksize) <= 0:
            raise ValueError("blocksize must be positive")
        self._x: np.ndarray | None = audio.samples
        self.blocksize = int(blocksize)
        self.samplerate, self.channels, self.frames = audio.samplerate, audio.channels, audio.frames
        self.info = audio.info
        self.position = 0
        self.nonfinite_replaced = 0  # BlockReader's counter: an array with any was refused up front

    def read(self, n: int | None = None) -> np.ndarray:
        """Up to ``n`` (default ``blocksize``) next frames as ``[channels, k]``; k == 0 at the end."""
        if self._x is None:
            raise ValueError("ArrayReader is closed")
        n = self.blocksize if n is None else int(n)
        n = max(0, min(n, self.frames - self.position))
        block = _to_float32(self._x[:, self.position : self.position + n])
        self.position += n
        return block

    def close(self) -> None:
        self._x = None


class MemoryOutput:
    """One output kept in memory, with ``OutputPlan``'s interface for the pipeline: ``path`` is its
    name, the rate and channels are the input's. After a committed run, ``array`` holds it."""

    channel_mode = "input"

    def __init__(self, name: str, samplerate: int, channels: int):
        self.path, self.samplerate, self.channels = name, int(samplerate), int(channels)
        self.array: np.ndarray | None = None

    def result(self) -> np.ndarray:
        """The committed array; a run that did not commit has none."""
        if self.array is None:
            raise RuntimeError(f"output '{self.path}' was not written")
        return self.array

    def writer(self, *, expected_frames: int | None = None, warnings: list[str] | None = None) -> "ArraySink":
        if expected_frames is None:
            raise ValueError("an in-memory output needs expected_frames (its array is allocated once)")
        return ArraySink(self, int(expected_frames), warnings)


class ArraySink:
    """``AtomicWriter``'s interface (open, write, commit, abort) filling one preallocated array.

    Values are kept as a FLOAT file keeps them (no clipping); NaN/Inf become 0, counted and
    reported on commit, as the file writers do. The array reaches its ``MemoryOutput`` only on
    commit: an aborted or failed run leaves nothing behind.
    """

    def __init__(self, output: MemoryOutput, frames: int, warnings: list[str] | None = None):
        self.output, self.frames, self._warnings = output, frames, warnings
        self._array: np.ndarray | None = None
        self.position = 0
        self.nonfinite = 0

    def open(self) -> "ArraySink":
        self._array = np.empty((self.output.channels, self.frames), dtype=np.float32)
        return self

    def write(self, block: np.ndarray) -> None:
        if self._array is None:
            raise RuntimeError("ArraySink is not open")
        n = block.shape[1]
        if block.shape[0] != self.output.channels or self.position + n > self.frames:
            raise ValueError(f"block {block.shape} does not fit output {self._array.shape} at frame {self.position}")
        target = self._array[:, self.position : self.position + n]
        target[...] = block
        self.nonfinite += sanitize(target)
        self.position += n

    def commit(self) -> np.ndarray:
        if self._array is None:
            raise RuntimeError("ArraySink is not open")
        array, self._array = self._array, None
        # The pipeline writes exactly the expected frames; were it ever fewer, keep only what was written.
        self.output.array = array if self.position == self.frames else array[:, : self.position].copy()
        if self.nonfinite:
            report(f"output '{self.output.path}': {self.nonfinite} non-finite samples (NaN/Inf) set to 0", self._warnings)
        return self.output.array

    def abort(self) -> None:
        self._array = None


def read_file_object(f: BinaryIO, warnings: list[str] | None = None, blocksize: int = BLOCK) -> MemoryAudio:
    """Decode an open binary file object (e.g. ``io.BytesIO`` of a FLAC) from its current position,
    block by block, like a file: NaN/Inf replaced by 0 with a warning, a damaged stream INVALID_AUDIO."""
    try:
        sfile = sf.SoundFile(f)
    except Exception as exc:  # libsndfile, or whatever the object's own read/seek raised
        raise AudioSepError(INVALID_AUDIO, f"the file object is not readable audio ({describe_error(exc)})") from None
    blocks, replaced = [], 0
    with sfile:
        try:
            while True:
                block = sfile.read(blocksize, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                block = np.ascontiguousarray(block.T)
                replaced += sanitize(block)
                blocks.append(block)
        except Exception as exc:
            frames = sum(b.shape[1] for b in blocks)
            raise AudioSepError(INVALID_AUDIO, f"the file object is damaged or truncated: decoding failed after "
                                f"{frames} frames ({describe_error(exc)})") from None
        rate, channels = int(sfile.samplerate), int(sfile.channels)
    if not blocks:
        raise AudioSepError(INVALID_AUDIO, "the file object contains no samples")
    if replaced:
        report(f"file object: replaced {replaced} non-finite samples (NaN/Inf) by 0", warnings)
    x = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)
    return MemoryAudio(x.reshape(channels, -1), rate)
