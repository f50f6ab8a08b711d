"""Every setting, defined once: its type, default, choices or range, where it can be given and what
it means.

A setting can be a field of a command (``load_model``, ``separate``), a worker-level default (a
command-line flag ``--name``, an environment variable ``AUDIOSEP_NAME`` and a key of the runtime
policy file), or both. Everything that reads settings is derived from ``SETTINGS``: the protocol's
argument records and their validation, the policy file and environment, the worker's flags, the
``ready`` capabilities, the CLI's ``separate`` flags and the settings table of docs/settings.md
(``python -m dsu_audiosep.options docs/settings.md`` rewrites it; a test keeps them equal).

Two ways in, one meaning:
- ``from_json``: a JSON value from a command (strict types: ``true``, not ``"yes"``); a bad value
  is an ``AudioSepError(INVALID_FIELD)`` naming the field;
- ``from_text``: a string from a flag or the environment, or a value of the policy file (lenient:
  ``1``/``yes``/``on`` for true); a bad value is a ``ValueError`` the caller turns into a warning.
Either way the result is the one canonical value (``"auto"``, ``"PCM_24"``, a float of seconds).
This module is a leaf: it imports nothing of the package but ``errors``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Callable

from .errors import INVALID_FIELD, MISSING_FIELD, AudioSepError

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def json_type(value: Any) -> str:
    """How a JSON value is named in error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:40] + "..."
        return f"string {shown!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# Kinds of value. Each kind checks a value and returns the canonical one, or None when the value
# does not fit; the Setting turns None into the error of its way in.


@dataclass(frozen=True)
class Kind:
    expected: str  # completes "must be ...": the message for a wrong value
    check: Callable[[Any, bool], Any]  # (value, lenient) -> canonical value, or None if invalid
    metavar: str = ""


def _bool(value: Any, lenient: bool) -> Any:
    if isinstance(value, bool):
        return value
    if lenient and isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    if lenient and isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None


def _bool_or_auto(value: Any, lenient: bool) -> Any:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return _bool(value, lenient)


def _number(value: Any, lenient: bool) -> float | None:
    if lenient and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer literal too large for a float
        return None
    return number if math.isfinite(number) else None


def _seconds(value: Any, lenient: bool) -> Any:
    number = _number(value, lenient)
    return number if number is not None and number > 0 else None


def _seconds_or_zero(value: Any, lenient: bool) -> Any:
    number = _number(value, lenient)
    return number if number is not None and number >= 0 else None


def _count(value: Any, lenient: bool) -> Any:
    if lenient and isinstance(value, str):
        text = value.strip()
        value = int(text) if text.lstrip("+").isdigit() else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _name(value: Any, lenient: bool) -> Any:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _path(value: Any, lenient: bool) -> Any:
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        return None
    try:
        # Lone surrogates (legal in JSON escapes) cannot name a file on any platform.
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None
    return value


def _paths(value: Any, lenient: bool) -> Any:
    """One path, or a list of paths (an empty list passes: the query check says what is wrong)."""
    if isinstance(value, (list, tuple)):
        checked = [_path(v, lenient) for v in value]
        return None if any(c is None for c in checked) else list(checked)
    return _path(value, lenient)


def _fraction(value: Any, lenient: bool) -> Any:
    number = _number(value, lenient)
    return number if number is not None and 0 <= number <= 1 else None


def _numbers(value: Any, lenient: bool) -> Any:
    """A JSON array of numbers (length and finiteness: engine/query.py, with its own error code)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    try:
        return [float(v) for v in value]
    except OverflowError:  # an integer literal too large for a float
        return None


def _text(value: Any, lenient: bool) -> Any:
    return value if isinstance(value, str) else None


def _choice(choices: dict[str, str], fold: Callable[[str], str]) -> Callable[[Any, bool], Any]:
    def check(value: Any, lenient: bool) -> Any:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return choices.get(fold(str(value).strip()))
        return None

    return check


def _sample_rate(low: int, high: int) -> Callable[[Any, bool], Any]:
    def check(value: Any, lenient: bool) -> Any:
        if isinstance(value, str) and value.strip().lower() == "input":
            return "input"
        if lenient and isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)  # numpy integers from Python callers
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return None
        return value

    return check


# The fields of one entry of ``queries`` (stems), each checked by its own setting of the table;
# an entry needs ``output`` and one of QUERY_NEEDS (how the model is asked). Other kinds of query
# join both tuples.
QUERY_NEEDS = ("text", "query_audio", "query_embedding")
QUERY_FIELDS = QUERY_NEEDS + ("query_start", "query_end", "query_weight", "output", "mode")
QueryArgs = make_dataclass("QueryArgs", [(n, Any, field(default=None)) for n in QUERY_FIELDS], frozen=True)


def _queries(value: Any, lenient: bool) -> Any:
    """A list of query objects -> a tuple of QueryArgs; raises with the entry's index when one is wrong."""
    if not isinstance(value, list):
        return None
    if not value:
        raise AudioSepError(INVALID_FIELD, '"queries" is empty: give at least one {"text": ..., "output": ...}')
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise AudioSepError(INVALID_FIELD, f'"queries"[{i}] must be an object, got {json_type(item)}')
        try:
            fields = {n: BY_NAME[n].from_json(item.get(n)) for n in QUERY_FIELDS}
        except AudioSepError as exc:
            raise AudioSepError(exc.code, f'"queries"[{i}]: {exc.message}') from None
        if fields["output"] is None:
            raise AudioSepError(MISSING_FIELD, f'"queries"[{i}] needs "output" (where its sound is written)')
        if all(fields[n] is None for n in QUERY_NEEDS):
            raise AudioSepError(MISSING_FIELD, f'"queries"[{i}] needs ' + " or ".join(f'"{n}"' for n in QUERY_NEEDS))
        out.append(QueryArgs(**fields))
    return tuple(out)


def choice(*names: str, aliases: dict[str, str] | None = None, fold: Callable[[str], str] = str.lower) -> Kind:
    table = {fold(n): n for n in names}
    table.update({fold(a): n for a, n in (aliases or {}).items()})
    return Kind("one of " + ", ".join(f'"{n}"' for n in names), _choice(table, fold), "|".join(names))


BOOL = Kind("true or false", _bool, "true|false")
BOOL_OR_AUTO = Kind('true, false or "auto"', _bool_or_auto, "true|false|auto")
SECONDS = Kind("a positive finite number of seconds", _seconds, "S")
MEBIBYTES = Kind("a positive finite number of MiB (e.g. 2048)", _seconds, "MIB")  # same check: positive, finite
SECONDS_OR_ZERO = Kind("a non-negative finite number of seconds", _seconds_or_zero, "S")
COUNT = Kind("a whole number >= 0", _count, "N")
PATH = Kind("a path string (not empty, no NUL, no lone surrogates)", _path, "PATH")
TEXT = Kind("a string", _text, "TEXT")
PATHS = Kind("a path string or an array of path strings", _paths, "PATH")
FRACTION = Kind("a number from 0 to 1", _fraction, "W")
NUMBERS = Kind("an array of 512 numbers", _numbers, "")
DEVICE = Kind('a device name such as "cpu", "cuda", "cuda:1", "mps" or "auto"', _name, "D")
OUTPUT_SR_RANGE = (1000, 768000)
def _jobs(value: Any, lenient: bool) -> Any:
    """A batch's jobs: a non-empty list; each entry is checked as a separate command by the
    protocol, so that one malformed job is that job's result, not the batch's failure."""
    if not isinstance(value, list):
        return None
    if not value:
        raise AudioSepError(INVALID_FIELD, '"jobs" is empty: give at least one {separate fields} object')
    return tuple(value)


JOBS = Kind("a non-empty list of separate jobs (objects)", _jobs, "")
QUERIES = Kind('a non-empty list of objects {"text" | "query_audio" | "query_embedding", "output", "mode"?}', _queries, "")
BITRATE_RANGE = (6, 512)  # kbit/s: Opus' lowest to AAC's highest useful; each codec's own limit in output_options.py


def _bitrate(value: Any, lenient: bool) -> Any:
    """"auto" (each format's default), or kbit/s as a whole number, also written "192k"."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        text = text[:-1] if text.endswith("k") else text
        if not text.isdigit():
            return None
        value = int(text)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not BITRATE_RANGE[0] <= value <= BITRATE_RANGE[1]:
        return None
    return value


BITRATE = Kind(f'"auto" or kbit/s from {BITRATE_RANGE[0]} to {BITRATE_RANGE[1]} (e.g. 192)', _bitrate, "KBPS|auto")
SAMPLE_RATE = Kind(f"a sample rate in Hz from {OUTPUT_SR_RANGE[0]} to {OUTPUT_SR_RANGE[1]} (e.g. 44100) or \"input\"",
                   _sample_rate(*OUTPUT_SR_RANGE), "HZ|input")


# --------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Setting:
    """One setting. ``commands``: the commands that take it as a field; ``worker``: it also has a
    worker-level default (flag, environment, policy file); ``cli``: the ``separate`` subcommand's
    flag when it differs from ``--name`` ("" for none)."""

    name: str
    kind: Kind
    default: Any
    help: str
    commands: tuple[str, ...] = ()
    worker: bool = False
    policy: bool = True  # with ``worker``: also a key of the runtime policy file
    per_device: str = ""
    required: bool = False
    cli: str | None = None
    seed: bool = False  # a field of the seed worker's contract (SPEC 5); the others are extensions
    default_when: str = ""  # when the default applies, if not always (shown after it in --help)

    @property
    def env(self) -> str | None:
        return f"AUDIOSEP_{self.name.upper()}" if self.worker else None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def cli_flag(self) -> str:
        return self.flag if self.cli is None else self.cli

    @property
    def default_note(self) -> str:
        """The "(default ...)" of this setting's --help: the per-device rule where there is one
        (the plain value would be wrong on some machine), else the value in the flags' spelling."""
        if self.per_device:
            return f" (default: {self.per_device})"
        if self.default is None:
            return ""
        value = str(self.default).lower() if isinstance(self.default, bool) else self.default
        return f" (default {value}{self.default_when})"

    @property
    def flag_help(self) -> str:
        """This setting's --help line, the same for every parser that has the flag."""
        repeat = " (repeatable)" if self.kind is PATHS else ""
        return self.help + repeat + self.default_note

    def from_json(self, value: Any) -> Any:
        """A command's field -> canonical value; None when not given."""
        if value is None:
            return None
        checked = self.kind.check(value, False)
        if checked is None:
            raise AudioSepError(INVALID_FIELD, f'"{self.name}" must be {self.kind.expected}, got {json_type(value)}')
        return checked

    def from_text(self, value: Any) -> Any:
        """A flag's, an environment variable's or a policy file's value -> canonical value."""
        checked = self.kind.check(value, True)
        if checked is None:
            raise ValueError(f"{self.name} must be {self.kind.expected}, got {value!r}")
        return checked

    def from_python(self, value: Any) -> Any:
        """A Python caller's value (the API's keywords) -> canonical value; lenient like text, and
        an ``AudioSepError(INVALID_FIELD)`` like JSON."""
        try:
            return self.from_text(value)
        except ValueError as exc:
            raise AudioSepError(INVALID_FIELD, str(exc)) from None


LOAD, SEPARATE, EMBED, BATCH, SET_CACHE_SIZE = "load_model", "separate", "embed", "batch", "set_cache_size"
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
BACKENDS = ("auto", "torch", "openvino")  # engine/backends.py
OUTPUT_SUBTYPES = ("PCM_16", "PCM_24", "FLOAT")
SUBTYPE_ALIASES = {"PCM16": "PCM_16", "16": "PCM_16", "INT16": "PCM_16", "PCM24": "PCM_24", "24": "PCM_24",
                   "INT24": "PCM_24", "FLOAT32": "FLOAT", "F32": "FLOAT", "32F": "FLOAT"}

SETTINGS: tuple[Setting, ...] = (
    # worker-level only
    Setting("max_cached_models", COUNT, 1, "models kept in memory (least recently used goes first)", worker=True),
    Setting("models_dir", PATH, None, "where load_model without paths looks first: config/, checkpoint/, roberta-base/ (the parent app's layout), the seed's flat file names, or a converted folder",
            worker=True),
    # load_model
    Setting("config_path", PATH, None, "AudioSep YAML config (default config/audiosep_base.yaml)", (LOAD,),
            cli="--config", seed=True),
    Setting("checkpoint_path", PATH, None, "AudioSep checkpoint (.ckpt)", (LOAD,), cli="--checkpoint", seed=True),
    Setting("clap_checkpoint_path", PATH, None, "CLAP checkpoint (.pt), optional", (LOAD,), cli="--clap-checkpoint", seed=True),
    Setting("roberta_dir", PATH, None, "roberta-base folder (tokenizer files), optional", (LOAD,), seed=True),
    Setting("model_dir", PATH, None, "converted model folder (instead of a checkpoint)", (LOAD,)),
    Setting("device", DEVICE, "auto", "auto, cpu, cuda, cuda:N or mps", (LOAD,), worker=True, policy=False, seed=True),
    Setting("mmap", BOOL, False, "memory-map checkpoints when loading", (LOAD,), worker=True,
            per_device="on, except on Windows, where a mapped file could not be replaced while loaded", seed=True),
    Setting("use_torch_stft", BOOL_OR_AUTO, False, "torch.stft instead of the conv STFT (auto: for long files)",
            (LOAD, SEPARATE), worker=True, per_device="true on CUDA (cuFFT, faster there), false elsewhere", seed=True),
    Setting("auto_stft_seconds", SECONDS, 60.0, "duration from which use_torch_stft auto picks torch.stft",
            (LOAD, SEPARATE), worker=True, seed=True),
    Setting("chunk_seconds", SECONDS, 30.0, "duration from which use_chunk auto chunks", (LOAD, SEPARATE), worker=True, seed=True),
    Setting("chunk_length", SECONDS, None, "kept centre of each chunk, seconds", (LOAD, SEPARATE),
            per_device="30.72 s on CUDA (less when GPU memory is short), 9.6 s elsewhere"),
    Setting("memory_budget", MEBIBYTES, None, "peak memory of the worker, MiB: full passes and windows are sized to "
            "fit it (a full pass that would not is windowed, with a warning)", (LOAD, SEPARATE), worker=True,
            per_device="2048 MiB on CPU; on CUDA the free GPU memory decides, as without it (engine/memory.py)"),
    Setting("precision", choice(*PRECISIONS), "fp32", "fp32 (exact), tf32 (CUDA matrix units), bf16 or fp16",
            (LOAD,), worker=True, per_device="fp32; on GPUs with TF32 (Ampere and newer) the measured CUDA default "
            "(engine/resolve.py; fp32 until its GPU run)"),
    Setting("load_audio_branch", BOOL, False, "load the CLAP audio branch now, not on the first audio query",
            (LOAD,), worker=True),
    Setting("backend", choice(*BACKENDS), "auto", "runtime of the network on CPU in fp32: auto (measured table), torch or openvino",
            (LOAD,), worker=True,
            per_device="auto, which picks openvino on x86-64 CPUs with AVX2 (when installed), torch elsewhere and on GPUs"),
    Setting("trust_checkpoint", BOOL, False, "unpickle without weights_only (runs code from the file)", (LOAD,),
            cli=""),
    # separate
    Setting("input", PATH, None, "the mixture to separate", (SEPARATE,), required=True, cli="", seed=True),
    Setting("output", PATH, None, "where the separated sound is written", (SEPARATE,), required=True, cli="", seed=True),
    Setting("text", TEXT, "speech", "what to extract, in words", (SEPARATE, EMBED),
            seed=True, default_when=" when no other query is given"),
    Setting("query_audio", PATHS, None, "example audio of the sound: a file, or a list averaged", (SEPARATE, EMBED)),
    Setting("query_start", SECONDS_OR_ZERO, None, "start of the span of query_audio to use, seconds", (SEPARATE, EMBED)),
    Setting("query_end", SECONDS, None, "end of the span of query_audio to use, seconds", (SEPARATE, EMBED)),
    Setting("query_weight", FRACTION, 0.5, "share of the audio embedding when text and query_audio are both given",
            (SEPARATE, EMBED)),
    Setting("query_embedding", NUMBERS, None, "a stored query embedding (from embed), instead of text/audio",
            (SEPARATE, EMBED), cli=""),
    Setting("use_chunk", BOOL_OR_AUTO, False, "stream the file in chunks (auto: from chunk_seconds on)", (SEPARATE,), seed=True),
    Setting("context_seconds", SECONDS_OR_ZERO, 0.64, "context on each side of a chunk (3.52 is exact)", (SEPARATE,)),
    Setting("output_sr", SAMPLE_RATE, 44100, "output rate in Hz, or input", (SEPARATE,)),
    Setting("output_subtype", choice(*OUTPUT_SUBTYPES, aliases=SUBTYPE_ALIASES, fold=str.upper), "PCM_16",
            "sample format of a .wav/.flac/.aiff output (an error with .mp3/.opus/.m4a)", (SEPARATE,)),
    Setting("output_bitrate", BITRATE, "auto", "bitrate of a .mp3/.opus/.m4a output (auto: 192, 128, 192 kbit/s)",
            (SEPARATE,)),
    Setting("output_channels", choice("stereo", "input"), "stereo", "stereo, or the input's channels", (SEPARATE,)),
    Setting("mode", choice("extract", "remove"), "extract", "extract the sound, or remove it from the mix", (SEPARATE,)),
    Setting("residual_output", PATH, None, "also write the rest of the mixture here (with queries: minus every extracted sound)",
            (SEPARATE,)),
    Setting("queries", QUERIES, None, "stems: several queries on one read of the input, each with its own output "
            "(replaces output and text)", (SEPARATE,), cli=""),
    # set_cache_size
    Setting("n", COUNT, None, "the new max_cached_models (evicts down to it at once)", (SET_CACHE_SIZE,), required=True,
            cli=""),
    # batch
    Setting("jobs", JOBS, None, "separate jobs run in order on the loaded model", (BATCH,), required=True, cli=""),
    Setting("stop_on_error", BOOL, False, "stop the batch at the first failed job (the sibling worker's way)", (BATCH,),
            cli=""),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
WORKER_SETTINGS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.worker)
POLICY_SETTINGS: tuple[Setting, ...] = tuple(s for s in WORKER_SETTINGS if s.policy)


def for_command(cmd: str) -> tuple[Setting, ...]:
    return tuple(s for s in SETTINGS if cmd in s.commands)


# What ``queries`` replaces on a separate command: each query has its own output and query fields.
STEMS_REPLACE = ("output", "text", "query_audio", "query_start", "query_end", "query_weight", "query_embedding")


def missing_fields(cmd: str, obj: dict) -> list[str]:
    """The required fields a command object lacks. With ``queries``, the outputs are in the
    queries, and ``output``/``text`` beside them would be ambiguous (an error)."""
    missing = [s.name for s in for_command(cmd) if s.required and obj.get(s.name) is None]
    if cmd == SEPARATE and obj.get("queries") is not None:
        given = [n for n in STEMS_REPLACE if obj.get(n) is not None]
        if given:
            raise AudioSepError(INVALID_FIELD, f'give "queries" or top-level "output" and query fields, not both ({", ".join(given)} given)')
        missing = [m for m in missing if m not in STEMS_REPLACE]
    return missing


def args_record(cmd: str, class_name: str) -> type:
    """A frozen record of a command's fields: required ones first, then optional ones whose
    ``None`` means "not given" (the worker falls back to flag, environment, policy, default).
    ``text`` too: without any query field the seed's "speech" applies (engine/query.py)."""
    fields: list[tuple] = [(s.name, Any) for s in for_command(cmd) if s.required]
    fields += [(s.name, Any, field(default=None)) for s in for_command(cmd) if not s.required]
    return make_dataclass(class_name, fields, frozen=True)


def worker_settings_record() -> type:
    """The worker-level settings, with where each value came from."""
    fields: list[tuple] = [(s.name, Any, field(default=s.default)) for s in WORKER_SETTINGS]
    fields += [("sources", dict, field(default_factory=dict, compare=False)), ("policy_path", Any, field(default=None))]
    return make_dataclass("Settings", fields, frozen=True)


def extension_field_names() -> list[str]:
    """The command fields beyond the seed's contract, in table order: ``ready`` lists them among
    its capabilities, so a client can see what this worker understands."""
    return [s.name for s in SETTINGS if s.commands and not s.seed]


def markdown_table() -> str:
    """The settings table of docs/settings.md."""
    rows = ["| setting | values | default | per-device default | commands | flag / env / policy | meaning |",
            "|---|---|---|---|---|---|---|"]
    for s in SETTINGS:
        where = [s.flag, f"`{s.env}`"] + (["policy"] if s.policy else []) if s.worker else []
        default = "" if s.default is None else f"`{str(s.default).lower() if isinstance(s.default, bool) else s.default}`"
        rows.append(
            f"| `{s.name}` | {s.kind.expected} | {default} | {s.per_device} | {', '.join(s.commands)} "
            f"| {' '.join(w if w.startswith('`') or w == 'policy' else f'`{w}`' for w in where)} | {s.help} |"
        )
    return "\n".join(rows) + "\n"


TABLE_BEGIN, TABLE_END = "<!-- settings table: begin -->\n", "<!-- settings table: end -->"


def with_table(document: str) -> str:
    """``document`` (docs/settings.md) with the text between its table markers regenerated."""
    head, rest = document.split(TABLE_BEGIN, 1)
    return head + TABLE_BEGIN + markdown_table() + TABLE_END + rest.split(TABLE_END, 1)[1]


if __name__ == "__main__":
    # python -m dsu_audiosep.options               print the table
    # python -m dsu_audiosep.options FILE.md       regenerate the table inside FILE.md (docs/settings.md)
    import sys

    if len(sys.argv) > 1:
        with open(sys.argv[1], encoding="utf-8") as f:
            text = with_table(f.read())
        with open(sys.argv[1], "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(markdown_table(), end="")
