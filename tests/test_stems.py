"""Stems over real pipes: several queries on one read of a file (``separate`` with ``queries``).

Runs against the source tree, and against the frozen binary when ``DSU_WORKER_CMD`` is set
(scripts/test.sh). The model is the UNTRAINED demo model in the real checkpoint format.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import assert_same_function
from test_worker import assert_alive, loaded_worker, write_wav  # noqa: F401  (fixtures)
from worker_client import WorkerClient, worker_argv

# Two windows per file: chunked like a long file, at a third of the cost of 1 s chunks.
COMMON = {"output_subtype": "FLOAT", "use_chunk": True, "chunk_length": 1.28, "context_seconds": 0.32}


def read(path) -> np.ndarray:
    return sf.read(str(path), dtype="float32", always_2d=True)[0]


@pytest.mark.numerics
def test_stems_equal_single_query_runs_and_residual(worker, tmp_path):
    mix = write_wav(tmp_path / "mix.wav", 2.5)
    queries = [{"text": "a dog barking", "output": str(tmp_path / "dog.wav")},
               {"text": "piano", "output": str(tmp_path / "piano.wav")},
               {"text": "speech", "output": str(tmp_path / "nospeech.wav"), "mode": "remove"}]
    reply, before = worker.request_all({"cmd": "separate", "id": "s", "input": str(mix), "queries": queries,
                                        "residual_output": str(tmp_path / "rest.wav"), "progress": True, **COMMON},
                                       timeout=300)
    assert reply["status"] == "done", reply
    assert reply["files"] == [q["output"] for q in queries] + [str(tmp_path / "rest.wav")]
    assert [(q["text"], q["mode"], q["file"]) for q in reply["queries"]] == [
        ("a dog barking", "extract", queries[0]["output"]), ("piano", "extract", queries[1]["output"]),
        ("speech", "remove", queries[2]["output"])]
    percents = [m["percent"] for m in before if m["status"] == "progress"]
    assert percents[0] == 0 and percents[-1] == 100 and percents == sorted(percents)

    singles = {}
    for q in queries:
        out = tmp_path / ("single_" + Path(q["output"]).name)
        r = worker.request({"cmd": "separate", "input": str(mix), "output": str(out), "text": q["text"],
                            "mode": q.get("mode", "extract"), **COMMON}, timeout=300)
        assert r["status"] == "done", r
        singles[q["output"]] = read(out)
    for q in queries:
        assert_same_function(read(q["output"]), singles[q["output"]])
    # residual: the mixture minus every extracted sound (the removed query's sound is mix - output)
    m = read(mix)
    extracted = singles[queries[0]["output"]] + singles[queries[1]["output"]] + (m - singles[queries[2]["output"]])
    assert_same_function(read(tmp_path / "rest.wav"), m - extracted)


def test_single_query_in_queries_is_the_plain_job(worker, tmp_path):
    mix = write_wav(tmp_path / "mix.wav", 0.5)
    r1 = worker.request({"cmd": "separate", "input": str(mix), "queries": [{"text": "bird", "output": str(tmp_path / "a.wav")}],
                         "residual_output": str(tmp_path / "ra.wav"), **COMMON}, timeout=300)
    r2 = worker.request({"cmd": "separate", "input": str(mix), "text": "bird", "output": str(tmp_path / "b.wav"),
                         "residual_output": str(tmp_path / "rb.wav"), **COMMON}, timeout=300)
    assert r1["status"] == r2["status"] == "done", (r1, r2)
    assert "queries" not in r2 and len(r1["queries"]) == 1
    assert_same_function(read(tmp_path / "a.wav"), read(tmp_path / "b.wav"))
    assert_same_function(read(tmp_path / "ra.wav"), read(tmp_path / "rb.wav"))


BAD = [
    ({"queries": []}, "invalid_field", "empty"),
    ({"queries": [{"text": "x"}]}, "missing_field", "output"),
    ({"queries": [{"output": "a.wav"}]}, "missing_field", "text"),
    ({"queries": ["dog"]}, "invalid_field", "[0]"),
    ({"queries": [{"text": "x", "output": "a.wav", "mode": "boost"}]}, "invalid_field", "mode"),
    ({"queries": [{"text": "x", "output": "a.wav"}], "output": "b.wav"}, "invalid_field", "not both"),
    ({"queries": [{"text": "x", "output": "a.wav"}, {"text": "y", "output": "./a.wav"}]}, "duplicate_output", "a.wav"),
    ({"queries": [{"text": "x", "output": "a.wav"}], "residual_output": "a.wav"}, "duplicate_output", "a.wav"),
    ({"queries": [{"text": "x", "output": "mix.wav"}]}, "output_error", "input"),
    ({"queries": {"text": "x", "output": "a.wav"}}, "invalid_field", "queries"),
]


def test_bad_queries_are_clear_errors_and_nothing_is_written(tmp_path):
    write_wav(tmp_path / "mix.wav", 0.2)
    with WorkerClient(worker_argv(), cwd=tmp_path) as client:
        client.wait_ready()
        for n, (fields, code, word) in enumerate(BAD):
            reply = client.request({"cmd": "separate", "id": n, "input": "mix.wav", **fields})
            assert reply["status"] == "error" and reply["code"] == code and reply["id"] == n, (fields, reply)
            assert word in reply["message"], (fields, reply)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mix.wav"]
        assert_alive(client)
