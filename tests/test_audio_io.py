"""Tests for the engine's audio I/O (audio_read.py, resampling.py, output_options.py,
audio_write.py) with real files written into tmp_path."""
from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dsu_audiosep import errors as E
from dsu_audiosep.engine import audio_read, audio_write, output_options, resampling
from dsu_audiosep.errors import AudioSepError

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
CAN_DROP_PRIVILEGES = IS_ROOT and hasattr(os, "fork") and hasattr(os, "setuid")


def signal_nc(n: int, c: int, sr: int, seed: int = 0, amp: float = 0.5) -> np.ndarray:
    """[n, c] float32: a different tone mixture per channel plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    chans = []
    for k in range(c):
        f1 = min(220.0 * (k + 1), sr / 5)
        x = amp * 0.6 * np.sin(2 * np.pi * f1 * t) + amp * 0.3 * np.sin(2 * np.pi * f1 * 1.5 * t + k)
        chans.append(x + amp * 0.05 * rng.standard_normal(n))
    return np.stack(chans, axis=1).astype(np.float32)


def write_file(path: Path, data_nc: np.ndarray, sr: int, fmt: str, subtype: str) -> Path:
    sf.write(str(path), data_nc, sr, format=fmt, subtype=subtype)
    return path


def expect_error(code: str, fn, *args, match: str | None = None, **kwargs) -> AudioSepError:
    with pytest.raises(AudioSepError) as ei:
        fn(*args, **kwargs)
    assert ei.value.code == code, f"{ei.value.code}: {ei.value.message}"
    if match is not None:
        assert match in ei.value.message, ei.value.message
    return ei.value


def leftovers(folder: Path) -> list[str]:
    return sorted(glob.glob(str(folder / ".*.partial*")))


@pytest.fixture
def shared_dir():
    """A folder every user can traverse (tmp_path's parents are private to the test user)."""
    d = tempfile.mkdtemp(prefix="aio-")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def as_unprivileged(fn):
    """Run fn() as an ordinary user; return ("ok", repr) or (error code, message).

    As root, permission bits do not apply, so a forked child drops to uid/gid 65534 (nobody).
    """
    if not IS_ROOT:
        try:
            return "ok", repr(fn())
        except AudioSepError as e:
            return e.code, e.message
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            try:
                out = "ok\0" + repr(fn())
            except AudioSepError as e:
                out = e.code + "\0" + e.message
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                out = "crash\0" + repr(e)
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    code, _, msg = data.decode().partition("\0")
    return code, msg


# ---------------------------------------------------------------------------------------------
# Reading: formats, subtypes, rates, channels
# ---------------------------------------------------------------------------------------------

# (format, extension, subtype, tolerance on read-back); integer scaling is read / 2^(bits-1).
FORMAT_CASES = [
    ("WAV", "wav", "PCM_U8", 2 / 128),
    ("WAV", "wav", "PCM_16", 2 / 32768),
    ("WAV", "wav", "PCM_24", 2 / 2**23),
    ("WAV", "wav", "PCM_32", 2 / 2**31 + 1e-7),
    ("WAV", "wav", "FLOAT", 0.0),
    ("WAV", "wav", "DOUBLE", 0.0),
    ("FLAC", "flac", "PCM_S8", 2 / 128),
    ("FLAC", "flac", "PCM_16", 2 / 32768),
    ("FLAC", "flac", "PCM_24", 2 / 2**23),
    ("AIFF", "aiff", "PCM_16", 2 / 32768),
    ("AIFF", "aif", "PCM_24", 2 / 2**23),
    ("AIFF", "aiff", "FLOAT", 0.0),
]


@pytest.mark.parametrize("fmt,ext,subtype,tol", FORMAT_CASES)
def test_read_roundtrip_formats(tmp_path, fmt, ext, subtype, tol):
    sr, n = 44100, 3001
    data = signal_nc(n, 2, sr)
    p = write_file(tmp_path / f"in.{ext}", data, sr, fmt, subtype)
    x, got_sr = audio_read.read_audio(p)
    assert got_sr == sr
    assert x.dtype == np.float32 and x.shape == (2, n) and x.flags.c_contiguous
    assert np.max(np.abs(x - data.T)) <= tol + 1e-9
    info = audio_read.probe(p)
    assert (info.frames, info.samplerate, info.channels) == (n, sr, 2)
    assert info.format == fmt and info.subtype == subtype
    assert info.duration == pytest.approx(n / sr)


def test_read_ogg_vorbis(tmp_path):
    sr, n = 44100, 22050
    data = signal_nc(n, 2, sr)
    p = write_file(tmp_path / "in.ogg", data, sr, "OGG", "VORBIS")
    x, got_sr = audio_read.read_audio(p)
    assert got_sr == sr and x.shape == (2, n) and x.dtype == np.float32
    # Lossy: compare by signal-to-error ratio rather than samplewise.
    err = x - data.T
    snr = 10 * np.log10(np.sum(data.T**2) / np.sum(err**2))
    assert snr > 15, snr
    assert audio_read.probe(p).subtype == "VORBIS"


@pytest.mark.parametrize("sr", [8000, 11025, 16000, 22050, 32000, 44100, 48000, 88200, 96000, 192000])
def test_read_any_rate(tmp_path, sr):
    data = signal_nc(777, 1, sr)
    p = write_file(tmp_path / "r.wav", data, sr, "WAV", "PCM_16")
    x, got_sr = audio_read.read_audio(p)
    assert got_sr == sr and x.shape == (1, 777)


@pytest.mark.parametrize("channels,fmt,ext", [(1, "WAV", "wav"), (2, "FLAC", "flac"), (3, "WAV", "wav"),
                                              (6, "FLAC", "flac"), (8, "AIFF", "aiff"), (12, "WAV", "wav")])
def test_read_any_channel_count(tmp_path, channels, fmt, ext):
    data = signal_nc(500, channels, 48000)
    p = write_file(tmp_path / f"c.{ext}", data, 48000, fmt, "PCM_24")
    x, _ = audio_read.read_audio(p)
    assert x.shape == (channels, 500)
    # channel order preserved
    np.testing.assert_allclose(x, data.T, atol=2 / 2**23)


def test_read_one_sample(tmp_path):
    p = write_file(tmp_path / "one.wav", np.array([[0.25, -0.5]], np.float32), 16000, "WAV", "FLOAT")
    x, sr = audio_read.read_audio(p)
    assert sr == 16000 and x.shape == (2, 1)
    assert x[:, 0].tolist() == [0.25, -0.5]


def test_read_keeps_values_beyond_full_scale(tmp_path):
    data = np.array([[5.0], [-37.5], [1.0001], [0.0]], np.float32)
    p = write_file(tmp_path / "loud.wav", data, 32000, "WAV", "FLOAT")
    x, _ = audio_read.read_audio(p)
    np.testing.assert_array_equal(x[0], data[:, 0])


def test_read_replaces_nonfinite_and_reports(tmp_path, caplog, capsys):
    data = signal_nc(1000, 2, 32000)
    data[10, 0] = np.nan
    data[20, 1] = np.inf
    data[999, 1] = -np.inf
    p = write_file(tmp_path / "nan.wav", data, 32000, "WAV", "FLOAT")
    warnings: list[str] = []
    with caplog.at_level(logging.WARNING, logger="dsu_audiosep.engine.audio_read"):
        x, _ = audio_read.read_audio(p, warnings=warnings)
    assert np.isfinite(x).all()
    assert x[0, 10] == 0 and x[1, 20] == 0 and x[1, 999] == 0
    mask = np.isfinite(data.T)
    np.testing.assert_array_equal(x[mask], data.T[mask])
    assert len(warnings) == 1 and "replaced 3 non-finite" in warnings[0]
    assert any("replaced 3 non-finite" in r.getMessage() for r in caplog.records)
    assert capsys.readouterr().out == ""  # never on stdout


def test_read_accepts_placeholder_wav_size(tmp_path):
    # A recorder that died before rewriting the header leaves 0xFFFFFFFF sizes: still readable.
    data = signal_nc(1000, 2, 48000)
    p = write_file(tmp_path / "rec.wav", data, 48000, "WAV", "PCM_16")
    b = bytearray(p.read_bytes())
    assert b[36:40] == b"data"
    b[4:8] = struct.pack("<I", 0xFFFFFFFF)
    b[40:44] = struct.pack("<I", 0xFFFFFFFF)
    p.write_bytes(bytes(b))
    x, _ = audio_read.read_audio(p)
    assert x.shape == (2, 1000)


def test_read_unicode_path(tmp_path):
    p = write_file(tmp_path / "sprache – ß 音.wav", signal_nc(100, 1, 8000), 8000, "WAV", "PCM_16")
    x, sr = audio_read.read_audio(p)
    assert x.shape == (1, 100) and sr == 8000


# ---------------------------------------------------------------------------------------------
# Reading: errors
# ---------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    p = tmp_path / "nope.wav"
    e = expect_error(E.FILE_NOT_FOUND, audio_read.read_audio, p)
    assert str(p) in e.message
    expect_error(E.FILE_NOT_FOUND, audio_read.probe, p)
    expect_error(E.FILE_NOT_FOUND, audio_read.BlockReader, p)
    expect_error(E.FILE_NOT_FOUND, audio_read.read_audio, "")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_broken_symlink(tmp_path):
    link = tmp_path / "dangling.wav"
    os.symlink(tmp_path / "gone.wav", link)
    expect_error(E.FILE_NOT_FOUND, audio_read.read_audio, link, match="link")


def test_directory(tmp_path):
    d = tmp_path / "folder.wav"
    d.mkdir()
    expect_error(E.INVALID_AUDIO, audio_read.read_audio, d, match="folder")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_fifo_is_refused_without_blocking(tmp_path):
    f = tmp_path / "pipe.wav"
    os.mkfifo(f)
    expect_error(E.INVALID_AUDIO, audio_read.read_audio, f, match="not a regular file")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_no_read_permission(shared_dir):
    if IS_ROOT and not CAN_DROP_PRIVILEGES:
        pytest.skip("running as root without a way to drop privileges: permission bits do not apply")
    p = write_file(shared_dir / "secret.wav", signal_nc(100, 1, 8000), 8000, "WAV", "PCM_16")
    os.chmod(p, 0)
    code, msg = as_unprivileged(lambda: audio_read.read_audio(p))
    assert code == E.PERMISSION_DENIED, msg
    assert str(p) in msg
    code, _ = as_unprivileged(lambda: audio_read.probe(p))
    assert code == E.PERMISSION_DENIED


def test_permission_error_mapping_simulated(tmp_path, monkeypatch):
    # Works everywhere (root, Windows): the OS refusal itself is simulated.
    p = write_file(tmp_path / "x.wav", signal_nc(100, 1, 8000), 8000, "WAV", "PCM_16")
    import builtins

    real_open = builtins.open

    def deny(file, *a, **k):
        if os.fspath(file) == str(p):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)
    expect_error(E.PERMISSION_DENIED, audio_read.read_audio, p, match=str(p))


@pytest.mark.parametrize("content", [b"", b"RIFF", b"hello, this is not audio at all" * 50,
                                     bytes(range(256)) * 40])
def test_garbage_is_invalid_audio(tmp_path, content):
    p = tmp_path / "garbage.wav"
    p.write_bytes(content)
    e = expect_error(E.INVALID_AUDIO, audio_read.read_audio, p)
    assert str(p) in e.message
    expect_error(E.INVALID_AUDIO, audio_read.probe, p)


@pytest.mark.parametrize("fmt,ext,subtype", [("WAV", "wav", "PCM_16"), ("WAV", "wav", "FLOAT"),
                                             ("AIFF", "aiff", "PCM_24"), ("FLAC", "flac", "PCM_16")])
@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file(tmp_path, fmt, ext, subtype, keep):
    full = write_file(tmp_path / f"full.{ext}", signal_nc(20000, 2, 44100), 44100, fmt, subtype)
    raw = full.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(raw[: max(60, int(len(raw) * keep))])
    e = expect_error(E.INVALID_AUDIO, audio_read.read_audio, cut)
    assert str(cut) in e.message
    assert ("truncated" in e.message) or ("damaged" in e.message) or ("cut short" in e.message)
    # the header-only cut is also caught by probe for WAV/AIFF
    if fmt != "FLAC":
        expect_error(E.INVALID_AUDIO, audio_read.probe, cut, match="truncated")


def test_truncated_header(tmp_path):
    full = write_file(tmp_path / "full.wav", signal_nc(1000, 2, 44100), 44100, "WAV", "PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[:30])
    expect_error(E.INVALID_AUDIO, audio_read.read_audio, cut, match=str(cut))


@pytest.mark.parametrize("fmt,ext,subtype", [("WAV", "wav", "PCM_16"), ("WAV", "wav", "FLOAT"),
                                             ("AIFF", "aiff", "FLOAT")])
def test_zero_samples(tmp_path, fmt, ext, subtype):
    p = write_file(tmp_path / f"empty.{ext}", np.zeros((0, 2), np.float32), 44100, fmt, subtype)
    assert p.stat().st_size > 0  # a valid header
    e = expect_error(E.INVALID_AUDIO, audio_read.read_audio, p, match="contains no samples")
    assert str(p) in e.message
    expect_error(E.INVALID_AUDIO, audio_read.probe, p, match="contains no samples")


def test_zero_byte_file(tmp_path):
    # libsndfile writes nothing at all for a FLAC file without samples
    p = write_file(tmp_path / "empty.flac", np.zeros((0, 2), np.float32), 44100, "FLAC", "PCM_16")
    expect_error(E.INVALID_AUDIO, audio_read.read_audio, p, match="empty (0 bytes)")


def _flac_header_only(tmp_path, total: int) -> Path:
    full = write_file(tmp_path / "f.flac", np.zeros((1234, 2), np.float32), 44100, "FLAC", "PCM_16")
    b = bytearray(full.read_bytes())
    i = 4  # walk the metadata blocks after "fLaC"
    while True:
        last, size = b[i] >> 7, int.from_bytes(b[i + 1 : i + 4], "big")
        i += 4 + size
        if last:
            break
    head = b[:i]
    v = int.from_bytes(head[18:26], "big")  # STREAMINFO: 36-bit total sample count at the end
    head[18:26] = ((v >> 36 << 36) | total).to_bytes(8, "big")
    p = tmp_path / f"head{total}.flac"
    p.write_bytes(bytes(head))
    return p


@pytest.mark.parametrize("total", [0, 1234])
def test_flac_without_audio_frames(tmp_path, total):
    # total 0 means "unknown length" in FLAC: the reader counts frames by decoding (and fails here)
    p = _flac_header_only(tmp_path, total)
    with pytest.raises(AudioSepError) as ei:
        audio_read.read_audio(p)
    assert ei.value.code == E.INVALID_AUDIO and str(p) in ei.value.message


def test_unknown_length_is_counted(tmp_path, monkeypatch):
    data = signal_nc(5000, 2, 8000)
    p = write_file(tmp_path / "u.wav", data, 8000, "WAV", "FLOAT")
    # simulate a stream whose header does not announce its length
    monkeypatch.setattr(sf.SoundFile, "frames", property(lambda self: audio_read._UNKNOWN_FRAMES + 5))
    assert audio_read.probe(p).frames == 5000
    x, _ = audio_read.read_audio(p)
    np.testing.assert_array_equal(x, data.T)


# ---------------------------------------------------------------------------------------------
# BlockReader
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocksize", [1, 1000, 4096, 100000])
def test_block_reader_equals_read_audio(tmp_path, blocksize):
    data = signal_nc(9001, 3, 22050)
    p = write_file(tmp_path / "b.flac", data, 22050, "FLAC", "PCM_24")
    whole, _ = audio_read.read_audio(p)
    with audio_read.BlockReader(p, blocksize=blocksize) as r:
        assert (r.frames, r.channels, r.samplerate) == (9001, 3, 22050)
        blocks = list(r) if blocksize > 1 else [r.read() for _ in range(50)]
    if blocksize > 1:
        assert all(b.shape[1] == blocksize for b in blocks[:-1])
        assert all(b.dtype == np.float32 and b.flags.c_contiguous for b in blocks)
        np.testing.assert_array_equal(np.concatenate(blocks, axis=1), whole)
    else:
        np.testing.assert_array_equal(np.concatenate(blocks, axis=1), whole[:, :50])


def test_block_reader_blocks_are_independent_and_sanitised(tmp_path):
    data = signal_nc(300, 1, 8000)
    data[150, 0] = np.nan
    p = write_file(tmp_path / "n.wav", data, 8000, "WAV", "FLOAT")
    warnings: list[str] = []
    with audio_read.BlockReader(p, blocksize=100, warnings=warnings) as r:
        blocks = list(r)
        assert r.nonfinite_replaced == 1
    assert blocks[1][0, 50] == 0
    # a reused internal buffer must not alias earlier blocks
    np.testing.assert_array_equal(blocks[0][0], data[:100, 0])
    assert warnings and "replaced 1 non-finite" in warnings[0]


def test_block_reader_seek_and_read(tmp_path):
    data = signal_nc(1000, 2, 8000)
    p = write_file(tmp_path / "s.wav", data, 8000, "WAV", "FLOAT")
    with audio_read.BlockReader(p, blocksize=256) as r:
        r.seek(900)
        b = r.read(500)
        assert b.shape == (2, 100)
        np.testing.assert_array_equal(b, data[900:].T)
        assert r.read().shape == (2, 0)


def test_block_reader_truncated_flac_raises(tmp_path):
    full = write_file(tmp_path / "f.flac", signal_nc(48000, 2, 48000), 48000, "FLAC", "PCM_16")
    cut = tmp_path / "cut.flac"
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    r = audio_read.BlockReader(cut, blocksize=4096)  # opens: FLAC announces its length in STREAMINFO
    with pytest.raises(AudioSepError) as ei:
        for _ in r:
            pass
    r.close()
    assert ei.value.code == E.INVALID_AUDIO and str(cut) in ei.value.message


# ---------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------

def test_resampled_length_is_round_half_up():
    for n in list(range(0, 40)) + [12345, 44101, 10**7 + 3]:
        for a, b in [(44100, 32000), (32000, 44100), (44100, 22050), (32000, 48000), (8000, 32000)]:
            exact = Fraction(n * b, a)
            assert resampling.resampled_length(n, a, b) == int(exact + Fraction(1, 2)), (n, a, b)


RATES = [8000, 22050, 44100, 48000, 96000, 192000]


@pytest.mark.parametrize("sr", RATES)
@pytest.mark.parametrize("direction", ["to_model", "from_model"])
def test_resample_lengths(sr, direction):
    sr_in, sr_out = (sr, 32000) if direction == "to_model" else (32000, sr)
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 7, 1001, 12347):
        x = rng.standard_normal((2, n)).astype(np.float32)
        y = resampling.resample(x, sr_in, sr_out)
        assert y.shape == (2, resampling.resampled_length(n, sr_in, sr_out)), (n, sr_in, sr_out)
        assert y.dtype == np.float32


def test_resample_quality_on_a_sine():
    sr_in, sr_out = 44100, 32000
    t_in = np.arange(44100) / sr_in
    x = np.sin(2 * np.pi * 1000 * t_in).astype(np.float32)[None, :]
    y = resampling.resample(x, sr_in, sr_out)
    t_out = np.arange(y.shape[1]) / sr_out
    ref = np.sin(2 * np.pi * 1000 * t_out)
    mid = slice(1000, -1000)  # away from the edges where the filter sees zeros
    assert np.max(np.abs(y[0, mid] - ref[mid])) < 1e-3


def test_resample_identity_and_length_override():
    x = np.random.default_rng(2).standard_normal((2, 100)).astype(np.float32)
    y = resampling.resample(x, 32000, 32000)
    np.testing.assert_array_equal(y, x)
    assert resampling.resample(x, 32000, 32000, length=90).shape == (2, 90)
    z = resampling.resample(x, 32000, 32000, length=110)
    assert z.shape == (2, 110) and not z[:, 100:].any()
    assert resampling.resample(x, 32000, 44100, length=150).shape == (2, 150)


def test_resample_1d_and_empty():
    x = np.ones(1000, np.float32)
    assert resampling.resample(x, 48000, 32000).shape == (667,)
    assert resampling.resample(np.zeros((2, 0), np.float32), 48000, 32000).shape == (2, 0)
    with pytest.raises(ValueError):
        resampling.resample(x, 0, 32000)
    with pytest.raises(ValueError):
        resampling.resample(x, 48000, 32000, quality="best")


def test_round_trip_restores_length_and_signal():
    sr = 44100
    x = signal_nc(44101, 2, sr, amp=0.3).T
    down = resampling.resample(x, sr, 32000)
    back = resampling.resample(down, 32000, sr, length=x.shape[1])
    assert back.shape == x.shape
    mid = slice(2000, -2000)
    # content below 16 kHz survives: compare tones (noise above 16 kHz is removed by design)
    err = back[:, mid] - x[:, mid]
    assert 10 * np.log10(np.sum(x[:, mid] ** 2) / np.sum(err**2)) > 20


@pytest.mark.parametrize("sr_in,sr_out", [(44100, 32000), (32000, 44100), (48000, 32000), (8000, 32000),
                                          (32000, 192000), (22050, 32000), (32000, 32000)])
def test_stream_resampler_equals_one_shot(sr_in, sr_out):
    rng = np.random.default_rng(3)
    n = 30011
    x = rng.standard_normal((2, n)).astype(np.float32)
    ref = resampling.resample(x, sr_in, sr_out)
    sr = resampling.StreamResampler(2, sr_in, sr_out)
    sizes = [0, 1, 5, 4096, 333, 7000, 1, 0, 12000]
    outs, pos = [], 0
    for s in sizes:
        outs.append(sr.process(x[:, pos : pos + s]))
        pos += s
    outs.append(sr.process(x[:, pos:], last=True))
    y = np.concatenate(outs, axis=1)
    assert y.shape == ref.shape == (2, resampling.resampled_length(n, sr_in, sr_out))
    assert np.max(np.abs(y - ref)) < 1e-5
    assert sr.total_out == y.shape[1]
    with pytest.raises(RuntimeError):
        sr.process(x[:, :10])


def test_stream_resampler_empty_last_block_and_mono():
    x = np.random.default_rng(4).standard_normal(5000).astype(np.float32)
    s = resampling.StreamResampler(1, 44100, 32000)
    a = s.process(x)
    b = s.process(np.zeros((1, 0), np.float32), last=True)
    y = np.concatenate([a, b], axis=1)
    np.testing.assert_allclose(y[0], resampling.resample(x, 44100, 32000), atol=1e-5)
    with pytest.raises(ValueError):
        resampling.StreamResampler(2, 44100, 32000).process(np.zeros((3, 10), np.float32))


def test_stream_resampler_never_runs_ahead():
    """A resampler that emits early (soxr does not, but the contract must not depend on it) is
    held back so the running total never exceeds the final length, and nothing is lost."""

    class EagerStream:
        def __init__(self):
            self.next = 0

        def resample_chunk(self, x, last=False):
            k = 3 * x.shape[0] if not last else 5  # far too many, then a small tail
            out = np.arange(self.next, self.next + k, dtype=np.float32)
            self.next += k
            return np.repeat(out[:, None], x.shape[1], axis=1)

    s = resampling.StreamResampler(2, 32000, 44100)
    s._stream = EagerStream()
    outs, n_in = [], 0
    for size in (100, 7, 0, 50):
        outs.append(s.process(np.zeros((2, size), np.float32)))
        n_in += size
        assert s.total_out <= resampling.resampled_length(n_in, 32000, 44100)
    outs.append(s.process(np.zeros((2, 10), np.float32), last=True))
    y = np.concatenate(outs, axis=1)
    want = resampling.resampled_length(n_in + 10, 32000, 44100)
    assert y.shape == (2, want)
    np.testing.assert_array_equal(y[0], np.arange(want, dtype=np.float32))


def test_stream_resampler_length_override():
    x = np.zeros((1, 32001), np.float32)
    s = resampling.StreamResampler(1, 32000, 44100)
    total = s.process(x[:, :10000]).shape[1] + s.process(x[:, 10000:], last=True, length=44101).shape[1]
    assert total == 44101


# ---------------------------------------------------------------------------------------------
# Output options, formats and channels
# ---------------------------------------------------------------------------------------------

def test_output_options_defaults_and_aliases():
    o = output_options.OutputOptions().validate()
    assert (o.samplerate, o.subtype, o.channels) == (44100, "PCM_16", "stereo")
    for alias, canon in [("16", "PCM_16"), ("pcm_24", "PCM_24"), ("24", "PCM_24"), ("float", "FLOAT"),
                         ("Float32", "FLOAT"), (" pcm16 ", "PCM_16"), (24, "PCM_24")]:
        assert output_options.OutputOptions(subtype=alias).validate().subtype == canon
    assert output_options.OutputOptions(samplerate="Input").validate().samplerate == "input"
    assert output_options.OutputOptions(samplerate="48000").validate().samplerate == 48000
    assert output_options.OutputOptions(samplerate=np.int64(22050)).validate().samplerate == 22050
    assert output_options.OutputOptions(channels="INPUT").validate().channels == "input"
    o = output_options.OutputOptions(samplerate="input", channels="input").validate()
    assert o.resolved_samplerate(22050) == 22050 and o.resolved_channels(6) == 6
    o = output_options.OutputOptions().validate()
    assert o.resolved_samplerate(22050) == 44100 and o.resolved_channels(1) == 2


@pytest.mark.parametrize("kwargs", [
    {"samplerate": 0}, {"samplerate": -44100}, {"samplerate": True}, {"samplerate": 44100.5},
    {"samplerate": "fast"}, {"samplerate": None}, {"samplerate": 10**7},
    {"subtype": "PCM_8"}, {"subtype": "mp3"}, {"subtype": None}, {"subtype": 32},
    {"channels": "mono"}, {"channels": 2}, {"channels": None},
])
def test_output_options_invalid(kwargs):
    expect_error(E.INVALID_FIELD, output_options.OutputOptions(**kwargs).validate)


def test_output_format_from_extension():
    assert output_options.output_format_for("a.wav") == "WAV"
    assert output_options.output_format_for("A.WAV") == "WAV"
    assert output_options.output_format_for("x/y.flac") == "FLAC"
    assert output_options.output_format_for("y.ogg") == "OGG"
    assert output_options.output_format_for("y.aiff") == "AIFF"
    assert output_options.output_format_for("y.aif") == "AIFF"
    assert [output_options.output_format_for(f"y.{e}") for e in ("mp3", "OPUS", "m4a")] == ["MP3", "OPUS", "M4A"]
    expect_error(E.INVALID_FIELD, output_options.output_format_for, "y.wma", match=".wma")
    expect_error(E.INVALID_FIELD, output_options.output_format_for, "noext", match="no extension")


def test_float_in_flac_refused(tmp_path):
    expect_error(E.INVALID_FIELD, audio_write.AtomicWriter, tmp_path / "o.flac", 44100, 2, "FLOAT", match="FLAC")
    expect_error(E.INVALID_FIELD, audio_write.prepare_output, tmp_path / "o.flac",
                 output_options.OutputOptions(subtype="FLOAT"), 44100, 2)


def test_format_limits_refused_before_opening(tmp_path):
    # libvorbis crashes the process above 200 kHz: must be refused, never attempted.
    expect_error(E.INVALID_FIELD, audio_write.AtomicWriter, tmp_path / "o.ogg", 256000, 2, match="200000")
    expect_error(E.INVALID_FIELD, audio_write.AtomicWriter, tmp_path / "o.flac", 44100, 9, match="8 channels")
    expect_error(E.INVALID_FIELD, audio_write.prepare_output, tmp_path / "o.flac",
                 output_options.OutputOptions(channels="input"), 44100, 10)
    assert not list(tmp_path.iterdir())


def test_map_channels():
    mono = np.arange(5, dtype=np.float32)[None]
    st = output_options.map_channels(mono, "stereo")
    assert st.shape == (2, 5) and (st[0] == mono[0]).all() and (st[1] == mono[0]).all()
    two = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    assert output_options.map_channels(two, "stereo") is two
    six = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    assert output_options.map_channels(six, "input") is six
    for c in range(3, 12):
        ones = np.ones((c, 4), np.float32)
        out = output_options.map_channels(ones, "stereo")
        assert out.shape == (2, 4)
        # rows sum to one: a full-scale signal everywhere stays full scale, never above
        np.testing.assert_allclose(out, 1.0, atol=1e-6)
    centre = np.zeros((6, 3), np.float32)
    centre[2] = 1.0  # 5.1: FC goes equally to both sides
    out = output_options.map_channels(centre, "stereo")
    assert out[0, 0] == pytest.approx(out[1, 0]) and out[0, 0] > 0
    lfe = np.zeros((6, 3), np.float32)
    lfe[3] = 1.0  # LFE dropped
    assert not output_options.map_channels(lfe, "stereo").any()
    left = np.zeros((6, 3), np.float32)
    left[0] = 1.0
    out = output_options.map_channels(left, "stereo")
    assert out[0, 0] > 0 and out[1, 0] == 0


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext,fmt", [("wav", "WAV"), ("flac", "FLAC"), ("ogg", "OGG"), ("aiff", "AIFF")])
@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
@pytest.mark.parametrize("sr_opt", [44100, "input", 16000])
@pytest.mark.parametrize("ch_opt,in_ch", [("stereo", 1), ("input", 1), ("stereo", 6), ("input", 3)])
def test_write_audio_options(tmp_path, ext, fmt, subtype, sr_opt, ch_opt, in_ch):
    model_sr, input_sr, n = 32000, 48000, 6400
    x = signal_nc(n, in_ch, model_sr, amp=0.4).T
    out = tmp_path / f"out.{ext}"
    opts = output_options.OutputOptions(samplerate=sr_opt, subtype=subtype, channels=ch_opt)
    if fmt == "FLAC" and subtype == "FLOAT":  # refused by design, before anything is written
        expect_error(E.INVALID_FIELD, audio_write.write_audio, out, x, model_sr, opts, input_samplerate=input_sr)
        assert list(tmp_path.iterdir()) == []
        return
    stats = audio_write.write_audio(out, x, model_sr, opts, input_samplerate=input_sr)
    want_sr = input_sr if sr_opt == "input" else sr_opt
    want_ch = in_ch if ch_opt == "input" else 2
    want_frames = resampling.resampled_length(n, model_sr, want_sr)
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.frames) == (want_sr, want_ch, want_frames)
    assert info.format == fmt
    assert info.subtype == ("VORBIS" if fmt == "OGG" else subtype)
    assert (stats.samplerate, stats.channels, stats.frames) == (want_sr, want_ch, want_frames)
    assert stats.clipped == 0 and stats.nonfinite == 0
    y, _ = audio_read.read_audio(out)
    ref = resampling.resample(output_options.map_channels(x, ch_opt), model_sr, want_sr)
    if fmt == "OGG":
        err = y - ref
        assert 10 * np.log10(np.sum(ref**2) / np.sum(err**2)) > 10
    else:
        tol = {"PCM_16": 2 / 32768, "PCM_24": 2 / 2**23, "FLOAT": 1e-7}[subtype]
        assert np.max(np.abs(y - ref)) <= tol
    assert leftovers(tmp_path) == []


def test_write_input_rate_without_input_samplerate_uses_sr(tmp_path):
    x = signal_nc(1000, 2, 32000).T
    audio_write.write_audio(tmp_path / "o.wav", x, 32000, output_options.OutputOptions(samplerate="input"))
    assert sf.info(str(tmp_path / "o.wav")).samplerate == 32000


def test_write_exact_length(tmp_path):
    x = np.zeros((1, 32001), np.float32)
    stats = audio_write.write_audio(tmp_path / "o.wav", x, 32000, output_options.OutputOptions(), length=44101)
    assert stats.frames == 44101 == sf.info(str(tmp_path / "o.wav")).frames


def test_pcm_clipping_and_nonfinite(tmp_path, caplog):
    x = np.array([[0.5, 1.5, -2.0, np.nan, np.inf, 1.0, -1.0]], np.float32)
    warnings: list[str] = []
    with caplog.at_level(logging.WARNING, logger="dsu_audiosep.engine.audio_write"):
        stats = audio_write.write_audio(tmp_path / "c.wav", x, 32000,
                                        output_options.OutputOptions(samplerate="input", channels="input"), warnings=warnings)
    assert stats.clipped == 2  # 1.5 and -2.0; +inf is non-finite, so it becomes 0 before clipping
    y, _ = audio_read.read_audio(tmp_path / "c.wav")
    assert np.max(np.abs(y)) <= 1.0
    assert y[0, 3] == 0 and y[0, 4] == 0
    assert y[0, 1] == pytest.approx(32767 / 32768) and y[0, 2] == -1.0  # extremes, no wrap-around
    assert stats.nonfinite == 2
    assert any("clipped" in w for w in warnings) and any("non-finite" in w for w in warnings)


def test_pcm_clipping_happens_before_libsndfile(tmp_path, monkeypatch):
    # libsndfile 1.2 saturates by itself; we must not depend on that (older versions wrap around).
    seen = []
    real = sf.SoundFile.write
    monkeypatch.setattr(sf.SoundFile, "write", lambda self, d: (seen.append(float(np.abs(d).max())), real(self, d))[1])
    audio_write.write_audio(tmp_path / "c.flac", np.array([[3.0, -3.0, 0.1]], np.float32), 32000,
                    output_options.OutputOptions(samplerate="input", subtype="PCM_24", channels="input"))
    assert seen and max(seen) <= 1.0


def test_float_output_keeps_values(tmp_path):
    x = np.array([[0.5, 1.5, -2.0, np.nan]], np.float32)
    stats = audio_write.write_audio(tmp_path / "f.wav", x, 32000,
                            output_options.OutputOptions(samplerate="input", subtype="FLOAT", channels="input"))
    y, _ = audio_read.read_audio(tmp_path / "f.wav")
    assert y[0].tolist() == [0.5, 1.5, -2.0, 0.0]
    assert stats.clipped == 0 and stats.nonfinite == 1


def test_writer_does_not_modify_callers_array(tmp_path):
    x = np.array([[2.0, np.nan, 0.1]], np.float32)
    before = x.copy()
    with audio_write.AtomicWriter(tmp_path / "o.wav", 8000, 1) as w:
        w.write(x)
    np.testing.assert_array_equal(x, before)  # NaN == NaN with assert_array_equal


def test_atomic_writer_streams_and_replaces(tmp_path):
    target = tmp_path / "out.wav"
    target.write_bytes(b"old content")
    x = signal_nc(10000, 2, 44100).T
    with audio_write.AtomicWriter(target, 44100, 2, "FLOAT") as w:
        for s in range(0, 10000, 3000):
            w.write(x[:, s : s + 3000])
            # the partial file lives in the target folder, hidden, with the right name pattern
            parts = leftovers(tmp_path)
            assert len(parts) == 1 and os.path.basename(parts[0]).startswith(".out.")
            assert parts[0].endswith(".partial.wav") and parts[0] in audio_write._PARTIALS
            assert target.read_bytes() == b"old content"
    assert leftovers(tmp_path) == [] and not audio_write._PARTIALS
    y, _ = audio_read.read_audio(target)
    np.testing.assert_array_equal(y, x)


@pytest.mark.skipif(os.name != "posix", reason="umask semantics")
def test_output_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        audio_write.write_audio(tmp_path / "o.wav", np.zeros((1, 10), np.float32), 8000, output_options.OutputOptions(samplerate="input"))
    finally:
        os.umask(old)
    assert (tmp_path / "o.wav").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_writer_exception_leaves_no_partial_and_keeps_target(tmp_path, exc):
    target = tmp_path / "keep.wav"
    write_file(target, signal_nc(100, 2, 8000), 8000, "WAV", "PCM_16")
    original = target.read_bytes()
    with pytest.raises(type(exc)):
        with audio_write.AtomicWriter(target, 8000, 2) as w:
            w.write(np.zeros((2, 5000), np.float32))
            raise exc
    assert target.read_bytes() == original
    assert leftovers(tmp_path) == [] and not audio_write._PARTIALS


def test_atomic_writer_exception_without_previous_target(tmp_path):
    target = tmp_path / "new.flac"
    with pytest.raises(ValueError):
        with audio_write.AtomicWriter(target, 8000, 2) as w:
            w.write(np.zeros((2, 10), np.float32))
            w.write(np.zeros((3, 10), np.float32))  # wrong channel count: programming error
    assert not target.exists() and leftovers(tmp_path) == []


def test_cleanup_partial_files(tmp_path):
    target = tmp_path / "t.wav"
    target.write_bytes(b"previous")
    w = audio_write.AtomicWriter(target, 8000, 1).open()
    w.write(np.zeros((1, 100), np.float32))
    assert len(leftovers(tmp_path)) == 1
    assert audio_write.cleanup_partial_files() == 1
    assert leftovers(tmp_path) == [] and not audio_write._PARTIALS
    expect_error(E.CANCELLED, w.write, np.zeros((1, 10), np.float32))
    expect_error(E.CANCELLED, w.commit)
    assert target.read_bytes() == b"previous"
    w.abort()


def _fail_second_write(monkeypatch, exc_factory):
    real = sf.SoundFile.write
    calls = {"n": 0}

    def write(self, data):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise exc_factory()
        return real(self, data)

    monkeypatch.setattr(sf.SoundFile, "write", write)


def test_disk_full_oserror(tmp_path, monkeypatch):
    _fail_second_write(monkeypatch, lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    target = tmp_path / "full.wav"
    with pytest.raises(AudioSepError) as ei:
        with audio_write.AtomicWriter(target, 8000, 2) as w:
            w.write(np.zeros((2, 100), np.float32))
            w.write(np.zeros((2, 100), np.float32))
    assert ei.value.code == E.DISK_FULL and str(target) in ei.value.message
    assert not target.exists() and leftovers(tmp_path) == [] and not audio_write._PARTIALS


def test_disk_full_libsndfile_system_error(tmp_path, monkeypatch):
    # What libsndfile really raises on ENOSPC: code 2 "System error", details in sf_strerror.
    _fail_second_write(monkeypatch, lambda: sf.LibsndfileError(2))
    monkeypatch.setattr(audio_write, "_sf_system_error",
                        lambda sfobj: (errno.ENOSPC, "System error : No space left on device."))
    target = tmp_path / "full.flac"
    target.write_bytes(b"previous")
    with pytest.raises(AudioSepError) as ei:
        audio_write.write_audio(target, np.zeros((2, 300000), np.float32), 32000, output_options.OutputOptions(samplerate="input"))
    assert ei.value.code == E.DISK_FULL
    assert target.read_bytes() == b"previous" and leftovers(tmp_path) == []


def test_disk_nearly_full_fallback(tmp_path, monkeypatch):
    # No errno available (e.g. another C runtime on Windows): an almost empty disk decides.
    _fail_second_write(monkeypatch, lambda: sf.LibsndfileError(2))
    monkeypatch.setattr(audio_write, "_sf_system_error", lambda sfobj: (None, ""))
    monkeypatch.setattr(audio_write.shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**9, used=10**9, free=1000))
    with pytest.raises(AudioSepError) as ei:
        with audio_write.AtomicWriter(tmp_path / "o.wav", 8000, 1) as w:
            w.write(np.zeros((1, 10), np.float32))
            w.write(np.zeros((1, 10), np.float32))
    assert ei.value.code == E.DISK_FULL and leftovers(tmp_path) == []


@pytest.mark.skipif(sys.platform == "win32" or not hasattr(os, "fork"), reason="POSIX rlimit")
def test_real_write_failure_from_file_size_limit(tmp_path):
    """A real libsndfile write failure (RLIMIT_FSIZE -> EFBIG) in a child process: a clear error,
    the previous target intact and no partial file left."""
    target = tmp_path / "big.wav"
    target.write_bytes(b"previous")
    code = textwrap.dedent(f"""
        import resource, signal, sys, numpy as np
        from dsu_audiosep.engine import audio_write, output_options
        from dsu_audiosep.errors import AudioSepError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000))
        try:
            audio_write.write_audio({str(target)!r}, np.zeros((2, 200000), np.float32), 32000,
                                    output_options.OutputOptions(samplerate="input"))
        except AudioSepError as e:
            print(e.code + "|" + e.message)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    code_, _, msg = res.stdout.strip().partition("|")
    assert code_ in (E.OUTPUT_ERROR, E.DISK_FULL), res.stdout
    assert str(target) in msg
    assert target.read_bytes() == b"previous" and leftovers(tmp_path) == []


def test_output_folder_missing(tmp_path):
    out = tmp_path / "no" / "such" / "o.wav"
    expect_error(E.OUTPUT_ERROR, audio_write.AtomicWriter, out, 44100, 2, match="does not exist")
    expect_error(E.OUTPUT_ERROR, audio_write.prepare_output, out, output_options.OutputOptions(), 44100, 2)
    expect_error(E.OUTPUT_ERROR, audio_write.write_audio, out, np.zeros((2, 10), np.float32), 32000)


def test_output_is_a_folder_or_bad_extension(tmp_path):
    (tmp_path / "d.wav").mkdir()
    expect_error(E.OUTPUT_ERROR, audio_write.AtomicWriter, tmp_path / "d.wav", 44100, 2, match="folder")
    expect_error(E.INVALID_FIELD, audio_write.AtomicWriter, tmp_path / "o.wma", 44100, 2)
    (tmp_path / "file").write_bytes(b"x")
    expect_error(E.OUTPUT_ERROR, audio_write.AtomicWriter, tmp_path / "file" / "o.wav", 44100, 2)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_output_folder_not_writable(shared_dir):
    if IS_ROOT and not CAN_DROP_PRIVILEGES:
        pytest.skip("running as root without a way to drop privileges: permission bits do not apply")
    ro = shared_dir / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    out = ro / "o.wav"
    code, msg = as_unprivileged(lambda: audio_write.prepare_output(out, output_options.OutputOptions(), 44100, 2))
    assert code == E.PERMISSION_DENIED, msg
    assert str(ro) in msg
    code, _ = as_unprivileged(lambda: audio_write.write_audio(out, np.zeros((2, 10), np.float32), 32000))
    assert code == E.PERMISSION_DENIED
    assert list(ro.iterdir()) == []


def test_prepare_output_plan(tmp_path):
    plan = audio_write.prepare_output(tmp_path / "o.ogg", output_options.OutputOptions(samplerate="input", subtype="24"), 22050, 1)
    assert (plan.format, plan.subtype, plan.samplerate, plan.channels) == ("OGG", "VORBIS", 22050, 2)
    assert list(tmp_path.iterdir()) == []  # the trial file is gone
    plan = audio_write.prepare_output(tmp_path / "o.flac", output_options.OutputOptions(channels="input", subtype="PCM_24"), 48000, 6)
    with plan.writer(expected_frames=100) as w:
        w.write(np.zeros((6, 100), np.float32))
    info = sf.info(str(tmp_path / "o.flac"))
    assert (info.format, info.subtype, info.channels, info.samplerate) == ("FLAC", "PCM_24", 6, 44100)


def test_huge_wav_switches_to_rf64(tmp_path):
    w = audio_write.AtomicWriter(tmp_path / "huge.wav", 192000, 2, "FLOAT", expected_frames=192000 * 3600 * 2)
    assert w.format == "RF64"
    w = audio_write.AtomicWriter(tmp_path / "small.wav", 44100, 2, "PCM_16", expected_frames=44100 * 600)
    assert w.format == "WAV"


# ---------------------------------------------------------------------------------------------
# same_file
# ---------------------------------------------------------------------------------------------

def test_same_file(tmp_path, monkeypatch):
    a = write_file(tmp_path / "a.wav", np.zeros((10, 1), np.float32), 8000, "WAV", "PCM_16")
    b = write_file(tmp_path / "b.wav", np.zeros((10, 1), np.float32), 8000, "WAV", "PCM_16")
    assert audio_write.same_file(a, a)
    assert audio_write.same_file(a, str(tmp_path / "sub" / ".." / "a.wav"))
    monkeypatch.chdir(tmp_path)
    assert audio_write.same_file("a.wav", a)
    assert audio_write.same_file("./a.wav", str(a))
    assert not audio_write.same_file(a, b)
    assert not audio_write.same_file(a, tmp_path / "missing.wav")
    assert audio_write.same_file(tmp_path / "missing.wav", "missing.wav")
    if hasattr(os, "symlink"):
        os.symlink(a, tmp_path / "link.wav")
        assert audio_write.same_file(tmp_path / "link.wav", a)
        (tmp_path / "sub").mkdir()
        os.symlink(tmp_path, tmp_path / "sub" / "up")
        assert audio_write.same_file(tmp_path / "sub" / "up" / "a.wav", a)
        assert audio_write.same_file(tmp_path / "sub" / "up" / "new.wav", tmp_path / "new.wav")
    if hasattr(os, "link"):
        os.link(a, tmp_path / "hard.wav")
        assert audio_write.same_file(tmp_path / "hard.wav", a)


@pytest.mark.parametrize("sr_in,sr_out", [(44100, 32000), (32000, 44100), (48000, 32000)])
def test_per_channel_threaded_resampling_is_bit_identical(sr_in, sr_out):
    from dsu_audiosep.engine.resampling import StreamResampler

    x = np.random.default_rng(0).standard_normal((2, 300000)).astype(np.float32)
    outs = []
    for parallel in (False, True):
        r = StreamResampler(2, sr_in, sr_out, parallel=parallel)
        ys, pos = [], 0
        for b in (1000, 70000, 5000, 100000, 124000):
            ys.append(r.process(x[:, pos : pos + b]))
            pos += b
        ys.append(r.process(x[:, pos:], last=True))
        outs.append(np.concatenate(ys, 1))
    assert outs[0].shape == outs[1].shape and np.array_equal(outs[0], outs[1])
