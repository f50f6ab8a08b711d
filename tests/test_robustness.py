"""Hostile inputs and process faults against ONE long-lived worker, as the parent app drives it.

The module starts a worker over real pipes, loads the (untrained, synthetic) demo model once and
then feeds it broken audio, odd text, bad output paths and broken model files. After every command
it checks: exactly one terminal reply (the next ``ping`` is answered straight after it), a stable
error ``code`` with a message naming the problem - or ``done`` with a correct, finite output - and
no partial file left anywhere. Every stdout line must be JSON. One test feeds the module's worker a
hostile input of each kind and then a normal separation: nothing may have damaged it.

Faults that end a worker (SIGINT, stdin closed, a small file-size limit, a parent that stops
reading) get their own worker each.

Permission tests need permission bits to apply. When the tests run as root, the module's worker
is started without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (dropped from the bounding set before
exec, so it stays uid 0 and can still read the interpreter under /root), which makes it obey file
modes like an ordinary user; where that is impossible those tests skip with the reason.

``DSU_WORKER_CMD`` selects the worker command (see worker_client.py), so the same tests run
against the frozen build.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import soundfile as sf

import bad_inputs as bad
from worker_client import NON_TERMINAL, WorkerClient, worker_argv

POSIX = os.name == "posix"
IS_ROOT = POSIX and os.geteuid() == 0
JOB_TIMEOUT = 300.0
OUT_SR, OUT_CH, OUT_SUBTYPE = 44100, 2, "PCM_16"  # the default output contract
MODEL_SR = 32000

# Runs between fork and the worker's exec: resource limits and capability drops that the child
# must have from its first instruction. Prints nothing (stdout is the protocol stream).
LAUNCHER = textwrap.dedent(
    """
    import json, os, signal, sys
    spec = json.loads(sys.argv[1])
    argv = sys.argv[2:]
    if spec.get("fsize"):
        import resource
        # A write past the limit must fail with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec["fsize"], spec["fsize"]))
    if spec.get("drop_dac"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
                libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: gone from the exec'd worker
        except Exception:
            pass  # the tests read the worker's capabilities and skip what needs the drop
    os.execvp(argv[0], argv)
    """
)


def launch_argv(**spec) -> list[str]:
    if not spec:
        return worker_argv()
    return [sys.executable, "-c", LAUNCHER, json.dumps(spec), *worker_argv()]


def permission_bits_apply(pid: int) -> bool:
    """Whether the worker process is refused files by their mode bits."""
    if not POSIX:
        return False
    if not IS_ROOT:
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return not (eff >> 1) & 1 and not (eff >> 2) & 1


_ids = itertools.count()


def new_id(tag: str) -> str:
    return f"{tag}-{next(_ids)}"


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def demo(demo_files) -> dict[str, str]:
    return dict(demo_files)


def load_cmd(demo: dict[str, str], **extra) -> dict:
    cmd = {"cmd": "load_model", "checkpoint_path": demo["checkpoint_path"], "roberta_dir": demo["roberta_dir"],
           "mmap": True}
    cmd.update(extra)
    return cmd


def load(client: WorkerClient, demo: dict[str, str]) -> dict:
    reply = client.request(load_cmd(demo), timeout=JOB_TIMEOUT)
    assert reply["status"] == "model_loaded", reply
    return reply


@pytest.fixture(scope="module")
def worker(demo):
    client = WorkerClient(launch_argv(drop_dac=True) if IS_ROOT else worker_argv())
    try:
        client.wait_ready()
        load(client, demo)
        client.perms = permission_bits_apply(client.proc.pid)  # type: ignore[attr-defined]
        yield client
        client.assert_all_json()
    finally:
        client.kill()


@pytest.fixture(scope="module")
def short_input(tmp_path_factory) -> Path:
    """0.25 s of mono 32 kHz: the cheapest valid job (text and model tests)."""
    return bad.wav(tmp_path_factory.mktemp("short") / "short.wav", 0.25)


# --------------------------------------------------------------------------------------------
# helpers


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


def confirm_alive(client: WorkerClient) -> None:
    """The previous command got exactly one terminal reply and nothing trails it: the very next
    line after it is the answer to this ping."""
    pid = new_id("alive")
    client.send({"cmd": "ping", "id": pid})
    msg = client.next_message(timeout=JOB_TIMEOUT)
    assert msg == {"status": "pong", "model_loaded": True, "id": pid}, f"expected the pong, got {msg}"
    assert client.alive()


def run(client: WorkerClient, cmd: dict, timeout: float = JOB_TIMEOUT) -> tuple[dict, list[dict]]:
    """Send one command; return its terminal reply and the status lines before it (all of which
    must belong to it); then prove the worker alive and the reply unique."""
    cmd = dict(cmd)
    cmd.setdefault("id", new_id(cmd["cmd"]))
    client.send(cmd)
    reply, before = client.read_reply(timeout)
    assert reply.get("id") == cmd["id"], (reply, cmd["id"])
    for m in before:
        assert m["status"] in NON_TERMINAL and m.get("id") == cmd["id"], m
    confirm_alive(client)
    return reply, before


def expect_error(client: WorkerClient, cmd: dict, code: str | tuple[str, ...], *mentions: str) -> dict:
    """``code``: the stable code, or a tuple of codes that are equally right."""
    reply, _ = run(client, cmd)
    assert reply["status"] == "error", reply
    assert reply["code"] in ((code,) if isinstance(code, str) else code), reply
    assert isinstance(reply["message"], str) and reply["message"].strip(), reply
    for text in mentions:
        assert text in reply["message"], (text, reply["message"])
    return reply


def expect_done(client: WorkerClient, cmd: dict) -> dict:
    reply, _ = run(client, cmd)
    assert reply["status"] == "done", reply
    assert reply["files"] == [cmd["output"]], reply
    return reply


def expected_frames(n: int, sr_in: int, sr_out: int = OUT_SR) -> int:
    return int(round(n * sr_out / sr_in))


def check_output(path: Path, frames: int, sr: int = OUT_SR, channels: int = OUT_CH,
                 subtype: str = OUT_SUBTYPE) -> np.ndarray:
    """The output exists, has the contract's format and the input's duration, holds only finite
    samples, and its folder holds no partial file."""
    assert path.is_file(), f"no output at {path}"
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (sr, channels, subtype), info
    assert abs(info.frames - frames) <= 1 and info.frames >= 1, (info.frames, frames)
    y, _ = sf.read(str(path), dtype="float32", always_2d=True)
    assert np.isfinite(y).all()
    assert leftovers(path.parent) == []
    return y


def separate_cmd(inp: Path | str, out: Path | str, **extra) -> dict:
    cmd = {"cmd": "separate", "input": str(inp), "output": str(out)}
    cmd.update(extra)
    return cmd


def no_nonfinite_written(reply: dict) -> None:
    # The writer turns NaN/Inf into 0 and says so; such a note would mean the model made NaN.
    for w in reply.get("warnings", []):
        assert not ("non-finite" in w and "wrote" in w), w


# ============================================================================================
# 1. audio input

# name -> (maker(folder) -> path, outcome); outcome is ("error", code, words the message must
# contain) or ("done", input frames, input rate).
AUDIO_CASES = {
    "missing": (lambda d: d / "missing.wav", ("error", "file_not_found", ["missing.wav", "does not exist"])),
    "directory": (lambda d: bad.directory(d / "folder.wav"), ("error", "invalid_audio", ["folder.wav", "folder"])),
    "random_bytes": (lambda d: bad.random_bytes(d / "noise.wav"), ("error", "invalid_audio", ["noise.wav"])),
    "text_file": (lambda d: bad.text_file(d / "minutes.wav"), ("error", "invalid_audio", ["minutes.wav"])),
    "zero_bytes": (lambda d: bad.empty_file(d / "empty.wav"), ("error", "invalid_audio", ["empty.wav", "empty"])),
    "truncated_wav": (lambda d: bad.truncated_wav(d / "cut.wav"), ("error", "invalid_audio", ["cut.wav", "truncated"])),
    "truncated_flac": (lambda d: bad.truncated_flac(d / "cut.flac"), ("error", "invalid_audio", ["cut.flac"])),
    "zero_samples": (lambda d: bad.zero_samples_wav(d / "nothing.wav"),
                     ("error", "invalid_audio", ["nothing.wav", "no samples"])),
    "one_sample": (lambda d: bad.wav(d / "one.wav", 1 / MODEL_SR), ("done", 1, MODEL_SR)),
    "shorter_than_stft_frame": (lambda d: bad.wav(d / "tiny.wav", 500 / MODEL_SR), ("done", 500, MODEL_SR)),
    "silence": (lambda d: bad.silence(d / "silence.wav", 0.5), ("done", 16000, MODEL_SR)),
    "nan_inf_float": (lambda d: bad.float_wav_with_nonfinite(d / "nan.wav"), ("done", 16000, MODEL_SR)),
    "beyond_full_scale_float": (lambda d: bad.float_wav_loud(d / "loud.wav"), ("done", 16000, MODEL_SR)),
    "eight_channels": (lambda d: bad.wav(d / "8ch.wav", 0.5, 48000, channels=8), ("done", 24000, 48000)),
    "8_khz": (lambda d: bad.wav(d / "8k.wav", 0.5, 8000), ("done", 4000, 8000)),
    "192_khz": (lambda d: bad.wav(d / "192k.wav", 0.5, 192000, channels=2, subtype="PCM_24"), ("done", 96000, 192000)),
    "pcm_u8": (lambda d: bad.wav(d / "u8.wav", 0.5, 22050, subtype="PCM_U8"), ("done", 11025, 22050)),
    "float32": (lambda d: bad.wav(d / "f32.wav", 0.5, 44100, channels=2, subtype="FLOAT"), ("done", 22050, 44100)),
    # containers FFmpeg reads (PyAV), sound and damaged
    "aac_m4a": (lambda d: bad.m4a(d / "song.m4a", 0.5, 44100), ("done", 22050, 44100)),
    "cut_m4a": (lambda d: bad.cut_m4a(d / "cut.m4a"), ("error", "invalid_audio", ["cut.m4a"])),
    "zeroed_header_m4a": (lambda d: bad.zeroed_m4a(d / "zeroed.m4a"), ("error", "invalid_audio", ["zeroed.m4a"])),
    "random_bytes_m4a": (lambda d: bad.random_bytes(d / "noise.m4a"), ("error", "invalid_audio", ["noise.m4a"])),
    "silent_video": (lambda d: bad.silent_video(d / "silent.mp4"), ("error", "invalid_audio", ["silent.mp4", "no audio"])),
}


@pytest.mark.parametrize("case", list(AUDIO_CASES))
def test_audio_input(worker, tmp_path, case):
    maker, outcome = AUDIO_CASES[case]
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    inp = maker(tmp_path / "in")
    out = tmp_path / "out" / "result.wav"
    if outcome[0] == "error":
        _, code, words = outcome
        expect_error(worker, separate_cmd(inp, out), code, *words)
        assert list((tmp_path / "out").iterdir()) == []
    else:
        _, frames, sr = outcome
        reply = expect_done(worker, separate_cmd(inp, out, text="a dog barking"))
        check_output(out, expected_frames(frames, sr))
        no_nonfinite_written(reply)
    assert leftovers(tmp_path / "in") == []


def test_nonfinite_input_is_reported_and_output_is_finite_as_float(worker, tmp_path):
    # FLOAT output keeps whatever the model produced (no clipping), so it shows raw finiteness.
    inp = bad.float_wav_with_nonfinite(tmp_path / "nan.wav")
    out = tmp_path / "o.wav"
    reply = expect_done(worker, separate_cmd(inp, out, output_subtype="FLOAT"))
    assert any("non-finite" in w or "NaN" in w for w in reply.get("warnings", [])), reply
    no_nonfinite_written(reply)
    y = check_output(out, expected_frames(16000, MODEL_SR), subtype="FLOAT")
    assert np.abs(y).max() > 0  # the tone around the bad samples survived: not zeroed wholesale


def test_loud_float_input_gives_finite_float_output(worker, tmp_path):
    inp = bad.float_wav_loud(tmp_path / "loud.wav")
    out = tmp_path / "o.wav"
    reply = expect_done(worker, separate_cmd(inp, out, output_subtype="FLOAT", output_sr="input"))
    no_nonfinite_written(reply)
    check_output(out, 16000, sr=MODEL_SR, subtype="FLOAT")


@pytest.mark.skipif(not POSIX, reason="POSIX permission bits")
def test_input_without_read_permission(worker, tmp_path):
    if not worker.perms:
        pytest.skip("running as root and the worker could not drop CAP_DAC_OVERRIDE: permission bits do not apply")
    inp = bad.wav(tmp_path / "secret.wav", 0.25)
    os.chmod(inp, 0)
    (tmp_path / "out").mkdir()
    expect_error(worker, separate_cmd(inp, tmp_path / "out" / "o.wav"), "permission_denied", str(inp))
    assert list((tmp_path / "out").iterdir()) == []


# ============================================================================================
# 2. text

TEXT_CASES = {
    "empty": ("", ("error", "invalid_text")),
    "whitespace": (" \t\n\r\u3000 ", ("error", "invalid_text")),
    "ten_thousand_chars": (("a dog barking near a busy road, " * 400)[:10_000], ("done",)),
    "unicode_emoji_rtl": ("🐕‍🦺 كلب ينبح \u202eevil\u202c собака 犬の鳴き声 e\u0301\u0301 \U0001F3B9", ("done",)),
    "control_chars": ("bird\u0000song\u0007\u001b[31m\b\x7f\u0085\u2028\ufeff end", ("done",)),
    "null_means_speech": (None, ("done",)),
    "list": (["a", "dog"], ("error", "invalid_field")),
    "object": ({"text": "dog"}, ("error", "invalid_field")),
    "boolean": (True, ("error", "invalid_field")),
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_text_query(worker, short_input, tmp_path, case):
    text, outcome = TEXT_CASES[case]
    out = tmp_path / "o.wav"
    cmd = separate_cmd(short_input, out, text=text)
    if outcome[0] == "error":
        reply = expect_error(worker, cmd, outcome[1])
        if outcome[1] == "invalid_field":
            assert "text" in reply["message"]
        assert list(tmp_path.iterdir()) == []
    else:
        expect_done(worker, cmd)
        check_output(out, expected_frames(8000, MODEL_SR))


def test_lone_surrogate_in_text(worker, short_input, tmp_path):
    # Valid JSON ("\ud800" escape) that is not valid Unicode: Python accepts it, a tokenizer cannot.
    out = tmp_path / "o.wav"
    rid = new_id("surrogate")
    line = json.dumps(separate_cmd(short_input, out, id=rid))[:-1] + ', "text": "dog \\ud800 bark"}'
    worker.send(line)
    reply, _ = worker.read_reply(JOB_TIMEOUT)
    assert reply["id"] == rid and reply["status"] == "error" and reply["code"] == "invalid_text", reply
    confirm_alive(worker)
    assert list(tmp_path.iterdir()) == []


# ============================================================================================
# 3. output


def test_output_folder_missing(worker, short_input, tmp_path):
    folder = tmp_path / "no" / "such"
    expect_error(worker, separate_cmd(short_input, folder / "o.wav"), "output_error", str(folder), "does not exist")
    assert not (tmp_path / "no").exists()


@pytest.mark.skipif(not POSIX, reason="POSIX permission bits")
def test_output_folder_without_write_permission(worker, short_input, tmp_path):
    if not worker.perms:
        pytest.skip("running as root and the worker could not drop CAP_DAC_OVERRIDE: permission bits do not apply")
    ro = tmp_path / "readonly"
    ro.mkdir()
    (ro / "keep.txt").write_text("untouched")
    os.chmod(ro, 0o555)
    try:
        expect_error(worker, separate_cmd(short_input, ro / "o.wav"), "permission_denied", str(ro))
        assert sorted(p.name for p in ro.iterdir()) == ["keep.txt"]
    finally:
        os.chmod(ro, 0o755)


def _same_file_spellings(d: Path, inp: Path) -> dict[str, str]:
    (d / "x").mkdir()
    spellings = {
        "dot_dotdot": f"{d}/./x/../{inp.name}",
        "missing_dir_dotdot": f"{d}/./nowhere/../{inp.name}",
        "double_slash": f"{d}//{inp.name}",
    }
    if hasattr(os, "symlink"):
        os.symlink(inp, d / "link.wav")
        spellings["symlink"] = str(d / "link.wav")
    if hasattr(os, "link"):
        os.link(inp, d / "hard.wav")
        spellings["hard_link"] = str(d / "hard.wav")
    return spellings


def test_output_is_the_input_under_other_spellings(worker, tmp_path):
    inp = bad.wav(tmp_path / "in.wav", 0.25)
    original = inp.read_bytes()
    for name, spelling in _same_file_spellings(tmp_path, inp).items():
        reply = expect_error(worker, separate_cmd(inp, spelling), "output_error")
        assert "input" in reply["message"], (name, reply)
        assert inp.read_bytes() == original, name
    assert leftovers(tmp_path) == []


def test_existing_output_is_replaced_whole(worker, tmp_path):
    """The old file is swapped for the complete new one in one step: a watcher that stats the
    path throughout the job sees only the old file or the final one, never a missing, empty or
    growing file, and the path ends up on a new inode (a rename, not an in-place rewrite)."""
    inp = bad.wav(tmp_path / "in.wav", 1.0)
    out = tmp_path / "out.wav"
    bad.write_audio(out, bad.noise(4410, 2), OUT_SR)
    old = os.stat(out)
    seen: set[tuple[int, int] | str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                st = os.stat(out)
                seen.add((st.st_ino, st.st_size))
            except FileNotFoundError:
                seen.add("missing")
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        expect_done(worker, separate_cmd(inp, out))
    finally:
        stop.set()
        watcher.join(10)
    new = os.stat(out)
    assert new.st_ino != old.st_ino
    assert seen <= {(old.st_ino, old.st_size), (new.st_ino, new.st_size)}, seen
    check_output(out, expected_frames(MODEL_SR, MODEL_SR))


@pytest.mark.parametrize("name", ["o.xyz", "o", "o.wma", "o.wav.txt"])
def test_unknown_output_extension(worker, short_input, tmp_path, name):
    expect_error(worker, separate_cmd(short_input, tmp_path / name), "invalid_field", name)
    assert list(tmp_path.iterdir()) == []


# EFBIG from a size limit is as right reported as "disk full" as it is as a plain write failure.
DISK_FULL_CODES = ("disk_full", "output_error")


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_disk_full_simulated_by_file_size_limit(demo, tmp_path):
    # 32 kB per file: the 0.5 s output (~88 kB) cannot be written, a 0.1 s one (~18 kB) can.
    limit = 32 * 1024
    client = WorkerClient(launch_argv(fsize=limit))
    try:
        client.wait_ready()
        load(client, demo)
        inp = bad.wav(tmp_path / "in.wav", 0.5)
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        out = out_dir / "big.wav"
        reply = expect_error(client, separate_cmd(inp, out), DISK_FULL_CODES, str(out))
        assert not out.exists() and list(out_dir.iterdir()) == [], reply
        # A file already at the path survives a failed overwrite, byte for byte.
        previous = out_dir / "previous.wav"
        previous.write_bytes(b"the user's earlier result")
        expect_error(client, separate_cmd(inp, previous), DISK_FULL_CODES, str(previous))
        assert previous.read_bytes() == b"the user's earlier result"
        assert sorted(p.name for p in out_dir.iterdir()) == ["previous.wav"]
        # Not damaged: a job whose output fits still works.
        small = bad.wav(tmp_path / "small.wav", 0.1)
        expect_done(client, separate_cmd(small, out_dir / "small.wav"))
        check_output(out_dir / "small.wav", expected_frames(3200, MODEL_SR))
        client.assert_all_json()
    finally:
        client.kill()


# ============================================================================================
# 4. models: every failed load leaves the previous model in place and usable


@pytest.fixture(scope="module")
def broken_models(demo, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("broken-models")
    files = {
        "truncated": bad.truncated_copy(demo["checkpoint_path"], d / "truncated.ckpt"),
        "clap_like": bad.clap_like_checkpoint(d / "clap_like.ckpt"),
        "wrong_shape": bad.wrong_shape_checkpoint(d / "wrong_shape.ckpt"),
        "malicious": bad.malicious_checkpoint(d / "malicious.ckpt", d / "PWNED_marker"),
        "malformed_yaml": bad.malformed_yaml(d / "malformed.yaml"),
        "yaml_list": bad.yaml_without_model_section(d / "list.yaml"),
    }
    files["marker"] = d / "PWNED_marker"
    return files


def test_malicious_payload_is_live(tmp_path):
    """Control for the unsafe-checkpoint case: the same payload, loaded without weights_only,
    really does create its marker - so the marker's absence below means the worker refused it."""
    torch = pytest.importorskip("torch")
    marker = tmp_path / "control_marker"
    control = bad.malicious_checkpoint(tmp_path / "control.ckpt", marker)
    torch.load(str(control), weights_only=False)
    assert marker.exists()


MODEL_CASES = {
    "missing_checkpoint": (lambda b, d: {"checkpoint_path": str(Path(d["checkpoint_path"]).parent / "gone.ckpt")},
                           "file_not_found", ["gone.ckpt"]),
    "truncated_checkpoint": (lambda b, d: {"checkpoint_path": str(b["truncated"])}, "invalid_checkpoint",
                             ["truncated.ckpt"]),
    "clap_as_checkpoint": (lambda b, d: {"checkpoint_path": str(b["clap_like"])}, "invalid_checkpoint",
                           ["clap_like.ckpt", "CLAP"]),
    "wrong_shape": (lambda b, d: {"checkpoint_path": str(b["wrong_shape"])}, "invalid_checkpoint",
                    ["wrong_shape.ckpt", "ss_model.base.bn0.weight", "(7,)", "(1025,)"]),
    "malicious_pickle": (lambda b, d: {"checkpoint_path": str(b["malicious"])}, "unsafe_checkpoint",
                         ["malicious.ckpt"]),
    "malformed_yaml": (lambda b, d: {"config_path": str(b["malformed_yaml"])}, "invalid_config", ["malformed.yaml"]),
    "yaml_without_model": (lambda b, d: {"config_path": str(b["yaml_list"])}, "invalid_config", ["list.yaml"]),
    "device_tpu": (lambda b, d: {"device": "tpu"}, "device_unavailable", ["tpu"]),
    "device_cuda_7": (lambda b, d: {"device": "cuda:7"}, "device_unavailable", ["cuda:7"]),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_failed_load_keeps_previous_model(worker, demo, broken_models, short_input, tmp_path, case):
    if case == "device_cuda_7":
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available() and torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    overrides, code, words = MODEL_CASES[case]
    before = worker.request({"cmd": "list_models"})
    expect_error(worker, load_cmd(demo, **overrides(broken_models, demo)), code, *words)
    if case == "malicious_pickle":
        assert not broken_models["marker"].exists(), "the checkpoint's pickle ran code"
    assert worker.request({"cmd": "list_models"}) == before
    status = worker.request({"cmd": "get_status"})
    assert status["model_loaded"] is True and status["checkpoint_path"] == demo["checkpoint_path"]
    out = tmp_path / "o.wav"
    expect_done(worker, separate_cmd(short_input, out))
    check_output(out, expected_frames(8000, MODEL_SR))


# ============================================================================================
# 5. process faults


def start_chunked_job(client: WorkerClient, demo: dict, tmp_path: Path, job_id: str) -> tuple[Path, Path]:
    """A job with several chunks, started and seen between 0 and 100 %."""
    load(client, demo)
    inp = bad.wav(tmp_path / "long.wav", 2.0)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "result.wav"
    client.send(separate_cmd(inp, out, id=job_id, progress=True, use_chunk=True, chunk_length=0.32))
    client.wait_for(lambda m: m.get("id") == job_id and m["status"] == "progress" and 0 < m["percent"] < 100,
                    timeout=JOB_TIMEOUT)
    return out_dir, out


@pytest.mark.skipif(not POSIX, reason="POSIX signals")
def test_sigint_mid_job(demo, tmp_path):
    client = WorkerClient(launch_argv())
    try:
        client.wait_ready()
        out_dir, out = start_chunked_job(client, demo, tmp_path, "int")
        client.proc.send_signal(signal.SIGINT)
        msg, _ = client.wait_status("shutdown", timeout=60)
        assert msg == {"status": "shutdown", "reason": "signal SIGINT"}
        after = client.drain(timeout=60)
        assert client.wait_exit(timeout=60) == 0
        # The job may still report its cancellation; it must never report success.
        assert all(m["status"] != "done" for m in client.messages)
        assert all(m.get("code") in (None, "cancelled") for m in after), after
        assert not out.exists() and list(out_dir.iterdir()) == []
        client.assert_all_json()
    finally:
        client.kill()


def test_stdin_closed_while_progress_job_runs(demo, tmp_path):
    client = WorkerClient(launch_argv())
    try:
        client.wait_ready()
        load(client, demo)
        inp = bad.wav(tmp_path / "in.wav", 1.0, channels=2)
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        out = out_dir / "o.wav"
        client.send(separate_cmd(inp, out, id="eof", progress=True))
        client.wait_for(lambda m: m.get("id") == "eof" and m["status"] == "progress")  # the job has started
        client.close_stdin()
        rest = client.drain(timeout=JOB_TIMEOUT)
        assert client.wait_exit(timeout=60) == 0
        assert rest[-1] == {"status": "shutdown", "reason": "stdin_closed"}, rest
        # End of stdin is not a cancel (the seed's contract): the running job finishes first.
        terminal = [m for m in rest if m["status"] not in NON_TERMINAL]
        assert len(terminal) == 1 and terminal[0]["id"] == "eof" and terminal[0]["status"] == "done", rest
        check_output(out, expected_frames(MODEL_SR, MODEL_SR))
        assert leftovers(out_dir) == []
        client.assert_all_json()
    finally:
        client.kill()


def _pipe_capacity(fd: int) -> int | None:
    try:
        import fcntl

        return fcntl.fcntl(fd, getattr(fcntl, "F_GETPIPE_SZ", 1032))
    except (ImportError, OSError):
        return None


def _pipe_pending(fd: int) -> int | None:
    try:
        import array
        import fcntl
        import termios

        buf = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, buf)
        return buf[0]
    except (ImportError, OSError):
        return None


class BlockedJob:
    """A raw worker (no reader thread) whose stdout pipe is full in the middle of a progress job.

    Each reply line is made ~40 % of the pipe's capacity through a long id (every line of a job
    echoes it): "separating" and the 0 % line fit, the next progress line - sent by the engine's
    callback after the first of two windows - cannot. Once the pipe holds more than those two
    lines, that third line has begun and the job thread is provably blocked writing it, mid-job,
    with its temporary output file open. Nothing here is timed except the generous deadlines.
    """

    def __init__(self, demo: dict, tmp_path: Path):
        self.client = WorkerClient(launch_argv(), reader=False, stderr=subprocess.DEVNULL)
        self.proc = self.client.proc
        # A deadlock must fail the test, not hang it.
        self.watchdog = threading.Timer(JOB_TIMEOUT, self.proc.kill)
        self.watchdog.start()
        self.fd = self.proc.stdout.fileno()
        capacity = _pipe_capacity(self.fd) or 65536
        while self.read_json()["status"] != "ready":
            pass
        self.send(load_cmd(demo))
        while (m := self.read_json())["status"] != "model_loaded":
            assert m["status"] in NON_TERMINAL, m
        # Two windows (chunks of 1.28 s plus 0.64 s of context need more than 1.92 s): the
        # cheapest job with a progress line strictly between 0 and 100 %.
        self.seconds = 2.3
        inp = bad.wav(tmp_path / "in.wav", self.seconds)
        self.out_dir = tmp_path / "out"
        self.out_dir.mkdir()
        self.out = self.out_dir / "o.wav"
        self.job_id = "bp-" + "x" * int(capacity * 0.4)
        self.send(separate_cmd(inp, self.out, id=self.job_id, progress=True, use_chunk=True, chunk_length=1.28))
        self.send({"cmd": "ping", "id": "after"})  # the reader thread takes it even now
        two_lines = 2 * (len(self.job_id) + 400)  # "separating" + the 0 % line, generously
        deadline = time.monotonic() + JOB_TIMEOUT
        while (_pipe_pending(self.fd) or 0) <= two_lines:
            assert self.proc.poll() is None, "worker died while its stdout was full"
            assert time.monotonic() < deadline, f"pipe never filled ({_pipe_pending(self.fd)} of {capacity} bytes)"
            time.sleep(0.05)

    def read_json(self) -> dict:
        raw = self.proc.stdout.readline()
        assert raw, f"worker closed stdout (rc={self.proc.poll()})"
        return json.loads(raw)

    def send(self, obj: dict) -> None:
        self.client.send(obj)

    def close(self) -> None:
        self.watchdog.cancel()
        self.client.kill()


linux_pipes = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="measures the pipe with Linux fcntl/ioctl")


@linux_pipes
def test_parent_not_reading_during_progress_job(demo, tmp_path):
    """The parent stops reading mid-job; when it reads again, every line arrives whole and in
    order, the job has completed and the worker goes on serving."""
    job = BlockedJob(demo, tmp_path)
    try:
        time.sleep(1.0)  # stay away a while longer; the worker must simply wait
        assert not job.out.exists()  # still blocked before its end
        lines = []
        while True:
            lines.append(job.read_json())
            if lines[-1].get("id") == "after":
                break
        statuses = [m["status"] for m in lines]
        assert statuses[0] == "separating" and statuses[-2:] == ["done", "pong"], statuses
        assert all(m["id"] == job.job_id for m in lines[:-1])
        percents = [m["percent"] for m in lines if m["status"] == "progress"]
        assert len(percents) >= 3 and percents[0] == 0 and percents[-1] == 100 and percents == sorted(percents)
        check_output(job.out, expected_frames(int(job.seconds * MODEL_SR), MODEL_SR))
        job.proc.stdin.close()
        assert job.read_json() == {"status": "shutdown", "reason": "stdin_closed"}
        assert job.proc.wait(timeout=60) == 0
    finally:
        job.close()


@linux_pipes
def test_sigterm_while_stdout_is_full_mid_job(demo, tmp_path):
    """SIGTERM while the job thread is stuck writing to a full pipe: the worker cannot say
    "shutdown" (the pipe is full) but must still end, exit 0 and remove its temporary output."""
    job = BlockedJob(demo, tmp_path)
    try:
        partial = leftovers(job.out_dir)
        assert len(partial) == 1, partial  # the temporary file is open while the job is blocked
        job.proc.send_signal(signal.SIGTERM)
        assert job.proc.wait(timeout=60) == 0
        assert not job.out.exists() and list(job.out_dir.iterdir()) == []
        # What the parent finds afterwards: the two lines that fitted, whole, then the start of
        # the third, cut off without its newline (the process ended while writing it).
        data = job.proc.stdout.read()
        *whole, tail = data.split(b"\n")
        assert [json.loads(raw)["status"] for raw in whole] == ["separating", "progress"]
        assert tail and job.job_id[:100].encode() in tail
    finally:
        job.close()


# ============================================================================================
# the module's worker, after hostile inputs of every kind, still does a normal job


def test_worker_still_separates_after_hostile_inputs(worker, demo, broken_models, tmp_path):
    """Independent of test order: this test itself first feeds the module's worker one hostile
    input of each kind (audio, text, output, model file, protocol), then runs a normal job."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    short = bad.wav(tmp_path / "in" / "short.wav", 0.25)
    expect_error(worker, separate_cmd(bad.truncated_wav(tmp_path / "in" / "cut.wav"), tmp_path / "out" / "a.wav"),
                 "invalid_audio", "cut.wav")
    expect_error(worker, separate_cmd(short, tmp_path / "out" / "b.wav", text={"text": "dog"}), "invalid_field")
    expect_error(worker, separate_cmd(short, tmp_path / "missing" / "c.wav"), "output_error", "does not exist")
    expect_error(worker, load_cmd(demo, checkpoint_path=str(broken_models["truncated"])), "invalid_checkpoint")
    worker.send(b"{\"cmd\": \"separate\", \"input\": ")  # a line cut in the middle
    reply, _ = worker.read_reply(JOB_TIMEOUT)
    assert reply["code"] == "invalid_json", reply
    confirm_alive(worker)
    assert list((tmp_path / "out").iterdir()) == []

    inp = bad.wav(tmp_path / "final.wav", 1.0, 44100, channels=2)
    out = tmp_path / "final_out.flac"
    started = time.monotonic()
    reply = expect_done(worker, separate_cmd(inp, out, text="guitar", output_subtype="PCM_24", progress=True))
    wall = time.monotonic() - started
    # elapsed is the job's own time: positive, and no more than the client waited for the reply
    assert 0 < reply["elapsed"] <= wall, (reply["elapsed"], wall)
    check_output(out, 44100, subtype="PCM_24")
    worker.assert_all_json()
    assert worker.alive()
