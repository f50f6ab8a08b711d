"""Heartbeats: a running command is never silent for longer than the heartbeat interval.

A parent that puts a timeout on every line (DSU's client waits 300 s per line) would otherwise give
up on a long job that was going fine: without ``"progress": true`` a separation writes
``separating`` and then nothing until ``done``. While a command runs, whenever no line at all has
been written for ``interval`` seconds, a thread writes one non-terminal line for that command:
- ``{"status":"progress","percent":..,"stage":..,"id":..,"heartbeat":true}`` once the engine has
  reported a fraction (chunked separations report one per window);
- otherwise a repeat of the command's status line (``separating`` with its ``input``,
  ``loading_model`` with its ``model``) with ``"heartbeat": true`` added.
``end()`` returns only when no heartbeat is being written and none can start, and the worker calls
it before writing the terminal reply: a heartbeat never follows the reply it belongs to, so it can
never be mistaken for part of the next command's answer.

The default interval is 10 s, so that a line arrives at least every 15 s even on a busy machine;
``AUDIOSEP_HEARTBEAT_SECONDS`` overrides it (tests shorten it).
"""
from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, Callable

HEARTBEAT_SECONDS = 10.0
HEARTBEAT_ENV = "AUDIOSEP_HEARTBEAT_SECONDS"
_MIN_SECONDS, _MAX_SECONDS = 0.05, 3600.0


def interval_from_env(warn: Callable[[str], None]) -> float:
    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not raw:
        return HEARTBEAT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not _MIN_SECONDS <= value <= _MAX_SECONDS:  # NaN fails too
        warn(f"{HEARTBEAT_ENV}={raw!r} is not a number of seconds in [{_MIN_SECONDS}, {_MAX_SECONDS}]; "
             f"using {HEARTBEAT_SECONDS}")
        return HEARTBEAT_SECONDS
    return value


class Heartbeat:
    """Writes a line for the running command when ``last_write()`` is ``interval`` seconds old."""

    def __init__(self, send: Callable[[dict], Any], last_write: Callable[[], float], interval: float,
                 clock: Callable[[], float] = time.monotonic):
        self._send = send
        self._last_write = last_write
        self.interval = interval
        self._clock = clock
        self._cond = threading.Condition()
        self._line: dict | None = None  # the running command's status line; None: nothing to say
        self._since = 0.0
        self._percent: float | None = None
        self._stopped = False

    def start(self) -> "Heartbeat":
        threading.Thread(target=self._main, name="heartbeat", daemon=True).start()
        return self

    def status(self, status_line: dict) -> None:
        """Write the running command's status line; from now on the command is kept audible."""
        with self._cond:
            self._send(status_line)
            self._line = dict(status_line)
            self._since = self._clock()
            self._percent = None
            self._cond.notify_all()

    def send(self, line: dict) -> Any:
        """Write another line of the running command (its progress lines). Under the same lock as
        heartbeats, so a heartbeat's percent, read just before, cannot land after a newer one."""
        with self._cond:
            return self._send(line)

    def fraction(self, value: float) -> None:
        """The engine's progress (0..1), for the next heartbeat; cheap, called once per window."""
        try:
            pct = round(min(max(float(value), 0.0), 1.0) * 100.0, 1)
        except (TypeError, ValueError):
            return
        if pct == pct:  # not NaN
            self._percent = pct  # one assignment: atomic, no lock needed

    def end(self) -> None:
        """No heartbeat for the current command after this returns (one being written finishes first)."""
        with self._cond:
            self._line = None
            self._percent = None

    def stop(self, timeout: float = 1.0) -> None:
        """For good (the worker is shutting down). Bounded: a heartbeat stuck on a full pipe must
        not stop the shutdown line, which then gives up on its own lock timeout."""
        self._stopped = True
        if self._cond.acquire(timeout=timeout):
            try:
                self._line = None
                self._cond.notify_all()
            finally:
                self._cond.release()

    def _beat_line(self) -> dict:
        line = self._line or {}
        if self._percent is None:
            return {**line, "heartbeat": True}
        beat: dict[str, Any] = {"status": "progress", "percent": self._percent, "stage": line.get("status")}
        if "id" in line:
            beat["id"] = line["id"]
        beat["heartbeat"] = True
        return beat

    def _main(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._line is None:
                    self._cond.wait()
                    continue
                due = max(self._last_write(), self._since) + self.interval
                wait = due - self._clock()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                try:
                    self._send(self._beat_line())
                except Exception:  # never let the thread die: the next command needs it too
                    pass
                self._since = self._clock()
