"""Exceptions raised inside a job, as (stable code, message, extra reply fields)."""
from __future__ import annotations

import errno
import traceback
from typing import Callable

from .. import errors
from ..errors import AudioSepError


def is_out_of_memory(exc: BaseException) -> bool:
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


def describe_exception(exc: BaseException, release_memory: Callable[[], None]) -> tuple[str, str, dict]:
    """(code, message, extra fields) for an exception raised inside a job. An out-of-memory
    failure first gives back what the failed job held (``release_memory``), so the next job can run."""
    if isinstance(exc, AudioSepError):
        return exc.code, exc.message or exc.code, {}
    if is_out_of_memory(exc):
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

