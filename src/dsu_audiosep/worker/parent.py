"""Noticing that the parent app is gone (crashed, force-quit) while our stdin may still be open.

End of stdin alone does not mean that: ``printf ... | dsu-audiosep --worker`` closes stdin after its
last command and still wants every answer. So the worker looks at the parent process itself:
- POSIX: an orphan is re-parented (to init or a subreaper), so ``os.getppid()`` changes. A worker
  started with parent pid 1 has nothing to watch.
- Windows: processes are not re-parented; a handle to the parent, opened at start, becomes
  signalled when it exits (the handle also pins the process object, so pid reuse cannot fool it).
Checks are throttled to one every ``poll_s`` seconds: a system call, far below the cost of a window.
"""
from __future__ import annotations

import os
import time

PARENT_POLL_S = 0.5


class ParentWatch:
    def __init__(self, poll_s: float = PARENT_POLL_S):
        self.poll_s = poll_s
        self._next = 0.0
        self._ppid = os.getppid()
        self._handle = _open_process(self._ppid) if os.name == "nt" else None

    def gone(self) -> bool:
        """True once the parent has certainly exited; cheap to call often."""
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.poll_s
        if os.name == "nt":
            return self._handle is not None and _signalled(self._handle)
        return self._ppid > 1 and os.getppid() != self._ppid


def _open_process(pid: int):
    """A SYNCHRONIZE handle to ``pid``, or None (no parent to watch, or not allowed)."""
    try:
        import ctypes
        from ctypes import wintypes

        k32 = ctypes.WinDLL("kernel32", use_last_error=True)
        k32.OpenProcess.restype = wintypes.HANDLE
        handle = k32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        return handle or None
    except (OSError, AttributeError, ImportError):
        return None


def _signalled(handle) -> bool:
    try:
        import ctypes
        from ctypes import wintypes

        wait = ctypes.WinDLL("kernel32").WaitForSingleObject
        return wait(wintypes.HANDLE(handle), wintypes.DWORD(0)) == 0  # WAIT_OBJECT_0
    except (OSError, AttributeError):
        return False
