"""The long-lived worker: stdin lines in, one JSON reply per command out.

Threads, and why:
- the *reader* thread reads stdin and parses each line at once, so commands that arrive while
  torch is still importing (or while a job runs) are queued, never lost, and so ``cancel`` takes
  effect immediately instead of waiting behind the job it cancels;
- the *job* thread imports torch (through the engine), prints ``ready``, then runs queued
  commands one at a time, in the order they arrived;
- the *main* thread only waits (process.py), so SIGTERM/SIGINT/SIGBREAK handlers (which Python
  runs on the main thread between bytecodes) fire promptly even while the job thread is inside a
  long torch operation.

Every command gets exactly one terminal reply (see ``protocol.NON_TERMINAL_STATUSES``): handlers
(handlers.py) return it, ``_run_command`` writes it, and any exception becomes an ``error`` reply
with a stable code (failures.py) while the worker keeps serving.

The worker gets its engine passed in (engine/torch_engine.py in production; tests pass a fake).
"""
from __future__ import annotations

import os
import queue
import threading
import traceback
from typing import Any, Callable

from .. import PROTOCOL_VERSION, __version__, errors, options
from . import protocol as P
from .cache import CacheEntry, ModelCache
from .failures import describe_exception
from .handlers import HANDLERS, Session
from .heartbeat import Heartbeat, interval_from_env
from .jobs import JobTracker, ProgressReporter
from .policy import Settings, warn_stderr
from .stdout import ReplyWriter

# Every command, then the protocol extensions a client may look for: the reply conventions, the
# command fields beyond the seed's (from the options table) and the heartbeat lines.
CAPABILITIES = [*P.KNOWN_COMMANDS, "id", "code", "progress", *options.extension_field_names(), "heartbeat"]

_EOF = object()


class Worker:
    def __init__(self, writer: ReplyWriter, settings: Settings, *, engine: Any, stdin_fd: int = 0):
        self.writer = writer
        self.settings = settings
        self.engine = engine
        self.stdin_fd = stdin_fd
        self.tracker = JobTracker()
        self.queue: "queue.Queue[Any]" = queue.Queue()
        self.cache = ModelCache(settings.max_cached_models, release=engine.release_memory)
        self.device = "cpu"
        self.current: CacheEntry | None = None
        self.session: Session | None = None
        self.finished = threading.Event()
        self.ready = threading.Event()
        self.exit_code = 0
        self._finish_lock = threading.Lock()
        self.signal_name: str | None = None  # set by the signal handler, acted on by run_worker
        self._finishing = False
        self.heartbeat = Heartbeat(writer.send, lambda: writer.last_write, interval_from_env(warn_stderr))

    # ---- lifecycle -------------------------------------------------------------------------

    def start_threads(self) -> None:
        threading.Thread(target=self._reader_main, name="stdin-reader", daemon=True).start()
        threading.Thread(target=self._job_main, name="job-runner", daemon=True).start()
        self.heartbeat.start()

    def finish(self, code: int, shutdown_reason: str | None = None) -> None:
        """End the worker (once): optionally say why, then let the main thread exit."""
        with self._finish_lock:
            if self._finishing:
                return
            self._finishing = True
        self.tracker.cancel_event.set()  # a running job stops at its next check
        self.heartbeat.stop()  # nothing may follow the shutdown line
        if shutdown_reason is not None:
            self.writer.send(P.reply("shutdown", reason=shutdown_reason), lock_timeout=2.0)
        self.exit_code = code
        self.finished.set()

    def on_stdout_broken(self) -> None:
        warn_stderr("stdout was closed by the parent; shutting down")
        self.finish(0)

    # ---- reader thread ---------------------------------------------------------------------

    def _reader_main(self) -> None:
        splitter = P.LineSplitter()
        while True:
            try:
                chunk = os.read(self.stdin_fd, 1 << 16)
            except InterruptedError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                for line in splitter.finish():
                    self._on_line(line)
                self.queue.put(_EOF)
                return
            for line in splitter.feed(chunk):
                self._on_line(line)

    def _on_line(self, raw: bytes | P.OversizedLine) -> None:
        if P.is_blank_line(raw):
            return
        try:
            cmd = P.parse_line(raw)
        except P.RequestError as exc:
            self.queue.put(("reject", exc))
            return
        except Exception as exc:  # a parser bug must not kill the reader
            self.queue.put(("reject", P.RequestError(errors.INTERNAL_ERROR, f"cannot parse line: {exc!r}")))
            return
        if cmd.cmd == "cancel":
            self._handle_cancel(cmd)
            return
        self.tracker.enqueued(cmd)
        self.queue.put(("cmd", cmd))

    def _handle_cancel(self, cmd: P.Command) -> None:
        target = cmd.args.target  # type: ignore[union-attr]
        try:
            state = self.tracker.cancel(target)
            # The cancel takes effect at once; its reply waits for "ready" so that no reply
            # ever precedes the ready line.
            while not self.ready.wait(0.5):
                if self.finished.is_set():
                    return
        except Exception as exc:
            self.writer.send(P.error_reply(errors.INTERNAL_ERROR, f"cancel failed: {exc!r}", cmd.id))
            return
        if state is None:
            self.writer.send(
                P.error_reply(
                    errors.INVALID_FIELD,
                    f"cancel: no queued or running command has id {P.id_key(target)[:80]} "
                    "(it may have finished already)",
                    cmd.id,
                    target=target,
                )
            )
        else:
            self.writer.send(P.reply("cancelling", cmd.id, target=target, state=state))

    # ---- job thread ------------------------------------------------------------------------

    def _job_main(self) -> None:
        try:
            if not self._startup():
                return
            while True:
                item = self.queue.get()
                if item is _EOF:
                    self.finish(0, "stdin_closed")
                    return
                kind, payload = item
                if kind == "reject":
                    self.writer.send(
                        P.error_reply(payload.code, payload.message, payload.request_id)
                    )
                    continue
                self._run_command(payload)
                if self.finished.is_set():
                    return
        except BaseException as exc:  # last resort: never leave the parent waiting forever
            warn_stderr("job thread crashed:\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            self.writer.send(P.error_reply(errors.INTERNAL_ERROR, f"worker failure: {exc!r}"))
            self.finish(1, "internal_error")

    def _startup(self) -> bool:
        # Settings libraries read at import time; offline because the worker never downloads.
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        # Ops MPS lacks run on the CPU instead of failing the job (macOS).
        os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
        try:
            torch_version = self.engine.start()
        except BaseException as exc:
            self.writer.send(
                P.error_reply(errors.INTERNAL_ERROR, f"cannot start: importing torch failed: {exc!r}")
            )
            self.finish(1)
            return False
        ready: dict[str, Any] = {}
        try:
            self.device = self.engine.resolve_device(self.settings.device)
        except Exception as exc:
            try:
                fallback = self.engine.resolve_device("auto") if self.settings.device != "auto" else "cpu"
            except Exception:
                fallback = "cpu"
            ready["warning"] = f"device {self.settings.device!r} unusable ({exc}); using {fallback}"
            warn_stderr(ready["warning"])
            self.device = fallback
        self.writer.send(
            P.reply(
                "ready",
                device=self.device,
                version=__version__,
                protocol=PROTOCOL_VERSION,
                capabilities=CAPABILITIES,
                max_cached_models=self.cache.capacity,
                torch=torch_version,
                pid=os.getpid(),
                **ready,
            )
        )
        self.ready.set()
        # Pay the engine's import cost now, while the parent reads "ready", not in the first job.
        self.engine.warm_up(warn_stderr)
        try:
            # Partial outputs that killed workers left where relative outputs go; each output
            # folder is swept again before every write into it.
            self.engine.sweep_partials(os.getcwd())
        except Exception as exc:  # housekeeping: never a reason not to serve
            warn_stderr(f"sweeping stale partial files failed: {exc!r}")
        return True

    def _run_command(self, cmd: P.Command) -> None:
        result = self.execute(cmd)
        self.writer.send(result)
        if result.get("status") == "exiting":
            self.finish(0)

    def execute(self, cmd: P.Command) -> dict:
        """Run one command and return its terminal reply (errors included); never raises."""
        cancelled_in_queue = self.tracker.start(cmd)
        try:
            if cancelled_in_queue:
                result = P.error_reply(errors.CANCELLED, f"{cmd.cmd} was cancelled before it started", cmd.id)
            else:
                result = HANDLERS[cmd.cmd](self, cmd)
        except KeyboardInterrupt:  # only in-process callers (tests) run commands on the main thread
            raise
        except BaseException as exc:  # SystemExit from a library included: keep serving
            code, message, extra = describe_exception(exc, self.engine.release_memory)
            if code == errors.INTERNAL_ERROR:
                warn_stderr(f"{cmd.cmd} failed:\n{extra.get('traceback', '')}")
            result = P.error_reply(code, message, cmd.id, **extra)
        finally:
            self.heartbeat.end()  # before the terminal reply goes out: no heartbeat may follow it
            self.tracker.finish()
        return result

    def progress_sink(self, reporter: "ProgressReporter | None") -> Callable[[float], None]:
        """The engine's progress callback: feeds the heartbeat, and the client's lines if asked."""
        if reporter is None:
            return self.heartbeat.fraction

        def both(fraction: float) -> None:
            self.heartbeat.fraction(fraction)
            reporter(fraction)

        return both
