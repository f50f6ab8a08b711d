"""A folder run on this machine: the planned jobs one after another on one loaded model, with a
progress display on stderr.

Progress: on a terminal, one line redrawn in place (files done, audio seconds done, time left
estimated from audio seconds, the current file); otherwise one plain line per finished file, so a
log or a pipe gets readable text without carriage returns. About forty lines of our own rather
than tqdm: tqdm is in the development environment only through transformers (not in the frozen
bundle), its rate is per item while the time left here is per audio second inside a file, and
the two display modes are a few writes each.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TextIO

from .plan import FileJob, FolderQuery, Manifest, OutputResult, run_file_job

from ..options import BY_NAME

# Query settings a folder run takes several times (one output per query per file), and the ones
# that only make sense for one query (a span, a mix weight: give those on a one-shot separate).
REPEATED = ("text", "query_audio")
NOT_IN_FOLDER_RUNS = ("query_start", "query_end", "query_weight", "query_embedding")
REDRAW_INTERVAL_S = 0.1
BAR_WIDTH = 24


def _clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:d}:{rest % 60:02d}"


class Progress:
    """Files and audio seconds done; ``terminal`` picks the redrawn bar or plain lines."""

    def __init__(self, jobs: Sequence[FileJob], out: TextIO, terminal: bool, clock: Callable[[], float] = time.monotonic):
        self.out, self.terminal, self.clock = out, terminal, clock
        self.files = len(jobs)
        self.total_s = sum(j.seconds or 0.0 for j in jobs)
        self.done_files, self.done_s, self.current_s, self.current = 0, 0.0, 0.0, ""
        self.started = clock()
        self._last_draw = -1.0

    def start_file(self, job: FileJob) -> Callable[[float], None]:
        self.current, self.current_s = os.path.basename(job.input), 0.0
        length = job.seconds or 0.0

        def fraction(f: float) -> None:
            self.current_s = max(0.0, min(1.0, f)) * length
            self._draw()

        self._draw(force=True)
        return fraction

    def finish_file(self, job: FileJob, results: list[OutputResult]) -> None:
        self.done_files += 1
        self.done_s += job.seconds or 0.0
        self.current_s = 0.0
        if self.terminal:
            self._draw(force=True)
            return
        failed = [r for r in results if r.error]
        ran = [r for r in results if not r.skipped and not r.error]
        status = (f"error ({failed[0].code}): {failed[0].error}" if failed
                  else f"{len(ran)} written, {len(results) - len(ran)} skipped" + (f" in {ran[0].elapsed:.1f} s" if ran else ""))
        self.out.write(f"[{self.done_files}/{self.files}] {job.input}: {status}\n")
        self.out.flush()

    def close(self) -> None:
        if self.terminal:
            self.out.write("\n")
            self.out.flush()

    def _draw(self, force: bool = False) -> None:
        now = self.clock()
        if not self.terminal or (not force and now - self._last_draw < REDRAW_INTERVAL_S):
            return
        self._last_draw = now
        audio = self.done_s + self.current_s
        share = audio / self.total_s if self.total_s else self.done_files / max(1, self.files)
        left = (now - self.started) * (1 - share) / share if share > 0 else None
        filled = int(BAR_WIDTH * min(1.0, share))
        line = (f"\r[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {self.done_files}/{self.files} files "
                f"{audio:.0f}/{self.total_s:.0f} s audio, {_clock_text(left)} left  {self.current[:30]}")
        self.out.write(line + "\x1b[K")  # clear what a longer previous line left
        self.out.flush()


@dataclass
class RunSummary:
    outputs: int = 0
    written: int = 0
    skipped: int = 0
    failed: int = 0


def run_jobs(jobs: Sequence[FileJob], engine: Any, model: Any, load_plan: Any, fields: dict[str, Any],
             manifest: Manifest, progress: Progress) -> RunSummary:
    """Every job in order; a failed file is its results (and manifest lines), the run goes on."""
    summary = RunSummary()
    for job in jobs:
        on_fraction = progress.start_file(job)
        results = run_file_job(engine, model, load_plan, job, fields, progress=on_fraction)
        manifest.write(results)
        progress.finish_file(job, results)
        for r in results:
            summary.outputs += 1
            summary.skipped += r.skipped
            summary.failed += r.error is not None
            summary.written += not r.skipped and r.error is None
    progress.close()
    return summary


def add_folder_arguments(parser: Any) -> None:
    """The folder run's own arguments (the shared separate flags come from the options table)."""
    from .plan import DEFAULT_TEMPLATE

    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files, folders (searched recursively) or globs")
    parser.add_argument("--out-dir", required=True, help="where the outputs go (subfolders of an input folder are mirrored)")
    for name in REPEATED:
        setting = BY_NAME[name]
        parser.add_argument(setting.cli_flag, dest=setting.name, action="append", metavar=setting.kind.metavar,
                            help=f"{setting.help.split(':')[0]}; repeat for several (one output each)")
    parser.add_argument("--name-template", default=DEFAULT_TEMPLATE,
                        help=f"output name from {{stem}}, {{query}}, {{ext}} (default {DEFAULT_TEMPLATE})")
    parser.add_argument("--extensions", type=_extensions, default=None, metavar="EXT,...",
                        help="only these extensions when searching folders, e.g. wav,flac (default: every audio "
                        "and video extension read)")
    parser.add_argument("--skip-existing", action="store_true", help="leave outputs that exist alone (resume a run)")
    parser.add_argument("--manifest", help="append one JSON line per finished output to this file")


def _extensions(text: str) -> frozenset[str]:
    import argparse

    from .plan import parse_extensions

    try:
        return parse_extensions(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def take_queries(ns: Any) -> list[FolderQuery]:
    """The repeated query flags' values (texts first, then example files, each in the order given),
    removed from ``ns`` (the rest are one value each)."""
    queries = [FolderQuery(text=t) for t in getattr(ns, "text") or []]
    queries += [FolderQuery(audio=a) for a in getattr(ns, "query_audio") or []]
    for name in REPEATED:
        setattr(ns, name, None)
    return queries


def folder_main(ns: Any, queries: list[FolderQuery], load: dict[str, Any], job: dict[str, Any]) -> int:
    """``dsu-audiosep separate INPUT... --out-dir DIR``: plan, load the model once, run every file.
    stdout gets one JSON summary line; exit status 1 when any output failed."""
    import json
    import sys

    from ..engine.torch_engine import TorchEngine
    from ..worker import protocol as P
    from ..worker.failures import describe_exception
    from ..worker.model_paths import check_exists, resolve_model_paths
    from ..worker.policy import resolve_settings
    from .plan import expand_inputs, plan_run

    engine = TorchEngine()
    fields = {k: v for k, v in job.items() if v is not None and k not in ("cmd", "input", "output", "text")}
    manifest = None
    try:
        # the shared fields checked once, as the worker checks them, before any model is loaded
        P.parse_object({"cmd": "separate", "input": "-", "output": "-.wav", **fields})
        load_args = P.parse_object({k: v for k, v in load.items() if v is not None}).args
        inputs, missing = expand_inputs(ns.inputs, exclude_dir=ns.out_dir, extensions=getattr(ns, "extensions", None))
        jobs = plan_run(inputs, missing, queries, ns.out_dir, ns.name_template, ns.skip_existing, probe=engine.probe)
        manifest = Manifest(ns.manifest)
        model = load_plan = None
        if any(j.outputs and j.error is None for j in jobs):
            os.makedirs(ns.out_dir, exist_ok=True)
            engine.start()
            paths = resolve_model_paths(load_args)
            load_plan = engine.plan_load(load_args, resolve_settings({}))
            check_exists(paths)
            model = engine.load_model(paths, load_plan, bool(load_args.trust_checkpoint))
        summary = run_jobs(jobs, engine, model, load_plan, fields, manifest,
                           Progress(jobs, sys.stderr, terminal=sys.stderr.isatty()))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a failure before the first file: the run did not start
        code, message, _extra = describe_exception(exc, engine.release_memory)
        sys.stderr.write(f"dsu-audiosep: error ({code}): {message}\n")
        return 1
    finally:
        if manifest is not None:
            manifest.close()
    sys.stdout.write(json.dumps({"status": "done", "files": len(jobs), **summary.__dict__}) + "\n")
    return 1 if summary.failed else 0
