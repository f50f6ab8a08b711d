"""The ``batch`` command over real pipes (source tree, and the frozen binary under scripts/test.sh)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from test_worker import assert_alive, load, loaded_worker, write_wav  # noqa: F401  (fixtures)
from worker_client import WorkerClient, clean_env, worker_argv

POSIX = os.name == "posix"
LONG = {"use_chunk": True, "chunk_length": 0.32}  # many windows: time to cancel in the middle


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_batch_results_counts_and_progress(worker, tmp_path):
    mix = write_wav(tmp_path / "mix.wav", 0.6)
    out = tmp_path / "out"
    out.mkdir()
    jobs = [
        {"id": "a", "input": str(mix), "output": str(out / "a.wav"), "text": "dog"},
        {"id": "b", "input": str(mix), "text": "dog"},  # malformed: no output
        {"id": "c", "input": str(tmp_path / "gone.wav"), "output": str(out / "c.wav")},
        {"id": "d", "input": str(mix), "output": str(out / "a.wav"), "text": "cat"},  # writes a's file
        {"input": str(mix), "queries": [{"text": "x", "output": str(out / "e1.wav")},
                                        {"text": "y", "output": str(out / "e2.wav")}]},
        "not an object",
    ]
    reply, before = worker.request_all({"cmd": "batch", "id": "B", "jobs": jobs, "progress": True}, timeout=600)
    assert reply["status"] == "done" and reply["id"] == "B", reply
    assert (reply["jobs"], reply["done"], reply["failed"], reply["not_run"]) == (6, 2, 4, 0)
    res = reply["results"]
    assert [r.get("id") for r in res] == ["a", "b", "c", "d", None, None]
    assert [r["status"] for r in res] == ["done", "error", "error", "error", "done", "error"]
    assert [r.get("code") for r in res] == [None, "missing_field", "file_not_found", "duplicate_output", None, "invalid_field"]
    assert res[0]["files"] == [str(out / "a.wav")] and res[4]["files"] == [str(out / "e1.wav"), str(out / "e2.wav")]
    assert all(isinstance(r["elapsed"], float) for r in res)
    assert files_in(out) == ["a.wav", "e1.wav", "e2.wav"]
    progress = [m for m in before if m["status"] == "progress" and not m.get("heartbeat")]
    overall = [m["percent"] for m in progress]
    assert overall == sorted(overall) and overall[-1] == 100, progress
    assert {m["job"] for m in progress} >= {0, 4} and all(0 <= m["job_percent"] <= 100 for m in progress)
    assert [m["job"] for m in before if m["status"] == "separating"] == [0, 2, 4]
    assert_alive(worker)


def test_stop_on_error_stops_at_the_first_failure(worker, tmp_path):
    mix = write_wav(tmp_path / "mix.wav", 0.3)
    jobs = [{"input": str(mix), "output": str(tmp_path / "1.wav")},
            {"id": 2, "input": str(tmp_path / "gone.wav"), "output": str(tmp_path / "2.wav")},
            {"input": str(mix), "output": str(tmp_path / "3.wav")}]
    reply = worker.request({"cmd": "batch", "id": "S", "jobs": jobs, "stop_on_error": True}, timeout=600)
    assert reply["status"] == "error" and reply["code"] == "file_not_found" and "stop_on_error" in reply["message"]
    assert [r["status"] for r in reply["results"]] == ["done", "error", "not_run"]
    assert (reply["done"], reply["failed"], reply["not_run"]) == (1, 1, 1)
    assert (tmp_path / "1.wav").exists() and not (tmp_path / "3.wav").exists()


def test_bad_batches_are_clear_errors(worker, tmp_path):
    for fields, code in [({"jobs": []}, "invalid_field"), ({}, "missing_field"), ({"jobs": {"input": "x"}}, "invalid_field"),
                         ({"jobs": [{"input": "a.wav", "output": "b.wav"}], "stop_on_error": "yes"}, "invalid_field")]:
        reply = worker.request({"cmd": "batch", "id": "bad", **fields})
        assert reply["status"] == "error" and reply["code"] == code and reply["id"] == "bad", (fields, reply)
    with WorkerClient(worker_argv()) as fresh:
        fresh.wait_ready()
        reply = fresh.request({"cmd": "batch", "jobs": [{"input": "a.wav", "output": "b.wav"}]})
        assert reply["code"] == "model_not_loaded", reply


def three_jobs(tmp_path: Path) -> tuple[Path, list[dict]]:
    short, long_ = write_wav(tmp_path / "short.wav", 0.3), write_wav(tmp_path / "long.wav", 4.0)
    out = tmp_path / "out"
    out.mkdir()
    return out, [{"id": "j0", "input": str(short), "output": str(out / "0.wav")},
                 {"id": "j1", "input": str(long_), "output": str(out / "1.wav"), **LONG},
                 {"id": "j2", "input": str(short), "output": str(out / "2.wav")}]


def test_cancel_mid_batch_keeps_finished_outputs(worker, tmp_path):
    out, jobs = three_jobs(tmp_path)
    worker.send({"cmd": "batch", "id": "C", "jobs": jobs, "progress": True})
    worker.wait_for(lambda m: m["status"] == "progress" and m.get("job") == 1 and 0 < m["job_percent"] < 100, timeout=600)
    worker.send({"cmd": "cancel", "target": "C", "id": "k"})
    replies = {}
    while len(replies) < 2:
        msg, _ = worker.read_reply(timeout=600)
        replies[msg["id"]] = msg
    assert replies["k"]["status"] == "cancelling"
    reply = replies["C"]
    assert reply["status"] == "error" and reply["code"] == "cancelled", reply
    assert [r["status"] for r in reply["results"]] == ["done", "error", "not_run"]
    assert reply["results"][1]["code"] == "cancelled"
    assert files_in(out) == ["0.wav"]  # no partial file of job 1, job 2 never started
    assert_alive(worker)


@pytest.mark.skipif(not POSIX, reason="POSIX signals")
def test_sigterm_mid_batch_with_heartbeats(demo_model, tmp_path):  # noqa: F811
    out, jobs = three_jobs(tmp_path)
    with WorkerClient(worker_argv(), env=clean_env(AUDIOSEP_HEARTBEAT_SECONDS="0.2")) as client:
        client.wait_ready()
        load(client, demo_model)
        client.send({"cmd": "batch", "id": "T", "jobs": jobs})  # no progress asked: heartbeats only
        beat, _ = client.wait_for(lambda m: m.get("heartbeat") and m["status"] == "progress" and m["percent"] > 40,
                                  timeout=600)
        assert beat["id"] == "T" and beat["stage"] == "separating" and beat["percent"] < 67
        client.proc.send_signal(signal.SIGTERM)
        msg, _ = client.wait_status("shutdown", timeout=120)
        assert msg["reason"] == "signal SIGTERM"
        assert client.wait_exit(timeout=120) == 0
        client.assert_all_json()
    assert files_in(out) == ["0.wav"]


def test_thousands_of_jobs_in_one_line(worker, tmp_path):
    # 3000 jobs whose inputs are missing: each fails fast, so this checks the batch's bookkeeping
    # (one small result each, one terminal reply) rather than separation speed.
    jobs = [{"id": i, "input": str(tmp_path / f"missing{i}.wav"), "output": str(tmp_path / f"o{i}.wav")} for i in range(3000)]
    reply, before = worker.request_all({"cmd": "batch", "id": "many", "jobs": jobs}, timeout=600)
    assert reply["status"] == "done" and (reply["jobs"], reply["failed"], reply["done"]) == (3000, 3000, 0)
    assert [r["id"] for r in reply["results"]] == list(range(3000))
    assert {r["code"] for r in reply["results"]} == {"file_not_found"}
    assert list(tmp_path.iterdir()) == []
    assert_alive(worker)
