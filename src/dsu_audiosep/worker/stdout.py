"""stdout belongs to the protocol alone: the guard that keeps it so, and the writer of reply lines.

At start the real stdout descriptor is duplicated to a private descriptor used only by
``ReplyWriter``, and descriptor 1 is pointed at stderr, so a stray ``print``, a C library or a
progress bar writing to stdout lands on stderr instead of corrupting the stream the parent parses.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

from . import protocol as P


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

