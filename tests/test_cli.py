"""The one-shot CLI, driven as a shell user would: ``python -m dsu_audiosep separate ...``."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf


@pytest.fixture(scope="module")
def demo(demo_files):
    return dict(demo_files)


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


def _setting_actions(parser):
    from dsu_audiosep.options import BY_NAME

    for action in parser._actions:
        setting = BY_NAME.get(action.dest)
        # the setting's own flag (not --no-FLAG, whose help says it is the opposite)
        if setting is not None and action.option_strings and action.option_strings[0] in (setting.flag, setting.cli_flag):
            yield setting, action


def test_every_flags_help_is_its_row_of_the_options_table():
    """One source for --help: each setting's flag says what the table says, default included."""
    from dsu_audiosep import cli
    from dsu_audiosep.folder.local import REPEATED

    checked = 0
    for parser in (cli._worker_parser(), cli._separate_parser(), cli._separate_parser(folder=True)):
        for setting, action in _setting_actions(parser):
            if setting.name in REPEATED and "--out-dir" in parser._option_string_actions:
                continue  # the folder run's repeated query flags: one output per value
            assert action.help == setting.flag_help, (setting.name, action.help)
            checked += 1
    assert checked > 30


def test_separate_help_tells_the_truth():
    """As a new user reads it: both forms in the usage, per-device defaults as such, one default per flag."""
    proc = run_cli("separate", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "separate [options] INPUT OUTPUT" in text and "INPUT... --out-dir DIR" in text
    mmap = text.split("--mmap ", 1)[1].split(" --", 1)[0]
    assert "on, except on Windows" in mmap and "False" not in mmap, mmap
    text_flag = text.split("--text TEXT ", 1)[1].split(" --", 1)[0]
    assert text_flag.count("default") == 1, text_flag
    assert "(default False)" not in text and "(default None)" not in text
