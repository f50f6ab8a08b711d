"""Property-based fuzzing of one running worker over real pipes.

Hypothesis generates batches of lines (random bytes, truncated JSON, JSON values that are not
objects, objects with known command names and known field names holding values of any type) and
sends each batch to the same long-running worker, followed by a ``ping`` used as a barrier.
Properties checked for every batch:
- every non-blank line got exactly one terminal reply and a blank one none, as in the seed
  (counted up to the barrier; ids checked where given);
- no reply is an ``internal_error`` (every bad input has a specific, stable code);
- every stdout line is a JSON object; the worker is alive at the end.

Quick profile by default (a few thousand lines); ``-m slow`` runs a much larger one.
"""
from __future__ import annotations

import itertools
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker_client import NON_TERMINAL, WorkerClient, clean_env, worker_argv

COMMANDS = ["load_model", "separate", "embed", "get_status", "ping", "list_models", "unload_model", "clear_cache", "cancel"]
FIELDS = [
    "checkpoint_path", "config_path", "clap_checkpoint_path", "roberta_dir", "model_dir", "device", "mmap",
    "use_torch_stft", "auto_stft_seconds", "chunk_seconds", "chunk_length", "context_seconds", "precision", "trust_checkpoint",
    "input", "output", "text", "use_chunk", "output_sr", "output_subtype", "output_channels", "mode",
    "residual_output", "target", "progress", "id", "output_bitrate",
    "query_audio", "query_start", "query_end", "query_weight", "query_embedding", "load_audio_branch",
]
# Values a client might plausibly send for those fields, plus junk of every JSON type.
PLAUSIBLE = st.sampled_from(
    [True, False, "auto", "AUTO", "input", "cpu", "cuda", "mps", "cuda:9", "fp32", "bf16", "fp64", "PCM_16", "FLOAT",
     "MP3", "192k", 512, "stereo", "in.m4a", "out.mp3", "out.opus", "out.m4a", "extract", "remove", "", " ", ".", "..", "/", "/nonexistent/x.ckpt", "config/audiosep_base.yaml",
     "README.md", 0, -1, 1, 44100, 1e300, -0.0, 0.5, "60", "\u0000", "\ud800", "é", "\n", None]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
FIELD_VALUES = PLAUSIBLE | JSON_VALUES
CMD_NAMES = st.sampled_from(COMMANDS) | st.text(max_size=12).filter(lambda s: s != "exit")


@st.composite
def command_objects(draw):
    obj = {"cmd": draw(CMD_NAMES)}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True)):
        obj[name] = draw(FIELD_VALUES)
    if draw(st.booleans()):
        obj["id"] = TRACKED  # replaced by a unique id when the line is rendered
    return obj


TRACKED = "<tracked-id>"

# Files in the fuzz worker's working directory (relative paths fall back to it), so that
# near-valid commands get past validation into the loader's own checks.
FUZZ_FILES = {"garbage.ckpt": b"not a checkpoint" * 64, "empty.ckpt": b"", "text.txt": b"hello",
              "trunc.ckpt": b"PK\x03\x04" + b"\x00" * 100, "notaudio.wav": b"RIFF\x00\x00",
              # damaged containers that go to FFmpeg (PyAV): an MP4 box header with nothing after it,
              # a Matroska signature cut short, random bytes under audio and video names
              "cut.m4a": b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00M4A isomiso2\x00\x00\x00\x08free\x00\x00",
              "cut.webm": b"\x1aE\xdf\xa3\x9fB\x86\x81\x01B\xf7\x81\x01B\xf2\x81\x04",
              "random.m4a": bytes(range(256)) * 16, "random.mkv": bytes(reversed(range(256))) * 16}
PATHS = st.sampled_from(sorted(FUZZ_FILES) + ["adir", "nope.ckpt", "missing_dir/x.wav", "out.wav", "out.mp3",
                                              "out.m4a", "out.opus"])


@st.composite
def near_valid(draw):
    """A command that passes most validation: real command, plausible paths, few odd fields."""
    cmd = draw(st.sampled_from(["load_model", "separate"]))
    if cmd == "load_model":
        obj = {"cmd": cmd, draw(st.sampled_from(["checkpoint_path", "model_dir"])): draw(PATHS)}
    else:
        obj = {"cmd": cmd, "input": draw(PATHS), "output": draw(PATHS)}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True)):
        if name not in ("input", "output", "checkpoint_path", "model_dir", "id"):
            obj[name] = draw(PLAUSIBLE)
    obj["id"] = TRACKED
    return obj


@st.composite
def lines(draw):
    """A line to send, as ("bytes", raw) or (kind, object, parameter): ids are filled in at send
    time, so generation never depends on state outside Hypothesis."""
    kind = draw(st.sampled_from(["bytes", "value", "object", "object", "object", "truncated", "wrong_cmd", "near"]))
    if kind == "near":
        return ("object", draw(near_valid()), True)
    if kind == "bytes":
        return ("bytes", draw(st.binary(max_size=120)), None)
    if kind == "value":
        return ("value", draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict))), draw(st.booleans()))
    if kind == "truncated":
        return ("truncated", draw(command_objects()), draw(st.floats(0, 1)))
    if kind == "wrong_cmd":
        return ("object", {"cmd": draw(JSON_VALUES.filter(lambda v: not isinstance(v, str))), "id": TRACKED}, True)
    return ("object", draw(command_objects()), draw(st.booleans()))


_ids = itertools.count()


def encode(obj, ascii_only: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def render(item) -> tuple[bytes, str | None]:
    """The bytes of one line (no newline inside) and the tracked id it carries, if any."""
    kind, payload, param = item
    tracked = None
    if kind == "bytes":
        raw = payload
    elif kind == "value":
        raw = encode(payload, param)
    else:
        obj = dict(payload)
        if obj.get("id") == TRACKED:
            tracked = f"fz-{next(_ids)}"
            obj["id"] = tracked
        full = encode(obj, kind == "truncated" or param)
        if kind == "truncated":
            raw = full[: int(param * (len(full) - 1))]
            tracked = None  # a cut line is not JSON: no id can come back
        else:
            raw = full
    raw = raw.replace(b"\n", b" ")  # one item is one line
    if tracked is not None:
        try:  # an id only comes back from a line the worker can parse (strict UTF-8)
            json.loads(raw.decode("utf-8"))
        except ValueError:
            tracked = None
    return raw, tracked


@pytest.fixture(scope="module")
def fuzz_worker(tmp_path_factory):
    # Its own working directory: nothing a fuzzed relative path names can touch the checkout.
    cwd = tmp_path_factory.mktemp("fuzz-cwd")
    for name, data in FUZZ_FILES.items():
        (cwd / name).write_bytes(data)
    (cwd / "adir").mkdir()
    client = WorkerClient(worker_argv(), env=clean_env(), cwd=cwd)
    client.wait_ready()
    yield client
    try:
        reply = client.request({"cmd": "ping", "id": "final"})
        assert reply["status"] == "pong" and client.alive()
        client.assert_all_json()
    finally:
        client.kill()


_sync = itertools.count()


def is_blank(raw: bytes) -> bool:
    """The seed skips a line that str.strip() empties (after a byte-order mark), without a reply."""
    try:
        return not raw.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError:
        return False


def check_batch(client: WorkerClient, items: list) -> None:
    rendered = [render(item) for item in items]
    batch = [raw for raw, _ in rendered]
    expected_ids = [tracked for _, tracked in rendered if tracked is not None]
    barrier = f"sync-{next(_sync)}"
    client.send_bytes(b"".join(line + b"\n" for line in batch) + json.dumps({"cmd": "ping", "id": barrier}).encode() + b"\n")
    replies = []
    while True:
        msg, _ = client.read_reply(timeout=120)
        if msg.get("id") == barrier:
            assert msg["status"] == "pong", msg
            break
        replies.append(msg)
    assert len(replies) == sum(not is_blank(raw) for raw in batch), (batch, replies)
    for msg in replies:
        assert msg["status"] not in NON_TERMINAL
        if msg["status"] == "error":
            assert isinstance(msg.get("code"), str) and isinstance(msg.get("message"), str), msg
            assert msg["code"] != "internal_error", (msg, batch)
    got_ids = [m["id"] for m in replies if isinstance(m.get("id"), str) and m["id"].startswith("fz-")]
    assert sorted(got_ids) == sorted(expected_ids), (batch, replies)


QUICK = settings(max_examples=int(os.environ.get("DSU_FUZZ_EXAMPLES", "250")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)
LARGE = settings(max_examples=3000, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)


@QUICK
@given(batch=st.lists(lines(), min_size=1, max_size=20))
def test_every_nonblank_line_gets_exactly_one_reply(fuzz_worker, batch):
    check_batch(fuzz_worker, batch)


@pytest.mark.slow
@LARGE
@given(batch=st.lists(lines(), min_size=1, max_size=40))
def test_every_nonblank_line_gets_exactly_one_reply_large(fuzz_worker, batch):
    check_batch(fuzz_worker, batch)
