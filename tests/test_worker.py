"""The worker as the parent app sees it: a subprocess spoken to only through pipes.

By default the worker is ``python -m dsu_audiosep --worker``; set ``DSU_WORKER_CMD`` (e.g.
``dist/dsu-audiosep/dsu-audiosep --worker``) to run the same tests against the frozen build.

The first part needs no model. The second part loads untrained synthetic weights written in the
real checkpoint format (``dsu_audiosep.demo.model_files``) and runs real separations.
"""
from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import numpy as np
import pytest

from worker_client import NON_TERMINAL, PARENT_TERMINAL, WorkerClient, clean_env, worker_argv

POSIX = os.name == "posix"
FROZEN = bool(os.environ.get("DSU_WORKER_CMD"))


@pytest.fixture(scope="session")
def worker_cmd() -> list[str]:
    return worker_argv()


@pytest.fixture
def spawn(worker_cmd):
    started: list[WorkerClient] = []

    def _spawn(*extra_args: str, env=None, cwd=None, argv=None) -> WorkerClient:
        client = WorkerClient(argv or worker_cmd, extra_args=extra_args, env=env, cwd=cwd)
        started.append(client)
        return client

    yield _spawn
    for client in started:
        client.kill()


@pytest.fixture(scope="module")
def shared(worker_cmd):
    """One worker reused by the quick protocol tests (start-up is the expensive part)."""
    client = WorkerClient(worker_cmd)
    client.wait_ready()
    yield client
    client.assert_all_json()
    client.kill()


def assert_alive(client: WorkerClient) -> None:
    reply = client.request({"cmd": "ping", "id": "alive?"})
    assert reply["status"] == "pong" and reply["id"] == "alive?", reply
    assert client.alive()


# ============================================================================================
# start-up


def test_loading_then_ready_with_fields(spawn):
    client = spawn()
    first = client.next_message()
    assert first["status"] == "loading" and isinstance(first["message"], str)
    ready = client.next_message()
    assert ready["status"] == "ready"
    assert ready["device"] in ("cpu", "mps") or ready["device"].startswith("cuda")
    assert isinstance(ready["version"], str) and ready["version"]
    assert isinstance(ready["protocol"], int)
    assert {"load_model", "separate", "get_status", "ping", "list_models", "cancel", "progress", "id"} <= set(
        ready["capabilities"])
    assert client.line_times[0] <= client.line_times[1]
    client.send({"cmd": "exit"})
    assert client.read_reply()[0] == {"status": "exiting"}
    assert client.wait_exit() == 0
    client.assert_all_json()


FAKE_TORCH = textwrap.dedent(
    """
    # Stands in for torch: blocks its import until the test creates the gate file, and writes
    # to stdout the way a noisy library would (Python print and a raw write to descriptor 1).
    import os, sys, time
    print("noise from a fake torch print()")
    os.write(1, b"noise from a fake torch fd write\\n")
    gate = os.environ["FAKE_TORCH_GATE"]
    while not os.path.exists(gate):
        time.sleep(0.01)
    __version__ = "0.0-fake"
    class _NoAccel:
        @staticmethod
        def is_available():
            return False
    cuda = _NoAccel()
    class backends:
        mps = _NoAccel()
    """
)


@pytest.mark.source_tree
@pytest.mark.skipif(FROZEN, reason="injects a fake torch module through PYTHONPATH (source tree only)")
def test_loading_precedes_torch_import_and_commands_queue(spawn, tmp_path):
    # Deterministic proof (no timing): torch's import blocks on a gate file, yet "loading"
    # arrives; commands sent meanwhile are answered after "ready"; stray stdout goes to stderr.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(FAKE_TORCH)
    gate = tmp_path / "gate"
    env = clean_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
                    FAKE_TORCH_GATE=str(gate))
    client = spawn(env=env)
    first = client.next_message()
    assert first["status"] == "loading"
    client.send({"cmd": "ping", "id": 1})
    client.send({"cmd": "get_status", "id": 2})
    client.send("garbage")
    with pytest.raises(TimeoutError):
        client.next_message(timeout=1.0)  # nothing can answer while torch is "importing"
    gate.write_text("go")
    assert client.next_message()["status"] == "ready"
    assert client.next_message() == {"status": "pong", "model_loaded": False, "id": 1}
    status = client.next_message()
    assert status["status"] == "status" and status["id"] == 2
    assert client.next_message()["code"] == "invalid_json"
    client.close_stdin()
    assert client.next_message() == {"status": "shutdown", "reason": "stdin_closed"}
    assert client.wait_exit() == 0
    client.assert_all_json()
    stderr = client.stderr_text()
    assert "noise from a fake torch print()" in stderr and "noise from a fake torch fd write" in stderr


def test_commands_sent_before_ready_are_answered_in_order(spawn):
    client = spawn()
    client.send({"cmd": "ping", "id": "a"})
    client.send({"cmd": "list_models", "id": "b"})
    client.send({"cmd": "get_status", "id": "c"})
    client.send({"cmd": "exit", "id": "d"})
    statuses = [(m["status"], m.get("id")) for m in client.drain(timeout=60)]
    assert statuses == [("loading", None), ("ready", None), ("pong", "a"), ("models", "b"), ("status", "c"),
                        ("exiting", "d")]
    assert client.wait_exit() == 0


# ============================================================================================
# commands without a model


def test_ping_status_list_without_model(shared):
    assert shared.request({"cmd": "ping"}) == {"status": "pong", "model_loaded": False}
    status = shared.request({"cmd": "get_status"})
    assert status["status"] == "status" and status["ready"] is True and status["model_loaded"] is False
    assert status["device"] in ("cpu", "mps") or status["device"].startswith("cuda")
    models = shared.request({"cmd": "list_models"})
    assert models["status"] == "models" and models["models"] == []


def test_separate_without_model(shared, tmp_path):
    reply = shared.request({"cmd": "separate", "input": str(tmp_path / "a.wav"), "output": str(tmp_path / "b.wav"),
                            "id": 17})
    assert reply["status"] == "error" and reply["code"] == "model_not_loaded" and reply["id"] == 17
    assert reply["message"]


def test_unknown_fields_are_ignored(shared):
    assert shared.request({"cmd": "ping", "id": 1, "colour": "blue", "nested": {"x": [1, 2]}})["status"] == "pong"


@pytest.mark.parametrize("request_id", [0, "x", None, [1, "two"], {"job": 3}, 2.5, False])
def test_id_echo(shared, request_id):
    assert shared.request({"cmd": "ping", "id": request_id})["id"] == request_id
    err = shared.request({"cmd": "nope", "id": request_id})
    assert err["code"] == "unknown_command" and err["id"] == request_id
    assert err["message"].startswith("Unknown command: nope")  # the seed's wording, which parents test


def test_blank_lines_get_no_reply_and_replies_stay_in_order(shared):
    """The seed skips blank lines silently; the parent pairs replies with requests by order."""
    shared.send_bytes(b'\n   \t  \n\r\n{"cmd":"ping","id":"p"}\n\xef\xbb\xbf \n\n{"cmd":"fly","id":"u"}\n'
                      + " \u3000\xa0 ".encode() + b'\n{"cmd":"get_status","id":"s"}\n\n')
    replies = [shared.next_message() for _ in range(3)]
    assert [(m["status"], m.get("id")) for m in replies] == [("pong", "p"), ("error", "u"), ("status", "s")]
    assert replies[1]["code"] == "unknown_command" and replies[1]["message"].startswith("Unknown command: fly")
    # nothing else was queued for the blank lines: the very next line answers this ping
    assert shared.request({"cmd": "ping", "id": "after"}) == {"status": "pong", "model_loaded": False, "id": "after"}


BAD_LINES = [
    (b"this is not json", "invalid_json"),
    (b"{\"cmd\": \"ping\"", "invalid_json"),
    (b"\xff\xfe\xfa\x00\x01binary", "invalid_json"),
    (b"{\"cmd\": \"ping\", \"t\": \"\xc3\x28\"}", "invalid_json"),
    (b"{\"cmd\": \"ping\", \"x\": NaN}", "invalid_json"),
    (b"[1, 2, 3]", "invalid_command"),
    (b"\"ping\"", "invalid_command"),
    (b"null", "invalid_command"),
    (b"{}", "invalid_command"),
    (b"{\"cmd\": 5}", "invalid_command"),
    (b"{\"cmd\": \"fly\"}", "unknown_command"),
    (b"{\"cmd\": \"load_model\", \"checkpoint_path\": 5}", "invalid_field"),
    (b"{\"cmd\": \"load_model\", \"checkpoint_path\": \"a\", \"mmap\": \"yes\"}", "invalid_field"),
    (b"{\"cmd\": \"load_model\", \"checkpoint_path\": \"a\", \"use_torch_stft\": 3}", "invalid_field"),
    (b"{\"cmd\": \"load_model\", \"checkpoint_path\": \"a\", \"auto_stft_seconds\": -1}", "invalid_field"),
    (b"{\"cmd\": \"load_model\", \"checkpoint_path\": \"a\", \"precision\": \"fp8\"}", "invalid_field"),
    (b"{\"cmd\": \"separate\", \"input\": \"a\", \"output\": \"b\", \"use_chunk\": \"maybe\"}", "invalid_field"),
    (b"{\"cmd\": \"separate\", \"input\": \"a\", \"output\": \"b\", \"output_sr\": 0}", "invalid_field"),
    (b"{\"cmd\": \"separate\", \"input\": \"a\", \"output\": \"b\", \"text\": 7}", "invalid_field"),
    (b"{\"cmd\": \"separate\", \"input\": \"a\"}", "missing_field"),
    (b"{\"cmd\": \"separate\"}", "missing_field"),
    (b"{\"cmd\": \"cancel\"}", "missing_field"),
    (b"{\"cmd\": \"load_model\"}", "missing_field"),
]


@pytest.mark.parametrize("line,code", BAD_LINES, ids=[f"{i}-{c}" for i, (_, c) in enumerate(BAD_LINES)])
def test_bad_lines_get_one_error_and_worker_lives(shared, line, code):
    shared.send(line)
    reply, before = shared.read_reply()
    assert reply["status"] == "error" and reply["code"] == code, reply
    assert isinstance(reply["message"], str) and reply["message"]
    assert all(m["status"] in NON_TERMINAL for m in before)
    assert_alive(shared)


def test_error_id_is_echoed_when_parseable(shared):
    reply = shared.request({"cmd": "load_model", "checkpoint_path": 5, "id": "L"})
    assert reply["code"] == "invalid_field" and reply["id"] == "L" and "checkpoint_path" in reply["message"]
    reply = shared.request({"cmd": 5, "id": "C"})
    assert reply["code"] == "invalid_command" and reply["id"] == "C"


def test_missing_checkpoint_file(shared, tmp_path):
    missing = tmp_path / "nothing.ckpt"
    reply = shared.request({"cmd": "load_model", "checkpoint_path": str(missing)})
    assert reply["code"] == "file_not_found" and str(missing) in reply["message"]
    assert shared.request({"cmd": "ping"})["model_loaded"] is False


def test_cancel_of_unknown_id(shared):
    reply = shared.request({"cmd": "cancel", "target": "never-sent", "id": "k"})
    assert reply["status"] == "error" and reply["code"] == "invalid_field" and reply["id"] == "k"


def test_crlf_and_bom_lines(shared):
    shared.send_bytes(b"{\"cmd\": \"ping\", \"id\": \"crlf\"}\r\n")
    assert shared.read_reply()[0]["id"] == "crlf"
    shared.send_bytes(b"\xef\xbb\xbf{\"cmd\": \"ping\", \"id\": \"bom\"}\n")
    assert shared.read_reply()[0]["id"] == "bom"


def test_several_commands_in_one_write(shared):
    shared.send_bytes(b'{"cmd":"ping","id":1}\n{"cmd":"ping","id":2}\n\n{"cmd":"ping","id":3}\n')
    replies = [shared.read_reply()[0] for _ in range(3)]
    assert [r.get("id") for r in replies] == [1, 2, 3]  # the blank line between them gets no reply


def test_ten_megabyte_lines(shared):
    big_valid = json.dumps({"cmd": "ping", "id": "big", "pad": "x" * 10_000_000}).encode()
    shared.send(big_valid)
    assert shared.read_reply(timeout=120)[0] == {"status": "pong", "model_loaded": False, "id": "big"}
    shared.send(b"y" * 10_000_000)
    assert shared.read_reply(timeout=120)[0]["code"] == "invalid_json"
    shared.send(b"{\"cmd\": \"ping\", \"pad\": \"" + b"z" * 17_000_000)  # over the 16 MB limit, unterminated
    reply = shared.read_reply(timeout=120)[0]
    assert reply["code"] == "invalid_json" and "too long" in reply["message"]
    assert_alive(shared)


def test_slow_reader_does_not_deadlock(shared):
    # Thousands of replies pile up while the test writes and does not read: the stdout pipe
    # fills, the worker blocks writing, but its reader thread keeps draining stdin.
    count = 4000
    payload = b"".join(b'{"cmd":"ping","id":%d}\n' % i for i in range(count))
    shared.send_bytes(payload)
    ids = [shared.read_reply()[0]["id"] for _ in range(count)]
    assert ids == list(range(count))


def test_stdout_is_only_json_so_far(shared):
    shared.assert_all_json()
    assert shared.messages and all(isinstance(m.get("status"), str) for m in shared.messages)


# ============================================================================================
# exit paths


def test_exit(spawn):
    client = spawn()
    client.wait_ready()
    client.send({"cmd": "exit", "id": "bye"})
    client.send({"cmd": "ping"})  # after exit: never answered
    assert client.read_reply()[0] == {"status": "exiting", "id": "bye"}
    assert client.wait_exit() == 0
    assert client.drain() == []


def test_end_of_stdin_answers_pending_then_shuts_down(spawn):
    client = spawn()
    client.send({"cmd": "ping", "id": 1})
    client.send({"cmd": "fly", "id": 2})
    client.send_bytes(b'{"cmd":"ping","id":3}')  # last line without a newline still counts
    client.close_stdin()
    messages = client.drain(timeout=60)
    assert [(m["status"], m.get("id")) for m in messages[2:]] == [
        ("pong", 1), ("error", 2), ("pong", 3), ("shutdown", None)]
    assert messages[-1] == {"status": "shutdown", "reason": "stdin_closed"}
    assert client.wait_exit() == 0


@pytest.mark.skipif(not POSIX, reason="POSIX signals")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_while_idle(spawn, sig):
    client = spawn()
    client.wait_ready()
    client.proc.send_signal(getattr(signal, sig))
    msg, _ = client.wait_status("shutdown")
    assert msg == {"status": "shutdown", "reason": f"signal {sig}"}
    assert client.wait_exit() == 0
    client.assert_all_json()


@pytest.mark.skipif(not POSIX, reason="POSIX signals")
def test_sigterm_during_startup(spawn):
    client = spawn()
    assert client.next_message()["status"] == "loading"
    client.proc.send_signal(signal.SIGTERM)
    messages = client.drain(timeout=60)
    assert messages[-1] == {"status": "shutdown", "reason": "signal SIGTERM"}
    assert client.wait_exit() == 0


def test_parent_closing_stdout_ends_worker(worker_cmd):
    # Raw pipes (no reader thread): the test closes its read end, as a parent that went away.
    import subprocess

    read_fd, write_fd = os.pipe()
    client = WorkerClient(worker_cmd, stdout=write_fd, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as stdout:
            assert json.loads(stdout.readline())["status"] == "loading"
            assert json.loads(stdout.readline())["status"] == "ready"
        client.send_bytes(b'{"cmd":"ping"}\n{"cmd":"ping"}\n')
        assert client.wait_exit(timeout=60) == 0
    finally:
        client.kill()


# ============================================================================================
# settings: flags, environment, policy file


def ready_of(client: WorkerClient) -> dict:
    return client.wait_ready()


def test_max_cached_models_flag_env_policy(spawn, tmp_path):
    policy = tmp_path / "runtime_policy.json"
    policy.write_text(json.dumps({"global": {"max_cached_models": 5}, "audiosep": {"max_cached_models": 3}}))
    assert ready_of(spawn(env=clean_env(policy)))["max_cached_models"] == 3
    env = clean_env(policy, AUDIOSEP_MAX_CACHED_MODELS="4")
    assert ready_of(spawn(env=env))["max_cached_models"] == 4
    assert ready_of(spawn("--max-cached-models", "2", env=env))["max_cached_models"] == 2


def test_broken_policy_file_is_survived(spawn, tmp_path):
    policy = tmp_path / "runtime_policy.json"
    policy.write_bytes(b"{ this is : not json")
    client = spawn(env=clean_env(policy))
    assert ready_of(client)["max_cached_models"] == 1
    status = client.request({"cmd": "get_status"})
    assert status["use_torch_stft_mode"] == "force" and status["auto_stft_seconds"] == 60
    client.send({"cmd": "exit"})
    client.wait_exit()
    assert str(policy) in client.stderr_text()


def test_policy_stft_settings_reach_status(spawn, tmp_path):
    policy = tmp_path / "runtime_policy.json"
    policy.write_text(json.dumps({"audiosep": {"use_torch_stft": "auto", "auto_stft_seconds": 12, "chunk_seconds": 7}}))
    client = spawn(env=clean_env(policy))
    status = client.request({"cmd": "get_status"})
    assert status["use_torch_stft_mode"] == "auto" and status["auto_stft_seconds"] == 12
    assert status["chunk_seconds"] == 7


def test_unknown_flag_and_bad_flag_value_do_not_stop_the_worker(spawn):
    client = spawn("--future-flag", "--max-cached-models", "lots")
    assert ready_of(client)["max_cached_models"] == 1
    assert_alive(client)


def test_unavailable_device_flag_falls_back(spawn):
    client = spawn("--device", "cuda:63")
    ready = ready_of(client)
    assert "warning" in ready
    assert_alive(client)


# ============================================================================================
# with a model (untrained synthetic weights in the real checkpoint format)




def write_wav(path: Path, seconds: float, channels: int = 2, sr: int = 44100) -> Path:
    import numpy as np
    import soundfile as sf

    t = np.arange(int(round(seconds * sr))) / sr
    x = np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)], axis=1)
    sf.write(str(path), x.astype(np.float32), sr, subtype="PCM_16")
    return path


def load(client: WorkerClient, model: dict, **extra) -> dict:
    """load_model that must succeed (so a broken load fails here, not as a later timeout)."""
    reply = client.request(load_cmd(model, **extra), timeout=300)
    assert reply["status"] == "model_loaded", reply
    return reply


def load_cmd(model: dict, **extra) -> dict:
    cmd = {"cmd": "load_model", "checkpoint_path": model["checkpoint_path"], "roberta_dir": model["roberta_dir"],
           "mmap": True}
    cmd.update(extra)
    return cmd


@pytest.fixture(scope="module", name="worker")
def loaded_worker(demo_model):
    """A worker with the demo model loaded, shared by one module's tests (tests/test_stems.py and
    tests/test_batch.py import it)."""
    client = WorkerClient(worker_argv())
    client.wait_ready()
    load(client, demo_model)
    yield client
    client.assert_all_json()
    client.kill()


@pytest.fixture(scope="module")
def model_worker(worker_cmd, demo_model):
    client = WorkerClient(worker_cmd)
    client.wait_ready()
    yield client
    client.assert_all_json()
    client.kill()


EXACT_MODEL_LOADED = {"status", "elapsed", "config_path", "checkpoint_path", "clap_checkpoint_path", "roberta_dir",
                      "device", "cached", "cache_size", "max_cached_models", "use_torch_stft_mode",
                      "use_torch_stft_value", "auto_stft_seconds"}


def test_load_model_then_cache_hit(model_worker, demo_model):
    client = model_worker
    first, before = client.request_all(load_cmd(demo_model, id="l1"), timeout=300)
    assert first["status"] == "model_loaded", first
    assert before == [{"status": "loading_model", "model": demo_model["checkpoint_path"], "id": "l1"}]
    assert EXACT_MODEL_LOADED <= set(first)
    assert first["cached"] is False and first["cache_size"] == 1 and first["max_cached_models"] == 1
    assert first["checkpoint_path"] == demo_model["checkpoint_path"]
    assert first["roberta_dir"] == demo_model["roberta_dir"]
    assert first["use_torch_stft_mode"] == "force" and first["use_torch_stft_value"] is False
    assert first["auto_stft_seconds"] == 60
    second = client.request(load_cmd(demo_model, use_torch_stft=True), timeout=300)
    # a cache hit: the same model object answers (no timing asserted: machines and loads differ)
    assert second["cached"] is True and second["cache_size"] == 1
    assert second["use_torch_stft_value"] is True
    status = client.request({"cmd": "get_status"})
    assert status["model_loaded"] is True and status["checkpoint_path"] == demo_model["checkpoint_path"]
    assert client.request({"cmd": "ping"})["model_loaded"] is True


def test_separate_writes_contract_output(model_worker, demo_model, tmp_path):
    import soundfile as sf

    client = model_worker
    load(client, demo_model)
    mix = write_wav(tmp_path / "mono 22k.wav", 1.5, channels=1, sr=22050)
    out = tmp_path / "out.wav"
    done, before = client.request_all({"cmd": "separate", "input": str(mix), "output": str(out), "text": "a dog",
                                       "id": "s1", "progress": True}, timeout=300)
    assert done["status"] == "done", done
    assert {"elapsed", "files", "use_torch_stft_mode", "use_torch_stft_value"} <= set(done)
    assert done["files"] == [str(out)] and done["id"] == "s1"
    assert before[0] == {"status": "separating", "input": str(mix), "id": "s1"}
    percents = [m["percent"] for m in before if m["status"] == "progress"]
    assert percents[0] == 0 and percents[-1] == 100 and percents == sorted(percents)
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype) == (44100, 2, "PCM_16")
    assert abs(info.frames - round(1.5 * 44100)) <= 1


def test_auto_stft_switches_by_duration_without_reloading(model_worker, demo_model, tmp_path):
    client = model_worker
    loaded = client.request(load_cmd(demo_model, use_torch_stft="auto", auto_stft_seconds=1.0), timeout=300)
    assert loaded["use_torch_stft_mode"] == "auto" and loaded["auto_stft_seconds"] == 1.0
    short = write_wav(tmp_path / "short.wav", 0.5)
    long = write_wav(tmp_path / "long.wav", 1.2)
    r1 = client.request({"cmd": "separate", "input": str(short), "output": str(tmp_path / "o1.wav")}, timeout=300)
    r2 = client.request({"cmd": "separate", "input": str(long), "output": str(tmp_path / "o2.wav")}, timeout=300)
    assert (r1["use_torch_stft_mode"], r1["use_torch_stft_value"]) == ("auto", False)
    assert (r2["use_torch_stft_mode"], r2["use_torch_stft_value"]) == ("auto", True)
    assert client.request({"cmd": "list_models"})["cache_size"] == 1


def test_eviction_and_failed_load_keep_worker_usable(model_worker, demo_model, tmp_path):
    client = model_worker
    load(client, demo_model)
    twin = client.request(load_cmd(demo_model, checkpoint_path=demo_model["twin_checkpoint_path"]), timeout=300)
    assert twin["cached"] is False and twin["cache_size"] == 1  # the first one was evicted
    models = client.request({"cmd": "list_models"})["models"]
    assert [m["checkpoint_path"] for m in models] == [demo_model["twin_checkpoint_path"]]

    bad = client.request(load_cmd(demo_model, checkpoint_path=demo_model["garbage_checkpoint_path"], id="bad"),
                         timeout=300)
    assert bad["status"] == "error" and bad["code"] == "invalid_checkpoint" and bad["id"] == "bad"
    assert demo_model["garbage_checkpoint_path"] in bad["message"]
    assert client.request({"cmd": "list_models"})["models"] == models
    mix = write_wav(tmp_path / "m.wav", 0.5)
    done = client.request({"cmd": "separate", "input": str(mix), "output": str(tmp_path / "o.wav")}, timeout=300)
    assert done["status"] == "done"
    assert client.request({"cmd": "get_status"})["checkpoint_path"] == demo_model["twin_checkpoint_path"]


def test_separate_errors_keep_worker_serving(model_worker, demo_model, tmp_path):
    client = model_worker
    load(client, demo_model)
    missing = client.request({"cmd": "separate", "input": str(tmp_path / "none.wav"), "output": str(tmp_path / "o.wav")})
    assert missing["code"] == "file_not_found"
    notaudio = tmp_path / "text.wav"
    notaudio.write_text("hello")
    reply = client.request({"cmd": "separate", "input": str(notaudio), "output": str(tmp_path / "o.wav")})
    assert reply["code"] == "invalid_audio"
    mix = write_wav(tmp_path / "m.wav", 0.3)
    same = client.request({"cmd": "separate", "input": str(mix), "output": str(mix)})
    assert same["code"] == "output_error"
    assert_alive(client)


def test_unload_and_clear_cache(model_worker, demo_model, tmp_path):
    client = model_worker
    load(client, demo_model)
    reply = client.request({"cmd": "unload_model"})
    assert reply["status"] == "models" and reply["model_loaded"] is False and len(reply["unloaded"]) == 1
    mix = write_wav(tmp_path / "m.wav", 0.3)
    assert client.request({"cmd": "separate", "input": str(mix), "output": str(tmp_path / "o.wav")})["code"] == \
        "model_not_loaded"
    load(client, demo_model)
    reply = client.request({"cmd": "clear_cache"})
    assert reply["status"] == "models" and reply["models"] == [] and reply["cache_size"] == 0
    assert reply["status"] in PARENT_TERMINAL


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def start_long_job(client: WorkerClient, demo_model: dict, tmp_path: Path, job_id: str) -> tuple[Path, Path]:
    """A job with many chunks (short kept centre), started and seen making progress."""
    load(client, demo_model)
    mix = write_wav(tmp_path / "long.wav", 4.0)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "result.wav"
    client.send({"cmd": "separate", "input": str(mix), "output": str(out), "id": job_id, "progress": True,
                 "use_chunk": True, "chunk_length": 0.32})
    client.wait_for(lambda m: m["status"] == "progress" and m["id"] == job_id and 0 < m["percent"] < 100,
                    timeout=300)
    return out_dir, out


def test_cancel_running_job(model_worker, demo_model, tmp_path):
    client = model_worker
    out_dir, out = start_long_job(client, demo_model, tmp_path, "c1")
    client.send({"cmd": "cancel", "target": "c1", "id": "k1"})
    replies = {}
    while len(replies) < 2:
        msg, _ = client.read_reply(timeout=300)
        replies[msg["id"]] = msg
    assert replies["k1"]["status"] == "cancelling" and replies["k1"]["target"] == "c1"
    assert replies["c1"]["status"] == "error" and replies["c1"]["code"] == "cancelled"
    assert not out.exists() and leftovers(out_dir, set()) == []
    assert_alive(client)


@pytest.mark.skipif(not POSIX, reason="POSIX signals")
def test_sigterm_mid_job_leaves_no_partial_output(spawn, demo_model, tmp_path):
    client = spawn()
    client.wait_ready()
    out_dir, out = start_long_job(client, demo_model, tmp_path, "t1")
    client.proc.send_signal(signal.SIGTERM)
    msg, _ = client.wait_status("shutdown", timeout=60)
    assert msg == {"status": "shutdown", "reason": "signal SIGTERM"}
    assert client.wait_exit(timeout=60) == 0
    assert not out.exists() and leftovers(out_dir, set()) == []
    client.assert_all_json()


def test_end_of_stdin_mid_job_finishes_the_job(spawn, demo_model, tmp_path):
    client = spawn()
    load(client, demo_model)
    mix = write_wav(tmp_path / "m.wav", 0.5)
    out = tmp_path / "o.wav"
    client.send({"cmd": "separate", "input": str(mix), "output": str(out), "id": "last"})
    client.close_stdin()
    messages = client.drain(timeout=300)
    # heartbeats (a repeated status line after 10 s of silence) come on a slow or busy machine
    assert [m["status"] for m in messages if not m.get("heartbeat")] == ["separating", "done", "shutdown"]
    assert client.wait_exit() == 0 and out.exists()


def test_max_cached_models_two_keeps_both(spawn, demo_model):
    client = spawn("--max-cached-models", "2")
    client.wait_ready()
    a = client.request(load_cmd(demo_model), timeout=300)
    b = client.request(load_cmd(demo_model, checkpoint_path=demo_model["twin_checkpoint_path"]), timeout=300)
    again = client.request(load_cmd(demo_model), timeout=300)
    assert (a["cached"], b["cached"], again["cached"]) == (False, False, True)
    assert again["cache_size"] == 2 and again["max_cached_models"] == 2
    models = client.request({"cmd": "list_models"})["models"]
    assert [m["checkpoint_path"] for m in models] == [demo_model["checkpoint_path"], demo_model["twin_checkpoint_path"]]
    assert models[0]["current"] is True and models[1]["current"] is False


# ============================================================================================
# the command line around the worker


def base_cmd(worker_cmd: list[str]) -> list[str]:
    return [a for a in worker_cmd if a != "--worker"]


def test_version_and_usage(worker_cmd):
    import subprocess

    out = subprocess.run(base_cmd(worker_cmd) + ["--version"], capture_output=True, timeout=120, env=clean_env())
    assert out.returncode == 0 and out.stdout.decode().startswith("dsu-audiosep ")
    out = subprocess.run(base_cmd(worker_cmd), capture_output=True, timeout=120, env=clean_env())
    assert out.returncode == 2 and out.stdout == b"" and b"--worker" in out.stderr


def test_one_shot_separate(worker_cmd, demo_model, tmp_path):
    import subprocess

    import soundfile as sf

    mix = write_wav(tmp_path / "m.wav", 0.6)
    out = tmp_path / "o.wav"
    args = ["separate", str(mix), str(out), "--text", "bird", "--checkpoint", demo_model["checkpoint_path"],
            "--roberta-dir", demo_model["roberta_dir"], "--mmap", "--output-sr", "input"]
    done = subprocess.run(base_cmd(worker_cmd) + args, capture_output=True, timeout=600, env=clean_env())
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    reply = json.loads(done.stdout)
    assert reply["status"] == "done" and reply["files"] == [str(out)]
    assert sf.info(str(out)).samplerate == 44100
    bad = subprocess.run(base_cmd(worker_cmd) + ["separate", str(mix), str(out), "--checkpoint",
                                                 demo_model["garbage_checkpoint_path"]],
                         capture_output=True, timeout=600, env=clean_env())
    assert bad.returncode == 1 and b"invalid_checkpoint" in bad.stderr and bad.stdout == b""


# ============================================================================================
# faults and load


@pytest.mark.skipif(not POSIX, reason="POSIX signals")
def test_kill_9_mid_job_leaves_nothing_at_the_output_path(spawn, demo_model, tmp_path):
    client = spawn()
    client.wait_ready()
    _out_dir, out = start_long_job(client, demo_model, tmp_path, "k9")
    client.proc.kill()  # no handler can run: only the atomic write protects the output path
    client.wait_exit(timeout=60)
    assert not out.exists()


def test_evicted_real_model_is_freed_in_process(demo_model):
    # What pipes cannot show: the evicted AudioSep object is really gone after eviction.
    import weakref

    from dsu_audiosep.engine.torch_engine import TorchEngine
    from dsu_audiosep.worker import loop, policy
    from dsu_audiosep.worker import protocol as P

    class Sink:
        def send(self, obj, lock_timeout=None):
            return True

    worker = loop.Worker(Sink(), policy.Settings(max_cached_models=1), engine=TorchEngine())
    first = worker.execute(P.parse_object(load_cmd(demo_model)))
    assert first["status"] == "model_loaded", first
    ref = weakref.ref(worker.current.model)
    second = worker.execute(P.parse_object(load_cmd(demo_model, checkpoint_path=demo_model["twin_checkpoint_path"])))
    assert second["status"] == "model_loaded" and second["cache_size"] == 1
    assert ref() is None  # also when its background compile (OpenVINO) was still running
    worker.execute(P.parse_object({"cmd": "clear_cache"}))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)")
def test_soak_500_jobs_rss_flat(spawn, demo_model, tmp_path):
    """Run with: pytest -m slow tests/test_worker.py -k soak"""
    client = spawn()
    load(client, demo_model, mmap=False)
    mix = write_wav(tmp_path / "m.wav", 0.25)
    texts = ["speech", "dog barking", "a piano", "rain", "guitar"]
    samples = []
    for i in range(500):
        reply = client.request({"cmd": "separate", "input": str(mix), "output": str(tmp_path / f"o{i % 3}.wav"),
                                "text": texts[i % len(texts)]}, timeout=300)
        assert reply["status"] == "done", reply
        if i % 50 == 49:
            samples.append(rss_bytes(client.proc.pid))
    warm = samples[1]  # after 100 jobs: caches (text embeddings, allocator) are warm
    assert max(samples[1:]) <= warm * 1.05, [s >> 20 for s in samples]
    assert_alive(client)




def test_load_converted_model_dir(spawn, converted_dir, tmp_path):
    client = spawn()
    loaded, before = client.request_all({"cmd": "load_model", "model_dir": converted_dir, "id": "md"}, timeout=300)
    assert loaded["status"] == "model_loaded", loaded
    assert before[-1] == {"status": "loading_model", "model": converted_dir, "id": "md"}
    assert loaded["model_dir"] == converted_dir and loaded["checkpoint_path"] is None
    assert EXACT_MODEL_LOADED <= set(loaded)
    mix = write_wav(tmp_path / "m.wav", 0.4)
    done = client.request({"cmd": "separate", "input": str(mix), "output": str(tmp_path / "o.flac"),
                           "output_subtype": "PCM_24"}, timeout=300)
    assert done["status"] == "done" and done["files"] == [str(tmp_path / "o.flac")]
    status = client.request({"cmd": "get_status"})
    assert status["model_dir"] == converted_dir and status["model_loaded"] is True


def test_context_seconds_sets_the_chunk_overlap(model_worker, demo_model, tmp_path):
    """Chunked with 3.52 s of context is the full pass to float rounding; 0 s is allowed (and
    cheaper); a negative overlap is a clear error."""
    import soundfile as sf

    client = model_worker
    load(client, demo_model)
    mix = write_wav(tmp_path / "mix.wav", 3.0, channels=1, sr=32000)  # three windows of 1.28 s
    exact = {"output_sr": "input", "output_subtype": "FLOAT", "output_channels": "input"}
    outs = {}
    for name, extra in {"full": {"use_chunk": False},
                        "exact": {"use_chunk": True, "chunk_length": 1.28, "context_seconds": 3.52},
                        "none": {"use_chunk": True, "chunk_length": 1.28, "context_seconds": 0}}.items():
        out = tmp_path / f"{name}.wav"
        done = client.request({"cmd": "separate", "input": str(mix), "output": str(out), "text": "a dog", **exact, **extra},
                              timeout=300)
        assert done["status"] == "done", done
        outs[name] = sf.read(str(out), dtype="float64")[0]
    full = outs["full"]

    def snr(y):
        return 10 * np.log10(np.sum(full**2) / max(np.sum((full - y) ** 2), 1e-300))

    assert snr(outs["exact"]) > 100
    assert snr(outs["none"]) < snr(outs["exact"])
    bad = client.request({"cmd": "separate", "input": str(mix), "output": str(tmp_path / "x.wav"), "context_seconds": -1})
    assert bad["status"] == "error" and bad["code"] == "invalid_field" and "context_seconds" in bad["message"]
    assert not (tmp_path / "x.wav").exists()


def test_default_precision_comes_from_the_environment(spawn, demo_model):
    client = spawn(env=clean_env(AUDIOSEP_PRECISION="bf16"))
    client.wait_ready()
    load(client, demo_model)
    status = client.request({"cmd": "get_status"})
    assert status["precision"] == "bf16" and status["settings_sources"]["precision"] == "env"
    load(client, demo_model, precision="fp32")  # a job field still wins
    assert client.request({"cmd": "get_status"})["precision"] == "fp32"
