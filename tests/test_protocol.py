"""Unit tests of the worker's pure parts: line parsing and validation, replies, settings
precedence, path resolution, the model cache, progress throttling, and the command handlers
driven in-process with a fake engine (no torch, no files of real weights)."""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import types
import weakref
from pathlib import Path

import pytest

from dsu_audiosep import errors
from dsu_audiosep.errors import AudioSepError
from dsu_audiosep.engine.torch_engine import JobOutcome, TorchEngine
from dsu_audiosep.worker import jobs, loop, policy
from dsu_audiosep.worker import protocol as P
from dsu_audiosep.worker.cache import CacheEntry, ModelCache, ModelKey, file_fingerprint

# ============================================================================================
# parsing


def parse(obj) -> P.Command:
    return P.parse_line(json.dumps(obj).encode())


def parse_error(raw) -> P.RequestError:
    if not isinstance(raw, (bytes, P.OversizedLine)):
        raw = json.dumps(raw).encode()
    with pytest.raises(P.RequestError) as info:
        P.parse_line(raw)
    return info.value


@pytest.mark.parametrize("cmd", ["ping", "get_status", "list_models", "unload_model", "clear_cache", "exit"])
def test_simple_commands_parse(cmd):
    command = parse({"cmd": cmd})
    assert command.cmd == cmd
    assert not command.has_id
    assert command.id is P.NO_ID


@pytest.mark.parametrize("request_id", [None, 0, 7, "job-1", [1, 2], {"a": [None]}, 1.5, True, ""])
def test_any_json_id_is_kept(request_id):
    command = parse({"cmd": "ping", "id": request_id})
    assert command.has_id
    assert command.id == request_id and type(command.id) is type(request_id)


def test_load_model_fields():
    command = parse(
        {
            "cmd": "load_model",
            "checkpoint_path": "a.ckpt",
            "config_path": "c.yaml",
            "clap_checkpoint_path": None,  # null == not given
            "roberta_dir": "rb",
            "device": " cpu ",
            "mmap": True,
            "use_torch_stft": "AUTO",
            "auto_stft_seconds": 12,
            "chunk_seconds": 3.5,
            "chunk_length": 2,
            "precision": "BF16",
            "future_field": {"ignored": True},
        }
    )
    args = command.args
    assert isinstance(args, P.LoadModelArgs)
    assert args.checkpoint_path == "a.ckpt" and args.config_path == "c.yaml"
    assert args.clap_checkpoint_path is None and args.roberta_dir == "rb"
    assert args.device == "cpu" and args.mmap is True
    assert args.use_torch_stft == "auto"
    assert args.auto_stft_seconds == 12.0 and args.chunk_seconds == 3.5 and args.chunk_length == 2.0
    assert args.precision == "bf16"


def test_load_model_without_paths_parses():
    # The worker (not the parser) decides: default checkpoint beside the executable, else error.
    args = parse({"cmd": "load_model"}).args
    assert args == P.LoadModelArgs()


def test_separate_fields_and_defaults():
    args = parse({"cmd": "separate", "input": "in.wav", "output": "out.wav"}).args
    assert isinstance(args, P.SeparateArgs)
    assert args.text is None  # not given ...
    assert P.query_of(args).text == "speech"  # ... so the query is the original worker's default
    assert args.use_chunk is None and args.output_sr is None and args.mode is None

    args = parse(
        {
            "cmd": "separate",
            "input": "in.wav",
            "output": "out.flac",
            "text": "",
            "use_chunk": "auto",
            "output_sr": 48000.0,
            "output_subtype": "pcm_24",
            "output_channels": "INPUT",
            "mode": "Remove",
            "residual_output": "rest.wav",
            "use_torch_stft": False,
        }
    ).args
    assert args.text == ""
    assert args.use_chunk == "auto"
    assert args.output_sr == 48000 and isinstance(args.output_sr, int)
    assert args.output_subtype == "PCM_24" and args.output_channels == "input" and args.mode == "remove"
    assert args.residual_output == "rest.wav" and args.use_torch_stft is False
    assert parse({"cmd": "separate", "input": "a", "output": "b", "output_sr": "input"}).args.output_sr == "input"


def test_progress_flag():
    assert parse({"cmd": "ping", "progress": True}).progress is True
    assert parse({"cmd": "ping"}).progress is False


def test_cancel_needs_target():
    assert parse({"cmd": "cancel", "target": "j1"}).args == P.CancelArgs(target="j1")
    assert parse({"cmd": "cancel", "target": None}).args == P.CancelArgs(target=None)
    err = parse_error({"cmd": "cancel", "id": 3})
    assert err.code == errors.MISSING_FIELD and err.request_id == 3


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"{",
        b'{"cmd": "ping"',
        b"\xff\xfe\x00garbage",
        b'{"cmd": "ping", "text": "\xc3\x28"}',  # invalid UTF-8 inside a string
        b"",
        b"   \t ",
        b"\r",
        b"NaN",
        b'{"cmd": "ping", "x": NaN}',
        b'{"cmd": "ping", "x": -Infinity}',
        b"[" * 200_000,  # deeper than the parser's recursion limit
        b'{"cmd":"ping","n":' + b"9" * 5000 + b"}",  # beyond Python's int digit limit
        b"\x00\x01\x02",
        b'{"cmd":"ping"} {"cmd":"ping"}',  # two objects on one line
    ],
)
def test_invalid_json(raw):
    err = parse_error(raw)
    assert err.code == errors.INVALID_JSON
    assert err.message and err.request_id is P.NO_ID


def test_oversized_line_marker():
    err = parse_error(P.OversizedLine(20_000_000))
    assert err.code == errors.INVALID_JSON and "too long" in err.message


@pytest.mark.parametrize("raw,blank", [(b"", True), (b"   \t ", True), (b"\r", True), (b"\xef\xbb\xbf  ", True),
                                       (" \u3000\xa0".encode(), True), (b"\xff", False), (b"x", False),
                                       (b'{"cmd":"ping"}', False)])
def test_blank_lines_are_recognised(raw, blank):
    # The worker skips these without a reply (the seed's contract); parse_line still rejects them.
    assert P.is_blank_line(raw) is blank
    assert P.is_blank_line(P.OversizedLine(10)) is False


def test_bom_and_whitespace_are_tolerated():
    assert P.parse_line(b'\xef\xbb\xbf{"cmd":"ping"}\r').cmd == "ping"
    assert P.parse_line(b'   {"cmd":"ping"}   ').cmd == "ping"


@pytest.mark.parametrize("value", [[], [{"cmd": "ping"}], 1, "ping", None, True, 2.5])
def test_not_an_object(value):
    assert parse_error(value).code == errors.INVALID_COMMAND


@pytest.mark.parametrize(
    "obj", [{}, {"id": 1}, {"cmd": None, "id": 1}, {"cmd": 5, "id": 1}, {"cmd": ["ping"], "id": 1}]
)
def test_missing_or_bad_cmd(obj):
    err = parse_error(obj)
    assert err.code == errors.INVALID_COMMAND
    if "id" in obj:
        assert err.request_id == 1


@pytest.mark.parametrize("cmd", ["PING", "separate_all", "", "load-model", "x" * 1000])
def test_unknown_command(cmd):
    err = parse_error({"cmd": cmd, "id": "u"})
    assert err.code == errors.UNKNOWN_COMMAND and err.request_id == "u"
    assert err.message.startswith("Unknown command: " + cmd[:60])
    assert len(err.message) < 500


def test_id_that_cannot_be_echoed():
    err = parse_error(b'{"cmd": "ping", "id": 1e999}')  # parses as infinity
    assert err.code == errors.INVALID_FIELD


WRONG_TYPES = [
    ("load_model", "checkpoint_path", 5),
    ("load_model", "checkpoint_path", ""),
    ("load_model", "checkpoint_path", "   "),
    ("load_model", "checkpoint_path", ["a"]),
    ("load_model", "checkpoint_path", "a\u0000b"),
    ("load_model", "config_path", True),
    ("load_model", "clap_checkpoint_path", {"p": 1}),
    ("load_model", "roberta_dir", 1.5),
    ("load_model", "model_dir", False),
    ("load_model", "device", 0),
    ("load_model", "device", ""),
    ("load_model", "mmap", "true"),
    ("load_model", "mmap", 1),
    ("load_model", "use_torch_stft", "yes"),
    ("load_model", "use_torch_stft", 1),
    ("load_model", "auto_stft_seconds", "60"),
    ("load_model", "auto_stft_seconds", 0),
    ("load_model", "auto_stft_seconds", -1),
    ("load_model", "auto_stft_seconds", True),
    ("load_model", "chunk_seconds", -0.5),
    ("load_model", "chunk_length", [1]),
    ("load_model", "precision", "fp64"),
    ("load_model", "precision", 32),
    ("load_model", "progress", "yes"),
    ("separate", "input", 3),
    ("separate", "output", ""),
    ("separate", "text", 5),
    ("separate", "text", ["speech"]),
    ("separate", "use_chunk", "always"),
    ("separate", "use_chunk", 0),
    ("separate", "chunk_seconds", "30"),
    ("separate", "chunk_length", 0),
    ("separate", "output_sr", 0),
    ("separate", "output_sr", -44100),
    ("separate", "output_sr", 44100.5),
    ("separate", "output_sr", "44100"),
    ("separate", "output_sr", True),
    ("separate", "output_sr", 10**12),
    ("separate", "output_subtype", "MP3"),
    ("separate", "output_channels", 2),
    ("separate", "mode", "isolate"),
    ("separate", "residual_output", 1),
    ("separate", "use_torch_stft", "false"),
    ("separate", "auto_stft_seconds", -3),
]


@pytest.mark.parametrize("cmd,field,value", WRONG_TYPES)
def test_wrong_field_types(cmd, field, value):
    obj = {"cmd": cmd, "id": 42}
    if cmd == "separate":
        obj.update(input="in.wav", output="out.wav")
    obj[field] = value
    err = parse_error(obj)
    assert err.code == errors.INVALID_FIELD, err.message
    assert err.request_id == 42
    assert field in err.message  # the message names the field


def test_non_finite_numbers_rejected():
    err = parse_error(b'{"cmd":"load_model","checkpoint_path":"a","auto_stft_seconds":1e999}')
    assert err.code == errors.INVALID_FIELD
    err = parse_error(b'{"cmd":"load_model","checkpoint_path":"a","chunk_seconds":' + b"1" * 400 + b"}")
    assert err.code == errors.INVALID_FIELD


def test_lone_surrogate_path_rejected():
    err = parse_error(b'{"cmd":"separate","input":"\\ud800.wav","output":"o.wav"}')
    assert err.code == errors.INVALID_FIELD


@pytest.mark.parametrize(
    "obj,missing",
    [
        ({"cmd": "separate"}, ["input", "output"]),
        ({"cmd": "separate", "input": "a.wav"}, ["output"]),
        ({"cmd": "separate", "output": "a.wav", "input": None}, ["input"]),
    ],
)
def test_missing_fields(obj, missing):
    err = parse_error(dict(obj, id="m"))
    assert err.code == errors.MISSING_FIELD and err.request_id == "m"
    for name in missing:
        assert name in err.message


# ============================================================================================
# replies


def test_encode_reply_is_one_ascii_line():
    data = P.encode_reply(P.reply("done", "ü-id", message="line1\nline2 \u2028 é \x00", files=["ö.wav"]))
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    data.decode("ascii")  # raises if anything non-ASCII got through
    back = json.loads(data)
    assert back["id"] == "ü-id" and back["files"] == ["ö.wav"] and "\n" in back["message"]


def test_encode_reply_never_emits_nan():
    data = P.encode_reply({"status": "done", "elapsed": float("nan"), "x": [float("inf")], "obj": object()})
    text = data.decode()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back["elapsed"] is None and back["x"] == [None] and isinstance(back["obj"], str)


def test_reply_id_only_when_given():
    assert "id" not in P.reply("pong")
    assert P.reply("pong", None)["id"] is None
    err = P.error_reply(errors.INVALID_JSON, "bad", 3)
    assert err == {"status": "error", "code": "invalid_json", "message": "bad", "id": 3}


def test_id_key_distinguishes_json_types():
    keys = {P.id_key(v) for v in [1, 1.0, True, "1", [1], {"a": 1}, None]}
    assert len(keys) == 7
    assert P.id_key({"b": 1, "a": 2}) == P.id_key({"a": 2, "b": 1})


# ============================================================================================
# line splitting


def collect(splitter, chunks):
    out = []
    for chunk in chunks:
        out.extend(splitter.feed(chunk))
    out.extend(splitter.finish())
    return out


def test_splitter_joins_chunks_and_keeps_last_line():
    lines = collect(P.LineSplitter(), [b'{"cmd":', b'"ping"}\n{"cmd"', b':"exit"}'])
    assert lines == [b'{"cmd":"ping"}', b'{"cmd":"exit"}']


def test_splitter_keeps_empty_lines_but_not_trailing_blank():
    assert collect(P.LineSplitter(), [b"a\n\n\r\nb\n"]) == [b"a", b"", b"\r", b"b"]
    assert collect(P.LineSplitter(), [b"a\n   "]) == [b"a"]


def test_splitter_drops_oversized_line_and_recovers():
    splitter = P.LineSplitter(max_line_bytes=10)
    lines = collect(splitter, [b"ok\n", b"x" * 7, b"y" * 7, b"z" * 30, b"\nnext\n", b"w" * 11])
    assert lines[0] == b"ok"
    assert isinstance(lines[1], P.OversizedLine) and lines[1].size == 44
    assert lines[2] == b"next"
    assert isinstance(lines[3], P.OversizedLine)


def test_splitter_line_at_exact_limit_passes():
    assert collect(P.LineSplitter(max_line_bytes=5), [b"12345\n123456\n"])[0] == b"12345"


# ============================================================================================
# settings


def write_policy(tmp_path: Path, data) -> Path:
    path = tmp_path / "runtime_policy.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def settings_for(tmp_path, policy_data=None, env=None, flags=None, warnings=None):
    env = dict(env or {})
    path = write_policy(tmp_path, policy_data) if policy_data is not None else tmp_path / "absent.json"
    env[policy.POLICY_ENV] = str(path)
    sink = warnings if warnings is not None else []
    return policy.resolve_settings(flags or {}, env=env, warn=sink.append)


def test_defaults(tmp_path):
    s = settings_for(tmp_path)
    assert (s.max_cached_models, s.use_torch_stft, s.auto_stft_seconds, s.mmap, s.chunk_seconds, s.device) == (
        1, False, 60.0, False, 30.0, "auto")
    assert s.precision == "fp32"
    assert set(s.sources.values()) == {"default"}


def test_default_precision_from_env_policy_or_flag(tmp_path):
    """A deployment can make the fast CUDA mode its default without changing the parent app."""
    s = settings_for(tmp_path, {"audiosep": {"precision": "TF32"}})
    assert s.precision == "tf32" and s.sources["precision"] == "policy"
    s = settings_for(tmp_path, {"audiosep": {"precision": "tf32"}}, env={"AUDIOSEP_PRECISION": "fp16"})
    assert s.precision == "fp16" and s.sources["precision"] == "env"
    s = settings_for(tmp_path, env={"AUDIOSEP_PRECISION": "fp16"}, flags={"precision": "bf16"})
    assert s.precision == "bf16"
    warnings: list[str] = []
    s = settings_for(tmp_path, env={"AUDIOSEP_PRECISION": "fp64"}, warnings=warnings)
    assert s.precision == "fp32" and any("precision" in w for w in warnings)


def test_policy_audiosep_section_beats_global(tmp_path):
    s = settings_for(
        tmp_path,
        {"global": {"max_cached_models": 3, "mmap": True, "chunk_seconds": 10},
         "audiosep": {"max_cached_models": 2, "use_torch_stft": "auto", "auto_stft_seconds": 20}},
    )
    assert s.max_cached_models == 2 and s.mmap is True and s.chunk_seconds == 10.0
    assert s.use_torch_stft == "auto" and s.auto_stft_seconds == 20.0
    assert s.sources["max_cached_models"] == "policy"


def test_precedence_flag_over_env_over_policy(tmp_path):
    data = {"audiosep": {"max_cached_models": 2, "mmap": True, "chunk_seconds": 5}}
    env = {"AUDIOSEP_MAX_CACHED_MODELS": "3", "AUDIOSEP_MMAP": "false"}
    s = settings_for(tmp_path, data, env=env, flags={"max_cached_models": 4, "mmap": None})
    assert s.max_cached_models == 4 and s.sources["max_cached_models"] == "flag"
    assert s.mmap is False and s.sources["mmap"] == "env"
    assert s.chunk_seconds == 5.0 and s.sources["chunk_seconds"] == "policy"
    s = settings_for(tmp_path, data, env=env)
    assert s.max_cached_models == 3


@pytest.mark.parametrize(
    "content", ["{not json", "[1, 2]", '"text"', "", "\xff", '{"audiosep": 5}', '{"audiosep": {"max_cached_models": "many"}}']
)
def test_broken_policy_warns_and_uses_defaults(tmp_path, content):
    warnings: list[str] = []
    path = tmp_path / "runtime_policy.json"
    path.write_bytes(content.encode("latin-1"))
    s = policy.resolve_settings({}, env={policy.POLICY_ENV: str(path)}, warn=warnings.append)
    assert s.max_cached_models == 1 and s.use_torch_stft is False
    if content:  # an empty file is broken JSON too
        assert warnings and str(path) in warnings[0]


def test_policy_bad_value_ignored_others_kept(tmp_path):
    warnings: list[str] = []
    s = settings_for(tmp_path, {"audiosep": {"max_cached_models": -1, "mmap": True, "auto_stft_seconds": "nan"}},
                     warnings=warnings)
    assert s.max_cached_models == 1 and s.mmap is True and s.auto_stft_seconds == 60.0
    assert len(warnings) == 2


def test_policy_path_that_is_a_directory(tmp_path):
    warnings: list[str] = []
    s = policy.resolve_settings({}, env={policy.POLICY_ENV: str(tmp_path)}, warn=warnings.append)
    assert s.max_cached_models == 1 and warnings


def test_env_values(tmp_path):
    warnings: list[str] = []
    env = {"AUDIOSEP_USE_TORCH_STFT": "Auto", "AUDIOSEP_AUTO_STFT_SECONDS": "12.5", "AUDIOSEP_MMAP": "1",
           "AUDIOSEP_CHUNK_SECONDS": "abc", "AUDIOSEP_MAX_CACHED_MODELS": "0", "AUDIOSEP_DEVICE": "cpu"}
    s = settings_for(tmp_path, env=env, warnings=warnings)
    assert s.use_torch_stft == "auto" and s.auto_stft_seconds == 12.5 and s.mmap is True
    assert s.chunk_seconds == 30.0 and s.max_cached_models == 0 and s.device == "cpu"
    assert len(warnings) == 1 and "AUDIOSEP_CHUNK_SECONDS" in warnings[0]


def test_policy_path_default_and_override(tmp_path):
    assert policy.policy_path({}) == Path("~/.dsu/runtime_policy.json").expanduser()
    assert policy.policy_path({policy.POLICY_ENV: str(tmp_path / "p.json")}) == tmp_path / "p.json"


@pytest.mark.parametrize(
    "name,raw,expected",
    [("max_cached_models", "2", 2), ("max_cached_models", 3.0, 3), ("use_torch_stft", "off", False),
     ("use_torch_stft", True, True), ("mmap", "YES", True), ("chunk_seconds", 7, 7.0)],
)
def test_parse_setting_accepts(name, raw, expected):
    assert policy.parse_setting(name, raw) == expected


@pytest.mark.parametrize(
    "name,raw",
    [("max_cached_models", "-1"), ("max_cached_models", True), ("max_cached_models", 1.5), ("mmap", "auto"),
     ("use_torch_stft", 2), ("chunk_seconds", "inf"), ("auto_stft_seconds", 0), ("device", "")],
)
def test_parse_setting_rejects(name, raw):
    with pytest.raises(ValueError):
        policy.parse_setting(name, raw)


def test_resolve_path_absolute_and_home(tmp_path):
    assert policy.resolve_path(str(tmp_path / "x.ckpt"), [Path("/elsewhere")]) == str(tmp_path / "x.ckpt")
    assert policy.resolve_path("~/x.ckpt", [tmp_path]) == os.path.expanduser("~/x.ckpt")


def test_resolve_path_first_existing_base_wins(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a).mkdir()
    (b / "checkpoint").mkdir(parents=True)
    (b / "checkpoint" / "m.ckpt").write_bytes(b"x")
    assert policy.resolve_path("checkpoint/m.ckpt", [a, b]) == str(b / "checkpoint" / "m.ckpt")
    # Found nowhere: the first base, so the error names where the worker looked first.
    assert policy.resolve_path("checkpoint/none.ckpt", [a, b]) == str(a / "checkpoint" / "none.ckpt")


def test_base_dirs_frozen_uses_executable_folder(tmp_path, monkeypatch):
    exe = tmp_path / "dist" / "dsu-audiosep" / "dsu-audiosep"
    exe.parent.mkdir(parents=True)
    exe.write_bytes(b"")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(exe))
    assert policy.base_dirs()[0] == exe.parent.resolve()


def test_base_dirs_from_source_starts_at_repo_root():
    repo_root = Path(__file__).resolve().parents[1]
    bases = policy.base_dirs()
    assert bases[0] == repo_root
    assert policy.resolve_path("config/audiosep_base.yaml") == str(repo_root / "config" / "audiosep_base.yaml")


# ============================================================================================
# cache


def key(name: str, **kw) -> ModelKey:
    fields = dict(config_path=None, checkpoint_path=f"/m/{name}.ckpt", clap_checkpoint_path=None,
                  roberta_dir=None, model_dir=None, device="cpu", mmap=False, precision="fp32")
    fields.update(kw)
    return ModelKey(**fields)


class Heavy:
    """Stands in for a model; the self-reference makes only gc.collect free it."""

    def __init__(self):
        self.me = self


def test_cache_lru_order_and_eviction():
    released = []
    cache = ModelCache(2, release=lambda: released.append(1))
    cache.put(CacheEntry(key("a"), "A", 1.0))
    cache.put(CacheEntry(key("b"), "B", 1.0))
    assert cache.get(key("a")).model == "A"  # a is now most recent
    evicted = cache.put(CacheEntry(key("c"), "C", 1.0))
    assert evicted == [key("b")] and released == [1]
    assert [e.model for e in cache.entries()] == ["C", "A"]
    assert cache.get(key("b")) is None


def test_cache_key_covers_every_load_choice():
    base = key("a")
    variants = [key("a", device="cuda"), key("a", mmap=True), key("a", precision="bf16"),
                key("a", config_path="/c.yaml"), key("a", roberta_dir="/rb"), key("a", model_dir="/md"),
                key("a", clap_checkpoint_path="/clap.pt"), key("a", fingerprint=(("x", 1, 2),))]
    assert len({base, *variants}) == len(variants) + 1


def test_evicted_model_is_freed():
    cache = ModelCache(1)  # the real release: gc.collect (+ accelerator cache when present)
    model = Heavy()
    ref = weakref.ref(model)
    cache.put(CacheEntry(key("a"), model, 1.0))
    del model
    gc.collect()
    assert ref() is not None  # the cache keeps it alive
    cache.put(CacheEntry(key("b"), Heavy(), 1.0))
    assert ref() is None  # evicted and collected, no gc.collect by the test needed


def test_cache_capacity_zero_keeps_nothing():
    cache = ModelCache(0)
    assert cache.put(CacheEntry(key("a"), "A", 1.0)) == [] and len(cache) == 0


def test_cache_remove_and_clear():
    cache = ModelCache(3, release=lambda: None)
    for name in "abc":
        cache.put(CacheEntry(key(name), name, 1.0))
    assert cache.remove(key("b")) and not cache.remove(key("b"))
    assert cache.clear() == 2 and len(cache) == 0


def test_fingerprint_changes_when_file_is_replaced(tmp_path):
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"one")
    first = file_fingerprint([str(path), None])
    path.write_bytes(b"two!")
    assert file_fingerprint([str(path)]) != first
    folder = tmp_path / "dir"
    folder.mkdir()
    before = file_fingerprint([str(folder)])
    (folder / "w.safetensors").write_bytes(b"x")
    assert file_fingerprint([str(folder)]) != before
    assert file_fingerprint([str(tmp_path / "missing")]) == ((str(tmp_path / "missing"), None),)


# ============================================================================================
# progress throttling


def test_progress_throttle():
    sent = []
    now = [0.0]
    rep = jobs.ProgressReporter(sent.append, "p", "separating", clock=lambda: now[0])
    rep.start()
    for i in range(1, 100):  # 1% steps, 0.01 s apart: only every 5%
        now[0] += 0.01
        rep(i / 100)
    rep(0.5)  # backwards: ignored
    rep(float("nan"))
    now[0] += 10
    rep(0.995)  # small step but long silence: sent
    rep.finish()
    rep.finish()
    percents = [m["percent"] for m in sent]
    assert percents[0] == 0.0 and percents[-1] == 100.0
    assert percents == sorted(set(percents))
    assert all(b - a >= 5 for a, b in zip(percents[:-3], percents[1:-2]))
    assert 99.5 in percents
    assert all(m["status"] == "progress" and m["id"] == "p" for m in sent)


# ============================================================================================
# command handlers, in-process, with a fake engine


class ListWriter:
    def __init__(self):
        self.sent: list[dict] = []

    def send(self, obj, lock_timeout=None):
        json.loads(P.encode_reply(obj))  # every reply must encode
        self.sent.append(obj)
        return True


class FakeModel:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.use_torch_stft = kwargs.get("use_torch_stft", False)
        self.sources = {}
        self.me = self  # freed only by gc.collect, like a real module graph may be

    def set_stft(self, use_torch_stft: bool) -> None:
        self.use_torch_stft = bool(use_torch_stft)


@dataclasses.dataclass
class FakeOptions:
    use_chunk: object = False
    chunk_seconds: float = 30.0
    chunk_length: object = None
    output_sr: object = 44100
    output_subtype: object = None  # not given: the container's own (PCM_16 for PCM files)
    output_bitrate: object = "auto"
    output_channels: str = "stereo"
    mode: str = "extract"
    residual_output: object = None


class FakeEngine(TorchEngine):
    """The real engine's planning (engine/resolve.py) around fake loading, probing and running:
    no weights, no audio files. ``durations`` maps input names to the length a probe reports."""

    def __init__(self):
        self.loads: list[dict] = []
        self.separations: list[tuple] = []
        self.fail_next_load: BaseException | None = None
        self.separate_behaviour = None
        self.durations: dict[str, float | None] = {}

    def start(self) -> str:
        return "0.0-fake"

    def resolve_device(self, name):
        if name in (None, "auto", "cpu"):
            return "cpu"
        raise AudioSepError(errors.DEVICE_UNAVAILABLE, f"no {name}")

    def load_model(self, paths, plan, trust_checkpoint):
        kwargs = dict(dataclasses.asdict(paths), device=plan.device, mmap=plan.mmap,
                      use_torch_stft=plan.stft_value, precision=plan.precision, trust_checkpoint=trust_checkpoint)
        self.loads.append(kwargs)
        if self.fail_next_load is not None:
            exc, self.fail_next_load = self.fail_next_load, None
            raise exc
        return FakeModel(**kwargs)

    def probe(self, path):
        duration = self.durations.get(os.path.basename(path), 1.0)
        return None if duration is None else types.SimpleNamespace(frames=int(duration * 44100), samplerate=44100,
                                                                   channels=2, duration=duration)

    def separate(self, model, plan, progress, cancelled):
        model.set_stft(plan.use_torch_stft)
        options = FakeOptions(**{f.name: getattr(plan.options, f.name) for f in dataclasses.fields(FakeOptions)})
        self.separations.append((model, plan.input_path, plan.output_path, plan.text, options, model.use_torch_stft))
        if self.separate_behaviour is not None:
            return JobOutcome(files=self.separate_behaviour(progress, cancelled))
        for i in range(10):
            if cancelled():
                raise AudioSepError(errors.CANCELLED, "cancelled")
            progress((i + 1) / 10)
        return JobOutcome(files=[plan.output_path])


@pytest.fixture
def fake(tmp_path):
    engine = FakeEngine()
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.ckpt").write_bytes(name.encode())
    return engine


def make_worker(tmp_path, engine=None, **settings) -> tuple[loop.Worker, ListWriter]:
    writer = ListWriter()
    s = policy.Settings(**settings)
    return loop.Worker(writer, s, engine=engine or FakeEngine()), writer


def run(worker, obj) -> dict:
    return worker.execute(P.parse_object(obj))


MODEL_LOADED_FIELDS = {"status", "elapsed", "config_path", "checkpoint_path", "clap_checkpoint_path", "roberta_dir",
                       "device", "cached", "cache_size", "max_cached_models", "use_torch_stft_mode",
                       "use_torch_stft_value", "auto_stft_seconds"}


def test_load_model_reply_and_cache_hit(fake, tmp_path):
    worker, writer = make_worker(tmp_path, fake)
    ckpt = str(tmp_path / "a.ckpt")
    first = run(worker, {"cmd": "load_model", "checkpoint_path": ckpt, "id": 1})
    assert first["status"] == "model_loaded", first
    assert MODEL_LOADED_FIELDS <= set(first)
    assert first["checkpoint_path"] == ckpt and first["cached"] is False and first["cache_size"] == 1
    assert first["use_torch_stft_mode"] == "force" and first["use_torch_stft_value"] is False
    assert first["auto_stft_seconds"] == 60.0 and first["max_cached_models"] == 1 and first["id"] == 1
    assert writer.sent[0] == {"status": "loading_model", "model": ckpt, "id": 1}
    second = run(worker, {"cmd": "load_model", "checkpoint_path": ckpt, "use_torch_stft": True})
    assert second["cached"] is True and len(fake.loads) == 1
    assert second["use_torch_stft_value"] is True and worker.current.model.use_torch_stft is True


def test_relative_paths_resolve_against_base(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(policy, "base_dirs", lambda: [tmp_path])
    worker, _ = make_worker(tmp_path, fake)
    reply = run(worker, {"cmd": "load_model", "checkpoint_path": "a.ckpt"})
    assert reply["checkpoint_path"] == str(tmp_path / "a.ckpt")
    assert fake.loads[0]["checkpoint_path"] == str(tmp_path / "a.ckpt")


def test_default_checkpoint_beside_executable(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(policy, "base_dirs", lambda: [tmp_path])
    worker, _ = make_worker(tmp_path, fake)
    reply = run(worker, {"cmd": "load_model"})
    assert reply["code"] == errors.MISSING_FIELD and "checkpoint_path" in reply["message"]
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "audiosep_base_4M_steps.ckpt").write_bytes(b"x")
    (tmp_path / "roberta-base").mkdir()
    reply = run(worker, {"cmd": "load_model"})
    assert reply["status"] == "model_loaded"
    assert reply["checkpoint_path"] == str(tmp_path / "checkpoint" / "audiosep_base_4M_steps.ckpt")
    assert reply["roberta_dir"] == str(tmp_path / "roberta-base") and reply["clap_checkpoint_path"] is None


def test_missing_and_wrong_kind_paths(fake, tmp_path):
    worker, writer = make_worker(tmp_path, fake)
    reply = run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path / "none.ckpt")})
    assert reply["code"] == errors.FILE_NOT_FOUND and "none.ckpt" in reply["message"]
    reply = run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path)})
    assert reply["code"] == errors.INVALID_FIELD
    reply = run(worker, {"cmd": "load_model", "model_dir": str(tmp_path / "a.ckpt")})
    assert reply["code"] == errors.INVALID_FIELD
    reply = run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path / "a.ckpt"), "device": "cuda:7"})
    assert reply["code"] == errors.DEVICE_UNAVAILABLE
    assert fake.loads == []


def test_eviction_frees_model_and_failed_load_changes_nothing(fake, tmp_path):
    worker, _ = make_worker(tmp_path, fake)
    run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path / "a.ckpt")})
    ref_a = weakref.ref(worker.current.model)
    reply = run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path / "b.ckpt")})
    assert reply["cache_size"] == 1 and reply["cached"] is False
    assert ref_a() is None  # max_cached_models 1: a was evicted and freed
    current_b = worker.current
    listing = run(worker, {"cmd": "list_models"})

    fake.fail_next_load = AudioSepError(errors.INVALID_CHECKPOINT, "c.ckpt: not an AudioSep checkpoint")
    reply = run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path / "c.ckpt"), "id": "bad"})
    assert reply == {"status": "error", "code": "invalid_checkpoint",
                     "message": "c.ckpt: not an AudioSep checkpoint", "id": "bad"}
    assert worker.current is current_b
    assert run(worker, {"cmd": "list_models"}) == listing
    done = run(worker, {"cmd": "separate", "input": "in.wav", "output": str(tmp_path / "o.wav")})
    assert done["status"] == "done" and fake.separations[-1][0] is current_b.model


def test_lru_with_two_slots(fake, tmp_path):
    worker, _ = make_worker(tmp_path, fake, max_cached_models=2)
    for name in ("a", "b", "a", "c"):
        run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path / f"{name}.ckpt")})
    assert len(fake.loads) == 3  # the second "a" was a hit
    cached = [m["checkpoint_path"] for m in run(worker, {"cmd": "list_models"})["models"]]
    assert cached == [str(tmp_path / "c.ckpt"), str(tmp_path / "a.ckpt")]


def test_capacity_zero_still_serves_current_model(fake, tmp_path):
    worker, _ = make_worker(tmp_path, fake, max_cached_models=0)
    reply = run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path / "a.ckpt")})
    assert reply["cache_size"] == 0 and reply["max_cached_models"] == 0
    assert run(worker, {"cmd": "ping"})["model_loaded"] is True
    assert run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path / "a.ckpt")})["cached"] is True
    assert len(run(worker, {"cmd": "list_models"})["models"]) == 1


def test_unload_and_clear(fake, tmp_path):
    worker, _ = make_worker(tmp_path, fake, max_cached_models=2)
    run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path / "a.ckpt")})
    run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path / "b.ckpt")})
    reply = run(worker, {"cmd": "unload_model", "id": 9})
    assert reply["status"] == "models" and reply["id"] == 9 and reply["model_loaded"] is False
    assert [m["checkpoint_path"] for m in reply["unloaded"]] == [str(tmp_path / "b.ckpt")]
    assert run(worker, {"cmd": "separate", "input": "i", "output": "o"})["code"] == errors.MODEL_NOT_LOADED
    reply = run(worker, {"cmd": "clear_cache"})
    assert reply["status"] == "models" and reply["models"] == [] and len(reply["unloaded"]) == 1


def test_separate_reply_and_options(fake, tmp_path):
    worker, writer = make_worker(tmp_path, fake, chunk_seconds=12.0)
    run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path / "a.ckpt"), "chunk_length": 4})
    writer.sent.clear()
    out = str(tmp_path / "o.wav")
    reply = run(worker, {"cmd": "separate", "input": "in.wav", "output": out, "text": "dog", "id": "s",
                         "use_chunk": "auto", "output_sr": "input", "mode": "remove", "progress": True})
    assert reply == {"status": "done", "elapsed": reply["elapsed"], "files": [out],
                     "use_torch_stft_mode": "force", "use_torch_stft_value": False, "id": "s"}
    assert writer.sent[0] == {"status": "separating", "input": "in.wav", "id": "s"}
    percents = [m["percent"] for m in writer.sent if m["status"] == "progress"]
    assert percents[0] == 0.0 and percents[-1] == 100.0
    options = fake.separations[-1][4]
    assert options == FakeOptions(use_chunk="auto", chunk_seconds=12.0, chunk_length=4.0, output_sr="input",
                                  mode="remove")
    assert fake.separations[-1][3] == "dog"
    before = len(writer.sent)
    run(worker, {"cmd": "separate", "input": "in.wav", "output": out})
    assert fake.separations[-1][3] == "speech" and fake.separations[-1][4].use_chunk is False
    assert [m["status"] for m in writer.sent[before:]] == ["separating"]  # progress is opt-in


def test_auto_stft_by_duration(fake, tmp_path, monkeypatch):
    durations = {"short.wav": 10.0, "long.wav": 61.0, "edge.wav": 60.0, "broken.wav": None}
    fake.durations.update(durations)
    worker, _ = make_worker(tmp_path, fake)
    loaded = run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path / "a.ckpt"), "use_torch_stft": "auto"})
    assert loaded["use_torch_stft_mode"] == "auto" and loaded["use_torch_stft_value"] is False
    expected = {"short.wav": False, "long.wav": True, "edge.wav": True, "broken.wav": False}
    for name, want in expected.items():
        reply = run(worker, {"cmd": "separate", "input": name, "output": str(tmp_path / "o.wav")})
        assert reply["use_torch_stft_mode"] == "auto" and reply["use_torch_stft_value"] is want, name
        assert fake.separations[-1][5] is want  # the model ran with that STFT
    assert len(fake.loads) == 1  # switching never reloads
    reply = run(worker, {"cmd": "separate", "input": "short.wav", "output": "o.wav", "auto_stft_seconds": 5})
    assert reply["use_torch_stft_value"] is True


def test_cancel_running_and_queued(fake, tmp_path):
    worker, _ = make_worker(tmp_path, fake)
    run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path / "a.ckpt")})

    def cancel_midway(progress, cancelled):
        assert worker.tracker.cancel("job") == "running"
        for _ in range(3):
            if cancelled():
                raise AudioSepError(errors.CANCELLED, "separation cancelled between chunks")
        return ["never"]

    fake.separate_behaviour = cancel_midway
    reply = run(worker, {"cmd": "separate", "input": "i", "output": "o", "id": "job"})
    assert reply["code"] == errors.CANCELLED and reply["id"] == "job"

    fake.separate_behaviour = None
    queued = P.parse_object({"cmd": "separate", "input": "i", "output": "o", "id": "q"})
    worker.tracker.enqueued(queued)
    assert worker.tracker.cancel("q") == "queued"
    assert worker.tracker.cancel("other") is None
    reply = worker.execute(queued)
    assert reply["code"] == errors.CANCELLED and len(fake.separations) == 1
    # The flag does not leak into the next job.
    assert run(worker, {"cmd": "separate", "input": "i", "output": "o", "id": "q"})["status"] == "done"


@pytest.mark.parametrize(
    "exc,code",
    [
        (MemoryError(), errors.OUT_OF_MEMORY),
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), errors.OUT_OF_MEMORY),
        (type("OutOfMemoryError", (RuntimeError,), {})("boom"), errors.OUT_OF_MEMORY),
        (OSError(28, "No space left on device", "/tmp/o.wav"), errors.DISK_FULL),
        (PermissionError(13, "Permission denied", "/root/o.wav"), errors.PERMISSION_DENIED),
        (ValueError("weird"), errors.INTERNAL_ERROR),
        (SystemExit(3), errors.INTERNAL_ERROR),
        (AudioSepError(errors.INVALID_AUDIO, "in.wav: not audio"), errors.INVALID_AUDIO),
    ],
)
def test_exceptions_become_error_replies(fake, tmp_path, exc, code):
    worker, _ = make_worker(tmp_path, fake)
    run(worker, {"cmd": "load_model", "checkpoint_path": str(tmp_path / "a.ckpt")})

    def boom(progress, cancelled):
        raise exc

    fake.separate_behaviour = boom
    reply = run(worker, {"cmd": "separate", "input": "i", "output": "o", "id": 5})
    assert reply["status"] == "error" and reply["code"] == code and reply["id"] == 5 and reply["message"]
    fake.separate_behaviour = None
    assert run(worker, {"cmd": "separate", "input": "i", "output": "o"})["status"] == "done"


def test_status_ping_and_list_without_model(tmp_path):
    worker, _ = make_worker(tmp_path)
    status = run(worker, {"cmd": "get_status", "id": "st"})
    assert status["status"] == "status" and status["ready"] is True and status["model_loaded"] is False
    assert status["id"] == "st" and status["device"] == "cpu"
    assert run(worker, {"cmd": "ping"}) == {"status": "pong", "model_loaded": False}
    assert run(worker, {"cmd": "list_models"})["models"] == []
    assert run(worker, {"cmd": "exit", "id": 0}) == {"status": "exiting", "id": 0}
