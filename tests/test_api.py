"""``Separator`` used as a Python user would: arrays, tensors and file objects in, arrays out.

Equality with the file path allows float rounding (1e-6 of the peak): the two paths run the same
pipeline, but a file's samples pass through libsndfile's conversions.
"""
from __future__ import annotations

import io
import subprocess
import sys
import threading

import numpy as np
import pytest
import soundfile as sf
import torch

from dsu_audiosep import Separator, separate_audio
from dsu_audiosep.engine.audio_memory import ArrayReader, memory_audio
from dsu_audiosep.errors import AudioSepError

EXACT = dict(output_sr="input", output_subtype="FLOAT", output_channels="input")


def _signal(seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """[channels, frames] float32: a modulated tone per channel plus a little noise."""
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    rng = np.random.default_rng(seed)
    return np.stack([0.3 * np.sin(2 * np.pi * (440 + 110 * c) * t) * np.sin(2 * np.pi * 0.5 * t)
                     + 0.05 * rng.standard_normal(n) for c in range(channels)]).astype(np.float32)


def _close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-6) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == np.float32
    peak = float(np.abs(expected).max())
    err = float(np.abs(actual.astype(np.float64) - expected).max())
    assert err <= rel * peak, f"max difference {err:.3g} is more than {rel:g} of the peak {peak:.3g}"


@pytest.fixture(scope="module")
def sep(model_files) -> Separator:
    """Loaded from the files, as a user loads it (CPU, the torch backend: the file path's reference)."""
    return Separator(model_files["checkpoint_path"], roberta_dir=model_files["roberta_dir"],
                     config_path=model_files["config_path"], device="cpu", backend="torch")


def _via_file(sep: Separator, tmp_path, x: np.ndarray, sr: int, text: str = "vocals", subtype: str = "FLOAT",
              **options) -> np.ndarray:
    """The same samples through a file: written, separated by the file API, read back."""
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(src, x.T, sr, subtype=subtype)
    separate_audio(sep.model, str(src), text, str(dst), **EXACT, **options)
    y, out_sr = sf.read(dst, dtype="float32", always_2d=True)
    assert out_sr == sr
    return y.T


@pytest.mark.parametrize("sr, channels", [(44100, 1), (22050, 2)])
def test_numpy_in_numpy_out_equals_the_file_path(sep, tmp_path, sr, channels):
    x = _signal(1.0, sr, channels)
    y = sep.separate(x, sr, text="vocals")
    assert isinstance(y, np.ndarray) and y.shape == x.shape and y.dtype == np.float32
    _close(y, _via_file(sep, tmp_path, x, sr))


def test_mono_1d_float64_and_torch_inputs(sep):
    x = _signal(0.5, 44100)
    ref = sep.separate(x, 44100, text="vocals")
    assert ref.shape == (1, x.shape[1])  # always [channels, frames], a 1-D input included
    _close(sep.separate(x[0], 44100, text="vocals"), ref)
    _close(sep.separate(x[0].astype(np.float64), 44100, text="vocals"), ref)
    tiny = sep.separate(np.full(10, 0.1, np.float32), 8000, text="vocals")  # shorter than one STFT frame
    assert tiny.shape == (1, 10) and np.isfinite(tiny).all()
    out = sep.separate(torch.from_numpy(x), 44100, text="vocals")
    assert isinstance(out, np.ndarray)
    _close(out, ref)
    _close(sep.separate(torch.from_numpy(x[0]).to(torch.bfloat16), 44100, text="vocals").astype(np.float32),
           sep.separate(torch.from_numpy(x[0]).to(torch.bfloat16).float().numpy(), 44100, text="vocals"))


def test_int16_array_equals_a_pcm16_file(sep, tmp_path):
    x = _signal(1.0, 22050)
    pcm = np.round(x * 32767).astype(np.int16)
    y = sep.separate(pcm, 22050, text="drums")
    _close(y, _via_file(sep, tmp_path, pcm.astype(np.float32) / 32768, 22050, text="drums", subtype="PCM_16"))


def test_file_object_and_path_inputs(sep, tmp_path):
    x = _signal(1.0, 48000)
    path = tmp_path / "mix.flac"
    sf.write(path, x.T, 48000, subtype="PCM_24")
    from_path = sep.separate(str(path), text="rain")
    assert from_path.shape == x.shape
    buf = io.BytesIO(path.read_bytes())
    _close(sep.separate(buf, text="rain"), from_path)
    _close(sep.separate(path, 48000, text="rain"), from_path)  # the file's own rate may be repeated
    with pytest.raises(AudioSepError) as ei:
        sep.separate(path, 44100, text="rain")
    assert ei.value.code == "invalid_field" and "48000" in str(ei.value)
    with pytest.raises(AudioSepError) as ei:
        sep.separate(io.BytesIO(b"not audio at all" * 100), text="rain")
    assert ei.value.code == "invalid_audio"


def test_stems_in_one_pass_with_residual(sep):
    x = _signal(1.0, 44100)
    out = sep.separate_stems(x, 44100, queries={"voice": "vocals", "kit": {"text": "drums"}}, residual="rest")
    assert list(out) == ["voice", "kit", "rest"]
    _close(out["voice"], sep.separate(x, 44100, text="vocals"))
    _close(out["kit"], sep.separate(x, 44100, text="drums"))
    _close(out["rest"], x - out["voice"] - out["kit"], rel=1e-5)
    listed = sep.separate_stems(x, 44100, queries=["vocals", {"name": "no_kit", "text": "drums", "mode": "remove"}])
    assert list(listed) == ["vocals", "no_kit"]
    _close(listed["no_kit"], x - out["kit"], rel=1e-5)
    with pytest.raises(AudioSepError) as ei:
        sep.separate_stems(x, 44100, queries=["vocals", "vocals"])
    assert ei.value.code == "duplicate_output"
    with pytest.raises(AudioSepError) as ei:
        sep.separate_stems(x, 44100, queries=[{"text": "drums", "colour": "red"}])
    assert ei.value.code == "invalid_field"


def test_remove_mode_is_the_mixture_minus_the_sound(sep):
    x = _signal(0.5, 32000)
    _close(sep.separate(x, 32000, text="speech", mode="remove"), x - sep.separate(x, 32000, text="speech"), rel=1e-5)


def test_embed_gives_a_reusable_preset(sep):
    vec = sep.embed("a dog barking")
    assert vec.shape == (512,) and vec.dtype == np.float32
    assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5
    x = _signal(0.5, 44100)
    _close(sep.separate(x, 44100, query_embedding=vec), sep.separate(x, 44100, text="a dog barking"))
    _close(sep.separate(x, 44100, query_embedding=vec.tolist()), sep.separate(x, 44100, query_embedding=torch.from_numpy(vec)))


def test_progress_is_monotone_and_cancel_raises(sep):
    chunked = Separator.from_model(sep.model, use_chunk=True, chunk_length=0.64)
    x = _signal(1.5, 44100)
    seen: list[float] = []
    chunked.separate(x, 44100, text="rain", progress=seen.append)
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    calls = []
    with pytest.raises(AudioSepError) as ei:
        chunked.separate(x, 44100, text="rain", cancel=lambda: calls.append(1) or len(calls) > 1)
    assert ei.value.code == "cancelled"
    stop = threading.Event()
    stop.set()
    with pytest.raises(AudioSepError) as ei:
        chunked.separate(x, 44100, text="rain", cancel=stop)
    assert ei.value.code == "cancelled"


def test_a_long_array_in_several_windows_equals_the_file_path(sep, tmp_path):
    settings = dict(use_chunk=True, chunk_length=1.0, context_seconds=0.32)
    windows = Separator.from_model(sep.model, **settings)
    x = _signal(3.0, 44100)
    seen: list[float] = []
    y = windows.separate(x, 44100, text="vocals", progress=seen.append)
    assert len(seen) >= 3  # one call per window
    _close(y, _via_file(sep, tmp_path, x, 44100, **settings))


class _ShortOfMemory:
    """The real model, except that a window longer than ``limit`` samples runs out of memory."""

    def __init__(self, model, limit: int):
        self._model, self._limit = model, limit
        self.refused = 0

    def __getattr__(self, name):  # everything else is the model's
        return getattr(self._model, name)

    def separate(self, wav, cond):
        if wav.shape[-1] > self._limit:
            self.refused += 1
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self._model.separate(wav, cond)


def test_the_memory_budget_bounds_an_array_as_it_bounds_a_file(sep):
    """use_chunk False over a small budget: windows with the parity context, the full pass's output."""
    x = _signal(6.0, 32000)
    small = Separator.from_model(sep.model, use_chunk=False, memory_budget=1000)
    ample = Separator.from_model(sep.model, use_chunk=False, memory_budget=100000)
    in_windows: list[float] = []
    whole: list[float] = []
    y = small.separate(x, 32000, text="vocals", progress=in_windows.append)
    full = ample.separate(x, 32000, text="vocals", progress=whole.append)
    assert len(whole) == 1 and len(in_windows) > 1  # one progress report per window
    _close(y, full, rel=1e-5)
    with pytest.raises(AudioSepError) as ei:
        Separator.from_model(sep.model, memory_budget=0)
    assert ei.value.code == "invalid_field"


def test_out_of_memory_retries_read_the_array_again_in_smaller_windows(sep):
    x = _signal(2.4, 44100)
    # the 2.4 s full pass fails; the retry's 1.2 s chunks with 0.32 s of context on each side fit
    short = _ShortOfMemory(sep.model, limit=int(2.3 * 32000))
    flaky = Separator.from_model(short, context_seconds=0.32)
    expected = Separator.from_model(sep.model, use_chunk=True, chunk_length=1.2, context_seconds=0.32).separate(
        x, 44100, text="rain")
    _close(flaky.separate(x, 44100, text="rain"), expected)
    assert short.refused == 1


def test_the_array_is_read_in_blocks_without_a_copy():
    x = _signal(1.0, 44100, channels=2)
    audio = memory_audio(x, 44100, blocksize=4096)
    assert np.shares_memory(audio.samples, x)
    with ArrayReader(audio, 4096) as r:
        blocks = list(r)
    assert max(b.shape[1] for b in blocks) == 4096
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), x)
    column_major = np.asfortranarray(x)  # e.g. soundfile's [frames, channels] array, transposed
    with memory_audio(column_major, 44100, blocksize=4096).reader() as r:
        np.testing.assert_array_equal(np.concatenate(list(r), axis=1), x)


def test_models_dir_is_searched_when_no_file_is_named(sep, model_files):
    folder = model_files["checkpoint_path"].parent  # the seed's file names, as --models-dir expects
    other = Separator(models_dir=folder, config_path=model_files["config_path"], device="cpu", backend="torch")
    assert other.model.sources["checkpoint_path"] == str(model_files["checkpoint_path"])
    x = _signal(0.3, 16000)
    _close(other.separate(x, 16000, text="rain"), sep.separate(x, 16000, text="rain"))


BAD_ARRAYS = [
    (np.full((1, 1000), np.nan, np.float32), "invalid_audio"),
    (np.array([[0.1, np.inf, 0.2] * 500]), "invalid_audio"),
    (np.full((1, 1000), 1e300), "invalid_audio"),  # float64 beyond float32
    (np.zeros((2, 3, 400), np.float32), "invalid_audio"),
    (np.zeros((0, 1000), np.float32), "invalid_audio"),
    (np.zeros((2, 0), np.float32), "invalid_audio"),
    (np.zeros(0, np.float32), "invalid_audio"),
    (np.zeros((44100, 2), np.float32), "invalid_audio"),  # [frames, channels]
    (np.full(1000, 2 ** 40, np.int64), "invalid_audio"),
    (np.zeros(1000, np.complex64), "invalid_audio"),
    (np.zeros(1000, bool), "invalid_audio"),
]


@pytest.mark.parametrize("x, code", BAD_ARRAYS)
def test_bad_arrays_raise_before_any_work(sep, x, code):
    with pytest.raises(AudioSepError) as ei:
        sep.separate(x, 44100, text="rain")
    assert ei.value.code == code


@pytest.mark.parametrize("sample_rate, code", [(None, "missing_field"), (0, "invalid_field"), (-44100, "invalid_field"),
                                               (44100.5, "invalid_field"), ("44100", "invalid_field")])
def test_bad_sample_rates(sep, sample_rate, code):
    with pytest.raises(AudioSepError) as ei:
        sep.separate(np.zeros(4410, np.float32), sample_rate, text="rain")
    assert ei.value.code == code


def test_pcm_integer_arrays_are_scaled_like_files():
    for dtype, value, expected in ((np.int16, -32768, -1.0), (np.int32, 2 ** 30, 0.5), (np.uint8, 192, 0.5),
                                   (np.int8, -64, -0.5), (np.int64, -(2 ** 31), -1.0)):
        audio = memory_audio(np.full(10, value, dtype), 8000)
        assert ArrayReader(audio).read()[0, 0] == expected, dtype


def test_settings_are_checked_by_the_options_table(sep, model_files):
    with pytest.raises(TypeError):
        Separator(model_files["checkpoint_path"], chunk_lenght=2.0)
    with pytest.raises(TypeError):
        Separator(model_files["checkpoint_path"], output_subtype="PCM_16")  # a file output's setting
    with pytest.raises(AudioSepError) as ei:
        Separator(model_files["checkpoint_path"], precision="fp8")
    assert ei.value.code == "invalid_field"
    with pytest.raises(AudioSepError) as ei:
        Separator.from_model(sep.model, chunk_length=-1)
    assert ei.value.code == "invalid_field"
    with pytest.raises(TypeError):
        Separator.from_model(sep.model, backend="torch")  # a load setting: the model is loaded
    with pytest.raises(AudioSepError) as ei:
        sep.separate(np.zeros(4410, np.float32), 44100)
    assert ei.value.code == "missing_field"
    with pytest.raises(AudioSepError) as ei:
        sep.separate(np.zeros(4410, np.float32), 44100, text="rain", mode="louder")
    assert ei.value.code == "invalid_field"


def test_import_stays_free_of_torch():
    code = "import sys, dsu_audiosep; dsu_audiosep.Separator.__name__; print('torch' in sys.modules)"
    lazy = "import sys, dsu_audiosep; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", lazy], capture_output=True, text=True, check=True).stdout.strip() == "False"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"
