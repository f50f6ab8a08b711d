"""The ``backend`` setting through the worker, over real pipes (source or frozen: scripts/test.sh
runs this file against the frozen binary too): load_model's field, the flag and the environment,
what ``model_loaded`` and ``get_status`` report, and that a separation on OpenVINO writes what the
torch reference writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import assert_same_function
from worker_client import WorkerClient, clean_env, worker_argv


@pytest.fixture
def spawn():
    started: list[WorkerClient] = []

    def _spawn(*flags: str, **env: str) -> WorkerClient:
        client = WorkerClient(worker_argv(), extra_args=flags, env=clean_env(**env))
        started.append(client)
        client.wait_ready()
        return client

    yield _spawn
    for client in started:
        client.kill()


def _load(client: WorkerClient, files: dict, **fields) -> dict:
    cmd = {"cmd": "load_model", "checkpoint_path": files["checkpoint_path"], "roberta_dir": files["roberta_dir"], **fields}
    return client.request(cmd, timeout=600)


def _mixture(path: Path) -> Path:
    rng = np.random.default_rng(11)
    t = np.arange(44100 * 3) / 44100
    x = 0.2 * np.sin(2 * np.pi * 330 * t)[:, None] + 0.05 * rng.standard_normal((t.size, 2))
    sf.write(str(path), x.astype(np.float32), 44100, subtype="FLOAT")
    return path


def test_openvino_and_torch_write_the_same_separation(spawn, demo_files, tmp_path):
    client = spawn()
    src = _mixture(tmp_path / "mix.wav")
    outputs = {}
    for backend in ("torch", "openvino"):
        loaded = _load(client, demo_files, backend=backend)
        assert loaded["status"] == "model_loaded" and loaded["backend"] == backend, loaded
        status = client.request({"cmd": "get_status"})
        assert status["backend"] == backend
        out = tmp_path / f"{backend}.wav"
        done = client.request({"cmd": "separate", "input": str(src), "output": str(out), "text": "a tone",
                               "output_subtype": "FLOAT"}, timeout=600)
        assert done["status"] == "done", done
        outputs[backend], _ = sf.read(str(out), dtype="float32")
    assert_same_function(outputs["openvino"], outputs["torch"])
    client.assert_all_json()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_worker_level_backend_and_its_source(spawn, demo_files, how):
    client = spawn("--backend", "torch") if how == "flag" else spawn(AUDIOSEP_BACKEND="torch")
    status = client.request({"cmd": "get_status"})
    assert status["settings_sources"]["backend"] == how and status["backend"] is None  # no model yet
    loaded = _load(client, demo_files)
    assert loaded["backend"] == "torch", loaded
    assert client.request({"cmd": "get_status"})["backend"] == "torch"


def test_bad_backend_is_an_invalid_field_and_the_worker_lives(spawn, demo_files):
    client = spawn()
    reply = _load(client, demo_files, backend="tensorrt")
    assert reply["status"] == "error" and reply["code"] == "invalid_field" and "backend" in reply["message"], reply
    assert client.request({"cmd": "ping"})["status"] == "pong"
