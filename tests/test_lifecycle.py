"""The worker and the parent that drives it, over real pipes (issue 16): heartbeats on long jobs,
partial files that killed workers left behind, a parent that dies, and a shell pipeline's end of
stdin (which is not a dead parent).

The long-job test speaks like DSU's Node.js client: one request at a time, replies matched by order,
a timeout on every line. DSU's 300 s per line and our 10 s heartbeat are scaled down to 2.5 s and
0.5 s (``AUDIOSEP_HEARTBEAT_SECONDS``), with a job that runs longer than the per-line timeout.

``DSU_WORKER_CMD`` selects the worker command (see worker_client.py); scripts/test.sh runs this
module against the frozen build too.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import exited_process_owner
from worker_client import NON_TERMINAL, WorkerClient, clean_env, worker_argv

from dsu_audiosep.engine import partials

LINUX = sys.platform.startswith("linux")
HEARTBEAT_S = 0.5
PER_LINE_TIMEOUT = 2.5  # stands for DSU's 300 s, scaled like the heartbeat (10 s -> 0.5 s)
JOB_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def demo(demo_files) -> dict[str, str]:
    return dict(demo_files)


@pytest.fixture
def spawn():
    started: list[WorkerClient] = []

    def _spawn(argv=None, cwd=None, **env) -> WorkerClient:
        client = WorkerClient(argv, env=clean_env(**env), cwd=cwd)
        started.append(client)
        return client

    yield _spawn
    for client in started:
        client.kill()


def write_wav(path: Path, seconds: float, channels: int = 2, sr: int = 44100) -> Path:
    t = np.arange(int(round(seconds * sr))) / sr
    x = np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)], axis=1)
    sf.write(str(path), x.astype(np.float32), sr, subtype="PCM_16")
    return path


def load(client: WorkerClient, demo: dict[str, str]) -> None:
    reply = client.request({"cmd": "load_model", "checkpoint_path": demo["checkpoint_path"],
                            "roberta_dir": demo["roberta_dir"], "mmap": True}, timeout=JOB_TIMEOUT)
    assert reply["status"] == "model_loaded", reply


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def partials_of(folder: Path, pid: int | None = None) -> list[Path]:
    found = [p for p in folder.iterdir() if ".partial" in p.name]
    if pid is None:
        return found
    return [p for p in found if (partials.parse(p.name) or partials.Owner("", "", -1, 0)).pid == pid]


def settled_partial(folder: Path, pid: int | None = None) -> Path:
    """The partial file a job writes into, once it has one. The output check before the job
    creates and deletes a trial partial at once: a file that is still there 0.5 s later is the real one."""
    while True:
        wait_until(lambda: partials_of(folder, pid), JOB_TIMEOUT, "a partial file")
        found = partials_of(folder, pid)
        time.sleep(0.5)
        if found[0].exists():
            return found[0]


# --------------------------------------------------------------------------------------------
# heartbeats


def dsu_style_request(client: WorkerClient, cmd: dict) -> tuple[dict, list[dict], float]:
    """Send one command and read its lines the way DSU does: each line must come within the
    per-line timeout, the first terminal line is the answer. Returns it, the lines before it and
    the time the whole command took."""
    started = time.monotonic()
    client.send(cmd)
    before: list[dict] = []
    while True:
        msg = client.next_message(timeout=PER_LINE_TIMEOUT)  # raises TimeoutError: DSU gives up
        if msg.get("status") not in NON_TERMINAL:
            return msg, before, time.monotonic() - started
        before.append(msg)


def test_heartbeats_keep_a_per_line_timeout_from_firing(spawn, demo, tmp_path):
    client = spawn(AUDIOSEP_HEARTBEAT_SECONDS=str(HEARTBEAT_S))
    client.wait_ready(timeout=JOB_TIMEOUT)
    load(client, demo)
    mix = write_wav(tmp_path / "long.wav", 8.0)
    # Chunked with long windows: silence before the first window ends (status-line heartbeats),
    # then known progress (progress heartbeats). "progress": false given explicitly.
    job = {"cmd": "separate", "input": str(mix), "output": str(tmp_path / "o.wav"), "id": "long",
           "use_chunk": True, "chunk_length": 2.56, "context_seconds": 0.32, "progress": False}
    reply, before, took = dsu_style_request(client, job)
    assert reply["status"] == "done" and reply["id"] == "long", reply
    assert took > PER_LINE_TIMEOUT  # the premise: without heartbeats the client would have given up
    assert all(m.get("id") == "long" for m in before), before  # nothing of another command
    assert before[0] == {"status": "separating", "input": str(mix), "id": "long"}
    status_beats = [m for m in before[1:] if m["status"] == "separating"]
    progress_beats = [m for m in before if m["status"] == "progress"]
    assert status_beats and all(m == {**before[0], "heartbeat": True} for m in status_beats), before
    assert progress_beats, before
    assert all(m["heartbeat"] is True and m["stage"] == "separating" and 0 < m["percent"] < 100
               for m in progress_beats), progress_beats
    percents = [m["percent"] for m in progress_beats]
    assert percents == sorted(percents)
    # Heartbeats stop with the reply: the next command's first line is its own answer.
    time.sleep(4 * HEARTBEAT_S)
    pong, before_pong, _ = dsu_style_request(client, {"cmd": "ping", "id": "after"})
    assert pong["status"] == "pong" and pong["id"] == "after" and before_pong == []
    client.assert_all_json()


def test_full_pass_repeats_its_status_line_and_gaps_stay_short(spawn, demo, tmp_path):
    client = spawn(AUDIOSEP_HEARTBEAT_SECONDS=str(HEARTBEAT_S))
    client.wait_ready(timeout=JOB_TIMEOUT)
    load(client, demo)
    mix = write_wav(tmp_path / "full.wav", 8.0)
    first = len(client.line_times)
    reply, before, took = dsu_style_request(
        client, {"cmd": "separate", "input": str(mix), "output": str(tmp_path / "o.wav"), "use_chunk": False})
    assert reply["status"] == "done" and took > PER_LINE_TIMEOUT, (reply, took)
    # One window, no progress known until it ends: the heartbeats repeat the status line (a
    # last one may say 100 % while the file is finished).
    statuses = [m["status"] for m in before if m.get("percent") != 100.0]
    assert len(statuses) >= 3 and set(statuses) == {"separating"}, before
    assert "id" not in before[0] and all(m.get("heartbeat") for m in before[1:])
    times = client.line_times[first:]
    assert max(b - a for a, b in zip(times, times[1:])) < PER_LINE_TIMEOUT


# --------------------------------------------------------------------------------------------
# partial files


def test_stale_partials_are_swept_never_a_live_workers(spawn, demo, tmp_path):
    folder = tmp_path / "shared-out"
    folder.mkdir()
    a, b = spawn(), spawn()
    pid_a = a.wait_ready(timeout=JOB_TIMEOUT)["pid"]
    b.wait_ready(timeout=JOB_TIMEOUT)
    load(a, demo)
    load(b, demo)
    # A's job is killed long before its end: its length only has to outlast B's short jobs.
    long_mix, short_mix = write_wav(tmp_path / "long.wav", 12.0), write_wav(tmp_path / "short.wav", 0.5)
    a.send({"cmd": "separate", "input": str(long_mix), "output": str(folder / "a.wav"), "use_chunk": False})
    partial_a = settled_partial(folder, pid_a)
    # B writes into the same folder while A writes: its sweep must leave A's file alone.
    reply = b.request({"cmd": "separate", "input": str(short_mix), "output": str(folder / "b1.wav")}, JOB_TIMEOUT)
    assert reply["status"] == "done", reply
    assert a.alive() and partial_a.exists()
    a.proc.send_signal(signal.SIGKILL)  # no handler runs: the partial file stays behind
    a.wait_exit(timeout=60)
    assert partial_a.exists()
    reply = b.request({"cmd": "separate", "input": str(short_mix), "output": str(folder / "b2.wav")}, JOB_TIMEOUT)
    assert reply["status"] == "done", reply
    assert sorted(p.name for p in folder.iterdir()) == ["b1.wav", "b2.wav"]


def test_worker_start_sweeps_its_folder(spawn, tmp_path):
    me = partials.this_process()
    owners = {
        "dead": exited_process_owner(),
        "reused_pid": partials.Owner(me.host, me.boot, me.pid, me.start + 1),  # a live pid, other start
        "live": me,  # this test process: alive
        "other_host": partials.Owner("00000000", me.boot, 1, 0),
    }
    if LINUX:
        owners["earlier_boot"] = partials.Owner(me.host, "deadbeef" if me.boot != "deadbeef" else "feedbeef", me.pid, me.start)
    files = {tag: tmp_path / partials.partial_name(f"{tag}.wav", owner) for tag, owner in owners.items()}
    legacy = tmp_path / ".song.1a2b3c4d.partial.wav"  # the old naming: no owner, never touched
    for path in [*files.values(), legacy]:
        path.write_bytes(b"RIFF")
    client = spawn(cwd=tmp_path)
    client.wait_ready(timeout=JOB_TIMEOUT)
    assert client.request({"cmd": "ping"})["status"] == "pong"
    left = {tag for tag, path in files.items() if path.exists()}
    assert left == {"live", "other_host"}, left
    assert legacy.exists()


# --------------------------------------------------------------------------------------------
# the parent


# Starts the worker and then waits; SIGKILLing it leaves the worker an orphan. With "1" the
# worker's stdin is a pipe from this process (closed by its death, as when a desktop app
# crashes); with "0" the worker shares the test's pipes, so stdin stays open (a pipe that was
# inherited elsewhere) and only the changed parent pid tells.
INTERMEDIATE = textwrap.dedent(
    """
    import subprocess, sys
    through = sys.argv[1] == "1"
    child = subprocess.Popen(sys.argv[2:], stdin=subprocess.PIPE if through else None)
    if through:
        for line in sys.stdin.buffer:
            child.stdin.write(line)
            child.stdin.flush()
    child.wait()
    """
)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"  # exited, not reaped yet
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not LINUX, reason="SIGKILL and /proc")
@pytest.mark.parametrize("stdin_through_parent", [True, False], ids=["stdin-closes", "stdin-inherited"])
def test_parent_death_cancels_and_exits(spawn, demo, tmp_path, stdin_through_parent):
    client = spawn(argv=[sys.executable, "-c", INTERMEDIATE, str(int(stdin_through_parent)), *worker_argv()])
    worker_pid = client.wait_ready(timeout=JOB_TIMEOUT)["pid"]
    try:
        load(client, demo)
        folder = tmp_path / "out"
        folder.mkdir()
        mix = write_wav(tmp_path / "long.wav", 12.0)  # cut short: it only has to outlast the checks
        for n in (1, 2):  # the second one waits in the queue: it must never start
            client.send({"cmd": "separate", "input": str(mix), "output": str(folder / f"{n}.wav"), "id": n,
                         "use_chunk": False})
        client.wait_status("separating", timeout=JOB_TIMEOUT)
        settled_partial(folder)
        client.proc.send_signal(signal.SIGKILL)
        client.proc.wait(timeout=30)
        shutdown, skipped = client.wait_status("shutdown", timeout=30)
        assert shutdown == {"status": "shutdown", "reason": "parent_died"}
        assert all(m.get("heartbeat") and m["id"] == 1 for m in skipped), skipped  # job 1 only
        assert client.drain(timeout=30) == []  # nothing after shutdown, and stdout closed: exited
        wait_until(lambda: _gone(worker_pid), 30, "the worker to exit")
        assert list(folder.iterdir()) == []
    finally:
        if not _gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


@pytest.mark.skipif(os.name != "posix", reason="a POSIX shell pipeline")
def test_shell_pipeline_end_of_stdin_still_answers_everything(demo, tmp_path):
    mix = write_wav(tmp_path / "m.wav", 0.5)
    lines = [
        {"cmd": "load_model", "checkpoint_path": demo["checkpoint_path"], "roberta_dir": demo["roberta_dir"]},
        {"cmd": "separate", "input": str(mix), "output": str(tmp_path / "o.wav"), "id": "s"},
        {"cmd": "ping", "id": "p"},
    ]
    import json

    script = "printf '%s\\n' " + " ".join(shlex.quote(json.dumps(l)) for l in lines) + " | " + shlex.join(worker_argv())
    done = subprocess.run(["sh", "-c", script], capture_output=True, timeout=JOB_TIMEOUT, env=clean_env())
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    # heartbeats (a repeated status line after 10 s of silence) come on a slow or busy machine
    statuses = [json.loads(l)["status"] for l in done.stdout.splitlines() if not json.loads(l).get("heartbeat")]
    assert statuses == ["loading", "ready", "loading_model", "model_loaded", "separating", "done", "pong",
                        "shutdown"], statuses
    assert json.loads(done.stdout.splitlines()[-1])["reason"] == "stdin_closed"
    assert (tmp_path / "o.wav").exists()
