"""scripts/cuda_default.py: the rule that picks the CUDA default precision from one measured run."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from cuda_default import Measured, choose_cuda_default  # noqa: E402

ORIGINAL = Measured("original", seconds=3.0, snr_vs_cpu_reference_db=60.0)  # TF32 convolutions: ~60 dB


def ours(fp32_s, tf32_s, fp32_db=140.0, tf32_db=61.0):
    return {"fp32": Measured("fp32", fp32_s, fp32_db), "tf32": Measured("tf32", tf32_s, tf32_db)}


def test_strict_fp32_kept_when_it_is_as_fast_as_the_original():
    choice, reasons = choose_cuda_default(ORIGINAL, ours(2.9, 1.5), (9, 0))
    assert choice == "fp32" and len(reasons) == 2


def test_tf32_when_only_it_is_fast_enough():
    assert choose_cuda_default(ORIGINAL, ours(3.2, 1.5), (8, 0))[0] == "tf32"


def test_a_faster_mode_that_is_less_faithful_than_the_original_does_not_qualify():
    choice, reasons = choose_cuda_default(ORIGINAL, ours(3.2, 1.5, tf32_db=59.0), (8, 6))
    assert choice == "fp32" and "neither qualifies" in reasons[-1]


def test_gpus_without_tf32_run_fp32():
    choice, reasons = choose_cuda_default(ORIGINAL, ours(9.0, 1.0), (7, 5))
    assert choice == "fp32" and "no TF32" in reasons[0]


def test_a_missing_measurement_is_said():
    choice, reasons = choose_cuda_default(ORIGINAL, {"tf32": Measured("tf32", 1.0, 61.0)}, (9, 0))
    assert choice == "tf32" and reasons[0] == "fp32: not measured"
