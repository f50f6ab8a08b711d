"""Shared fixtures: synthetic checkpoints in the real formats, written once per test session.

The reference data (manifests of the released checkpoints, outputs of the original code) lives in
``tests/fixtures`` inside the repository, so a bare clone runs every test. ``DSU_FIXTURES`` may
point elsewhere (a newer copy); a missing folder is a failure, never a skip.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("DSU_FIXTURES") or REPO / "tests" / "fixtures")
CONFIG = REPO / "config" / "audiosep_base.yaml"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def need_fixtures() -> Path:
    if not (FIXTURES / "manifest_audiosep_ckpt.json").exists():
        pytest.fail(f"reference fixtures not found at {FIXTURES} (they ship in tests/fixtures; DSU_FIXTURES overrides)")
    return FIXTURES


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return need_fixtures()


@pytest.fixture(scope="session")
def model_files(tmp_path_factory, fixtures_dir) -> dict[str, Path]:
    """The three user-facing files, written from the manifests with the deterministic weights."""
    from dsu_audiosep.demo.model_files import write_audiosep_checkpoint, write_clap_checkpoint, write_roberta_dir

    d = tmp_path_factory.mktemp("models")
    return {
        "checkpoint_path": write_audiosep_checkpoint(d / "audiosep_base_4M_steps.ckpt", manifest=fixtures_dir / "manifest_audiosep_ckpt.json"),
        "clap_checkpoint_path": write_clap_checkpoint(d / "music_speech_audioset_epoch_15_esc_89.98.pt", manifest=fixtures_dir / "manifest_clap_pt.json"),
        "roberta_dir": write_roberta_dir(d / "roberta-base"),
        "config_path": CONFIG,
    }


def link_or_copy(src: str, dst: Path) -> None:
    """A hard link where the file system allows one (model files are hundreds of MB), else a copy."""
    if os.path.isdir(src):
        shutil.copytree(src, dst, copy_function=link_or_copy)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory) -> dict[str, str]:
    """The UNTRAINED demo model (what scripts/demo.sh writes), written once for the session: every
    module that drives a worker or the CLI with it shares these 628 MB (read only)."""
    from dsu_audiosep.demo.model_files import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture(scope="session")
def demo_model(demo_files, tmp_path_factory) -> dict[str, str]:
    """The demo model for the worker suites, with a second path to its checkpoint (another cache
    key at no disk cost) and a file that is not a checkpoint."""
    folder = tmp_path_factory.mktemp("worker-model")
    files = dict(demo_files)
    # A second path to the same bytes: a different cache key at no disk cost.
    twin = folder / "twin_UNTRAINED.ckpt"
    link_or_copy(files["checkpoint_path"], twin)
    files["twin_checkpoint_path"] = str(twin)
    garbage = folder / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint" * 100)
    files["garbage_checkpoint_path"] = str(garbage)
    return files


@pytest.fixture(scope="session")
def converted_dir(demo_model, tmp_path_factory) -> str:
    from dsu_audiosep.model import convert

    out = tmp_path_factory.mktemp("converted") / "audiosep_demo_converted"
    convert.convert(checkpoint_path=demo_model["checkpoint_path"], roberta_dir=demo_model["roberta_dir"],
                    out_dir=str(out))
    return str(out)


def _api_model(model_files, backend: str):
    from dsu_audiosep import build_audiosep

    return build_audiosep(str(model_files["config_path"]), str(model_files["checkpoint_path"]), "cpu", mmap=True,
                          roberta_dir=str(model_files["roberta_dir"]), backend=backend)


@pytest.fixture(scope="session")
def model(model_files):
    """The AudioSep model loaded through the public API (conv STFT, CPU, mmap), on torch: the reference."""
    return _api_model(model_files, "torch")


@pytest.fixture(scope="session")
def backend_cache() -> Path:
    """Where OpenVINO exports and compiled blobs of the test weights go (the workers' folder too;
    entries are keyed by weights and versions, so sharing them between runs is safe)."""
    from worker_client import TEST_BACKEND_CACHE

    os.environ["AUDIOSEP_BACKEND_CACHE"] = str(TEST_BACKEND_CACHE)
    return TEST_BACKEND_CACHE


@pytest.fixture(scope="session")
def openvino_model(model_files, backend_cache):
    """The same model with its body on OpenVINO; fails (never falls back quietly) if it is not."""
    m = _api_model(model_files, "openvino")
    assert m.backend == "openvino", "the model fell back to torch: see the warning on stderr"
    return m


@pytest.fixture(params=["torch", "openvino"])
def backend_model(request):
    """Each backend's model in turn: for the numerics tests that every backend must pass."""
    return request.getfixturevalue("model" if request.param == "torch" else "openvino_model")


@pytest.fixture(scope="session")
def sep_fixture(fixtures_dir):
    return dict(np.load(fixtures_dir / "public" / "sep_6p4s.npz"))


def snr_db(ref: np.ndarray, est: np.ndarray) -> float:
    err = np.sum((np.asarray(ref, np.float64) - est) ** 2)
    return float("inf") if err == 0 else 10 * np.log10(np.sum(np.asarray(ref, np.float64) ** 2) / err)


# float32 rounding: one unit in the last place at 1.0. Two code paths that compute the same
# function (checkpoint vs converted folder, mmap vs read, another CPU's kernels) may sum in another
# order; each of the network's reductions then differs by a few ulps of its magnitude, and the
# difference grows roughly with the square root of the depth. Bit-equality is not a float32
# property, so such comparisons allow FLOAT32_PATHS_ULPS ulps of the reference's peak.
FLOAT32_EPS = float(np.finfo(np.float32).eps)
FLOAT32_PATHS_ULPS = 256  # 3.1e-5 of the peak: 1/3 of SPEC's parity bound, far below any real bug


def assert_same_function(actual, expected, ulps: int = FLOAT32_PATHS_ULPS) -> None:
    """``actual`` and ``expected`` (tensors or arrays) come from two code paths of one float32
    computation: equal shapes, and no element further apart than ``ulps`` ulps of the peak."""
    a = np.asarray(actual.detach().cpu() if isinstance(actual, torch.Tensor) else actual, np.float64)
    e = np.asarray(expected.detach().cpu() if isinstance(expected, torch.Tensor) else expected, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    peak = max(float(np.abs(e).max(initial=0.0)), np.finfo(np.float32).tiny)
    err = float(np.abs(a - e).max(initial=0.0))
    assert err <= ulps * FLOAT32_EPS * peak, f"max difference {err:.3g} = {err / (FLOAT32_EPS * peak):.1f} ulps of the peak {peak:.3g} (allowed {ulps})"


def exited_process_owner():
    """The partial-file owner of a process that has exited (its start time read while it ran):
    what a worker killed outright leaves behind."""
    import subprocess
    import sys

    from dsu_audiosep.engine import partials

    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    start = partials.process_start(proc.pid)
    proc.communicate(b"")
    me = partials.this_process()
    return partials.Owner(me.host, me.boot, proc.pid, start or 0)


class GainStandIn:
    """A stand-in for the model where a test checks the pipeline around the network (windows,
    resampling, channels, progress, cancel, residuals), not the network: each query is a fixed
    per-sample gain. Its output does not depend on how the file is cut into windows, so every
    path through the engine must give the same file; it runs in microseconds where the network
    takes seconds. The network's own part has its tests (test_parity.py, chunked = full pass)."""

    device = torch.device("cpu")
    use_torch_stft = False
    precision = "fp32"

    def embed_text(self, text: str) -> torch.Tensor:
        import zlib

        rng = np.random.default_rng(zlib.crc32(text.encode("utf-8", "surrogatepass")))
        v = torch.from_numpy(rng.standard_normal(512).astype(np.float32))
        return v / v.norm()

    def separate(self, wav: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return wav * (0.5 + 0.4 * torch.tanh(cond[0]))


@pytest.fixture(scope="session")
def stand_in() -> GainStandIn:
    return GainStandIn()
