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
