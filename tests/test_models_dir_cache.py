"""Sibling-worker conventions over real pipes: ``--models-dir`` and ``set_cache_size``."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from test_worker import converted_dir, demo_model, load, load_cmd  # noqa: F401  (fixtures)
from worker_client import WorkerClient, clean_env, worker_argv


def link_or_copy(src: str, dst: Path) -> None:
    if os.path.isdir(src):
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


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
    shutil.copytree(converted_dir, fast / "audiosep-fast")
    env = clean_env(AUDIOSEP_MODELS_DIR=str(fast))  # the environment spelling of the same setting
    with WorkerClient(worker_argv(), env=env) as client:
        client.wait_ready()
        loaded = client.request({"cmd": "load_model"}, timeout=300)
        assert loaded["status"] == "model_loaded" and loaded["model_dir"] == str(fast / "audiosep-fast"), loaded

    with WorkerClient(worker_argv(), extra_args=["--models-dir", str(tmp_path / "empty")]) as client:
        client.wait_ready()
        missing = client.request({"cmd": "load_model"})
        assert missing["status"] == "error" and missing["code"] == "missing_field", missing
