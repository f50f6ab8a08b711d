"""Which device a job runs on, and the per-device choices that follow from it."""
from __future__ import annotations

import torch

from .errors import DEVICE_UNAVAILABLE, AudioSepError


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if _mps_available():
        return "mps"
    return "cpu"


def resolve_device(name: str | None) -> str:
    """'auto'/None picks the best device; an explicit one must exist (``cuda:1`` included)."""
    if name is None or str(name).strip().lower() in ("", "auto"):
        return best_device()
    if not isinstance(name, str):
        raise AudioSepError(DEVICE_UNAVAILABLE, f"device must be a string, got {name!r}")
    text = name.strip().lower()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise AudioSepError(DEVICE_UNAVAILABLE, f"unknown device {name!r}; use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AudioSepError(DEVICE_UNAVAILABLE, f"device {name!r} requested but CUDA is not available on this machine (this torch build: {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AudioSepError(DEVICE_UNAVAILABLE, f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return str(dev)
    if dev.type == "mps":
        if not _mps_available():
            raise AudioSepError(DEVICE_UNAVAILABLE, f"device {name!r} requested but MPS (Apple GPU) is not available on this machine")
        return "mps"
    raise AudioSepError(DEVICE_UNAVAILABLE, f"unsupported device {name!r}; use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'")
