"""The ``batch`` command: separate jobs in order on the loaded model, one terminal reply.

Every job was checked by the protocol before the batch starts (protocol.BatchJob): a malformed
job is reported in its result and the others run. What is kept per finished job is its result (a
few fields), so a batch of thousands of jobs holds no more than its results. ``cancel`` with the
batch's id stops the running job at its next window and the batch with it; SIGTERM does the same
through the worker's shutdown, and the engine deletes the unfinished output, so only finished
outputs remain. Lines while it runs: ``separating`` per job (``job``, ``jobs``, ``input``), and with
``"progress": true`` progress lines with the overall ``percent``, the ``job`` index and its
``job_percent``; heartbeats carry the overall percent.
"""
from __future__ import annotations

import time
from typing import Any

from .. import errors
from ..errors import AudioSepError
from . import protocol as P
from .failures import describe_exception
from .jobs import ProgressReporter

Worker = Any  # the loop's Worker (named, not imported: imports stay one way)


def batch(w: "Worker", cmd: P.Command) -> dict:
    if w.current is None or w.session is None:
        raise AudioSepError(errors.MODEL_NOT_LOADED, "no model is loaded: send load_model first")
    jobs: tuple[P.BatchJob, ...] = cmd.args.jobs  # type: ignore[union-attr]
    stop_on_error = bool(cmd.args.stop_on_error)  # type: ignore[union-attr]
    reporter = ProgressReporter(w.heartbeat.send, cmd.id, "separating") if cmd.progress else None
    results: list[dict] = []
    failed: dict | None = None
    cancelled = False
    for job in jobs:
        if w.tracker.cancelled():
            cancelled = True
            break
        result = _run_job(w, cmd, job, len(jobs), reporter)
        results.append(result)
        if result.get("code") == errors.CANCELLED:
            cancelled = True
            break
        if result["status"] == "error" and stop_on_error:
            failed = result
            break
    results += [_result(job, "not_run") for job in jobs[len(results):]]
    if reporter is not None and not cancelled and failed is None:
        reporter.fields = {"job": jobs[-1].index, "job_percent": 100.0}
        reporter.finish()  # 100 even when the last job was malformed
    counts = {"jobs": len(jobs), "done": sum(r["status"] == "done" for r in results),
              "failed": sum(r["status"] == "error" for r in results),
              "not_run": sum(r["status"] == "not_run" for r in results)}
    if cancelled:
        return P.error_reply(errors.CANCELLED, "batch was cancelled; finished jobs' outputs are kept", cmd.id,
                             results=results, **counts)
    if failed is not None:
        return P.error_reply(failed["code"], f"{failed['message']} (stop_on_error: the batch stopped)", cmd.id,
                             results=results, **counts)
    return P.reply("done", cmd.id, results=results, **counts)


def _result(job: P.BatchJob, status: str, **fields: Any) -> dict:
    out: dict[str, Any] = {} if job.id is P.NO_ID else {"id": job.id}
    out.update(index=job.index, status=status, files=fields.pop("files", []), **fields)
    return out


def _run_job(w: "Worker", cmd: P.Command, job: P.BatchJob, count: int, reporter: ProgressReporter | None) -> dict:
    """One job; its result whatever happens (the batch goes on unless told to stop)."""
    if job.error is not None:
        return _result(job, "error", elapsed=0.0, code=job.error[0], message=job.error[1])
    started = time.perf_counter()
    args = job.args
    w.heartbeat.status(P.reply("separating", cmd.id, input=args.input, job=job.index, jobs=count))

    def fraction(f: float) -> None:
        overall = (job.index + min(max(float(f), 0.0), 1.0)) / count
        w.heartbeat.fraction(overall)
        if reporter is not None:
            reporter.fields = {"job": job.index, "job_percent": round(100.0 * f, 1)}
            reporter(overall)

    try:
        fraction(0.0)
        plan = w.engine.plan_job(args, w.session.load)
        w.session.stft_value = plan.use_torch_stft
        outcome = w.engine.separate(w.current.model, plan, progress=fraction, cancelled=w.tracker.cancelled)
        fraction(1.0)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # as Worker.execute: one job's failure is its result
        code, message, _extra = describe_exception(exc, w.engine.release_memory)
        return _result(job, "error", elapsed=round(time.perf_counter() - started, 3), code=code, message=message)
    details = {k: v for k, v in outcome.details.items() if k in ("duration", "queries", "warnings")}
    return _result(job, "done", files=list(outcome.files), elapsed=round(time.perf_counter() - started, 3), **details)
