"""Generators of hostile files for the robustness tests: broken audio, broken checkpoints, broken
configs. Each function writes one file and returns its path; nothing here talks to the worker.

Kept apart from the tests so that other suites (and a person reproducing a report by hand) can
make the same files: ``python -c "import bad_inputs as b; b.truncated_flac('cut.flac')"``.
"""
from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# Audio


def tone(frames: int, sr: int, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    """[frames, channels] float32: one sine per channel (different pitches, so channels differ)."""
    t = np.arange(frames, dtype=np.float64) / sr
    cols = [amp * np.sin(2 * np.pi * (220.0 + 55.0 * c) * t) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32) if frames else np.zeros((0, channels), np.float32)


def noise(frames: int, channels: int = 1, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    """[frames, channels] float32 white noise; unlike a sine it does not compress in FLAC, so a
    cut FLAC file really loses audio frames."""
    rng = np.random.default_rng(seed)
    return (amp * rng.uniform(-1.0, 1.0, size=(frames, channels))).astype(np.float32)


def write_audio(path: PathLike, data: np.ndarray, sr: int, subtype: str = "PCM_16",
                fmt: str | None = None) -> Path:
    sf.write(str(path), data, sr, subtype=subtype, format=fmt)
    return Path(path)


def wav(path: PathLike, seconds: float, sr: int = 32000, channels: int = 1, subtype: str = "PCM_16") -> Path:
    return write_audio(path, tone(int(round(seconds * sr)), sr, channels), sr, subtype)


def random_bytes(path: PathLike, size: int = 8192, seed: int = 1) -> Path:
    Path(path).write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return Path(path)


def text_file(path: PathLike) -> Path:
    Path(path).write_text("These are the minutes of the meeting, not a recording of it.\n" * 20)
    return Path(path)


def directory(path: PathLike) -> Path:
    """A folder with an audio file's name."""
    Path(path).mkdir()
    return Path(path)


def empty_file(path: PathLike) -> Path:
    Path(path).write_bytes(b"")
    return Path(path)


def silence(path: PathLike, seconds: float = 0.5, sr: int = 32000, channels: int = 2) -> Path:
    return write_audio(path, np.zeros((int(round(seconds * sr)), channels), np.float32), sr)


def _cut(path: Path, keep_fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def truncated_wav(path: PathLike, seconds: float = 0.5, sr: int = 32000, keep_fraction: float = 0.6) -> Path:
    """A WAV whose header announces more audio than the file holds (a copy cut short)."""
    return _cut(wav(path, seconds, sr), keep_fraction)


def truncated_flac(path: PathLike, seconds: float = 0.5, sr: int = 32000, keep_fraction: float = 0.5) -> Path:
    """A FLAC whose STREAMINFO announces the full length but whose frames stop half-way."""
    p = write_audio(path, noise(int(round(seconds * sr))), sr, "PCM_16", "FLAC")
    return _cut(p, keep_fraction)


def zero_samples_wav(path: PathLike, sr: int = 32000) -> Path:
    """A valid WAV header with an empty data chunk."""
    return write_audio(path, np.zeros((0, 1), np.float32), sr, "PCM_16")


def float_wav_with_nonfinite(path: PathLike, seconds: float = 0.5, sr: int = 32000) -> Path:
    """32-bit float WAV with NaN, +Inf and -Inf scattered through an otherwise normal tone."""
    x = tone(int(round(seconds * sr)), sr)
    x[100:400, 0] = np.nan
    x[1000, 0] = np.inf
    x[2000:2010, 0] = -np.inf
    x[-5:, 0] = np.nan
    return write_audio(path, x, sr, "FLOAT")


def float_wav_loud(path: PathLike, seconds: float = 0.5, sr: int = 32000, peak: float = 50.0) -> Path:
    """32-bit float WAV reaching +-peak (far beyond full scale), as a float mix bus can."""
    x = tone(int(round(seconds * sr)), sr, amp=peak)
    x[::7, 0] = peak
    x[3::7, 0] = -peak
    return write_audio(path, x, sr, "FLOAT")


# --------------------------------------------------------------------------------------------
# Checkpoints and configs


def truncated_copy(src: PathLike, dst: PathLike, nbytes: int = 4 << 20) -> Path:
    """The first ``nbytes`` of ``src`` (a download that stopped early)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(fin.read(nbytes))
    return Path(dst)


def clap_like_checkpoint(path: PathLike) -> Path:
    """A tiny LAION-CLAP-shaped file (``module.text_branch.*`` keys): the wrong kind of checkpoint."""
    import torch

    torch.save({"state_dict": {"module.text_branch.embeddings.word_embeddings.weight": torch.zeros(4, 3),
                               "module.audio_branch.x": torch.zeros(2)}, "epoch": 15}, str(path))
    return Path(path)


def wrong_shape_checkpoint(path: PathLike, key: str = "ss_model.base.bn0.weight", shape=(7,)) -> Path:
    """One separator tensor of the wrong shape (and nothing else)."""
    import torch

    torch.save({"state_dict": {key: torch.zeros(*shape)}}, str(path))
    return Path(path)


class _CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: a harmless stand-in for code execution."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def malicious_checkpoint(path: PathLike, marker: PathLike) -> Path:
    """A torch checkpoint whose unpickling (without weights_only) creates ``marker``."""
    import torch

    torch.save({"state_dict": {"ss_model.base.bn0.weight": torch.zeros(1025)}, "payload": _CreatesFile(str(marker))},
               str(path))
    return Path(path)


def malformed_yaml(path: PathLike) -> Path:
    Path(path).write_text("model:\n  model_type: ResUNet30\n  input_channels: [1, 2\n  : : bad\n")
    return Path(path)


def yaml_without_model_section(path: PathLike) -> Path:
    Path(path).write_text("- just\n- a\n- list\n")
    return Path(path)


# --------------------------------------------------------------------------------------------
# Compressed containers, made with PyAV's own encoders (no ffmpeg program needed), and damaged ones


def encode_av(path: PathLike, data: np.ndarray, sr: int, codec: str, fmt: str, *, bit_rate: int | None = None,
              sample_format: str = "fltp", video: bool = False, streams: int = 1,
              options: dict[str, str] | None = None, container_options: dict[str, str] | None = None) -> Path:
    """Encode ``data`` [frames, channels] with PyAV as FFmpeg's tool would (timestamps from 0, so the
    encoder's priming is declared); ``video`` adds a small picture stream first (a soundtrack),
    ``streams`` repeats the audio stream (the second one at half the amplitude)."""
    import av
    from fractions import Fraction

    channels = data.shape[1]
    layout = {1: "mono", 2: "stereo"}[channels]
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as c:
        v = None
        if video:
            v = c.add_stream("mpeg4", rate=10)
            v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
        outs = []
        for k in range(streams):
            s = c.add_stream(codec, rate=sr, layout=layout, options=options or {})
            if bit_rate:
                s.bit_rate = bit_rate
            outs.append(s)
        if v is not None:
            pic = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            for i in range(int(len(data) / sr * 10) + 1):
                pic.pts = i
                for p in v.encode(pic):
                    c.mux(p)
            for p in v.encode(None):
                c.mux(p)
        for k, s in enumerate(outs):
            scaled = data * (0.5 ** k)
            for i in range(0, len(data), 4096):
                block = scaled[i:i + 4096]
                if sample_format == "s16p":
                    arr = np.round(block.T * 32768).clip(-32768, 32767).astype(np.int16)
                elif sample_format == "s16":
                    arr = np.round(block * 32768).clip(-32768, 32767).astype(np.int16).reshape(1, -1)
                else:
                    arr = np.ascontiguousarray(block.T, dtype=np.float32)
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr), format=sample_format, layout=layout)
                fr.sample_rate, fr.pts, fr.time_base = sr, i, Fraction(1, sr)
                for p in s.encode(fr):
                    c.mux(p)
            for p in s.encode(None):
                c.mux(p)
    return Path(path)


def silent_video(path: PathLike) -> Path:
    """An MP4 with a picture stream and no sound."""
    import av

    with av.open(str(path), "w", format="mp4") as c:
        v = c.add_stream("mpeg4", rate=10)
        v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
        for i in range(5):
            pic = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            pic.pts = i
            for p in v.encode(pic):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
    return Path(path)


def picture(path: PathLike) -> Path:
    """A PNG picture (FFmpeg opens it, as a video of one frame)."""
    import av

    with av.open(str(path), "w", format="image2") as c:
        v = c.add_stream("png", rate=1)
        v.width, v.height, v.pix_fmt = 16, 16, "rgb24"
        pic = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 200, np.uint8), format="rgb24")
        for p in v.encode(pic):
            c.mux(p)
        for p in v.encode(None):
            c.mux(p)
    return Path(path)


def cut_in_the_middle(src: PathLike, dst: PathLike) -> Path:
    """The first half of ``src`` (a download or copy that stopped)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: len(data) // 2])
    return Path(dst)


def zeroed_header(src: PathLike, dst: PathLike, nbytes: int = 64) -> Path:
    """``src`` with its first ``nbytes`` bytes zeroed (the container's signature gone)."""
    data = bytearray(Path(src).read_bytes())
    data[:nbytes] = bytes(min(nbytes, len(data)))
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def m4a(path: PathLike, seconds: float = 0.5, sr: int = 44100, channels: int = 2, codec: str = "aac") -> Path:
    """A tone as AAC (or ALAC) in .m4a, made like FFmpeg's tool makes it."""
    return encode_av(path, tone(int(seconds * sr), sr, channels), sr, codec, "mp4")


def cut_m4a(path: PathLike) -> Path:
    """An .m4a whose download stopped half way (its index, written last, is gone)."""
    whole = m4a(Path(path).with_name("whole_" + Path(path).name))
    cut_in_the_middle(whole, path)
    whole.unlink()
    return Path(path)


def zeroed_m4a(path: PathLike) -> Path:
    whole = m4a(Path(path).with_name("whole_" + Path(path).name))
    zeroed_header(whole, path)
    whole.unlink()
    return Path(path)
