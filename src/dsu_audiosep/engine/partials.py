"""Names of temporary output files that say who wrote them, and sweeping those whose writer is gone.

A temporary output is ``.<stem>.dsu_<host>_<boot>_<pid>_<start>_<random>.partial<ext>``:
- ``host``: 8 hex digits of a hash of the machine's name. A folder can be shared over the network,
  and a pid means nothing on another machine: files of another host are never swept.
- ``boot``: 8 hex digits of the Linux boot id, ``0`` where there is none. Every process of an
  earlier boot of this machine is gone.
- ``pid`` and ``start``: the writer's process id and start time (Linux: clock ticks since boot from
  ``/proc/<pid>/stat``; Windows: the creation time), ``0`` where unknown. Both together survive pid
  reuse: a live process with that pid but another start time is someone else.
A file is swept only when its owner is *provably* gone; anything uncertain (other host, a pid
that exists but whose start time cannot be read) is left alone. Files named the old way
(``.<stem>.<random>.partial<ext>``, no owner) are never touched.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import socket
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

_NAME = re.compile(
    r"^\.(?P<stem>.*)\.dsu_(?P<host>[0-9a-f]{8})_(?P<boot>[0-9a-f]{8}|0)_(?P<pid>\d{1,10})_(?P<start>\d{1,20})"
    r"_(?P<rand>[0-9a-f]{8})\.partial(?P<ext>\.[^./\\]*)?$",
    re.DOTALL,
)
_STEM_BYTES = 80  # keeps the temporary name well inside the usual 255-byte limit


@dataclass(frozen=True)
class Owner:
    host: str
    boot: str
    pid: int
    start: int  # 0: unknown

    @property
    def token(self) -> str:
        return f"dsu_{self.host}_{self.boot}_{self.pid}_{self.start}"


def _hash8(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:8]


def _host_tag() -> str:
    try:
        return _hash8(socket.gethostname())
    except OSError:
        return _hash8("")


def _boot_tag() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return _hash8(f.read().strip())
    except OSError:
        return "0"


def _linux_start(pid: int) -> int | None:
    """Start time in ticks since boot; None when there is no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19])  # field 22 of the whole line


def _windows_start(pid: int) -> int | None:
    """Creation time (100 ns units); None when no process has this pid; 0 when it cannot be read."""
    import ctypes
    from ctypes import wintypes

    k32 = ctypes.WinDLL("kernel32", use_last_error=True)
    k32.OpenProcess.restype = wintypes.HANDLE
    handle = k32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        # ERROR_INVALID_PARAMETER: no such pid. Anything else (access denied): it exists.
        return None if ctypes.get_last_error() == 87 else 0
    handle = wintypes.HANDLE(handle)
    try:
        times = [wintypes.FILETIME() for _ in range(4)]
        code = wintypes.DWORD()
        if k32.GetExitCodeProcess(handle, ctypes.byref(code)) and code.value != 259:  # STILL_ACTIVE
            return None  # exited; someone still holds a handle to it
        if not k32.GetProcessTimes(handle, *[ctypes.byref(t) for t in times]):
            return 0
        return (times[0].dwHighDateTime << 32) | times[0].dwLowDateTime
    finally:
        k32.CloseHandle(handle)


def _posix_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks (on Windows os.kill would terminate it)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def process_start(pid: int) -> int | None:
    """The process's start time; None: no such process; 0: it exists (or may) but the time is unknown."""
    try:
        if os.name == "nt":
            return _windows_start(pid)
        if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):
            return _linux_start(pid)
        return 0 if _posix_exists(pid) else None
    except (OSError, ValueError, IndexError, AttributeError):
        return 0  # unreadable: assume it may be alive


_self_owner: Owner | None = None


def this_process() -> Owner:
    global _self_owner
    pid = os.getpid()
    if _self_owner is None or _self_owner.pid != pid:  # recomputed after a fork
        _self_owner = Owner(_host_tag(), _boot_tag(), pid, process_start(pid) or 0)
    return _self_owner


def partial_name(final_name: str, owner: Owner | None = None) -> str:
    """The temporary name for ``final_name`` (a file name, not a path), owned by this process."""
    stem, ext = os.path.splitext(final_name)
    stem = os.fsencode(stem)[:_STEM_BYTES].decode("utf-8", "ignore") if os.name != "nt" else stem[:_STEM_BYTES]
    return f".{stem}.{(owner or this_process()).token}_{secrets.token_hex(4)}.partial{ext}"


def parse(name: str) -> Owner | None:
    """The owner named in a temporary file name of ours; None for any other file."""
    m = _NAME.match(name)
    if m is None:
        return None
    return Owner(m["host"], m["boot"], int(m["pid"]), int(m["start"]))


def owner_gone(owner: Owner) -> bool:
    """True only when the process that wrote this file certainly no longer runs."""
    me = this_process()
    if owner.host != me.host:
        return False  # another machine (shared folder) or a renamed host: cannot know
    if owner.boot != "0" and me.boot != "0" and owner.boot != me.boot:
        return True  # an earlier boot
    if owner.pid == me.pid:
        return bool(owner.start and me.start and owner.start != me.start)
    start = process_start(owner.pid)
    if start is None:
        return True
    return bool(owner.start and start and start != owner.start)  # the pid was reused


def sweep(folder: str, keep: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Delete our temporary files in ``folder`` whose writer is gone; returns their paths.

    Never raises: sweeping is housekeeping and must not fail the write that triggered it.
    ``keep`` holds paths this process is writing right now.
    """
    removed: list[str] = []
    try:
        with os.scandir(folder) as entries:
            candidates = [(e.path, parse(e.name)) for e in entries if e.name.startswith(".") and ".partial" in e.name]
    except OSError:
        return removed
    for path, owner in candidates:
        if owner is None or path in keep:
            continue
        try:
            if owner_gone(owner):
                os.remove(path)
                removed.append(path)
        except FileNotFoundError:
            pass  # another worker swept it first
        except OSError as exc:
            log.debug("could not sweep %s: %s", path, exc)
    if removed:
        log.info("removed %d stale partial file(s) in %s", len(removed), folder)
    return removed
