"""Folder runs on a Ray cluster (``dsu-audiosep separate INPUT... --out-dir DIR --ray``), driven as a
user does: the CLI as a subprocess, a real local Ray instance, the demo-format model, two actors of
one CPU each, a few one-second files.

Skipped only where the ``ray`` extra is not installed (``.ci/run`` installs it). Ray starts slowly
on two cores (10-20 s for an instance, each actor imports torch and loads the model), so the runs
are few: one that starts its own local instance (outputs equal the local run's, a broken input is
reported, an actor killed mid-run is replaced and its job retried), and two that join a cluster
this module starts once (interrupted with Ctrl-C, then resumed with ``--skip-existing``).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import assert_same_function

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="the ray extra is not installed (pip install -e '.[ray]'; .ci/run installs it)")

CLIPS = 4
RUN_TIMEOUT_S = 420
ACTOR_TITLE = b"MapBatches(FileSeparator)"  # Ray's process title for our actors


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Four one-second clips (stereo 44.1 kHz and mono 32 kHz) and one broken file."""
    folder = tmp_path_factory.mktemp("ray_inputs")
    rng = np.random.default_rng(14)
    t = np.arange(44100) / 44100
    for i in range(CLIPS):
        if i % 2:
            audio = 0.1 * rng.standard_normal(32000).astype(np.float32)
            sf.write(folder / f"clip{i}.wav", audio, 32000)
        else:
            tone = 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t)
            audio = np.stack([tone, 0.05 * rng.standard_normal(t.size)], axis=1).astype(np.float32)
            sf.write(folder / f"clip{i}.flac", audio, 44100)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    return folder


def _model_args(model_files) -> list[str]:
    return ["--checkpoint", str(model_files["checkpoint_path"]), "--roberta-dir", str(model_files["roberta_dir"]),
            "--output-subtype", "FLOAT", "--name-template", "{stem}_{query}.wav", "--text", "a dog barking"]


def _cli(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dsu_audiosep", "separate", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **popen)


def _finish(proc: subprocess.Popen) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"stdout must be one JSON summary line, got {out!r}\nstderr:\n{err}"
    return proc.returncode, json.loads(lines[0]), err


def _outputs(folder: Path) -> dict[str, os.stat_result]:
    """Final outputs (hidden partial files are not outputs) and their identity on disk."""
    return {p.name: p.stat() for p in folder.glob("*.wav") if not p.name.startswith(".")}


def _partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name) if folder.exists() else []


def _manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _wait_for_outputs(folder: Path, count: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not folder.exists() or len(_outputs(folder)) < count:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "no output appeared in time"
        time.sleep(0.1)


def _descendants(root: int) -> set[int]:
    """Processes below ``root`` (read from /proc): only what this test started is ever killed."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _our_actors(root: int) -> list[int]:
    actors = []
    for pid in _descendants(root):
        try:
            if ACTOR_TITLE in Path(f"/proc/{pid}/cmdline").read_bytes():
                actors.append(pid)
        except OSError:
            continue
    return sorted(actors)


@pytest.fixture(scope="module")
def local_run(inputs, model_files, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The single-process folder run of the same inputs: the outputs every Ray run must equal."""
    work = tmp_path_factory.mktemp("local_run")
    rc, summary, err = _finish(_cli([str(inputs), "--out-dir", "out", "--manifest", "m.jsonl", *_model_args(model_files)],
                                    work))
    assert rc == 1 and summary["written"] == CLIPS and summary["failed"] == 1, err
    return work / "out", _manifest(work / "m.jsonl")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the actor's process in /proc")
def test_local_instance_equals_the_local_run_through_a_killed_actor_and_reports_the_broken_file(
        inputs, model_files, local_run, tmp_path):
    ref_dir, ref_manifest = local_run
    proc = _cli([str(inputs), "--out-dir", "out", "--manifest", "m.jsonl", "--ray", "--actors", "2",
                 "--cpus-per-actor", "1", *_model_args(model_files)], tmp_path)
    out = tmp_path / "out"
    _wait_for_outputs(out, 1, proc)
    before_kill = _outputs(out)
    actors = _our_actors(proc.pid)
    assert len(actors) == 2, actors
    assert len(before_kill) < CLIPS, "every file was done before the kill: the test proves nothing"
    os.kill(actors[0], signal.SIGKILL)  # an actor dies mid-run: Ray restarts it and retries its job
    rc, summary, err = _finish(proc)

    # the broken input is its own error result; every other file finished
    assert rc == 1, err
    assert (summary["status"], summary["written"], summary["failed"], summary["actors"]) == ("done", CLIPS, 1, 2), summary
    lines = _manifest(tmp_path / "m.jsonl")
    broken = [ln for ln in lines if ln["code"]]
    assert [(Path(ln["input"]).name, ln["code"]) for ln in broken] == [("broken.wav", "invalid_audio")]
    # manifest lines as the local run's: one per output, same inputs, queries, names and errors
    def comparable(line: dict) -> tuple:
        return line["input"], line["query"], Path(line["output"]).name, line["error"], line["code"]
    assert sorted(map(comparable, lines)) == sorted(map(comparable, ref_manifest))

    # nothing rewritten after the kill, nothing half-written left, outputs equal the local run's
    after = _outputs(out)
    for name, stat in before_kill.items():
        assert (after[name].st_ino, after[name].st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), f"{name} was rewritten"
    assert _partials(out) == []
    assert sorted(after) == sorted(_outputs(ref_dir))
    for name in after:
        ours, ours_sr = sf.read(out / name, dtype="float32")
        ref, ref_sr = sf.read(ref_dir / name, dtype="float32")
        assert ours_sr == ref_sr
        assert_same_function(ours, ref)


@pytest.fixture(scope="module")
def cluster():
    """A Ray instance the next runs join with --ray-address (its start-up paid once). The token
    its start enabled reaches the subprocesses through RAY_AUTH_MODE, as on a real cluster."""
    import ray

    saved = os.environ.get("RAY_AUTH_MODE")
    context = ray.init(num_cpus=2, object_store_memory=128 * 1024 * 1024, include_dashboard=False,
                       logging_level=logging.ERROR)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def test_ctrl_c_stops_cleanly_and_skip_existing_resumes_without_redoing(inputs, model_files, local_run, cluster,
                                                                       tmp_path):
    clips = sorted(str(p) for p in inputs.iterdir() if p.name.startswith("clip"))
    args = [*clips, "--out-dir", "out", "--manifest", "m.jsonl", "--ray", "--ray-address", cluster, "--actors", "2",
            *_model_args(model_files)]
    out = tmp_path / "out"
    proc = _cli(args, tmp_path)
    _wait_for_outputs(out, 1, proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
    rc, summary, err = _finish(proc)
    assert rc == 130 and summary["status"] == "interrupted", (summary, err)
    assert "--skip-existing" in err
    first = _outputs(out)
    assert 1 <= len(first) < CLIPS, f"the interrupt came too late to test a resume: {sorted(first)}"

    rc, summary, err = _finish(_cli([*args, "--skip-existing"], tmp_path))
    assert rc == 0, err
    assert (summary["written"], summary["skipped"]) == (CLIPS - len(first), len(first)), summary
    final = _outputs(out)
    assert sorted(final) == sorted(_outputs(local_run[0]))
    for name, stat in first.items():  # finished outputs were left alone, not redone
        assert (final[name].st_ino, final[name].st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    assert _partials(out) == []
    resumed = _manifest(tmp_path / "m.jsonl")[-CLIPS:]  # the manifest is appended to
    assert sorted(Path(ln["output"]).name for ln in resumed if ln.get("skipped")) == sorted(first)
    for name in final:
        assert_same_function(sf.read(out / name, dtype="float32")[0], sf.read(local_run[0] / name, dtype="float32")[0])


def test_a_model_that_does_not_load_is_each_file_s_error_not_a_crash(inputs, model_files, cluster, tmp_path):
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(Path(model_files["checkpoint_path"]).read_bytes()[:4096])
    clip = str(inputs / "clip1.wav")
    proc = _cli([clip, "--out-dir", "out", "--manifest", "m.jsonl", "--ray", "--ray-address", cluster, "--actors", "1",
                 "--checkpoint", str(bad), "--roberta-dir", str(model_files["roberta_dir"]), "--text", "x"], tmp_path)
    rc, summary, err = _finish(proc)
    assert rc == 1 and (summary["written"], summary["failed"]) == (0, 1), (summary, err)
    [line] = _manifest(tmp_path / "m.jsonl")
    assert line["code"] == "invalid_checkpoint" and str(bad) in line["error"] and line["input"] == clip
    assert "Traceback" not in err  # one clear line per file, not Ray's page of tracebacks


def test_cluster_flags_need_ray_and_check_their_values(tmp_path, inputs):
    proc = _cli([str(inputs), "--out-dir", "out", "--text", "x", "--actors", "2"], tmp_path)
    rc, err = proc.wait(timeout=60), proc.stderr.read()
    assert rc == 1 and "--actors needs --ray" in err and "invalid_field" in err
    proc = _cli([str(inputs), "--out-dir", "out", "--text", "x", "--ray", "--actors", "0"], tmp_path)
    rc, err = proc.wait(timeout=60), proc.stderr.read()
    assert rc == 2 and "--actors" in err
    assert not (tmp_path / "out").exists()


def test_pool_is_sized_to_the_cluster():
    from dsu_audiosep.distributed.session import PoolRequest, pool_size

    assert pool_size(PoolRequest(), {"CPU": 8.0}) == (8, None)
    assert pool_size(PoolRequest(cpus_per_actor=2), {"CPU": 8.0}) == (4, None)
    assert pool_size(PoolRequest(cpus_per_actor=1, gpus_per_actor=1), {"CPU": 32.0, "GPU": 4.0}) == (4, None)
    assert pool_size(PoolRequest(cpus_per_actor=1, gpus_per_actor=0.5), {"CPU": 32.0, "GPU": 4.0}) == (8, None)
    actors, warning = pool_size(PoolRequest(actors=3), {"CPU": 2.0})
    assert actors == 3 and "do not all fit" in warning
    actors, warning = pool_size(PoolRequest(gpus_per_actor=1), {"CPU": 2.0})
    assert actors == 1 and "no room" in warning
