"""The driver of a distributed folder run: ``dsu-audiosep separate INPUT... --out-dir DIR --ray``.

Planning is the local folder run's (folder/plan.py: inputs, output names, ``--skip-existing``,
planning errors), and so are the manifest lines and the JSON summary on stdout. What differs is
where the planned jobs run: a Ray Data ``map_batches`` over a fixed pool of ``FileSeparator``
actors, one job per block, results streamed back as they finish (not in input order).

Faults: a file that fails is its error results (the actor catches it, as the local loop does); an
actor that dies is restarted and its job retried (session.MAX_RESTARTS / MAX_TASK_RETRIES); a job
still lost after its retries is reported with ``worker_lost`` and the others finish. Outputs are
written by the engine's atomic writer, so a killed actor leaves no half file under a final name
(its hidden partial file is swept by the next writer into that folder on the same host, and by
this driver at the end for the local instance). Ctrl-C stops the pool, leaves the cluster (a local
instance stops), keeps the manifest lines written so far and exits 130; ``--skip-existing``
resumes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import sys
import time
from typing import Any, Callable, Iterator, Sequence, TextIO

from . import session as S

EXIT_INTERRUPTED = 130


class RayProgress:
    """Files done, audio hours processed and throughput: one redrawn line on a terminal, else one
    line per finished file (readable in a log or a pipe)."""

    def __init__(self, jobs: Sequence[Any], out: TextIO, terminal: bool, clock: Callable[[], float] = time.monotonic):
        self.out, self.terminal, self.clock = out, terminal, clock
        self.files = len(jobs)
        self.total_s = sum(j.seconds or 0.0 for j in jobs if j.outputs and j.error is None)
        self.done_files, self.done_s = 0, 0.0
        self.started = clock()

    def restart_clock(self) -> None:
        """Throughput counts from when the pool starts (cluster start-up is reported apart)."""
        self.started = self.clock()

    def rates(self) -> tuple[float, float]:
        """(files per minute, audio seconds per wall second) since the clock started."""
        wall = max(self.clock() - self.started, 1e-9)
        return 60.0 * self.done_files / wall, self.done_s / wall

    def file_done(self, job: Any, results: Sequence[Any], host: str = "") -> None:
        self.done_files += 1
        ran = [r for r in results if not r.skipped and r.error is None]
        if ran:
            self.done_s += job.seconds or 0.0
        per_min, realtime = self.rates()
        figures = (f"{self.done_s / 3600:.3f}/{self.total_s / 3600:.3f} h audio, {per_min:.1f} files/min, "
                   f"{realtime:.2f}x real time")
        if self.terminal:
            self.out.write(f"\r{self.done_files}/{self.files} files, {figures}\x1b[K")
        else:
            self.out.write(f"[{self.done_files}/{self.files}] {job.input}: {_status(results)}"
                           f"{f' on {host}' if host and ran else ''} | {figures}\n")
        self.out.flush()

    def close(self) -> None:
        if self.terminal:
            self.out.write("\n")
            self.out.flush()


def _status(results: Sequence[Any]) -> str:
    failed = [r for r in results if r.error]
    if failed:
        return f"error ({failed[0].code}): {failed[0].error}"
    ran = [r for r in results if not r.skipped]
    return f"{len(ran)} written, {len(results) - len(ran)} skipped" + (f" in {ran[0].elapsed:.1f} s" if ran else "")


def _portable(job: Any) -> Any:
    """The job as an actor on another node needs it: an absolute input path (outputs already are)."""
    return dataclasses.replace(job, input=os.path.abspath(job.input))


def stream_jobs(todo: Sequence[Any], load: dict[str, Any], fields: dict[str, Any], pool: S.PoolRequest,
                actors: int) -> Iterator[tuple[int, list[Any], str]]:
    """(index into ``todo``, its results, the host that ran it) for each job, as they finish."""
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    from .actor import FileSeparator

    # A job whose task failed past its retries is one errored block: the run goes on (the driver
    # reports that job as lost) instead of aborting every other file.
    DataContext.get_current().max_errored_blocks = -1
    rows = [{"index": i, "job": pickle.dumps(_portable(job))} for i, job in enumerate(todo)]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    threads = max(1, int(pool.cpus_per_actor)) if pool.cpus_per_actor >= 1 else None
    mapped = dataset.map_batches(
        FileSeparator,
        fn_constructor_kwargs={"load": load, "fields": fields, "threads": threads},
        batch_size=1,
        # Two tasks in flight per actor: the next job is queued while one runs, and at most one
        # waits behind a long file while another actor idles.
        compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
        num_cpus=pool.cpus_per_actor,
        num_gpus=pool.gpus_per_actor or None,
        max_restarts=S.MAX_RESTARTS,
        max_task_retries=S.MAX_TASK_RETRIES,
    )
    for row in mapped.iter_rows():
        yield int(row["index"]), pickle.loads(row["results"]), str(row["host"])


def _as_named(results: Sequence[Any], job: Any) -> list[Any]:
    """Results with the input as the user named it (the actor saw it absolute), so the manifest
    lines read as the local run's, error messages included."""
    shipped = _portable(job).input
    return [dataclasses.replace(r, input=job.input, error=r.error.replace(shipped, job.input) if r.error else r.error)
            for r in results]


def _lost(job: Any) -> list[Any]:
    from ..errors import WORKER_LOST
    from ..folder.plan import OutputResult

    message = (f"no result came back for this file: its actor died on each of {S.MAX_TASK_RETRIES + 1} tries "
               "(killed, out of memory, a crash in a library) or failed outside the separation (the Ray "
               "messages above say which); the other files went on")
    return [OutputResult(job.input, o.query, o.output, 0.0, message, WORKER_LOST) for o in job.outputs]


def _model_fields(load_args: Any, load: dict[str, Any]) -> dict[str, Any]:
    """The load_model fields with the model's files resolved here (absolute, defaults applied),
    so that every actor loads the same files whatever its working folder."""
    from ..worker.model_paths import check_exists, resolve_model_paths

    paths = resolve_model_paths(load_args)
    check_exists(paths)  # a missing model fails the run before any cluster starts
    resolved = {k: v for k, v in dataclasses.asdict(paths).items() if v is not None}
    return {**{k: v for k, v in load.items() if v is not None and k not in resolved and k != "cmd"}, **resolved,
            "cmd": "load_model"}


@dataclasses.dataclass
class Tally:
    """The run's counts, as the local folder run reports them, plus the cluster's figures."""

    outputs: int = 0
    written: int = 0
    skipped: int = 0
    failed: int = 0

    def add(self, results: Sequence[Any]) -> None:
        for r in results:
            self.outputs += 1
            self.skipped += r.skipped
            self.failed += r.error is not None
            self.written += not r.skipped and r.error is None


def run_distributed(jobs: Sequence[Any], load: dict[str, Any], fields: dict[str, Any], pool: S.PoolRequest,
                    address: str | None, manifest: Any, progress: RayProgress, tally: Tally,
                    figures: dict[str, Any], warn: Callable[[str], None]) -> None:
    """Jobs that need no model (planning errors, everything skipped) are reported here; the rest
    go through the pool. ``figures``: the summary's cluster figures, filled in as they are known
    (an interrupted run still reports them)."""
    from ..folder.plan import run_file_job

    todo = [j for j in jobs if j.outputs and j.error is None]
    for job in jobs:
        if not (job.outputs and job.error is None):
            results = run_file_job(None, None, None, job, fields)
            manifest.write(results)
            tally.add(results)
            progress.file_done(job, results)
    figures["actors"] = 0
    if not todo:
        return
    started = time.monotonic()
    session = S.connect(address, pool, warn)
    try:
        figures.update(actors=session.actors, startup=round(time.monotonic() - started, 3))
        progress.restart_clock()
        finished: set[int] = set()
        for index, results, host in stream_jobs(todo, load, fields, pool, session.actors):
            job = todo[index]
            results = _as_named(results, job)
            finished.add(index)
            manifest.write(results)
            tally.add(results)
            progress.file_done(job, results, host)
        for index, job in enumerate(todo):
            if index not in finished:
                results = _lost(job)
                manifest.write(results)
                tally.add(results)
                progress.file_done(job, results)
    finally:
        S.disconnect(session)
        _sweep_partials(todo)


def _sweep_partials(todo: Sequence[Any]) -> None:
    """Partial files of actors that died on this host (a stopped local instance's, an interrupted
    run's). Another host's files are left to that host's next writer."""
    from ..engine import partials

    for folder in sorted({os.path.dirname(o.output) for job in todo for o in job.outputs}):
        try:
            partials.sweep(folder)
        except OSError:
            pass


def ray_main(ns: Any, queries: list[Any], load: dict[str, Any], job: dict[str, Any]) -> int:
    """``dsu-audiosep separate INPUT... --out-dir DIR --ray``: stdout gets one JSON summary line,
    as the local folder run's (plus the cluster's figures); exit 1 when any output failed, 130
    when interrupted. Ray prints its workers' and raylet's messages on the driver's stdout; they
    go to stderr here, so that stdout stays one JSON line."""
    from ..worker.failures import describe_exception

    stdout = sys.stdout
    run = _Run(ns, queries, load, job)
    with contextlib.redirect_stdout(sys.stderr):
        try:
            run.execute()
            status, code = "done", 1 if run.tally.failed else 0
        except KeyboardInterrupt:
            status, code = "interrupted", EXIT_INTERRUPTED
        except BaseException as exc:  # a failure before or around the pool (model files, cluster): no run
            code, message, _extra = describe_exception(exc, lambda: None)
            sys.stderr.write(f"dsu-audiosep: error ({code}): {message}\n")
            return 1
        finally:
            run.close()
    return _summarize(status, code, run, stdout)


class _Run:
    """One distributed folder run: its plan, manifest, progress and counts."""

    def __init__(self, ns: Any, queries: list[Any], load: dict[str, Any], job: dict[str, Any]):
        from .flags import pool_request

        self.ns, self.queries, self.load = ns, queries, load
        self.fields = {k: v for k, v in job.items() if v is not None and k not in ("cmd", "input", "output", "text")}
        self.pool = pool_request(ns)
        self.tally, self.figures = Tally(), {}
        self.jobs: list[Any] = []
        self.manifest: Any = None
        self.progress: RayProgress | None = None
        self.started = time.monotonic()

    def execute(self) -> None:
        from ..engine.torch_engine import TorchEngine
        from ..folder.plan import Manifest, expand_inputs, plan_run
        from ..worker import protocol as P

        ns = self.ns
        engine = TorchEngine()  # probes the inputs; torch is never imported by the driver
        P.parse_object({"cmd": "separate", "input": "-", "output": "-.wav", **self.fields})
        load_args = P.parse_object({k: v for k, v in self.load.items() if v is not None}).args
        inputs, missing = expand_inputs(ns.inputs, exclude_dir=ns.out_dir, extensions=getattr(ns, "extensions", None))
        self.jobs = plan_run(inputs, missing, self.queries, ns.out_dir, ns.name_template, ns.skip_existing,
                             probe=engine.probe)
        model = _model_fields(load_args, self.load) if any(j.outputs and j.error is None for j in self.jobs) else {}
        os.makedirs(ns.out_dir, exist_ok=True)
        self.manifest = Manifest(ns.manifest)
        self.progress = RayProgress(self.jobs, sys.stderr, terminal=sys.stderr.isatty())
        run_distributed(self.jobs, model, self.fields, self.pool, ns.ray_address, self.manifest, self.progress,
                        self.tally, self.figures, _warn)

    def close(self) -> None:
        if self.manifest is not None:
            self.manifest.close()
        if self.progress is not None:
            self.progress.close()


def _warn(message: str) -> None:
    sys.stderr.write(f"dsu-audiosep: warning: {message}\n")


def _summarize(status: str, code: int, run: _Run, stdout: TextIO) -> int:
    progress, tally, jobs = run.progress, run.tally, run.jobs
    elapsed = time.monotonic() - run.started
    per_min, realtime = progress.rates() if progress is not None else (0.0, 0.0)
    audio_s = progress.done_s if progress is not None else 0.0
    summary = {"status": status, "files": len(jobs), **dataclasses.asdict(tally), **run.figures,
               "elapsed": round(elapsed, 3), "audio_seconds": round(audio_s, 3),
               "files_per_minute": round(per_min, 2), "realtime_factor": round(realtime, 3)}
    done = progress.done_files if progress is not None else 0
    sys.stderr.write(
        f"dsu-audiosep: {status}: {done}/{len(jobs)} files, {tally.written} outputs written, {tally.skipped} skipped, "
        f"{tally.failed} failed; {audio_s / 3600:.3f} h audio in {elapsed:.1f} s "
        f"({per_min:.1f} files/min, {realtime:.2f}x real time on {run.figures.get('actors', 0)} actors)\n")
    if status == "interrupted":
        sys.stderr.write("dsu-audiosep: interrupted; run the same command with --skip-existing to resume\n")
    stdout.write(json.dumps(summary) + "\n")
    stdout.flush()
    return code
