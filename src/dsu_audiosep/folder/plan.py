"""What a folder run does, decided before anything runs, and how one planned file runs.

- ``expand_inputs``: files, folders (recursive, by audio extension) and globs -> input files;
- ``plan_run``: one ``FileJob`` per input with its queries' output paths (``--name-template``),
  already-written outputs left out (``--skip-existing``), planning errors (a missing file, two
  inputs writing one output, an output that is its input) recorded on the job, not raised;
- ``run_file_job``: one job on an already-loaded model through the engine (one read of the file,
  every query on the same windows), returning one small ``OutputResult`` per output: what a
  local loop or a cluster actor calls;
- ``Manifest``: one JSON line per finished output (input, query, output, elapsed, error).
"""
from __future__ import annotations

import glob
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..engine.queries import output_key
from ..errors import DUPLICATE_OUTPUT, FILE_NOT_FOUND, INVALID_FIELD, OUTPUT_ERROR, AudioSepError

# Inputs found in folders (an explicitly named file is taken whatever its extension).
# libsndfile's, then what PyAV decodes (engine/audio_decode_av.py), video soundtracks included.
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3", ".opus", ".m4a",
                              ".aac", ".mp4", ".mov", ".mkv", ".mka", ".webm", ".avi", ".wma", ".ac3", ".eac3", ".caf"})
# Output containers (engine/output_options.py) an input's {ext} keeps; another input extension is
# written as .wav. The lossy .mp3/.opus/.m4a are left out on purpose: a folder run should not
# re-encode a lossy file lossily unless the template asks for it (e.g. "{stem}_{query}.mp3").
OUTPUT_EXTENSIONS = frozenset({"wav", "flac", "ogg", "oga", "aiff", "aif"})
DEFAULT_TEMPLATE = "{stem}_{query}.{ext}"
MAX_QUERY_NAME = 60


@dataclass(frozen=True)
class InputFile:
    path: str
    rel_dir: str = ""  # folder below the named input folder, mirrored under the output folder


@dataclass(frozen=True)
class FolderQuery:
    """One query of a folder run: a text (``--text``) or an example audio file (``--query-audio``)."""

    text: str | None = None
    audio: str | None = None

    @property
    def name(self) -> str:
        """What ``{query}`` in an output name stands for: the text, or the example file's stem."""
        return self.text if self.text is not None else Path(self.audio or "").stem


@dataclass(frozen=True)
class PlannedOutput:
    query: str  # the query text, or the example audio file (manifest lines say which)
    output: str
    audio: bool = False  # ``query`` is an example audio file (query_audio), not a text

    @property
    def fields(self) -> dict[str, Any]:
        """The query's fields in a separate command's ``queries`` entry."""
        return {"query_audio": self.query} if self.audio else {"text": self.query}


@dataclass(frozen=True)
class FileJob:
    """One input and the outputs still to write; ``error`` set when it cannot run at all."""

    input: str
    outputs: tuple[PlannedOutput, ...]
    skipped: tuple[PlannedOutput, ...] = ()  # already written (--skip-existing)
    seconds: float | None = None  # the input's length, when it could be probed
    error: tuple[str, str] | None = None  # (code, message)


@dataclass(frozen=True)
class OutputResult:
    """One output's outcome: a manifest line, and all a runner keeps of a finished output."""

    input: str
    query: str
    output: str
    elapsed: float
    error: str | None = None
    code: str | None = None
    skipped: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.skipped:
            del data["skipped"]
        return data


def safe_query_name(text: str) -> str:
    """A query as a file-name part: letters, digits, '-', '.', '_' (runs of others become one '_')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")[:MAX_QUERY_NAME].strip("._")
    return name or "query"


def parse_extensions(text: str) -> frozenset[str]:
    """``--extensions wav,flac`` -> {".wav", ".flac"} (case and leading dots ignored)."""
    exts = frozenset("." + e.strip().lower().lstrip(".") for e in str(text).split(",") if e.strip().lstrip("."))
    if not exts:
        raise ValueError(f"--extensions {text!r}: give extensions separated by commas, e.g. wav,flac")
    return exts


def expand_inputs(args: Sequence[str], exclude_dir: str | None = None,
                  extensions: frozenset[str] | None = None) -> tuple[list[InputFile], list[str]]:
    """(input files in order, arguments that matched nothing). Folders are searched recursively
    for audio extensions (``extensions`` when given, e.g. from ``--extensions wav,flac``, else
    AUDIO_EXTENSIONS), skipping ``exclude_dir`` (the output folder may sit inside an input
    folder: its results must not become inputs); globs may use ``**``. A file named outright is
    taken whatever its extension."""
    wanted = AUDIO_EXTENSIONS if extensions is None else extensions
    found: list[InputFile] = []
    missing: list[str] = []
    seen: set[str] = set()
    excluded = output_key(exclude_dir) + os.sep if exclude_dir else None

    def add(path: str, rel_dir: str = "") -> None:
        key = output_key(path)
        if key not in seen and not (excluded and key.startswith(excluded)):
            seen.add(key)
            found.append(InputFile(path, rel_dir))

    for arg in args:
        if os.path.isdir(arg):
            for root, dirs, files in os.walk(arg):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in wanted and not name.startswith("."):
                        add(os.path.join(root, name), os.path.relpath(root, arg) if root != arg else "")
        elif os.path.isfile(arg):
            add(arg)
        elif glob.has_magic(arg) and (matches := sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p))):
            for p in matches:
                add(p)
        else:
            missing.append(arg)
    return found, missing


def output_name(template: str, input_path: str, query: str) -> str:
    """The output file name of one query of one input; AudioSepError(INVALID_FIELD) for a bad template."""
    ext = Path(input_path).suffix.lower().lstrip(".")
    fields = {"stem": Path(input_path).stem, "query": safe_query_name(query),
              "ext": ext if ext in OUTPUT_EXTENSIONS else "wav"}
    try:
        name = template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise AudioSepError(INVALID_FIELD, f"--name-template {template!r}: {exc!r}; use {{stem}}, {{query}} and {{ext}}") from None
    if not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise AudioSepError(INVALID_FIELD, f"--name-template {template!r} gives {name!r}: a name inside --out-dir is needed")
    return name


def plan_run(inputs: Iterable[InputFile], missing: Iterable[str], queries: Sequence[str | FolderQuery], out_dir: str,
             template: str = DEFAULT_TEMPLATE, skip_existing: bool = False,
             probe: Callable[[str], Any] | None = None) -> list[FileJob]:
    """One job per input (and one failed job per argument that matched nothing), in order.
    ``queries``: texts, or FolderQuery records (texts or example audio files)."""
    queries = [q if isinstance(q, FolderQuery) else FolderQuery(text=q) for q in queries]
    if not queries:
        raise AudioSepError(INVALID_FIELD, "give at least one --text or --query-audio")

    def planned(q: FolderQuery, output: str) -> PlannedOutput:
        return PlannedOutput(q.text, output) if q.text is not None else PlannedOutput(q.audio or "", output, audio=True)

    jobs: list[FileJob] = [FileJob(arg, tuple(planned(q, "") for q in queries),
                                   error=(FILE_NOT_FOUND, f"no such file, folder or glob match: {arg}"))
                           for arg in missing]
    claimed: dict[str, str] = {}  # output key -> the input that writes it
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    for f in inputs:
        outputs = tuple(planned(q, os.path.join(out_dir, f.rel_dir, output_name(template, f.path, q.name)))
                        for q in queries)
        error = _conflict(f.path, outputs, claimed)
        todo, done = outputs, ()
        if skip_existing and error is None:
            todo = tuple(o for o in outputs if not os.path.exists(o.output))
            done = tuple(o for o in outputs if os.path.exists(o.output))
        info = probe(f.path) if probe is not None and todo and error is None else None
        jobs.append(FileJob(f.path, todo, done, getattr(info, "duration", None), error))
    return jobs


def _conflict(input_path: str, outputs: tuple[PlannedOutput, ...], claimed: dict[str, str]) -> tuple[str, str] | None:
    """Why this input's outputs cannot be written (None when they can); claims them otherwise."""
    source = output_key(input_path)
    keys = [output_key(o.output) for o in outputs]
    for o, key in zip(outputs, keys):
        if key == source:
            return OUTPUT_ERROR, f"output {o.output} would overwrite its input"
        if key in claimed or keys.count(key) > 1:
            other = claimed.get(key, input_path)
            return DUPLICATE_OUTPUT, (f"output {o.output} is also written for {other}; change --name-template "
                                      "(e.g. add {query}) or the inputs")
    claimed.update({key: input_path for key in keys})
    return None


# --------------------------------------------------------------------------------------------
# Running one planned file


def separate_command(job: FileJob, fields: dict[str, Any]) -> dict[str, Any]:
    """The worker's separate command for one job: every query on one read of the file."""
    return {"cmd": "separate", "input": job.input, **fields,
            "queries": [{**o.fields, "output": o.output} for o in job.outputs]}


def run_file_job(engine: Any, model: Any, load_plan: Any, job: FileJob, fields: dict[str, Any] | None = None,
                 progress: Callable[[float], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> list[OutputResult]:
    """Run one planned job on a loaded model (``engine``: engine/torch_engine.TorchEngine or one
    with its methods; ``load_plan``: its LoadPlan). ``fields``: the separate fields shared by every
    job (output format, chunking). Never raises for a job's own failure: each output's result
    says what happened. KeyboardInterrupt and cancellation's error pass through as results too."""
    from ..worker import protocol as P
    from ..worker.failures import describe_exception

    skipped = [OutputResult(job.input, o.query, o.output, 0.0, skipped=True) for o in job.skipped]
    if job.error is not None:
        code, message = job.error
        return skipped + [OutputResult(job.input, o.query, o.output, 0.0, message, code) for o in job.outputs]
    if not job.outputs:
        return skipped
    started = time.perf_counter()
    try:
        for folder in sorted({os.path.dirname(o.output) for o in job.outputs}):
            os.makedirs(folder, exist_ok=True)  # subfolders of an input folder, mirrored
        args = P.parse_object(separate_command(job, fields or {})).args
        plan = engine.plan_job(args, load_plan)
        outcome = engine.separate(model, plan, progress=progress, cancelled=cancelled)
        files = list(outcome.files)
        error = code = None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # as the worker: one file's failure is its result
        code, error, _extra = describe_exception(exc, engine.release_memory)
        files = [o.output for o in job.outputs]
    elapsed = round(time.perf_counter() - started, 3)
    return skipped + [OutputResult(job.input, o.query, f, elapsed, error, code) for o, f in zip(job.outputs, files)]


class Manifest:
    """``--manifest FILE.jsonl``: appended to (a resumed run adds its lines), flushed per line."""

    def __init__(self, path: str | None):
        self._file = open(path, "a", encoding="utf-8") if path else None

    def write(self, results: Iterable[OutputResult]) -> None:
        if self._file is None:
            return
        for r in results:
            self._file.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
