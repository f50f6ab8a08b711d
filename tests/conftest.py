"""Shared fixtures: synthetic checkpoints in the real formats, written once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("DSU_FIXTURES", REPO.parent / "shared" / "fixtures"))
CONFIG = REPO / "config" / "audiosep_base.yaml"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def need_fixtures() -> Path:
    if not (FIXTURES / "manifest_audiosep_ckpt.json").exists():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (set DSU_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return need_fixtures()


@pytest.fixture(scope="session")
def model_files(tmp_path_factory, fixtures_dir) -> dict[str, Path]:
    """The three user-facing files, written from the manifests with the deterministic weights."""
    from dsu_audiosep.synthetic_checkpoints import write_audiosep_checkpoint, write_clap_checkpoint, write_roberta_dir

    d = tmp_path_factory.mktemp("models")
    return {
        "checkpoint_path": write_audiosep_checkpoint(d / "audiosep_base_4M_steps.ckpt", manifest=fixtures_dir / "manifest_audiosep_ckpt.json"),
        "clap_checkpoint_path": write_clap_checkpoint(d / "music_speech_audioset_epoch_15_esc_89.98.pt", manifest=fixtures_dir / "manifest_clap_pt.json"),
        "roberta_dir": write_roberta_dir(d / "roberta-base"),
        "config_path": CONFIG,
    }


@pytest.fixture(scope="session")
def model(model_files):
    """The AudioSep model loaded through the public API (conv STFT, CPU, mmap)."""
    from dsu_audiosep import build_audiosep

    return build_audiosep(str(model_files["config_path"]), str(model_files["checkpoint_path"]), "cpu", mmap=True,
                          roberta_dir=str(model_files["roberta_dir"]))


@pytest.fixture(scope="session")
def sep_fixture(fixtures_dir):
    return dict(np.load(fixtures_dir / "public" / "sep_6p4s.npz"))


def snr_db(ref: np.ndarray, est: np.ndarray) -> float:
    err = np.sum((np.asarray(ref, np.float64) - est) ** 2)
    return float("inf") if err == 0 else 10 * np.log10(np.sum(np.asarray(ref, np.float64) ** 2) / err)
