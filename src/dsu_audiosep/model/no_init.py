"""Build modules without initialising their weights (they are about to be replaced).

Inside ``no_init()`` the ``torch.nn.init`` functions are no-ops, so a module's parameters are
uninitialised allocations: large ones are never touched, so they cost neither time (seconds saved
on 125 M RoBERTa parameters) nor resident memory, and they are replaced by the loaded tensors
(``load_state_dict(strict=True, assign=True)``). We do not use the meta device for this: on meta
tensors several factories and initialisers (hann_window, arange, normal_) run torch's Python
reference implementations, which import ``torch._dynamo``, a package the frozen bundle leaves out.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

_LOCK = threading.RLock()


def _noop(tensor, *args, **kwargs):
    return tensor


@contextmanager
def no_init() -> Iterator[None]:
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    with _LOCK:
        saved = {n: getattr(torch.nn.init, n) for n in names}
        try:
            for n in names:
                setattr(torch.nn.init, n, _noop)
            yield
        finally:
            for n, f in saved.items():
                setattr(torch.nn.init, n, f)
