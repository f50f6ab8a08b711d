"""The cx_Freeze build (dist/dsu-audiosep/dsu-audiosep), driven only through argv and pipes.

Skipped when the build is absent, unless DSU_REQUIRE_FROZEN=1 (set by scripts/test.sh and so
by CI), where an absent build fails. DSU_FROZEN_EXE points at another build.

Adding a test against a running worker: take the module-scoped ``frozen_worker`` fixture (one
process shared by the module, already ``ready``); leave it serving (no exit, no signals) and
check ``frozen_worker.alive()`` if you break something on purpose. Tests that end the process
spawn their own with ``spawn_frozen()``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from worker_client import WorkerClient, clean_env

import dsu_audiosep

pytestmark = pytest.mark.frozen

ROOT = Path(__file__).resolve().parents[1]
EXE_NAME = "dsu-audiosep.exe" if os.name == "nt" else "dsu-audiosep"
FROZEN_EXE = Path(os.environ.get("DSU_FROZEN_EXE") or ROOT / "dist" / "dsu-audiosep" / EXE_NAME)
REQUIRED = os.environ.get("DSU_REQUIRE_FROZEN") == "1"
TIMEOUT = 120.0  # generous: 2 shared cores under a parallel test load


@pytest.fixture(scope="module")
def frozen_exe() -> Path:
    if not FROZEN_EXE.is_file():
        message = f"frozen build not found at {FROZEN_EXE}; build it with scripts/build_frozen.sh"
        if REQUIRED:
            pytest.fail(message + " (DSU_REQUIRE_FROZEN=1)", pytrace=False)
        pytest.skip(message)
    return FROZEN_EXE


def spawn_frozen(exe: Path, *args: str, cwd: Path | None = None) -> WorkerClient:
    """A frozen worker over real pipes; cwd elsewhere, so nothing resolves against the repo."""
    return WorkerClient([str(exe), "--worker", *args], env=clean_env(), cwd=cwd)


@pytest.fixture(scope="module")
def frozen_worker(frozen_exe: Path, tmp_path_factory: pytest.TempPathFactory):
    client = spawn_frozen(frozen_exe, cwd=tmp_path_factory.mktemp("frozen-cwd"))
    try:
        client.wait_ready(TIMEOUT)
        yield client
        client.assert_all_json()
    finally:
        client.kill()


# -- the bundle ------------------------------------------------------------------------------


def test_version_matches_the_source_tree(frozen_exe: Path):
    # A stale build (older version, or a build from another checkout) shows up here first.
    out = subprocess.run([str(frozen_exe), "--version"], capture_output=True, timeout=TIMEOUT,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert out.stdout.decode().split() == [
        "dsu-audiosep", dsu_audiosep.__version__, "(protocol", f"{dsu_audiosep.PROTOCOL_VERSION})"
    ]


def test_bundle_layout(frozen_exe: Path):
    folder = frozen_exe.parent
    lib = folder / "lib"
    # Relative paths in commands resolve against the executable's folder: the default config
    # must be there.
    assert (folder / "config" / "audiosep_base.yaml").is_file()
    assert (lib / "dsu_audiosep" / "assets" / "demo_tokenizer" / "vocab.json").is_file()
    assert any((lib / "_soundfile_data").glob("*sndfile*")), "soundfile's bundled libsndfile is missing"
    # Test-time oracles and what only torch.compile needs stay out of the runtime.
    for name in ("transformers", "networkx", "jinja2", "torchvision", "torchaudio", "pytest",
                 "hypothesis", "setuptools", "pip", "tkinter", "scipy", "matplotlib",
                 # the ray extra (cluster folder runs) is a pip install, never the frozen worker
                 "ray", "pyarrow", "pandas", "requests", "dsu_audiosep/distributed/run.pyc"):
        assert not (lib / name).exists(), f"{name} was bundled"
    # Eager torch code imports these lazily (torch._check, torch._disable_dynamo).
    for name in ("sympy", "mpmath", "torch/_dynamo", "torch/_inductor"):
        assert (lib / name).is_dir(), f"{name} is missing"
    # PyAV with FFmpeg's libraries (issue 24): AAC, WebM, WMA, AC-3, video soundtracks in; MP3, Opus, M4A out.
    assert (lib / "av").is_dir() and any((lib / "av.libs").glob("libavcodec*")), "PyAV or its FFmpeg libraries are missing"
    torch_bin = lib / "torch" / "bin"
    if torch_bin.is_dir():  # Linux/macOS wheels; Windows wheels keep DLLs in torch/lib
        assert sorted(p.name.split(".")[0] for p in torch_bin.iterdir()) == ["torch_shm_manager"]



def test_ray_is_refused_with_the_extra_named(frozen_exe: Path, tmp_path: Path):
    # The cluster runner is a pip extra, never bundled: --ray says so instead of failing on an import.
    (tmp_path / "in.wav").write_bytes(b"")
    out = subprocess.run([str(frozen_exe), "separate", "in.wav", "--out-dir", "out", "--text", "x", "--ray"],
                         capture_output=True, text=True, timeout=TIMEOUT, env=clean_env(), cwd=tmp_path)
    assert out.returncode == 1, out
    assert 'pip install "dsu-audiosep[ray]"' in out.stderr and "invalid_field" in out.stderr, out.stderr
    assert out.stdout == "" and not (tmp_path / "out").exists()


def test_new_formats_over_pipes_without_ffmpeg_on_path(frozen_exe: Path, model_files, tmp_path: Path):
    """.m4a (AAC), WebM (Opus), a video's soundtrack and ALAC in; .mp3, .opus, .m4a out: the bundle's
    own FFmpeg libraries only (PATH holds an empty folder, so no ffmpeg program can be found)."""
    import bad_inputs as bad
    from dsu_audiosep.engine import audio_read

    sr = 48000
    x = bad.tone(sr, sr, 2)
    inputs = {"aac.m4a": ("aac", "mp4", {}), "opus.webm": ("libopus", "webm", {}),
              "video.mp4": ("aac", "mp4", {"video": True}), "alac.m4a": ("alac", "mp4", {"sample_format": "s16p"})}
    for name, (codec, fmt, kw) in inputs.items():
        bad.encode_av(tmp_path / name, x, sr, codec, fmt, **kw)
    (tmp_path / "empty").mkdir()
    w = WorkerClient([str(frozen_exe), "--worker"], env=clean_env(PATH=str(tmp_path / "empty")), cwd=tmp_path)
    try:
        w.wait_ready(TIMEOUT)
        loaded = w.request({"cmd": "load_model", "checkpoint_path": str(model_files["checkpoint_path"]),
                            "roberta_dir": str(model_files["roberta_dir"])}, 600)
        assert loaded["status"] == "model_loaded", loaded
        for src, out in [("aac.m4a", "a.mp3"), ("opus.webm", "b.opus"), ("video.mp4", "c.m4a"), ("alac.m4a", "d.wav")]:
            reply = w.request({"cmd": "separate", "input": str(tmp_path / src), "output": str(tmp_path / out),
                               "text": "a tone", "output_sr": "input"}, 600)
            assert reply["status"] == "done", reply
            assert abs(audio_read.probe(tmp_path / out).duration - 1.0) <= 0.001, out
        cut = bad.cut_in_the_middle(tmp_path / "aac.m4a", tmp_path / "cut.m4a")
        reply = w.request({"cmd": "separate", "input": str(cut), "output": str(tmp_path / "e.mp3")}, 600)
        assert reply["status"] == "error" and reply["code"] == "invalid_audio", reply
        assert not (tmp_path / "e.mp3").exists()
        w.assert_all_json()
        assert "Traceback" not in w.stderr_text()
    finally:
        w.kill()


# -- start-up ------------------------------------------------------------------------------------


def test_first_line_is_loading_then_ready_on_cpu(frozen_exe: Path, tmp_path: Path):
    with spawn_frozen(frozen_exe, cwd=tmp_path) as w:
        first = w.next_message(TIMEOUT)
        assert first["status"] == "loading" and isinstance(first.get("message"), str)
        ready = w.next_message(TIMEOUT)
        assert ready["status"] == "ready"
        assert ready["device"] == "cpu"
        assert ready["version"] == dsu_audiosep.__version__
        assert ready["protocol"] == dsu_audiosep.PROTOCOL_VERSION
        assert isinstance(ready["capabilities"], list) and "separate" in ready["capabilities"]
        # The first line is written before torch is imported, so it comes strictly first.
        assert w.line_times[0] < w.line_times[1]
        assert w.request({"cmd": "exit"}, TIMEOUT)["status"] == "exiting"
        assert w.wait_exit(TIMEOUT) == 0
        w.assert_all_json()
        # The torch sources that torch.jit inspects at import are shipped as .py: without them
        # torch warns "Unable to retrieve source for @torch.jit._overload function" at start.
        assert "Unable to retrieve source" not in w.stderr_text()
        assert "Traceback" not in w.stderr_text()


def test_commands_sent_before_ready_are_answered(frozen_exe: Path, tmp_path: Path):
    with spawn_frozen(frozen_exe, cwd=tmp_path) as w:
        w.send({"cmd": "ping", "id": "early"})  # before reading anything: torch is still loading
        reply, before = w.read_reply(TIMEOUT)
        assert reply["status"] == "pong" and reply["id"] == "early"
        assert [m["status"] for m in before][:2] == ["loading", "ready"]


def test_stdin_from_dev_null_prints_only_json(frozen_exe: Path, tmp_path: Path):
    # The shell case `dsu-audiosep --worker < /dev/null`: start, notice EOF, shut down cleanly.
    out = subprocess.run([str(frozen_exe), "--worker"], stdin=subprocess.DEVNULL, capture_output=True,
                         timeout=TIMEOUT, cwd=tmp_path, env=clean_env())
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    lines = out.stdout.decode().splitlines()
    messages = [json.loads(line) for line in lines]  # any non-JSON line fails here
    assert [m["status"] for m in messages] == ["loading", "ready", "shutdown"]


# -- a running worker ------------------------------------------------------------------------


def test_ping(frozen_worker: WorkerClient):
    reply = frozen_worker.request({"cmd": "ping"}, TIMEOUT)
    assert reply["status"] == "pong"
    assert reply["model_loaded"] is False


def test_get_status(frozen_worker: WorkerClient):
    reply = frozen_worker.request({"cmd": "get_status", "id": 7}, TIMEOUT)
    assert reply["status"] == "status"
    assert reply["ready"] is True
    assert reply["device"] == "cpu"
    assert reply["model_loaded"] is False
    assert reply["id"] == 7


def test_list_models_is_empty(frozen_worker: WorkerClient):
    reply = frozen_worker.request({"cmd": "list_models"}, TIMEOUT)
    assert reply["status"] == "models" and reply["models"] == []


@pytest.mark.parametrize(
    "line, code",
    [
        (b"this is not json", "invalid_json"),
        (b'{"cmd": "ping"', "invalid_json"),
        (b"\xff\xfe not utf-8", "invalid_json"),
        (b"[1, 2, 3]", "invalid_command"),
        (b'{"no_cmd": true}', "invalid_command"),
        (b'{"cmd": "fly_to_the_moon"}', "unknown_command"),
    ],
)
def test_bad_lines_get_an_error_with_a_code_and_the_worker_keeps_serving(
    frozen_worker: WorkerClient, line: bytes, code: str
):
    frozen_worker.send(line)
    reply, _ = frozen_worker.read_reply(TIMEOUT)
    assert reply["status"] == "error"
    assert reply["code"] == code
    assert isinstance(reply["message"], str) and reply["message"]
    assert frozen_worker.request({"cmd": "ping"}, TIMEOUT)["status"] == "pong"


def test_relative_paths_resolve_against_the_executable_folder(frozen_worker: WorkerClient, frozen_exe: Path):
    # The worker runs with its cwd elsewhere; a relative path must still mean "beside the exe".
    reply = frozen_worker.request(
        {"cmd": "load_model", "checkpoint_path": "checkpoint/no-such-file.ckpt"}, TIMEOUT
    )
    assert reply["status"] == "error" and reply["code"] == "file_not_found"
    assert str(frozen_exe.parent.resolve() / "checkpoint" / "no-such-file.ckpt") in reply["message"]


def test_separate_without_a_model_is_an_error(frozen_worker: WorkerClient, tmp_path: Path):
    reply = frozen_worker.request(
        {"cmd": "separate", "input": str(tmp_path / "in.wav"), "output": str(tmp_path / "out.wav")}, TIMEOUT
    )
    assert reply["status"] == "error" and isinstance(reply.get("code"), str)
    assert frozen_worker.alive()


# -- ending the process ----------------------------------------------------------------------


def test_exit_replies_exiting_and_returns_0(frozen_exe: Path, tmp_path: Path):
    with spawn_frozen(frozen_exe, cwd=tmp_path) as w:
        w.wait_ready(TIMEOUT)
        assert w.request({"cmd": "exit"}, TIMEOUT)["status"] == "exiting"
        assert w.wait_exit(TIMEOUT) == 0
        w.assert_all_json()


def test_end_of_stdin_shuts_down_with_0(frozen_exe: Path, tmp_path: Path):
    with spawn_frozen(frozen_exe, cwd=tmp_path) as w:
        w.wait_ready(TIMEOUT)
        w.close_stdin()
        rest = w.drain(TIMEOUT)
        assert [m["status"] for m in rest] == ["shutdown"]
        assert isinstance(rest[0].get("reason"), str)
        assert w.wait_exit(TIMEOUT) == 0
        w.assert_all_json()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM cannot be delivered to a process on Windows")
def test_sigterm_prints_shutdown_and_ends_cleanly(frozen_exe: Path, tmp_path: Path):
    with spawn_frozen(frozen_exe, cwd=tmp_path) as w:
        w.wait_ready(TIMEOUT)
        w.proc.send_signal(signal.SIGTERM)
        rest = w.drain(TIMEOUT)
        assert [m["status"] for m in rest] == ["shutdown"]
        assert "SIGTERM" in rest[0]["reason"]
        assert w.wait_exit(TIMEOUT) == 0
        w.assert_all_json()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM cannot be delivered to a process on Windows")
def test_sigterm_while_torch_loads_still_ends_the_process(frozen_exe: Path, tmp_path: Path):
    # A parent that gives up during start-up must not be left with a stuck process.
    with spawn_frozen(frozen_exe, cwd=tmp_path) as w:
        assert w.next_message(TIMEOUT)["status"] == "loading"
        w.proc.send_signal(signal.SIGTERM)
        rest = w.drain(TIMEOUT)
        assert rest and rest[-1]["status"] == "shutdown"
        w.wait_exit(TIMEOUT)
        w.assert_all_json()
