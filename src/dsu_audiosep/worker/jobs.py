"""Job tracking: which commands are queued or running (so ``cancel`` acts at once), and the
throttled ``progress`` lines of a running one."""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable

from . import protocol as P

PROGRESS_MIN_INTERVAL_S = 0.5
PROGRESS_MIN_STEP_PERCENT = 5.0


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
        self.fields: dict[str, Any] = {}  # added to each line (a batch's job index and job percent)

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
        self._send(P.reply("progress", self._id, percent=pct, stage=self._stage, **self.fields))

    def start(self) -> None:
        self(0.0)

    def finish(self) -> None:
        self(1.0)

