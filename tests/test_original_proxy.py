"""The benchmarks' stand-in for the original network (scripts/original_proxy.py) must compute
what the original computed: checked against the original's own outputs."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from original_proxy import original_separate  # noqa: E402


def _peak_err(y, ref):
    return float(np.abs(y - ref).max() / np.abs(ref).max())


@pytest.mark.numerics
@pytest.mark.parametrize("torch_stft", [False, True])
def test_proxy_matches_the_original_output(model, sep_fixture, torch_stft):
    x = torch.from_numpy(sep_fixture["mixture"])[None]
    c = torch.from_numpy(sep_fixture["condition"])
    model.set_stft(torch_stft)
    try:
        y = original_separate(model.ss_model, x, c)[0].numpy()
        ours = model.separate(x, c)[0].numpy()
    finally:
        model.set_stft(False)
    ref = sep_fixture["out_torchstft" if torch_stft else "out_torchlibrosa"]
    assert _peak_err(y, ref) <= 5e-5  # the SPEC bound is 1e-4 of the peak
    assert _peak_err(ours, y) <= 5e-5
