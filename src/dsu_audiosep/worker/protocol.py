"""The worker's wire format: one JSON object per line in, one JSON object per line out.

This module is pure (no torch, no I/O): it turns a raw stdin line into a validated ``Command`` or
an ``AudioSepError`` carrying a stable code, and builds reply dicts and the bytes written for them.
Validation happens here, before any work, so a bad field is reported by name and never reaches
the engine half-checked.

Rules a reader of the protocol can rely on:
- every reply is one line of compact ASCII JSON (``ensure_ascii``): no odd bytes reach the parent;
- NaN and Infinity are never written (JSON has no such values; some parsers reject them);
- a command's ``id`` (any JSON value) is echoed in every reply to it, errors included, whenever
  the line was parsed far enough to find it;
- every error carries ``code`` (see ``dsu_audiosep.errors``) beside a human ``message``;
- unknown fields are ignored, so a newer client can talk to an older worker.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Union

from .. import errors, options
from ..engine.queries import check_distinct_outputs
from ..errors import AudioSepError

# A 10 MB line must work; anything beyond this is refused as a whole (and its bytes dropped)
# rather than buffered without bound.
MAX_LINE_BYTES = 16 * 1024 * 1024

KNOWN_COMMANDS = (
    "load_model",
    "separate",
    "get_status",
    "ping",
    "list_models",
    "unload_model",
    "clear_cache",
    "cancel",
    "exit",
)

# Statuses that are *not* the answer to a command: start-up lines, "still working" lines and the
# shutdown notice. Every command gets exactly one reply whose status is not in this set.
NON_TERMINAL_STATUSES = frozenset(
    {"loading", "ready", "loading_model", "separating", "progress", "shutdown"}
)
# The replies the parent app waits for after each of its commands (a subset of the terminal ones).
PARENT_TERMINAL_STATUSES = frozenset({"done", "error", "model_loaded", "models", "pong", "exiting"})



class _NoId:
    """Marker for "the command carried no id" (``None`` is a valid id: JSON null)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_ID"

    def __bool__(self) -> bool:
        return False


NO_ID: Any = _NoId()


class RequestError(AudioSepError):
    """A line that could not become a command; ``request_id`` is echoed when it was found."""

    def __init__(self, code: str, message: str, request_id: Any = NO_ID, cmd: str | None = None):
        super().__init__(code, message)
        self.request_id = request_id
        self.cmd = cmd


# --------------------------------------------------------------------------------------------
# Typed arguments, one record per command, with the fields the options table gives it. ``None``
# means "not given": the worker then falls back to command-line flag, environment, policy file
# and default, in that order.

LoadModelArgs = options.args_record(options.LOAD, "LoadModelArgs")
SeparateArgs = options.args_record(options.SEPARATE, "SeparateArgs")
_ARGS_RECORDS = {options.LOAD: LoadModelArgs, options.SEPARATE: SeparateArgs}


@dataclass(frozen=True)
class CancelArgs:
    target: Any


@dataclass(frozen=True)
class NoArgs:
    pass


Args = Union[LoadModelArgs, SeparateArgs, CancelArgs, NoArgs]


@dataclass(frozen=True)
class Command:
    cmd: str
    args: Args = field(default_factory=NoArgs)
    id: Any = NO_ID
    progress: bool = False

    @property
    def has_id(self) -> bool:
        return self.id is not NO_ID


# --------------------------------------------------------------------------------------------
# Reading lines


@dataclass(frozen=True)
class OversizedLine:
    """Stands in for a line longer than the limit; its bytes were discarded."""

    size: int


class LineSplitter:
    """Cuts a byte stream into lines without ever holding more than one limit's worth of a line.

    Reading ``os.read`` chunks through this (rather than ``readline``) keeps a 1 GB line without a
    newline from exhausting memory, and lets the reader thread use a raw file descriptor, which
    avoids the interpreter-shutdown lock problem of a daemon thread blocked in a buffered reader.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES):
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._dropping = False  # inside an oversized line: discard until its newline
        self._dropped = 0

    def feed(self, chunk: bytes) -> Iterator[bytes | OversizedLine]:
        start = 0
        n = len(chunk)
        while start < n:
            nl = chunk.find(b"\n", start)
            end = n if nl < 0 else nl
            piece = chunk[start:end]
            if self._dropping:
                self._dropped += len(piece)
            else:
                self._buf += piece
                if len(self._buf) > self.max_line_bytes:
                    self._dropping = True
                    self._dropped = len(self._buf)
                    self._buf = bytearray()
            if nl < 0:
                break
            if self._dropping:
                yield OversizedLine(self._dropped)
                self._dropping = False
                self._dropped = 0
            else:
                yield bytes(self._buf)
                self._buf = bytearray()
            start = nl + 1

    def finish(self) -> Iterator[bytes | OversizedLine]:
        """End of stream: a last line without a newline is still a line."""
        if self._dropping:
            yield OversizedLine(self._dropped)
        elif self._buf.strip():
            yield bytes(self._buf)
        self._buf = bytearray()
        self._dropping = False
        self._dropped = 0


# --------------------------------------------------------------------------------------------
# Parsing


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json_line(raw: bytes | OversizedLine) -> Any:
    """Bytes of one line -> JSON value, or RequestError(INVALID_JSON)."""
    if isinstance(raw, OversizedLine):
        raise RequestError(
            errors.INVALID_JSON,
            f"line too long ({raw.size} bytes; the limit is {MAX_LINE_BYTES} bytes): "
            "send one JSON object per line",
        )
    if len(raw) > MAX_LINE_BYTES:
        raise RequestError(
            errors.INVALID_JSON,
            f"line too long ({len(raw)} bytes; the limit is {MAX_LINE_BYTES} bytes)",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            errors.INVALID_JSON,
            f"line is not valid UTF-8 (bad byte at position {exc.start}): send UTF-8 encoded JSON",
        ) from None
    # A UTF-8 byte-order mark may lead a line written by Windows tools; it is not part of JSON.
    text = text.lstrip("\ufeff").strip()
    if not text:
        raise RequestError(
            errors.INVALID_JSON, "empty line: expected one JSON object per line, e.g. {\"cmd\":\"ping\"}"
        )
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError(errors.INVALID_JSON, "JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, huge integer literals
        preview = text[:60] + ("..." if len(text) > 60 else "")
        raise RequestError(
            errors.INVALID_JSON, f"line is not valid JSON ({exc}): {preview!r}"
        ) from None


def is_blank_line(raw: bytes | OversizedLine) -> bool:
    """A line holding nothing but whitespace (or a byte-order mark). The seed worker skips such
    lines without a reply, and the parent matches replies to requests by order: an unasked-for
    error would put it out of step, so the reader drops them."""
    if isinstance(raw, OversizedLine):
        return False
    try:
        return not raw.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError:
        return False


def parse_line(raw: bytes | OversizedLine) -> Command:
    """One raw stdin line -> validated Command. Raises RequestError with a stable code."""
    obj = decode_json_line(raw)
    return parse_object(obj)


def parse_object(obj: Any) -> Command:
    if not isinstance(obj, dict):
        raise RequestError(
            errors.INVALID_COMMAND,
            f"expected a JSON object like {{\"cmd\": \"ping\"}}, got {options.json_type(obj)}",
        )
    request_id = obj["id"] if "id" in obj else NO_ID
    if request_id is not NO_ID and not _is_echoable(request_id):
        # An id holding e.g. 1e999 (parsed as infinity) cannot be written back as JSON.
        raise RequestError(errors.INVALID_FIELD, "field 'id' cannot be echoed back as JSON")
    if "cmd" not in obj:
        raise RequestError(
            errors.INVALID_COMMAND, "missing \"cmd\": every command needs a \"cmd\" string", request_id
        )
    cmd = obj["cmd"]
    if not isinstance(cmd, str):
        raise RequestError(
            errors.INVALID_COMMAND,
            f"\"cmd\" must be a string, got {options.json_type(cmd)}",
            request_id,
        )
    if cmd not in KNOWN_COMMANDS:
        shown = cmd if len(cmd) <= 60 else cmd[:60] + "..."
        raise RequestError(
            errors.UNKNOWN_COMMAND,
            # The seed's wording starts the message: a parent may test that prefix.
            f"Unknown command: {shown} (known commands: {', '.join(KNOWN_COMMANDS)})",
            request_id,
            cmd,
        )
    try:
        progress = _progress_flag(obj)
        if cmd in _ARGS_RECORDS:
            args: Args = _parse_fields(cmd, obj)
        elif cmd == "cancel":
            args = _parse_cancel(obj)
        else:
            args = NoArgs()
    except AudioSepError as exc:
        raise RequestError(exc.code, f"{cmd}: {exc.message}", request_id, cmd) from None
    return Command(cmd=cmd, args=args, id=request_id, progress=progress)


# What a command needs, said when its required fields are missing.
_REQUIRED_WHY = {options.SEPARATE: "separate needs the input audio path and the output path"}


def _parse_fields(cmd: str, obj: dict) -> Args:
    """A command's fields, each validated by its setting in the options table. (load_model's
    "checkpoint_path or model_dir" is checked by the worker: like the original worker it falls
    back to checkpoint/audiosep_base_4M_steps.ckpt beside the executable when that file exists.)"""
    settings = options.for_command(cmd)
    missing = options.missing_fields(cmd, obj)
    if missing:
        raise AudioSepError(
            errors.MISSING_FIELD,
            "missing " + " and ".join(f"\"{m}\"" for m in missing) + f" ({_REQUIRED_WHY.get(cmd, cmd)})",
        )
    values = {s.name: s.from_json(obj.get(s.name)) for s in settings}
    # JSON null means "not given": the record's default (the seed's query for text) stays.
    # (with queries, the record's required output is given as None: each query has its own)
    args = _ARGS_RECORDS[cmd](**{k: v for k, v in values.items() if v is not None or k in settings_required(settings)})
    if cmd == options.SEPARATE:
        check_distinct_outputs(args.input, separate_outputs(args))
    return args


def settings_required(settings: tuple[options.Setting, ...]) -> set[str]:
    return {s.name for s in settings if s.required}


def separate_outputs(args: Any) -> list[str]:
    """Every file a separate command writes, in reply order (queries, or output; then residual)."""
    outputs = [q.output for q in args.queries] if args.queries else [args.output]
    return outputs + ([args.residual_output] if args.residual_output else [])


def _progress_flag(obj: dict) -> bool:
    value = obj.get("progress")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise AudioSepError(errors.INVALID_FIELD, f"\"progress\" must be true or false, got {options.json_type(value)}")
    return value


def _parse_cancel(obj: dict) -> CancelArgs:
    if "target" not in obj:
        raise AudioSepError(errors.MISSING_FIELD, "cancel needs \"target\": the id of the command to cancel")
    if not _is_echoable(obj["target"]):
        raise AudioSepError(errors.INVALID_FIELD, "\"target\" must be a JSON id value")
    return CancelArgs(target=obj["target"])


# --------------------------------------------------------------------------------------------
# Replies


def _is_echoable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (ValueError, TypeError, RecursionError):
        return False


def reply(status: str, request_id: Any = NO_ID, **fields: Any) -> dict:
    """A reply dict; ``id`` is added only when the command carried one."""
    out: dict[str, Any] = {"status": status}
    out.update(fields)
    if request_id is not NO_ID:
        out["id"] = request_id
    return out


def error_reply(code: str, message: str, request_id: Any = NO_ID, **fields: Any) -> dict:
    return reply("error", request_id, code=code, message=message, **fields)


def _json_safe(value: Any) -> Any:
    """Replace what JSON cannot carry (NaN, Infinity, odd objects) by null / strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


def encode_reply(obj: dict) -> bytes:
    """Serialise a reply as one compact ASCII JSON line, newline included. Never raises."""
    try:
        text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except (ValueError, TypeError, RecursionError):
        try:
            text = json.dumps(_json_safe(obj), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        except (ValueError, TypeError, RecursionError):
            safe = {"status": obj.get("status") if isinstance(obj.get("status"), str) else "error"}
            text = json.dumps(safe, ensure_ascii=True)
    # ensure_ascii escapes every control character, so the line cannot contain a raw newline.
    return text.encode("ascii") + b"\n"


def id_key(value: Any) -> str:
    """A canonical, hashable form of a JSON id, for matching cancel targets.

    JSON 1, 1.0 and true are different ids; Python would call them equal, so compare by text.
    """
    return json.dumps(value, sort_keys=True, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
