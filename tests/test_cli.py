"""The one-shot CLI, driven as a shell user would: ``python -m dsu_audiosep separate ...``."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from dsu_audiosep.demo.model_files import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("cli-model"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsu_audiosep", *args], capture_output=True, text=True, timeout=600)


def test_separate_writes_the_file_and_prints_one_json_line(demo, tmp_path):
    mix = tmp_path / "mix.wav"
    sf.write(mix, np.random.default_rng(1).standard_normal((22050, 2)).astype(np.float32) * 0.1, 44100)
    out = tmp_path / "dog.flac"
    proc = run_cli("separate", str(mix), str(out), "--text", "a dog barking", "--checkpoint", demo["checkpoint_path"],
                   "--roberta-dir", demo["roberta_dir"], "--output-subtype", "pcm24", "--output-sr", "input",
                   "--use-chunk", "yes", "--chunk-length", "0.32")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    reply = json.loads(lines[0])
    assert reply["status"] == "done" and reply["files"] == [str(out)] and reply["chunked"] is True
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (44100, 2, "PCM_24", 22050)


@pytest.mark.parametrize("flag,value", [("--output-sr", "12"), ("--use-chunk", "maybe"), ("--chunk-length", "-1"),
                                        ("--mode", "isolate")])
def test_bad_flag_value_is_a_clear_error(demo, tmp_path, flag, value):
    proc = run_cli("separate", str(tmp_path / "in.wav"), str(tmp_path / "o.wav"), "--checkpoint",
                   demo["checkpoint_path"], flag, value)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "invalid_field" in proc.stderr and flag in proc.stderr
    assert list(tmp_path.iterdir()) == []
