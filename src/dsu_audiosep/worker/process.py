"""The worker process: stdout guarded, signals recorded, the main thread waiting, and the exit.

The main thread only waits (with a timeout, so Python runs signal handlers promptly even on
Windows) and acts on what it sees: a recorded signal, a parent that is gone, or the worker
finishing. The process leaves through ``os._exit``: the reader thread may be blocked in a read
that nothing can interrupt portably, and interpreter shutdown must not wait for it.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any

from . import protocol as P
from .loop import Worker
from .parent import ParentWatch
from .policy import resolve_settings, warn_stderr
from .stdout import ReplyWriter, protect_stdout

LOADING_MESSAGE = "Initializing DSU-AudioSep worker..."
SIGNAL_POLL_S = 0.05


def _install_signal_handlers(worker: Worker) -> None:
    # The handler only records the signal. It runs on the main thread between two bytecodes,
    # possibly while that same thread holds the writer's or an Event's lock (non-reentrant):
    # writing or setting an Event from here could deadlock or cut a line in half. The main
    # thread's wait loop acts on it within one poll interval.
    def handler(signum: int, _frame: Any) -> None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        if worker.signal_name is None:
            worker.signal_name = name

    # A vanished parent must surface as EPIPE on write (handled: the worker ends cleanly), not
    # kill the process. python itself ignores SIGPIPE, but an embedding launcher such as the
    # cx_Freeze executable may leave the default action (terminate) in place.
    sigpipe = getattr(signal, "SIGPIPE", None)
    if sigpipe is not None:
        try:
            signal.signal(sigpipe, signal.SIG_IGN)
        except (OSError, ValueError, RuntimeError):
            pass
    for name in ("SIGTERM", "SIGINT", "SIGBREAK", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            signal.signal(signum, handler)
        except (OSError, ValueError, RuntimeError):
            pass


def _wait_for_the_end(worker: Worker, parent: ParentWatch) -> None:
    # A timed wait keeps the main thread returning to the interpreter, where signal handlers
    # run (on Windows a bare wait would block them).
    while not worker.finished.wait(SIGNAL_POLL_S):
        if worker.signal_name is not None:
            worker.finish(0, f"signal {worker.signal_name}")
        elif parent.gone():
            # Nobody is waiting for the results any more: stop now (the running job is cancelled,
            # queued ones are dropped, partial outputs deleted at exit) instead of computing on.
            worker.finish(0, "parent_died")


def run_worker(flags: dict[str, Any] | None = None) -> int:
    """Serve the protocol until exit, end of stdin or a signal; returns the exit code."""
    from ..engine.torch_engine import TorchEngine  # imports nothing heavy: torch comes later

    proto_fd = protect_stdout()
    worker_box: list[Worker] = []
    writer = ReplyWriter(proto_fd, on_broken=lambda: worker_box and worker_box[0].on_stdout_broken())
    settings = resolve_settings(flags or {})  # a small JSON file at most
    engine = TorchEngine()
    worker = Worker(writer, settings, engine=engine)
    worker_box.append(worker)
    # Handlers go in before the first line: a parent may signal as soon as it sees it.
    _install_signal_handlers(worker)
    # The first line, before anything heavy: the parent treats it as "started".
    writer.send(P.reply("loading", message=LOADING_MESSAGE))
    parent = ParentWatch()
    worker.start_threads()
    _wait_for_the_end(worker, parent)
    writer.close()
    try:
        engine.discard_partials()
    except Exception as exc:
        warn_stderr(f"cleaning up partial outputs failed: {exc!r}")
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(worker.exit_code)
    return worker.exit_code  # not reached; keeps type checkers and tests patching os._exit happy
