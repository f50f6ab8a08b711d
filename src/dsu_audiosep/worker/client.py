"""A pipe client for the worker, as a parent app talks to it: spawn ``dsu-audiosep --worker``,
write JSON lines to its stdin, read JSON lines from its stdout with timeouts.

    from dsu_audiosep.worker.client import WorkerClient
    with WorkerClient() as worker:
        worker.wait_ready()
        worker.request({"cmd": "load_model", "model_dir": "audiosep-fast"}, check=True)
        done = worker.request({"cmd": "separate", "input": "mix.wav", "output": "dog.wav",
                               "text": "a dog barking"}, timeout=None, check=True)

Every stdout line is recorded (``raw_lines``, ``line_times`` since spawn, ``messages``);
``assert_all_json`` checks that each one is a JSON object. stderr is collected (its tail).
With ``reader=False`` nothing reads stdout: the caller owns the raw pipe (``read_json``), e.g. to
let it fill up or to close it. The tests and the benchmark scripts use this client.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterable

from .protocol import NON_TERMINAL_STATUSES

DEFAULT_TIMEOUT = 60.0
DEFAULT: Any = object()  # "the client's own timeout" (None is a valid timeout: wait forever)


def default_argv() -> list[str]:
    """This Python running the installed package's worker."""
    return [sys.executable, "-m", "dsu_audiosep", "--worker"]


class WorkerError(RuntimeError):
    """An ``error`` reply to a request made with ``check=True``."""

    def __init__(self, reply: dict):
        super().__init__(f"{reply.get('code')}: {reply.get('message')}")
        self.reply = reply


class WorkerExited(EOFError):
    pass


class WorkerClient:
    def __init__(
        self,
        argv: list[str] | None = None,
        extra_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        reader: bool = True,
        stdout: Any = subprocess.PIPE,
        stderr: Any = subprocess.PIPE,
        timeout: float | None = DEFAULT_TIMEOUT,
    ):
        """``env`` None: this process's environment. ``stdout``/``stderr``: where the worker's
        streams go when not to this client (a descriptor, ``subprocess.DEVNULL``). ``timeout``:
        seconds a read waits unless told otherwise (None: forever)."""
        self.timeout = timeout
        self.argv = list(argv or default_argv()) + list(extra_args)
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr,
                                     env=env, cwd=cwd, bufsize=0)
        self.raw_lines: list[bytes] = []
        self.line_times: list[float] = []  # seconds since spawn, per stdout line
        self.messages: list[dict] = []
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._stderr = bytearray()
        self._stdout_thread = self._start(self._pump_stdout) if reader and self.proc.stdout else None
        self._stderr_thread = self._start(self._pump_stderr) if self.proc.stderr else None

    @staticmethod
    def _start(target: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread

    # ---- background pumps ----------------------------------------------------------------

    def _pump_stdout(self) -> None:
        try:
            self._read_stdout()
        except (OSError, ValueError):  # the pipe was closed under us
            pass
        self._queue.put(None)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self.raw_lines.append(raw)
            self.line_times.append(time.monotonic() - self.started_at)
            try:
                msg = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                self._queue.put(AssertionError(f"worker wrote a non-JSON stdout line: {raw[:300]!r}"))
                continue
            if not isinstance(msg, dict):
                self._queue.put(AssertionError(f"worker wrote a JSON non-object: {raw[:300]!r}"))
                continue
            self.messages.append(msg)
            self._queue.put(msg)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        try:
            for chunk in iter(lambda: self.proc.stderr.read(65536), b""):
                self._stderr += chunk
                if len(self._stderr) > 4_000_000:  # keep the tail only
                    del self._stderr[:-2_000_000]
        except (OSError, ValueError):
            pass

    # ---- sending ---------------------------------------------------------------------------

    def send_bytes(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, obj: Any) -> None:
        """A dict/list/... is sent as one JSON line; str/bytes are sent as given plus a newline."""
        if isinstance(obj, bytes):
            data = obj
        elif isinstance(obj, str):
            data = obj.encode("utf-8")
        else:
            data = json.dumps(obj).encode("utf-8")
        self.send_bytes(data + b"\n")

    def close_stdin(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    # ---- reading ---------------------------------------------------------------------------

    def read_json(self) -> dict:
        """One stdout line, read directly (``reader=False`` only)."""
        raw = self.proc.stdout.readline()
        if not raw:
            raise WorkerExited(f"worker closed stdout (rc={self.proc.poll()})")
        return json.loads(raw)

    def next_message(self, timeout: Any = DEFAULT) -> dict:
        timeout = self.timeout if timeout is DEFAULT else timeout
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"no stdout line from the worker within {timeout} s; stderr tail:\n{self.stderr_text()[-3000:]}"
            ) from None
        if item is None:
            self._queue.put(None)  # stay at EOF for later reads
            raise WorkerExited(f"worker closed stdout (rc={self.proc.poll()}); stderr tail:\n{self.stderr_text()[-3000:]}")
        if isinstance(item, AssertionError):
            raise item
        return item

    def wait_for(self, predicate: Callable[[dict], bool], timeout: Any = DEFAULT) -> tuple[dict, list[dict]]:
        """Read until a message matches; returns it and the messages skipped on the way.
        ``timeout`` None waits as long as it takes."""
        timeout = self.timeout if timeout is DEFAULT else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        skipped: list[dict] = []
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"no matching message within {timeout:.0f} s; got {skipped[-5:]}")
            msg = self.next_message(remaining)
            if predicate(msg):
                return msg, skipped
            skipped.append(msg)

    def wait_status(self, *statuses: str, timeout: Any = DEFAULT) -> tuple[dict, list[dict]]:
        return self.wait_for(lambda m: m.get("status") in statuses, timeout)

    def read_reply(self, timeout: Any = DEFAULT) -> tuple[dict, list[dict]]:
        """The next terminal reply, and the status lines before it."""
        return self.wait_for(lambda m: m.get("status") not in NON_TERMINAL_STATUSES, timeout)

    def wait_ready(self, timeout: Any = DEFAULT) -> dict:
        msg, _ = self.wait_status("ready", timeout=timeout)
        return msg

    def request(self, obj: Any, timeout: Any = DEFAULT, check: bool = False) -> dict:
        """Send a command and return its terminal reply; ``check``: raise WorkerError on an error."""
        reply, _ = self.request_all(obj, timeout)
        if check and reply.get("status") == "error":
            raise WorkerError(reply)
        return reply

    def request_all(self, obj: Any, timeout: Any = DEFAULT) -> tuple[dict, list[dict]]:
        self.send(obj)
        return self.read_reply(timeout)

    # ---- process ---------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: Any = DEFAULT) -> int:
        rc = self.proc.wait(timeout=self.timeout if timeout is DEFAULT else timeout)
        self._join_pumps(stdout_only=True)
        return rc

    def close(self, timeout: Any = DEFAULT) -> int | None:
        """Ask the worker to exit and wait for it; kill it if it does not."""
        try:
            if self.alive():
                self.send({"cmd": "exit"})
                return self.wait_exit(timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            self.kill()
        return self.proc.poll()

    def drain(self, timeout: float = 10.0) -> list[dict]:
        """All remaining messages until stdout closes."""
        out = []
        while True:
            try:
                out.append(self.next_message(timeout))
            except WorkerExited:
                return out

    def stderr_text(self) -> str:
        return bytes(self._stderr).decode("utf-8", "replace")

    def assert_all_json(self) -> None:
        for raw in self.raw_lines:
            msg = json.loads(raw.decode("utf-8"))
            assert isinstance(msg, dict) and isinstance(msg.get("status"), str), raw[:300]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.close_stdin()
        self._join_pumps()
        for stream in (self.proc.stdout, self.proc.stderr):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass

    def _join_pumps(self, stdout_only: bool = False) -> None:
        # Let the pumps see EOF before their pipes are closed under them.
        for thread in (self._stdout_thread,) if stdout_only else (self._stdout_thread, self._stderr_thread):
            if thread is not None:
                thread.join(timeout=5)

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()
