"""Sibling-worker conventions over real pipes: ``--models-dir`` and ``set_cache_size``."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import link_or_copy
from test_worker import load, load_cmd
from worker_client import WorkerClient, clean_env, worker_argv


def test_set_cache_size_evicts_down_to_n(demo_model):  # noqa: F811
    with WorkerClient(worker_argv(), extra_args=["--max-cached-models", "2"]) as client:
        client.wait_ready()
        load(client, demo_model)
        load(client, demo_model, checkpoint_path=demo_model["twin_checkpoint_path"])
        assert client.request({"cmd": "list_models"})["cache_size"] == 2
        reply = client.request({"cmd": "set_cache_size", "n": 1, "id": "s"})
        assert reply["status"] == "models" and reply["id"] == "s" and reply["max_cached_models"] == 1, reply
        assert [m["checkpoint_path"] for m in reply["evicted"]] == [demo_model["checkpoint_path"]]
        assert [(m["checkpoint_path"], m["current"]) for m in reply["models"]] == [(demo_model["twin_checkpoint_path"], True)]
        zero = client.request({"cmd": "set_cache_size", "n": 0})
        assert zero["cache_size"] == 0 and zero["model_loaded"] is True  # the current model stays in use
        assert client.request({"cmd": "get_status"})["max_cached_models"] == 0
        for bad, code in [({"n": -1}, "invalid_field"), ({"n": "2"}, "invalid_field"), ({}, "missing_field")]:
            r = client.request({"cmd": "set_cache_size", **bad})
            assert r["status"] == "error" and r["code"] == code, r
        grown = client.request({"cmd": "set_cache_size", "n": 3})
        assert grown["max_cached_models"] == 3 and grown["evicted"] == []


def test_models_dir_seed_names_then_converted_folder(demo_model, converted_dir, tmp_path):  # noqa: F811
    seed = tmp_path / "models"
    seed.mkdir()
    link_or_copy(demo_model["checkpoint_path"], seed / "audiosep_base_4M_steps.ckpt")
    link_or_copy(demo_model["roberta_dir"], seed / "roberta-base")
    with WorkerClient(worker_argv(), extra_args=["--models-dir", str(seed)]) as client:
        client.wait_ready()
        loaded = client.request({"cmd": "load_model"}, timeout=300)
        assert loaded["status"] == "model_loaded", loaded
        assert loaded["checkpoint_path"] == str(seed / "audiosep_base_4M_steps.ckpt")
        assert loaded["roberta_dir"] == str(seed / "roberta-base")
        # paths given in the command win over the folder
        given = client.request(load_cmd(demo_model), timeout=300)
        assert given["checkpoint_path"] == demo_model["checkpoint_path"]

    fast = tmp_path / "fast_models"
    fast.mkdir()
    link_or_copy(converted_dir, fast / "audiosep-fast")
    env = clean_env(AUDIOSEP_MODELS_DIR=str(fast))  # the environment spelling of the same setting
    with WorkerClient(worker_argv(), env=env) as client:
        client.wait_ready()
        loaded = client.request({"cmd": "load_model"}, timeout=300)
        assert loaded["status"] == "model_loaded" and loaded["model_dir"] == str(fast / "audiosep-fast"), loaded

    empty = tmp_path / "empty"
    empty.mkdir()
    with WorkerClient(worker_argv(), extra_args=["--models-dir", str(empty)]) as client:
        client.wait_ready()
        missing = client.request({"cmd": "load_model"})
        assert missing["status"] == "error" and missing["code"] == "missing_field", missing
        # the message lists every place it looked: both layouts' checkpoints and a converted folder
        for place in (empty / "checkpoint" / "audiosep_base_4M_steps.ckpt", empty / "audiosep_base_4M_steps.ckpt"):
            assert str(place) in missing["message"], missing
        assert "converted" in missing["message"], missing


def parent_models_folder(root: Path, model_files) -> Path:
    """The parent app's installed layout, under a path with spaces and non-ASCII names."""
    folder = root / "Max 9" / "Modèles für DSU" / "Models" / "audiosep"
    (folder / "config").mkdir(parents=True)
    (folder / "checkpoint").mkdir()
    link_or_copy(str(model_files["config_path"]), folder / "config" / "audiosep_base.yaml")
    link_or_copy(str(model_files["checkpoint_path"]), folder / "checkpoint" / "audiosep_base_4M_steps.ckpt")
    link_or_copy(str(model_files["clap_checkpoint_path"]),
                 folder / "checkpoint" / "music_speech_audioset_epoch_15_esc_89.98.pt")
    link_or_copy(str(model_files["roberta_dir"]), folder / "roberta-base")
    return folder


def write_song(path: Path, seconds: float = 2.0) -> Path:
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * 44100)) / 44100
    sf.write(str(path), np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)], 1), 44100)
    return path


def separate_like_the_parent(client: WorkerClient, folder: Path) -> dict:
    """The parent's own separate command (use_chunk false), in and out of paths with spaces."""
    song = write_song(folder.parent / "mein Lied é.wav")
    out = folder.parent / "Ausgabe ü" / "vocals.wav"
    out.parent.mkdir(exist_ok=True)
    done = client.request({"cmd": "separate", "input": str(song), "output": str(out), "text": "vocals",
                           "use_chunk": False}, timeout=300)
    assert done["status"] == "done" and done["files"] == [str(out)] and out.stat().st_size > 0, done
    return done


def test_parent_models_folder_by_explicit_paths(model_files, tmp_path):
    folder = parent_models_folder(tmp_path, model_files)
    cmd = {"cmd": "load_model", "config_path": str(folder / "config" / "audiosep_base.yaml"),
           "checkpoint_path": str(folder / "checkpoint" / "audiosep_base_4M_steps.ckpt"),
           "clap_checkpoint_path": str(folder / "checkpoint" / "music_speech_audioset_epoch_15_esc_89.98.pt"),
           "roberta_dir": str(folder / "roberta-base"),
           "use_torch_stft": "auto", "auto_stft_seconds": 60, "mmap": False}
    with WorkerClient(worker_argv()) as client:
        client.wait_ready()
        loaded = client.request(cmd, timeout=300)
        assert loaded["status"] == "model_loaded", loaded
        assert all(loaded[k] == cmd[k] for k in ("config_path", "checkpoint_path", "clap_checkpoint_path", "roberta_dir"))
        assert loaded["mmap"] is False
        separate_like_the_parent(client, folder)


# The parent may start the worker from a desktop session whose locale is plain C (no UTF-8):
# non-ASCII paths must work either way.
@pytest.mark.parametrize("locale", ["inherited", "C"])
def test_parent_models_folder_by_models_dir(model_files, tmp_path, locale):
    """--models-dir DIR finds the layout the worker uses beside its executable: config/,
    checkpoint/ (both weights files), roberta-base/; a load_model with no paths at all loads it."""
    folder = parent_models_folder(tmp_path, model_files)
    env = clean_env(LC_ALL="C", LANG="C") if locale == "C" else clean_env()
    with WorkerClient(worker_argv(), extra_args=["--models-dir", str(folder)], env=env) as client:
        client.wait_ready()
        loaded = client.request({"cmd": "load_model", "use_torch_stft": "auto", "auto_stft_seconds": 60,
                                 "mmap": False}, timeout=300)
        assert loaded["status"] == "model_loaded", loaded
        assert loaded["config_path"] == str(folder / "config" / "audiosep_base.yaml")
        assert loaded["checkpoint_path"] == str(folder / "checkpoint" / "audiosep_base_4M_steps.ckpt")
        assert loaded["clap_checkpoint_path"] == str(folder / "checkpoint" / "music_speech_audioset_epoch_15_esc_89.98.pt")
        assert loaded["roberta_dir"] == str(folder / "roberta-base")
        separate_like_the_parent(client, folder)
