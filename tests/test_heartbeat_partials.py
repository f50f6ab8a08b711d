"""In-process checks of issue 16's pieces: partial-file owner names and sweeping, the heartbeat
thread, the parent watch. The same behaviour over real pipes is in test_lifecycle.py."""
from __future__ import annotations

import sys
import threading
import time

import pytest

from conftest import exited_process_owner

from dsu_audiosep.engine import audio_write, partials
from dsu_audiosep.worker import heartbeat as hb
from dsu_audiosep.worker import parent as parent_mod


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ---- partial names


@pytest.mark.parametrize("name", ["vocals.wav", "a.b.c.flac", "with space.wav", "ünïcødé.ogg", ".hidden.wav",
                                  "x.dsu_12345678_0_1_2_abcdef01.partial.wav", "é" * 200 + ".wav"])
def test_partial_name_round_trip(name):
    tmp = partials.partial_name(name)
    assert tmp.startswith(".") and tmp.endswith(".partial." + name.rsplit(".", 1)[1])
    assert len(tmp.encode()) < 200
    assert partials.parse(tmp) == partials.this_process()


@pytest.mark.parametrize("name", [".song.1a2b3c4d.partial.wav", "song.wav", ".song.dsu_zz_0_1_2_3.partial.wav", ""])
def test_other_names_have_no_owner(name):
    assert partials.parse(name) is None


def test_owner_gone_only_when_provable():
    me = partials.this_process()
    assert not partials.owner_gone(me)
    assert partials.owner_gone(exited_process_owner())
    assert not partials.owner_gone(partials.Owner("00000000", me.boot, 999_999_999, 1))  # another host
    if sys.platform.startswith("linux"):
        assert me.start > 0 and me.boot != "0"
        # a live pid started at another time: the pid was reused
        assert partials.owner_gone(partials.Owner(me.host, me.boot, me.pid, me.start + 1))
        assert partials.owner_gone(partials.Owner(me.host, "00000001", me.pid, me.start))  # earlier boot


def test_sweep_keeps_what_this_process_writes(tmp_path):
    dead = exited_process_owner()
    stale = tmp_path / partials.partial_name("a.wav", dead)
    kept = tmp_path / partials.partial_name("b.wav", dead)
    for p in (stale, kept):
        p.write_bytes(b"x")
    assert partials.sweep(str(tmp_path), keep={str(kept)}) == [str(stale)]
    assert kept.exists() and not stale.exists()
    assert partials.sweep(str(tmp_path / "missing")) == []


def test_atomic_writer_sweeps_its_folder_and_names_itself(tmp_path):
    import numpy as np

    stale = tmp_path / partials.partial_name("old.wav", exited_process_owner())
    stale.write_bytes(b"x")
    with audio_write.AtomicWriter(tmp_path / "new.wav", 44100, 2) as w:
        assert not stale.exists()
        assert partials.parse(w.tmp_path.rsplit("/", 1)[-1]) == partials.this_process()
        w.write(np.zeros((2, 100), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.wav"]


# ---- heartbeat


class Lines:
    def __init__(self):
        self.items: list[dict] = []
        self.last = time.monotonic()

    def send(self, line: dict) -> bool:
        self.items.append(line)
        self.last = time.monotonic()
        return True


def test_heartbeat_repeats_status_then_progress_and_stops_at_end():
    lines = Lines()
    beat = hb.Heartbeat(lines.send, lambda: lines.last, interval=0.05).start()
    try:
        beat.status({"status": "separating", "input": "a.wav", "id": 7})
        wait_until(lambda: len(lines.items) >= 3)
        assert lines.items[0] == {"status": "separating", "input": "a.wav", "id": 7}
        assert lines.items[1] == {**lines.items[0], "heartbeat": True}
        beat.fraction(0.4219)
        wait_until(lambda: lines.items[-1]["status"] == "progress")
        assert lines.items[-1] == {"status": "progress", "percent": 42.2, "stage": "separating", "id": 7,
                                   "heartbeat": True}
        beat.end()
        count = len(lines.items)
        time.sleep(0.3)  # many intervals: none may come after end()
        assert len(lines.items) == count
    finally:
        beat.stop()


def test_heartbeat_waits_for_silence():
    lines = Lines()
    beat = hb.Heartbeat(lines.send, lambda: time.monotonic(), interval=0.05).start()  # always just written
    try:
        beat.status({"status": "loading_model", "model": "m"})
        time.sleep(0.3)
        assert lines.items == [{"status": "loading_model", "model": "m"}]
    finally:
        beat.stop()


def test_end_waits_for_a_heartbeat_being_written():
    release = threading.Event()
    sent: list[dict] = []

    def slow_send(line):
        if line.get("heartbeat"):
            release.wait(5)
        sent.append(line)

    beat = hb.Heartbeat(slow_send, lambda: 0.0, interval=0.01).start()
    beat.status({"status": "separating"})
    time.sleep(0.1)  # the heartbeat thread is now inside slow_send
    ended = threading.Event()
    threading.Thread(target=lambda: (beat.end(), ended.set()), daemon=True).start()
    assert not ended.wait(0.2)  # end() cannot return while the line is half-written
    release.set()
    assert ended.wait(5) and len(sent) == 2 and sent[1]["heartbeat"]
    beat.stop()


@pytest.mark.parametrize("raw,expected", [("", 10.0), ("2", 2.0), ("0.5", 0.5), ("0", 10.0), ("nan", 10.0),
                                          ("-1", 10.0), ("soon", 10.0), ("1e9", 10.0)])
def test_heartbeat_interval_from_env(monkeypatch, raw, expected):
    warnings: list[str] = []
    monkeypatch.setenv(hb.HEARTBEAT_ENV, raw)
    assert hb.interval_from_env(warnings.append) == expected
    assert bool(warnings) == (raw not in ("", "2", "0.5"))


# ---- parent


def test_parent_watch(monkeypatch):
    watch = parent_mod.ParentWatch(poll_s=0.0)
    assert not watch.gone()
    if sys.platform.startswith("win"):
        return
    real = parent_mod.os.getppid()
    monkeypatch.setattr(parent_mod.os, "getppid", lambda: real + 1 if real > 1 else 1)
    assert watch.gone() == (real > 1)
