"""A small pipe client for the worker, as the parent app talks to it: spawn, write JSON lines to
stdin, read JSON lines from stdout with timeouts.

The command that starts the worker comes from ``worker_argv()``: ``DSU_WORKER_CMD`` (a shell-style
command line, e.g. ``dist/dsu-audiosep/dsu-audiosep --worker``) when set, else this Python
running ``-m dsu_audiosep --worker``. So the same tests drive the source tree and the frozen build.

Every stdout line is recorded; ``assert_all_json`` checks that each one is a JSON object.
"""
from __future__ import annotations

import json
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

# Statuses that are not the answer to a command (mirrors protocol.NON_TERMINAL_STATUSES; kept
# here so the client does not depend on the code under test).
NON_TERMINAL = frozenset({"loading", "ready", "loading_model", "separating", "progress", "shutdown"})
# What the parent app waits for after each command.
PARENT_TERMINAL = frozenset({"done", "error", "model_loaded", "models", "pong", "exiting"})

DEFAULT_TIMEOUT = float(os.environ.get("DSU_TEST_TIMEOUT", "60"))


def worker_argv() -> list[str]:
    override = os.environ.get("DSU_WORKER_CMD")
    if override:
        return shlex.split(override, posix=os.name != "nt")
    return [sys.executable, "-m", "dsu_audiosep", "--worker"]


def clean_env(policy_path: str | os.PathLike | None = None, **extra: str) -> dict[str, str]:
    """The test process's environment without worker settings, with an isolated policy file.

    The user's ~/.dsu/runtime_policy.json must not change test results: point the worker at a
    file that does not exist unless a test passes one.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOSEP_")}
    # The worker suites expect the CPU's per-device defaults (conv STFT, one channel at a time)
    # whatever the machine has; the CUDA path has its own tests (test_cuda.py, explicit device).
    env["AUDIOSEP_DEVICE"] = "cpu"
    if policy_path is None:
        policy_path = Path(tempfile.gettempdir()) / "dsu-audiosep-tests-no-policy" / "none.json"
    env["DSU_RUNTIME_POLICY_PATH"] = str(policy_path)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


class WorkerExited(EOFError):
    pass


class WorkerClient:
    def __init__(
        self,
        argv: list[str] | None = None,
        extra_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
    ):
        self.argv = list(argv or worker_argv()) + list(extra_args)
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env if env is not None else clean_env(),
            cwd=cwd,
            bufsize=0,
        )
        self.raw_lines: list[bytes] = []
        self.line_times: list[float] = []  # seconds since spawn, per stdout line
        self.messages: list[dict] = []
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._stderr = bytearray()
        self._stdout_thread = threading.Thread(target=self._pump_stdout, daemon=True)
        self._stderr_thread = threading.Thread(target=self._pump_stderr, daemon=True)
        self._stdout_thread.start()
        self._stderr_thread.start()

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

    def next_message(self, timeout: float = DEFAULT_TIMEOUT) -> dict:
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"no stdout line from the worker within {timeout:.0f} s; stderr tail:\n{self.stderr_text()[-3000:]}"
            ) from None
        if item is None:
            self._queue.put(None)  # stay at EOF for later reads
            raise WorkerExited(f"worker closed stdout (rc={self.proc.poll()}); stderr tail:\n{self.stderr_text()[-3000:]}")
        if isinstance(item, AssertionError):
            raise item
        return item

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = DEFAULT_TIMEOUT) -> tuple[dict, list[dict]]:
        """Read until a message matches; returns it and the messages skipped on the way."""
        deadline = time.monotonic() + timeout
        skipped: list[dict] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching message within {timeout:.0f} s; got {skipped[-5:]}")
            msg = self.next_message(remaining)
            if predicate(msg):
                return msg, skipped
            skipped.append(msg)

    def wait_status(self, *statuses: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[dict, list[dict]]:
        return self.wait_for(lambda m: m.get("status") in statuses, timeout)

    def read_reply(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[dict, list[dict]]:
        """The next terminal reply, and the status lines before it."""
        return self.wait_for(lambda m: m.get("status") not in NON_TERMINAL, timeout)

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT) -> dict:
        msg, _ = self.wait_status("ready", timeout=timeout)
        return msg

    def request(self, obj: Any, timeout: float = DEFAULT_TIMEOUT) -> dict:
        self.send(obj)
        reply, _ = self.read_reply(timeout)
        return reply

    def request_all(self, obj: Any, timeout: float = DEFAULT_TIMEOUT) -> tuple[dict, list[dict]]:
        self.send(obj)
        return self.read_reply(timeout)

    # ---- process ---------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._stdout_thread.join(timeout=5)
        return rc

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
        # Let the pumps see EOF before their pipes are closed under them.
        self._stdout_thread.join(timeout=5)
        self._stderr_thread.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()
