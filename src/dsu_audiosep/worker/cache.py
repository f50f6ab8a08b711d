"""Least-recently-used cache of loaded models.

The key holds every choice that changes the weights in memory: the resolved absolute paths, the
device, mmap (for checkpoints only: a converted folder is always memory-mapped, so one folder is
cached once whatever ``mmap`` said), precision, and a fingerprint (size, modification time) of
the files, so a checkpoint replaced on disk is loaded again instead of served stale.

The STFT implementation is *not* in the key: ``AudioSep.set_stft`` switches between the
convolution STFT and ``torch.stft`` on the loaded model without reloading anything, so the
"auto" mode (pick by input duration) reuses one cached model for both variants. Jobs run one at
a time and each sets the variant it needs before running, so sharing is safe.

Eviction drops the cache's reference and then returns memory to the system (the engine's
``release_memory``: ``gc.collect`` and the accelerator allocator's cache); a model still used
elsewhere (the worker's current model) stays alive through that other reference.
"""
from __future__ import annotations

import gc
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


@dataclass(frozen=True)
class ModelKey:
    config_path: str | None
    checkpoint_path: str | None
    clap_checkpoint_path: str | None
    roberta_dir: str | None
    model_dir: str | None
    device: str
    mmap: bool = field(compare=False)  # as asked; compared through _weights_mmap
    precision: str = "fp32"
    backend: str = "auto"  # as asked; the reply reports the one in use
    fingerprint: tuple = ()
    _weights_mmap: bool | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_weights_mmap", None if self.model_dir is not None else self.mmap)

    def describe(self) -> dict[str, Any]:
        return {
            "config_path": self.config_path,
            "checkpoint_path": self.checkpoint_path,
            "clap_checkpoint_path": self.clap_checkpoint_path,
            "roberta_dir": self.roberta_dir,
            "model_dir": self.model_dir,
            "device": self.device,
            "mmap": self.mmap,
            "precision": self.precision,
            "backend": self.backend,
        }


def file_fingerprint(paths: Iterable[str | None]) -> tuple:
    """(path, size, mtime_ns) of each file; for a folder, of each file directly inside it."""
    out: list[tuple] = []
    for path in paths:
        if not path:
            continue
        try:
            st = os.stat(path)
        except OSError:
            out.append((path, None))
            continue
        if os.path.isdir(path):
            try:
                names = sorted(os.listdir(path))
            except OSError:
                names = []
            for name in names:
                try:
                    s = os.stat(os.path.join(path, name))
                except OSError:
                    continue
                out.append((path, name, s.st_size, s.st_mtime_ns))
        else:
            out.append((path, st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclass
class CacheEntry:
    key: ModelKey
    model: Any
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        info = self.key.describe()
        info["load_seconds"] = round(self.load_seconds, 3)
        return info


class ModelCache:
    """LRU map ModelKey -> CacheEntry holding at most ``capacity`` models (0: cache nothing)."""

    def __init__(self, capacity: int = 1, release: Callable[[], None] = gc.collect):
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._entries: OrderedDict[ModelKey, CacheEntry] = OrderedDict()
        self._release = release

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: ModelKey) -> bool:
        return key in self._entries

    def get(self, key: ModelKey) -> CacheEntry | None:
        """The entry for key, marked most recently used; None on a miss."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.last_used = time.time()
        return entry

    def put(self, entry: CacheEntry) -> list[ModelKey]:
        """Insert (most recently used) and evict beyond capacity; returns the evicted keys.

        Called only after a successful load, so a failed load never disturbs the cache.
        """
        if self.capacity == 0:
            return []
        self._entries[entry.key] = entry
        self._entries.move_to_end(entry.key)
        evicted: list[ModelKey] = []
        while len(self._entries) > self.capacity:
            # Take only the key: no local may keep the evicted model alive past release().
            evicted.append(self._entries.popitem(last=False)[0])
        if evicted:
            self._release()
        return evicted

    def resize(self, capacity: int) -> list[dict[str, Any]]:
        """A new capacity; the least recently used beyond it go now. Returns what was evicted."""
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        evicted: list[dict[str, Any]] = []
        while len(self._entries) > capacity:
            evicted.append(self._entries.popitem(last=False)[1].describe())
        if evicted:
            self._release()
        return evicted

    def remove(self, key: ModelKey) -> bool:
        if self._entries.pop(key, None) is None:
            return False
        self._release()
        return True

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        if count:
            self._release()
        return count

    def entries(self) -> list[CacheEntry]:
        """Most recently used first."""
        return list(reversed(self._entries.values()))
