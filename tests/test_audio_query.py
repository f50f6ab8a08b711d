"""Audio queries, numerics and engine: the CLAP audio branch against the original's fixture, the
32 -> 48 kHz sinc resampler against its formula, spans, lists, weights and the lazy loading."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsu_audiosep.model.audio_query import CLIP_SAMPLES, mel_filterbank, repeatpad
from dsu_audiosep.model.sinc_resample import sinc_kernel, sinc_resample


@pytest.fixture(scope="module")
def aq_fixture(fixtures_dir):
    return dict(np.load(fixtures_dir / "public" / "audio_query_3p3s.npz"))


@pytest.mark.numerics
def test_embedding_matches_the_original_fixture(model, aq_fixture):
    wav = torch.from_numpy(aq_fixture["waveform48k"])
    emb = model.embed_audio(repeatpad(wav)[None])[0]
    ref = torch.from_numpy(aq_fixture["embedding"])
    assert emb.shape == (512,)
    assert float((emb - ref).abs().max()) <= 1e-5
    assert abs(float(emb.norm()) - 1.0) < 1e-5


def test_repeatpad_repeats_then_pads_with_zeros():
    clip = torch.arange(1, 158401, dtype=torch.float32)
    out = repeatpad(clip)
    assert out.shape == (CLIP_SAMPLES,)
    assert torch.equal(out[:158400], clip) and torch.equal(out[316800:475200], clip)  # 3 copies
    assert not out[475200:].any()  # 4800 zeros
    assert repeatpad(torch.ones(CLIP_SAMPLES + 5)).shape == (CLIP_SAMPLES + 5,)  # longer: untouched


def _direct_sinc(x: np.ndarray, orig: int, new: int, n_out: int, zeros: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """The windowed-sinc formula evaluated in float64 at every output instant j / new, summed over
    every input sample i / orig within the window's reach (the Hann window is 0 beyond ``zeros``
    cut-off periods; samples outside the signal are 0)."""
    b = min(orig, new) * rolloff
    reach = int(np.ceil(zeros * orig / b)) + 1
    j = np.arange(n_out)[:, None]
    i = (j * orig) // new + np.arange(-reach, reach + 1)[None, :]
    d = (i / orig - j / new) * b
    inside = (np.abs(d) < zeros) & (i >= 0) & (i < x.size)
    safe = np.where(d == 0, 1.0, np.pi * d)
    h = np.where(d == 0, 1.0, np.sin(np.pi * d) / safe) * np.cos(np.pi * d / zeros / 2) ** 2 * b / orig
    return (np.where(inside, h, 0.0) * x.astype(np.float64)[np.clip(i, 0, x.size - 1)]).sum(axis=1)


@pytest.mark.numerics
@pytest.mark.parametrize("n", [1, 7, 640, 3001])
def test_sinc_resampler_equals_the_formula_at_every_output_instant(n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    y = sinc_resample(torch.from_numpy(x), 32000, 48000).numpy()
    assert y.shape == (math.ceil(n * 3 / 2),)
    ref = _direct_sinc(x, 2, 3, y.size)
    assert np.abs(y - ref).max() <= 2e-6 * max(1.0, np.abs(ref).max())


def test_sinc_kernel_facts():
    taps, width = sinc_kernel(2, 3)
    # 6 zero crossings at a 0.99 * 2 cut-off: ceil(6 * 2 / 1.98) = 7 samples each side, plus one period
    assert width == 7 and taps.shape == (3, 1, 2 * 7 + 2)
    assert taps.dtype == torch.float32
    # phase 0 is centred on an input sample: tap 1 there times the gain 0.99, 0 at the clamped ends
    assert float(taps[0, 0, width]) == pytest.approx(0.99, abs=1e-7)
    assert float(taps[0, 0, 0]) == pytest.approx(0.0, abs=1e-7)
    # DC gain of each phase is ~1 (a constant stays constant)
    assert torch.allclose(taps.sum(-1), torch.ones(3, 1), atol=2e-3)


def test_sinc_resampler_keeps_batch_shape_and_48k_is_identity():
    x = torch.randn(2, 3, 100)
    assert sinc_resample(x, 32000, 48000).shape == (2, 3, 150)
    assert sinc_resample(x, 48000, 48000) is x


def test_mel_filterbank_is_slaney_triangles():
    mel = mel_filterbank().numpy()
    assert mel.shape == (513, 64) and mel.dtype == np.float32
    assert (mel >= 0).all()
    freqs = np.linspace(0, 24000, 513)
    used = freqs[(mel > 0).any(axis=1)]
    assert used.min() > 50 - 47 and used.max() < 14000 + 47  # nothing outside 50-14000 Hz (one bin of slack)
    peaks = mel.argmax(axis=0)
    assert (np.diff(peaks) >= 0).all()  # bands rise in frequency


# --------------------------------------------------------------------------------------------
# Engine: spans and windows


def test_span_is_cut_at_48k_to_the_nearest_sample():
    from dsu_audiosep.engine.query import cut_span

    wav = torch.arange(48000 * 2, dtype=torch.float32)
    part = cut_span(wav, 0.5, 1.00001)  # 24000 .. 48000.48 -> 48000
    assert part[0] == 24000 and part.shape[0] == 24000
    assert cut_span(wav, 1 / 96000, None)[0] == 1  # half a sample rounds up
    assert cut_span(wav, None, None).shape[0] == 96000


def test_long_clip_windows_cover_it_with_a_10s_hop():
    from dsu_audiosep.engine.query import window_starts

    w = 480000
    assert window_starts(100, w, w) == [0]
    assert window_starts(w, w, w) == [0]
    assert window_starts(w + 1, w, w) == [0, 1]
    assert window_starts(25 * 48000, w, w) == [0, 480000, 720000]  # the last one ends at the end
    assert window_starts(30 * 48000, w, w) == [0, 480000, 960000]


# --------------------------------------------------------------------------------------------
# Pay only when used


def test_text_only_jobs_never_load_the_audio_branch(model_files, tmp_path):
    import soundfile as sf

    from dsu_audiosep import build_audiosep, separate_audio

    m = build_audiosep(str(model_files["config_path"]), str(model_files["checkpoint_path"]), "cpu", mmap=True,
                       roberta_dir=str(model_files["roberta_dir"]))
    names = [n for n, _ in m.named_parameters()] + [n for n, _ in m.named_buffers()]
    assert names and not any("audio_branch" in n or "audio_projection" in n for n in names)
    mix = tmp_path / "mix.wav"
    sf.write(mix, np.random.default_rng(3).standard_normal(16000).astype(np.float32) * 0.1, 32000)
    separate_audio(m, str(mix), "a dog barking", str(tmp_path / "out.wav"))
    assert m.audio_source is not None and not m.audio_branch_loaded
    m.load_audio_branch()
    assert m.audio_branch_loaded
    assert m.release_audio_pages() > 0  # memory-mapped from the checkpoint: its pages can go back


# --------------------------------------------------------------------------------------------
# The Python API and the CLI, as a user drives them


def test_api_embed_query_and_separate_by_example(model_files, tmp_path, aq_fixture):
    import soundfile as sf

    from dsu_audiosep import build_audiosep, embed_query, separate_audio
    from dsu_audiosep.errors import AudioSepError

    m = build_audiosep(str(model_files["config_path"]), str(model_files["checkpoint_path"]), "cpu", mmap=True,
                       roberta_dir=str(model_files["roberta_dir"]), load_audio_branch=True)
    assert m.audio_branch_loaded
    q = tmp_path / "q.wav"
    sf.write(q, aq_fixture["waveform48k"], 48000, subtype="FLOAT")
    vec = embed_query(m, query_audio=str(q))
    assert len(vec) == 512 and np.abs(np.asarray(vec) - aq_fixture["embedding"]).max() <= 1e-5
    mix = tmp_path / "mix.wav"
    sf.write(mix, np.random.default_rng(4).standard_normal(32000).astype(np.float32) * 0.1, 32000)
    separate_audio(m, str(mix), None, str(tmp_path / "a.wav"), query_audio=str(q), output_subtype="FLOAT")
    separate_audio(m, str(mix), None, str(tmp_path / "b.wav"), query_embedding=vec, output_subtype="FLOAT")
    a, b = sf.read(tmp_path / "a.wav")[0], sf.read(tmp_path / "b.wav")[0]
    assert np.abs(a - b).max() <= 1e-6
    with pytest.raises(AudioSepError) as err:
        separate_audio(m, str(mix), None, str(tmp_path / "c.wav"), query_audio=[])
    assert err.value.code == "invalid_query"


def test_cli_separate_with_query_audio(model_files, tmp_path, aq_fixture):
    import json
    import subprocess
    import sys

    import soundfile as sf

    q1, q2 = tmp_path / "q1.wav", tmp_path / "q2.wav"
    sf.write(q1, aq_fixture["waveform48k"], 48000, subtype="FLOAT")
    sf.write(q2, aq_fixture["waveform48k"][::-1].copy(), 48000, subtype="FLOAT")
    mix = tmp_path / "mix.wav"
    sf.write(mix, np.random.default_rng(5).standard_normal((16000, 2)).astype(np.float32) * 0.1, 32000)
    base = [sys.executable, "-m", "dsu_audiosep", "separate", str(mix)]
    ckpt = ["--checkpoint", str(model_files["checkpoint_path"]), "--roberta-dir", str(model_files["roberta_dir"])]
    proc = subprocess.run(base + [str(tmp_path / "o.wav"), *ckpt, "--query-audio", str(q1), "--query-audio", str(q2),
                                  "--text", "a kick drum", "--query-weight", "0.8"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["files"] == [str(tmp_path / "o.wav")]
    bad = subprocess.run(base + [str(tmp_path / "x.wav"), *ckpt, "--query-audio", str(q1), "--query-start", "9"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and bad.stdout == "" and "invalid_query" in bad.stderr
    assert not (tmp_path / "x.wav").exists()


def test_htsat_stft_kernels_are_the_windowed_dft():
    from conftest import assert_same_function

    from dsu_audiosep.model.audio_query import stft_kernels
    from dsu_audiosep.model.stft import dft_kernels

    real, imag = stft_kernels()
    ref = dft_kernels(1024)
    assert_same_function(real, ref["stft.conv_real.weight"], ulps=4)
    assert_same_function(imag, ref["stft.conv_imag.weight"], ulps=4)
