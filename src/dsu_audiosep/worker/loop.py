"""The long-lived worker: stdin lines in, one JSON reply per command out.

Threads, and why:
- the *reader* thread reads stdin and parses each line at once, so commands that arrive while
  torch is still importing (or while a job runs) are queued, never lost, and so ``cancel`` takes
  effect immediately instead of waiting behind the job it cancels;
- the *job* thread imports torch, prints ``ready``, then runs queued commands one at a time, in
  the order they arrived;
- the *main* thread only waits, so SIGTERM/SIGINT/SIGBREAK handlers (which Python runs on the
  main thread between bytecodes) fire promptly even while the job thread is inside a long
  torch operation.

stdout belongs to the protocol alone: at start the real stdout descriptor is duplicated to a
private descriptor used only by ``ReplyWriter`` and descriptor 1 is pointed at stderr, so a stray
``print``, a C library or a progress bar writing to stdout lands on stderr instead of corrupting
the stream the parent parses.

Every command gets exactly one terminal reply (see ``protocol.NON_TERMINAL_STATUSES``): handlers
return it, ``_run_command`` writes it, and any exception becomes an ``error`` reply with a stable
code while the worker keeps serving.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from .. import PROTOCOL_VERSION, __version__, errors
from ..errors import AudioSepError
from . import protocol as P
from .cache import CacheEntry, ModelCache, ModelKey, file_fingerprint, release_memory
from .heartbeat import Heartbeat, interval_from_env
from .parent import ParentWatch
from .policy import Settings, pick, resolve_path, resolve_settings, warn_stderr

LOADING_MESSAGE = "Initializing DSU-AudioSep worker..."

# Every command, then the protocol extensions a client may look for.
CAPABILITIES = list(P.KNOWN_COMMANDS) + [
    "id",
    "code",
    "progress",
    "model_dir",
    "precision",
    "output_sr",
    "output_subtype",
    "output_channels",
    "mode",
    "residual_output",
    "chunk_length",
    "context_seconds",
    "trust_checkpoint",
    "heartbeat",
]

# The original worker's defaults, relative to the executable's folder. A default is used only
# when the file is there; otherwise the field stays empty (and for the checkpoint, that is an
# error naming the field).
DEFAULT_CONFIG = "config/audiosep_base.yaml"
DEFAULT_CHECKPOINT = "checkpoint/audiosep_base_4M_steps.ckpt"
DEFAULT_CLAP = "checkpoint/music_speech_audioset_epoch_15_esc_89.98.pt"
DEFAULT_ROBERTA = "roberta-base"

SIGNAL_POLL_S = 0.05
PROGRESS_MIN_INTERVAL_S = 0.5
PROGRESS_MIN_STEP_PERCENT = 5.0

_EOF = object()


# --------------------------------------------------------------------------------------------
# Output


class ReplyWriter:
    """Writes reply lines to the private protocol descriptor, one whole line at a time."""

    def __init__(self, fd: int | None, on_broken: Callable[[], None] | None = None):
        self._fd = fd
        self._lock = threading.Lock()
        self._closed = False
        self._on_broken = on_broken
        self.last_write = time.monotonic()  # when the last whole line went out (for heartbeats)

    def send(self, obj: dict, lock_timeout: float | None = None) -> bool:
        data = P.encode_reply(obj)
        acquired = self._lock.acquire(timeout=-1 if lock_timeout is None else lock_timeout)
        if not acquired:
            return False
        broken = False
        try:
            if self._closed or self._fd is None:
                return False
            view = memoryview(data)
            try:
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                self.last_write = time.monotonic()
            except InterruptedError:
                pass
            except OSError:  # the parent closed its end: nobody is listening any more
                self._closed = True
                broken = True
                return False
            return True
        finally:
            self._lock.release()
            if broken and self._on_broken is not None:
                self._on_broken()

    def close(self, lock_timeout: float = 2.0) -> None:
        """No line may start after this (so exiting cannot cut one in half)."""
        if self._lock.acquire(timeout=lock_timeout):
            self._closed = True  # keep the lock: the process is about to end


def protect_stdout() -> int | None:
    """Move the real stdout to a private descriptor and send descriptor 1 to stderr.

    Returns the private descriptor (None when there was no usable stdout at all).
    """
    try:
        sys.stdout.flush()
    except (AttributeError, OSError, ValueError):
        pass
    try:
        proto_fd: int | None = os.dup(1)
    except OSError:
        proto_fd = None
    try:
        os.dup2(2, 1)
    except OSError:  # no stderr either (e.g. a GUI parent): discard stray output
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
        except OSError:
            pass
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    sys.stdout = sys.stderr
    return proto_fd


# --------------------------------------------------------------------------------------------
# Bookkeeping for cancel


class JobTracker:
    """Which ids are queued or running, so the reader thread can cancel them at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: Counter[str] = Counter()
        self._doomed: Counter[str] = Counter()  # queued commands cancelled before they started
        self._running_key: str | None = None
        self.cancel_event = threading.Event()

    def enqueued(self, cmd: P.Command) -> None:
        if cmd.has_id:
            with self._lock:
                self._queued[P.id_key(cmd.id)] += 1

    def start(self, cmd: P.Command) -> bool:
        """Mark cmd running; True when it was cancelled while it waited in the queue."""
        with self._lock:
            self.cancel_event.clear()
            self._running_key = None
            if not cmd.has_id:
                return False
            key = P.id_key(cmd.id)
            self._queued[key] -= 1
            if self._queued[key] <= 0:
                del self._queued[key]
            if self._doomed[key] > 0:
                self._doomed[key] -= 1
                if self._doomed[key] <= 0:
                    del self._doomed[key]
                return True
            self._running_key = key
            return False

    def finish(self) -> None:
        with self._lock:
            self._running_key = None
            self.cancel_event.clear()

    def cancel(self, target: Any) -> str | None:
        """'running', 'queued' or None when no queued or running command has this id."""
        key = P.id_key(target)
        found = None
        with self._lock:
            if self._running_key == key:
                self.cancel_event.set()
                found = "running"
            pending = self._queued.get(key, 0) - self._doomed.get(key, 0)
            if pending > 0:
                self._doomed[key] += pending
                found = found or "queued"
        return found

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


# --------------------------------------------------------------------------------------------
# Progress


class ProgressReporter:
    """Turns the engine's fraction callbacks into throttled ``progress`` lines.

    A line goes out when the percentage moved by at least 5 points or 0.5 s passed since the
    last line; never backwards, never twice the same value, 0 and 100 always.
    """

    def __init__(
        self,
        send: Callable[[dict], Any],
        request_id: Any,
        stage: str,
        min_interval: float = PROGRESS_MIN_INTERVAL_S,
        min_step: float = PROGRESS_MIN_STEP_PERCENT,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._send = send
        self._id = request_id
        self._stage = stage
        self._min_interval = min_interval
        self._min_step = min_step
        self._clock = clock
        self._last_pct: float | None = None
        self._last_t = 0.0

    def __call__(self, fraction: float) -> None:
        try:
            value = float(fraction)
        except (TypeError, ValueError):
            return
        if value != value or value in (float("inf"), float("-inf")):
            return
        pct = round(min(max(value, 0.0), 1.0) * 100.0, 1)
        now = self._clock()
        if self._last_pct is not None:
            if pct <= self._last_pct:
                return
            if (
                pct < 100.0
                and pct - self._last_pct < self._min_step
                and now - self._last_t < self._min_interval
            ):
                return
        self._last_pct = pct
        self._last_t = now
        self._send(P.reply("progress", self._id, percent=pct, stage=self._stage))

    def start(self) -> None:
        self(0.0)

    def finish(self) -> None:
        self(1.0)


# --------------------------------------------------------------------------------------------
# Errors


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError / torch.cuda.*
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


_ERRNO_CODES = {
    errno.ENOENT: errors.FILE_NOT_FOUND,
    errno.EACCES: errors.PERMISSION_DENIED,
    errno.EPERM: errors.PERMISSION_DENIED,
    errno.ENOSPC: errors.DISK_FULL,
    getattr(errno, "EDQUOT", -1001): errors.DISK_FULL,
    errno.EFBIG: errors.DISK_FULL,
}


def describe_exception(exc: BaseException) -> tuple[str, str, dict]:
    """(code, message, extra fields) for an exception raised inside a job."""
    if isinstance(exc, AudioSepError):
        return exc.code, exc.message or exc.code, {}
    if _is_out_of_memory(exc):
        release_memory()
        return (
            errors.OUT_OF_MEMORY,
            f"out of memory ({type(exc).__name__}: {exc}); try use_chunk true, a smaller "
            "chunk_length, or fewer cached models",
            {},
        )
    if isinstance(exc, OSError) and exc.errno in _ERRNO_CODES:
        where = f": {exc.filename}" if exc.filename else ""
        return _ERRNO_CODES[exc.errno], f"{exc.strerror or exc}{where}", {}
    detail = str(exc) or repr(exc)
    return (
        errors.INTERNAL_ERROR,
        f"{type(exc).__name__}: {detail}",
        {"traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:]},
    )


# --------------------------------------------------------------------------------------------
# The worker


@dataclass
class Session:
    """Settings chosen by the last load_model; separate jobs start from these."""

    use_torch_stft: bool | str
    use_torch_stft_value: bool
    auto_stft_seconds: float
    chunk_seconds: float
    chunk_length: float | None
    model_dir: str | None

    @property
    def use_torch_stft_mode(self) -> str:
        return "auto" if self.use_torch_stft == "auto" else "force"


def _unchosen(job_value: Any, settings: Settings, name: str) -> bool:
    """Neither the job nor a flag, the environment or the policy file set ``name``: the built-in
    default applies, which the worker may then pick per device."""
    return job_value is None and settings.sources.get(name, "default") == "default"


def _stft_mode(setting: bool | str) -> tuple[str, bool]:
    """The original worker's (mode, value) pair: "auto" starts with the convolution STFT."""
    if setting == "auto":
        return "auto", False
    return "force", bool(setting)


def _fallback_resolve_device(name: str | None) -> str:
    import torch

    wanted = (name or "auto").strip().lower()
    if wanted == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if wanted == "cpu":
        return "cpu"
    if wanted.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AudioSepError(errors.DEVICE_UNAVAILABLE, f"device {name!r} is not available: no CUDA")
        return wanted
    if wanted == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise AudioSepError(errors.DEVICE_UNAVAILABLE, "device 'mps' is not available on this machine")
        return "mps"
    raise AudioSepError(
        errors.DEVICE_UNAVAILABLE, f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps"
    )


def resolve_device(name: str | None) -> str:
    try:
        from ..devices import resolve_device as engine_resolve
    except ImportError:
        return _fallback_resolve_device(name)
    return engine_resolve(name)


class Worker:
    def __init__(self, writer: ReplyWriter, settings: Settings, stdin_fd: int = 0):
        self.writer = writer
        self.settings = settings
        self.stdin_fd = stdin_fd
        self.tracker = JobTracker()
        self.queue: "queue.Queue[Any]" = queue.Queue()
        self.cache = ModelCache(settings.max_cached_models)
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
            import torch
        except BaseException as exc:
            self.writer.send(
                P.error_reply(errors.INTERNAL_ERROR, f"cannot start: importing torch failed: {exc!r}")
            )
            self.finish(1)
            return False
        ready: dict[str, Any] = {}
        try:
            self.device = resolve_device(self.settings.device)
        except Exception as exc:
            try:
                fallback = resolve_device("auto") if self.settings.device != "auto" else "cpu"
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
                torch=str(getattr(torch, "__version__", "")),
                pid=os.getpid(),
                **ready,
            )
        )
        self.ready.set()
        # Pay the engine's import cost now, while the parent reads "ready", not in the first job.
        for module in ("dsu_audiosep.model.checkpoints", "dsu_audiosep.engine.separate", "soundfile"):
            try:
                __import__(module)
            except Exception as exc:
                warn_stderr(f"pre-import of {module} failed ({exc!r}); it will be retried when needed")
        _sweep_partials(os.getcwd)
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
                handler = getattr(self, "_cmd_" + cmd.cmd)
                result = handler(cmd)
        except KeyboardInterrupt:  # only the one-shot CLI runs commands on the main thread
            raise
        except BaseException as exc:  # SystemExit from a library included: keep serving
            code, message, extra = describe_exception(exc)
            if code == errors.INTERNAL_ERROR:
                warn_stderr(f"{cmd.cmd} failed:\n{extra.get('traceback', '')}")
            result = P.error_reply(code, message, cmd.id, **extra)
        finally:
            self.heartbeat.end()  # before the terminal reply goes out: no heartbeat may follow it
            self.tracker.finish()
        return result

    def _progress_sink(self, reporter: "ProgressReporter | None") -> Callable[[float], None]:
        """The engine's progress callback: feeds the heartbeat, and the client's lines if asked."""
        if reporter is None:
            return self.heartbeat.fraction

        def both(fraction: float) -> None:
            self.heartbeat.fraction(fraction)
            reporter(fraction)

        return both

    # ---- commands --------------------------------------------------------------------------

    def _cmd_ping(self, cmd: P.Command) -> dict:
        return P.reply("pong", cmd.id, model_loaded=self.current is not None)

    def _cmd_exit(self, cmd: P.Command) -> dict:
        return P.reply("exiting", cmd.id)

    def _cmd_get_status(self, cmd: P.Command) -> dict:
        key = self.current.key if self.current else None
        session = self.session
        mode, value = _stft_mode(self.settings.use_torch_stft)
        return P.reply(
            "status",
            cmd.id,
            ready=True,
            device=key.device if key else self.device,
            model_loaded=self.current is not None,
            checkpoint_path=key.checkpoint_path if key else None,
            config_path=key.config_path if key else None,
            clap_checkpoint_path=key.clap_checkpoint_path if key else None,
            roberta_dir=key.roberta_dir if key else None,
            model_dir=key.model_dir if key else None,
            precision=key.precision if key else None,
            use_torch_stft_mode=session.use_torch_stft_mode if session else mode,
            use_torch_stft_value=session.use_torch_stft_value if session else value,
            auto_stft_seconds=session.auto_stft_seconds if session else self.settings.auto_stft_seconds,
            chunk_seconds=session.chunk_seconds if session else self.settings.chunk_seconds,
            cache_size=len(self.cache),
            max_cached_models=self.cache.capacity,
            version=__version__,
            protocol=PROTOCOL_VERSION,
            settings_sources=dict(self.settings.sources),
        )

    def _describe_models(self) -> list[dict]:
        models = []
        seen = set()
        for entry in self.cache.entries():
            info = entry.describe()
            info["current"] = entry is self.current
            models.append(info)
            seen.add(entry.key)
        if self.current is not None and self.current.key not in seen:  # max_cached_models 0
            info = self.current.describe()
            info["current"] = True
            models.insert(0, info)
        return models

    def _cmd_list_models(self, cmd: P.Command) -> dict:
        return P.reply(
            "models",
            cmd.id,
            models=self._describe_models(),
            cache_size=len(self.cache),
            max_cached_models=self.cache.capacity,
            model_loaded=self.current is not None,
        )

    # unload_model and clear_cache answer with status "models" (the cache after the change):
    # it is one of the statuses the parent app waits for, so it cannot hang a client that only
    # knows the original protocol.
    def _cmd_unload_model(self, cmd: P.Command) -> dict:
        unloaded = []
        if self.current is not None:
            unloaded.append(self.current.describe())
            self.cache.remove(self.current.key)
            self.current = None
            self.session = None
            release_memory()
        reply = self._cmd_list_models(cmd)
        reply["unloaded"] = unloaded
        return reply

    def _cmd_clear_cache(self, cmd: P.Command) -> dict:
        unloaded = self._describe_models()
        self.current = None
        self.session = None
        self.cache.clear()
        release_memory()
        reply = self._cmd_list_models(cmd)
        reply["unloaded"] = unloaded
        return reply

    def _resolve_model_paths(self, args: P.LoadModelArgs) -> dict[str, str | None]:
        def given(value: str | None) -> str | None:
            return resolve_path(value) if value else None

        def default_if_present(relative: str) -> str | None:
            candidate = resolve_path(relative)
            return candidate if os.path.exists(candidate) else None

        paths = {
            "config_path": given(args.config_path),
            "checkpoint_path": given(args.checkpoint_path),
            "clap_checkpoint_path": given(args.clap_checkpoint_path),
            "roberta_dir": given(args.roberta_dir),
            "model_dir": given(args.model_dir),
        }
        if paths["model_dir"] is None:
            if paths["checkpoint_path"] is None:
                paths["checkpoint_path"] = default_if_present(DEFAULT_CHECKPOINT)
                if paths["checkpoint_path"] is None:
                    raise AudioSepError(
                        errors.MISSING_FIELD,
                        "load_model needs \"checkpoint_path\" (an AudioSep .ckpt) or \"model_dir\" "
                        f"(a converted model folder); no default {DEFAULT_CHECKPOINT} was found "
                        f"at {resolve_path(DEFAULT_CHECKPOINT)}",
                    )
            if paths["config_path"] is None:
                paths["config_path"] = default_if_present(DEFAULT_CONFIG)
            if paths["clap_checkpoint_path"] is None:
                paths["clap_checkpoint_path"] = default_if_present(DEFAULT_CLAP)
            if paths["roberta_dir"] is None:
                paths["roberta_dir"] = default_if_present(DEFAULT_ROBERTA)
        return paths

    @staticmethod
    def _check_exists(paths: dict[str, str | None]) -> None:
        for name, path in paths.items():
            if path is None:
                continue
            if not os.path.exists(path):
                raise AudioSepError(errors.FILE_NOT_FOUND, f"{name}: not found: {path}")
            wants_dir = name in ("roberta_dir", "model_dir")
            if wants_dir and not os.path.isdir(path):
                raise AudioSepError(errors.INVALID_FIELD, f"{name}: not a folder: {path}")
            if not wants_dir and os.path.isdir(path):
                raise AudioSepError(errors.INVALID_FIELD, f"{name}: is a folder, expected a file: {path}")

    def _cmd_load_model(self, cmd: P.Command) -> dict:
        args: P.LoadModelArgs = cmd.args  # type: ignore[assignment]
        s = self.settings
        started = time.perf_counter()
        paths = self._resolve_model_paths(args)
        device = resolve_device(pick(args.device, s.device))
        mmap = bool(pick(args.mmap, s.mmap))
        if _unchosen(args.mmap, s, "mmap"):
            # Nobody chose: map the weights (loads in ~0.1 s instead of ~0.7 s, and on CPU the idle
            # text encoder's pages can go back to the kernel during long separations). Not on
            # Windows, where a mapped checkpoint could not be replaced or deleted while loaded.
            mmap = os.name != "nt"
        precision = pick(args.precision, s.precision)
        stft_setting = pick(args.use_torch_stft, s.use_torch_stft)
        if _unchosen(args.use_torch_stft, s, "use_torch_stft"):
            # Nobody chose: pick per device from measurements. On an H100 torch.stft (cuFFT) makes
            # the whole pass 5-20% faster than the conv STFT; on CPU the two cost the same, and the
            # conv STFT uses the checkpoint's own kernels (the seed's default).
            stft_setting = device.startswith("cuda")
        mode, value = _stft_mode(stft_setting)
        auto_stft_seconds = float(pick(args.auto_stft_seconds, s.auto_stft_seconds))
        chunk_seconds = float(pick(args.chunk_seconds, s.chunk_seconds))

        self._check_exists(paths)
        label = paths["model_dir"] or paths["checkpoint_path"]
        self.heartbeat.status(P.reply("loading_model", cmd.id, model=label))
        progress = ProgressReporter(self.heartbeat.send, cmd.id, "loading_model") if cmd.progress else None
        if progress:
            progress.start()

        key = ModelKey(
            config_path=paths["config_path"],
            checkpoint_path=paths["checkpoint_path"],
            clap_checkpoint_path=paths["clap_checkpoint_path"],
            roberta_dir=paths["roberta_dir"],
            model_dir=paths["model_dir"],
            device=device,
            mmap=mmap,
            precision=precision,
            fingerprint=file_fingerprint(paths.values()),
        )
        entry = self.cache.get(key)
        if entry is None and self.current is not None and self.current.key == key:
            entry = self.current  # max_cached_models 0 still keeps the current model
        cached = entry is not None
        if entry is None:
            from ..model.checkpoints import load_model

            load_started = time.perf_counter()
            model = load_model(
                config_path=paths["config_path"],
                checkpoint_path=paths["checkpoint_path"],
                clap_checkpoint_path=paths["clap_checkpoint_path"],
                roberta_dir=paths["roberta_dir"],
                model_dir=paths["model_dir"],
                device=device,
                mmap=mmap,
                use_torch_stft=value,
                precision=precision,
                trust_checkpoint=bool(args.trust_checkpoint),
            )
            if self.tracker.cancelled():
                # Not installed: the client asked for this load not to happen.
                del model
                release_memory()
                raise AudioSepError(errors.CANCELLED, "load_model was cancelled")
            entry = CacheEntry(key=key, model=model, load_seconds=time.perf_counter() - load_started)
            del model
            # Install first, then let the cache evict: the previous current model is released
            # only once the new one is in place.
            previous_key = self.current.key if self.current is not None else None
            self.current = entry
            self.cache.put(entry)
            if previous_key is not None and previous_key not in self.cache and self.cache.capacity == 0:
                release_memory()  # nothing cached: the replaced model was the only reference
        else:
            entry.model.set_stft(value)
            self.current = entry
        self.session = Session(
            use_torch_stft=stft_setting,
            use_torch_stft_value=value,
            auto_stft_seconds=auto_stft_seconds,
            chunk_seconds=chunk_seconds,
            chunk_length=args.chunk_length,
            model_dir=paths["model_dir"],
        )
        if progress:
            progress.finish()
        result = P.reply(
            "model_loaded",
            cmd.id,
            elapsed=round(time.perf_counter() - started, 3),
            config_path=paths["config_path"],
            checkpoint_path=paths["checkpoint_path"],
            clap_checkpoint_path=paths["clap_checkpoint_path"],
            # the folder the loader settled on when none was given (roberta-base beside the checkpoint)
            roberta_dir=paths["roberta_dir"] or getattr(entry.model, "sources", {}).get("roberta_dir"),
            device=device,
            cached=cached,
            cache_size=len(self.cache),
            max_cached_models=self.cache.capacity,
            use_torch_stft_mode=mode,
            use_torch_stft_value=value,
            auto_stft_seconds=auto_stft_seconds,
            chunk_seconds=chunk_seconds,
            mmap=mmap,
            precision=precision,
        )
        if paths["model_dir"] is not None:
            result["model_dir"] = paths["model_dir"]
        return result

    @staticmethod
    def _duration_seconds(path: str) -> float | None:
        try:
            from ..engine.audio_read import probe

            return float(probe(path).duration)
        except Exception:  # unreadable: separate_file reports the real problem
            return None

    def _separate_options(self, args: P.SeparateArgs, session: Session):
        from ..engine.separate import SeparateOptions

        wanted: dict[str, Any] = {
            "use_chunk": pick(args.use_chunk, False),
            "chunk_seconds": pick(args.chunk_seconds, session.chunk_seconds),
            "chunk_length": pick(args.chunk_length, session.chunk_length),
            "context_seconds": args.context_seconds,
            "output_sr": args.output_sr,
            "output_subtype": args.output_subtype,
            "output_channels": args.output_channels,
            "mode": args.mode,
            "residual_output": os.path.expanduser(args.residual_output) if args.residual_output else None,
        }
        supported = {f.name for f in dataclasses.fields(SeparateOptions)}
        kwargs = {}
        for name, value in wanted.items():
            if value is None:
                continue  # the engine's default
            if name not in supported:
                raise AudioSepError(errors.INVALID_FIELD, f"\"{name}\" is not supported by this engine")
            kwargs[name] = value
        return SeparateOptions(**kwargs)

    def _cmd_separate(self, cmd: P.Command) -> dict:
        args: P.SeparateArgs = cmd.args  # type: ignore[assignment]
        if self.current is None or self.session is None:
            raise AudioSepError(errors.MODEL_NOT_LOADED, "no model is loaded: send load_model first")
        entry, session = self.current, self.session
        input_path = os.path.expanduser(args.input)
        output_path = os.path.expanduser(args.output)

        stft_setting = pick(args.use_torch_stft, session.use_torch_stft)
        mode, value = _stft_mode(stft_setting)
        if mode == "auto":
            threshold = pick(args.auto_stft_seconds, session.auto_stft_seconds)
            duration = self._duration_seconds(input_path)
            value = duration is not None and duration >= threshold
        options = self._separate_options(args, session)

        self.heartbeat.status(P.reply("separating", cmd.id, input=args.input))
        progress = ProgressReporter(self.heartbeat.send, cmd.id, "separating") if cmd.progress else None
        if progress:
            progress.start()
        if self.tracker.cancelled():
            raise AudioSepError(errors.CANCELLED, "separate was cancelled")
        from ..engine.separate import separate_file

        entry.model.set_stft(value)
        session.use_torch_stft_value = value
        started = time.perf_counter()
        result = separate_file(
            entry.model,
            input_path,
            output_path,
            args.text,
            options,
            progress=self._progress_sink(progress),
            cancelled=self.tracker.cancelled,
        )
        elapsed = time.perf_counter() - started
        if progress:
            progress.finish()
        files = getattr(result, "files", result) or [output_path]
        reply = P.reply(
            "done",
            cmd.id,
            elapsed=round(elapsed, 3),
            files=[str(f) for f in files],
            use_torch_stft_mode=mode,
            use_torch_stft_value=value,
        )
        for extra in ("duration", "chunked"):
            if hasattr(result, extra):
                reply[extra] = getattr(result, extra)
        if getattr(result, "warnings", None):
            reply["warnings"] = [str(w) for w in result.warnings]
        return reply


# --------------------------------------------------------------------------------------------
# Entry point


def _cleanup_partial_files() -> None:
    audio_io = sys.modules.get("dsu_audiosep.engine.audio_write")
    cleanup = getattr(audio_io, "cleanup_partial_files", None) if audio_io else None
    if cleanup is None:
        return
    try:
        cleanup(final=True)
    except Exception as exc:
        warn_stderr(f"cleaning up partial outputs failed: {exc!r}")


def _sweep_partials(folder: Callable[[], str]) -> None:
    """Remove partial outputs that killed workers left in ``folder()`` (where relative outputs go);
    each output folder is swept again before every write into it."""
    try:
        from ..engine import partials

        partials.sweep(folder())
    except Exception as exc:  # housekeeping: never a reason not to serve
        warn_stderr(f"sweeping stale partial files failed: {exc!r}")


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


def run_worker(flags: dict[str, Any] | None = None) -> int:
    """Serve the protocol until exit, end of stdin or a signal; returns the exit code.

    The process leaves through ``os._exit``: the reader thread may be blocked in a read that
    nothing can interrupt portably, and interpreter shutdown must not wait for it.
    """
    proto_fd = protect_stdout()
    worker_box: list[Worker] = []
    writer = ReplyWriter(proto_fd, on_broken=lambda: worker_box and worker_box[0].on_stdout_broken())
    settings = resolve_settings(flags or {})  # a small JSON file at most
    worker = Worker(writer, settings)
    worker_box.append(worker)
    # Handlers go in before the first line: a parent may signal as soon as it sees it.
    _install_signal_handlers(worker)
    # The first line, before anything heavy: the parent treats it as "started".
    writer.send(P.reply("loading", message=LOADING_MESSAGE))
    parent = ParentWatch()
    worker.start_threads()
    # A timed wait keeps the main thread returning to the interpreter, where signal handlers
    # run (on Windows a bare wait would block them).
    while not worker.finished.wait(SIGNAL_POLL_S):
        if worker.signal_name is not None:
            worker.finish(0, f"signal {worker.signal_name}")
        elif parent.gone():
            # Nobody is waiting for the results any more: stop now (the running job is cancelled,
            # queued ones are dropped, partial outputs deleted below) instead of computing on.
            worker.finish(0, "parent_died")
    writer.close()
    _cleanup_partial_files()
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(worker.exit_code)
    return worker.exit_code  # not reached; keeps type checkers and tests patching os._exit happy
