"""The engine driven as a user would: files in, files out, through ``separate_audio``."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import snr_db
from dsu_audiosep import separate_audio
from dsu_audiosep.engine.chunking import GRID, plan_windows
from dsu_audiosep.engine.separate import SeparateOptions, separate_file
from dsu_audiosep.errors import AudioSepError

SR = 32000


def _signal(seconds: float, sr: int = SR, channels: int = 1, seed: int = 0) -> np.ndarray:
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    rng = np.random.default_rng(seed)
    chans = [0.3 * np.sin(2 * np.pi * (440 + 110 * c) * t) * np.sin(2 * np.pi * 0.5 * t) + 0.05 * rng.standard_normal(n) for c in range(channels)]
    return np.stack(chans, 1).astype(np.float32)


def _write(path, x, sr=SR, subtype="FLOAT"):
    sf.write(path, x, sr, subtype=subtype)
    return str(path)


def _run(model, src, dst, text="vocals", **kw):
    return separate_audio(model, str(src), text, str(dst), **kw)


EXACT = dict(output_sr="input", output_subtype="FLOAT", output_channels="input")


def test_plan_windows_tile_the_signal_on_the_grid():
    for n in (1, 5000, GRID * 7 + 3, 32000 * 61 + 17):
        for chunk in (None, 10240, 32000 * 3, 32000 * 10):
            wins = plan_windows(n, chunk, 40960)
            assert wins[0].keep_start == 0 and wins[-1].keep_end == n
            for a, b in zip(wins, wins[1:]):
                assert a.keep_end == b.keep_start
            for w in wins:
                assert w.start % GRID == 0 and w.keep_start % GRID == 0
                assert w.start <= w.keep_start < w.keep_end <= w.end <= n


@pytest.fixture(scope="module")
def full_pass(tmp_path_factory):
    """The full pass over one 13.3 s file, computed once per backend for every chunked case
    compared with it (the reference, not the thing under test)."""
    folder = tmp_path_factory.mktemp("full-pass")
    x = _signal(13.3)
    src = _write(folder / "in.wav", x)
    done: dict[str, np.ndarray] = {}

    def of(model) -> tuple[str, np.ndarray]:
        backend = getattr(model, "backend", "torch")
        if backend not in done:
            _run(model, src, folder / f"full_{backend}.wav", **EXACT)
            done[backend] = sf.read(folder / f"full_{backend}.wav", dtype="float32")[0]
        return src, done[backend]

    return of


# 2.56 s: several chunks with context on both sides; the numerics pass (AVX2) repeats only it
@pytest.mark.parametrize("chunk_length", [1.0, pytest.param(2.56, marks=pytest.mark.numerics), 4.0])
def test_chunked_equals_full_pass(backend_model, full_pass, tmp_path, chunk_length):
    src, full = full_pass(backend_model)
    r = _run(backend_model, src, tmp_path / "chunk.wav", use_chunk=True, chunk_length=chunk_length, **EXACT)
    assert r.chunked and r.windows > 2
    chunk, _ = sf.read(tmp_path / "chunk.wav", dtype="float32")
    assert full.shape == chunk.shape == (int(round(13.3 * SR)),)
    assert snr_db(full, chunk) >= 60


def test_exact_context_reproduces_the_full_pass(backend_model, full_pass, tmp_path):
    from dsu_audiosep.engine.chunking import EXACT_CONTEXT_S

    src, full = full_pass(backend_model)
    r = _run(backend_model, src, tmp_path / "exact.wav", use_chunk=True, chunk_length=6.4,
             context_seconds=EXACT_CONTEXT_S, **EXACT)
    assert r.windows == 3  # a window with context on both sides, and one at each end
    exact, _ = sf.read(tmp_path / "exact.wav", dtype="float32")
    assert np.abs(full - exact).max() <= 1e-5 * np.abs(full).max()


def test_default_output_is_seed_contract(model, tmp_path):
    src = _write(tmp_path / "mono22k.wav", _signal(1.5, 22050), 22050, "PCM_16")
    dst = tmp_path / "out.wav"
    r = _run(model, src, dst)
    info = sf.info(dst)
    assert (info.samplerate, info.channels, info.subtype) == (44100, 2, "PCM_16")
    assert info.frames == round(1.5 * 22050 * 44100 / 22050)
    y, _ = sf.read(dst)
    assert np.array_equal(y[:, 0], y[:, 1])  # mono duplicated
    assert r.files == [str(dst)]


def test_stereo_channels_are_separated_independently(model, tmp_path):
    x = _signal(2.0, channels=2)
    src = _write(tmp_path / "st.wav", x)
    _run(model, src, tmp_path / "st_out.wav", **EXACT)
    _run(model, _write(tmp_path / "l.wav", x[:, :1]), tmp_path / "l_out.wav", **EXACT)
    st, _ = sf.read(tmp_path / "st_out.wav", dtype="float32")
    left, _ = sf.read(tmp_path / "l_out.wav", dtype="float32")
    assert np.abs(st[:, 0] - left).max() < 1e-5


def test_remove_mode_and_residual_add_up_to_the_mixture(stand_in, tmp_path):
    x = _signal(2.0, 44100, channels=2)
    src = _write(tmp_path / "mix.wav", x, 44100)
    kw = dict(output_sr="input", output_subtype="FLOAT", output_channels="input")
    _run(stand_in, src, tmp_path / "ext.wav", residual_output=str(tmp_path / "rest.wav"), **kw)
    _run(stand_in, src, tmp_path / "rem.wav", mode="remove", **kw)
    ext, _ = sf.read(tmp_path / "ext.wav", dtype="float32")
    rest, _ = sf.read(tmp_path / "rest.wav", dtype="float32")
    rem, _ = sf.read(tmp_path / "rem.wav", dtype="float32")
    assert np.abs(ext + rest - x).max() < 1e-5
    assert np.abs(rem - rest).max() < 1e-6


@pytest.mark.parametrize("ext,subtype", [(".wav", "PCM_24"), (".flac", "PCM_16"), (".aiff", "FLOAT"), (".ogg", "PCM_16")])
def test_output_formats(model, tmp_path, ext, subtype):
    src = _write(tmp_path / "in.wav", _signal(1.0, 48000), 48000)
    dst = tmp_path / ("out" + ext)
    _run(model, src, dst, output_sr=24000, output_subtype=subtype)
    info = sf.info(dst)
    assert info.samplerate == 24000 and info.channels == 2
    assert abs(info.frames - 24000) <= 1


@pytest.mark.parametrize("sr,channels", [(8000, 1), (192000, 2), (44100, 8)])
def test_unusual_rates_and_channel_counts(stand_in, tmp_path, sr, channels):
    src = _write(tmp_path / "in.wav", _signal(0.7, sr, channels), sr, "PCM_24")
    dst = tmp_path / "out.wav"
    _run(stand_in, src, dst, output_sr="input", output_channels="input")
    y, out_sr = sf.read(dst, dtype="float32", always_2d=True)
    assert out_sr == sr and y.shape == (int(round(0.7 * sr)), channels)
    assert np.isfinite(y).all()
    _run(stand_in, src, tmp_path / "st.wav")
    assert sf.info(tmp_path / "st.wav").channels == 2


@pytest.mark.parametrize("n", [1, 100, 1500, 4000])
def test_very_short_inputs(model, tmp_path, n):
    src = _write(tmp_path / "short.wav", _signal(n / SR))
    dst = tmp_path / "out.wav"
    _run(model, src, dst, **EXACT)
    y, _ = sf.read(dst, dtype="float32", always_2d=True)
    assert y.shape == (n, 1) and np.isfinite(y).all()


def test_silence_nan_and_loud_inputs_give_finite_output(model, tmp_path):
    x = _signal(1.0)
    x[100:200] = np.nan
    x[300] = np.inf
    x[5000:6000] *= 1000
    for name, sig in (("silence", np.zeros_like(x)), ("nasty", x)):
        src = _write(tmp_path / f"{name}.wav", sig)
        _run(model, src, tmp_path / f"{name}_out.wav")
        y, _ = sf.read(tmp_path / f"{name}_out.wav", dtype="float32")
        assert np.isfinite(y).all() and np.abs(y).max() <= 1.0


def test_existing_output_is_replaced_and_bad_outputs_are_refused(model, tmp_path):
    src = _write(tmp_path / "in.wav", _signal(0.5))
    dst = tmp_path / "out.wav"
    dst.write_bytes(b"old")
    _run(model, src, dst)
    assert sf.info(dst).frames > 0
    for bad, code in ((src, "output_error"), (tmp_path / "missing_dir" / "o.wav", "output_error"), (tmp_path / "o.xyz", "invalid_field")):
        with pytest.raises(AudioSepError) as ei:
            _run(model, src, bad)
        assert ei.value.code == code, ei.value.message
    assert not list(tmp_path.glob(".*partial*"))


def test_bad_text_and_bad_options(model, tmp_path):
    src = _write(tmp_path / "in.wav", _signal(0.5))
    for text in ("", "   \n\t"):
        with pytest.raises(AudioSepError) as ei:
            _run(model, src, tmp_path / "o.wav", text=text)
        assert ei.value.code == "invalid_text"
    _run(model, src, tmp_path / "long.wav", text="dog " * 2500)  # truncated to 512 tokens, as the model does
    _run(model, src, tmp_path / "ctl.wav", text="b\x00ird\x07 \u9e1f \U0001F426")
    for kw in ({"mode": "both"}, {"use_chunk": "sometimes"}, {"chunk_length": -1}, {"output_sr": 0}):
        with pytest.raises(AudioSepError) as ei:
            _run(model, src, tmp_path / "o.wav", **kw)
        assert ei.value.code == "invalid_field"
    assert not (tmp_path / "o.wav").exists()


def test_progress_and_cancel_between_chunks(stand_in, tmp_path):
    src = _write(tmp_path / "in.wav", _signal(6.0))
    seen: list[float] = []
    opts = SeparateOptions(use_chunk=True, chunk_length=1.0, **EXACT)
    separate_file(stand_in, src, str(tmp_path / "p.wav"), "rain", opts, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) >= 5
    calls = []

    def cancel_after_two():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(AudioSepError) as ei:
        separate_file(stand_in, src, str(tmp_path / "c.wav"), "rain", opts, cancelled=cancel_after_two)
    assert ei.value.code == "cancelled"
    assert not (tmp_path / "c.wav").exists() and not list(tmp_path.glob(".*partial*"))


def test_oom_retries_with_smaller_chunks(stand_in, tmp_path):
    from conftest import GainStandIn

    class ShortOfMemory(GainStandIn):
        """Runs out of memory on any window longer than ``limit`` samples, as a GPU would."""

        def __init__(self, limit: int):
            self.limit = limit

        def separate(self, wav, cond):
            if wav.shape[1] > self.limit:
                raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return super().separate(wav, cond)

    src = _write(tmp_path / "in.wav", _signal(4.0))
    r = _run(ShortOfMemory(int(3.9 * SR)), src, tmp_path / "o.wav", **EXACT)  # only the single 4 s window fails
    assert r.chunked and r.warnings
    y, _ = sf.read(tmp_path / "o.wav", dtype="float32")
    _run(stand_in, src, tmp_path / "ref.wav", **EXACT)
    assert np.abs(y - sf.read(tmp_path / "ref.wav", dtype="float32")[0]).max() < 1e-6  # same output in chunks
    with pytest.raises(AudioSepError) as ei:
        _run(ShortOfMemory(0), src, tmp_path / "o2.wav")
    assert ei.value.code == "out_of_memory"
    assert not (tmp_path / "o2.wav").exists()


@pytest.mark.numerics
def test_streamed_file_equals_the_in_memory_computation(model, tmp_path):
    """The block-streamed pipeline (read, resample, separate, resample back, write) equals doing
    each step on whole arrays."""
    from dsu_audiosep.engine import resampling

    x = _signal(3.0, 44100, channels=2)
    src = _write(tmp_path / "in.wav", x, 44100)
    _run(model, src, tmp_path / "out.wav", output_subtype="FLOAT")
    y, sr = sf.read(tmp_path / "out.wav", dtype="float32")
    x32 = resampling.resample(x.T, 44100, 32000)
    sep = model.separate(torch.from_numpy(x32), model.embed_text("vocals")).numpy()
    ref = resampling.resample(sep, 32000, 44100, length=x.shape[0]).T
    assert sr == 44100 and y.shape == ref.shape
    assert snr_db(ref, y) > 90


def test_remove_and_residual_add_up_across_chunks(stand_in, tmp_path):
    x = _signal(5.0, 44100, channels=2, seed=3)
    src = _write(tmp_path / "mix.wav", x, 44100)
    kw = dict(output_sr="input", output_subtype="FLOAT", output_channels="input", use_chunk=True, chunk_length=1.0)
    r = _run(stand_in, src, tmp_path / "ext.wav", residual_output=str(tmp_path / "rest.wav"), **kw)
    assert r.windows >= 4
    ext, _ = sf.read(tmp_path / "ext.wav", dtype="float32")
    rest, _ = sf.read(tmp_path / "rest.wav", dtype="float32")
    assert ext.shape == rest.shape == x.shape
    assert np.abs(ext + rest - x).max() < 1e-5


def test_threaded_resampling_gives_the_same_file(stand_in, tmp_path, monkeypatch):
    """GPU runs resample each channel in its own thread; the written file must not change."""
    import dsu_audiosep.engine.separate as sep

    x = _signal(4.0, 44100, channels=2, seed=5)
    src = _write(tmp_path / "in.wav", x, 44100)
    kw = dict(output_subtype="FLOAT", use_chunk=True, chunk_length=1.0, residual_output=None)
    _run(stand_in, src, tmp_path / "serial.wav", **kw)
    monkeypatch.setattr(sep, "_resample_in_threads", lambda device: True)
    _run(stand_in, src, tmp_path / "threads.wav", mode="remove", **kw)
    _run(stand_in, src, tmp_path / "threads_extract.wav", **kw)
    a, _ = sf.read(tmp_path / "serial.wav", dtype="float32")
    b, _ = sf.read(tmp_path / "threads_extract.wav", dtype="float32")
    rest, _ = sf.read(tmp_path / "threads.wav", dtype="float32")
    assert np.array_equal(a, b)
    mix = sf.read(src, dtype="float32")[0]
    assert np.abs(rest + b - mix).max() < 1e-5
