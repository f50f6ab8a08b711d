"""The memory budget: how long a window (or a full pass) may be so that the worker's peak fits.

``memory_budget`` (MiB, options.py) bounds every command, whatever ``use_chunk`` says: a full pass
that would not fit is run in grid-aligned windows whose context keeps the output the full pass's
(within ``PARITY_ERROR`` of the peak), and chunked jobs' windows are shortened to fit. On CUDA the
GPU's free memory decides as before (resolve.py); the budget is the process's RAM.

The cost model is measured, not derived: the worker's peak RSS (VmHWM) after one full pass of a
stereo file, fresh worker per point, demo model in the released format, memory-mapped (the
default), 2 threads (BENCHMARKS.md, 2026-12-04). On CPU the channels run one at a time, so the
peak grows with the seconds of one mono window:

    openvino: 1251 / 1685 / 2136 MiB at 8 / 14 / 20 s  ->  658 MiB + 73.8 MiB per second
    torch:    1174 / 1653 / 2154 MiB at 8 / 14 / 20 s  ->  517 MiB + 81.7 MiB per second

(the reviewer's 60 s stereo full pass, 5123 MiB on OpenVINO, sits on the first line: 658 + 60 x
73.8 = 5086). The constants below round both terms up (about 6% over the points at 20 s), so a
window sized from them stays under the budget. Below ``RELEASE_TEXT_PAGES_S`` the separation keeps
the text encoder's pages (about 320 MiB measured) resident; a window that could not afford them
with them hands them back first (``needs_page_out``).

Nothing here imports torch: resolve.py uses it while planning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..model.constants import GRID, SAMPLE_RATE

DEFAULT_CPU_BUDGET_MIB = 2048.0  # see docs/backends.md, "Memory budget"
TEXT_PAGES_MIB = 340.0  # the text encoder's resident pages after a query (measured 314-318 MiB)
# Context of the windows that replace a full pass. Measured on the demo model (max abs error over
# the peak, windows vs the full pass, 30 s file, 9.6 s kept centres): see BENCHMARKS.md.
PARITY_CONTEXT_S = 1.92
PARITY_ERROR = 1e-5  # the bound those windows are chosen to meet (SPEC allows 1e-4)
MIN_CORE_S = GRID / SAMPLE_RATE  # one pooling block: the shortest kept centre a window can have


@dataclass(frozen=True)
class Cost:
    base_mib: float  # the worker with its model loaded and the per-job overheads
    mib_per_second: float  # per second of one window of one channel


COSTS = {
    "openvino": Cost(base_mib=700.0, mib_per_second=78.0),
    "torch": Cost(base_mib=560.0, mib_per_second=86.0),
}


def cost(backend: str) -> Cost:
    """An unknown backend name ("auto" before a load decided) takes the larger of each term."""
    if backend in COSTS:
        return COSTS[backend]
    return Cost(max(c.base_mib for c in COSTS.values()), max(c.mib_per_second for c in COSTS.values()))


def peak_mib(backend: str, window_s: float, channels_per_pass: int = 1, text_pages: bool = False) -> float:
    """The worker's expected peak for windows of ``window_s`` seconds (the full pass: the file)."""
    c = cost(backend)
    return c.base_mib + c.mib_per_second * window_s * max(1, channels_per_pass) + (TEXT_PAGES_MIB if text_pages else 0.0)


def longest_window_s(budget_mib: float, backend: str, channels_per_pass: int = 1) -> float:
    """The longest window whose expected peak fits ``budget_mib`` (text pages handed back); may be
    zero or negative when the budget is below what the loaded model alone needs."""
    c = cost(backend)
    return (budget_mib - c.base_mib) / (c.mib_per_second * max(1, channels_per_pass))


def core_for_window(window_s: float, context_s: float) -> float:
    """The longest grid-aligned kept centre whose window (centre plus context on both sides, the
    context rounded up to the grid as chunking.py does) is at most ``window_s``; at least one block."""
    ctx = 0.0 if context_s <= 0 else math.ceil(context_s * SAMPLE_RATE / GRID) * GRID / SAMPLE_RATE
    blocks = math.floor((window_s - 2 * ctx) * SAMPLE_RATE / GRID + 1e-9)
    return max(1, blocks) * MIN_CORE_S


def window_s(core_s: float, context_s: float) -> float:
    """A window's length for a kept centre and context, both rounded up to the grid (chunking.py)."""
    blocks = lambda s: 0 if s <= 0 else max(1, math.ceil(s * SAMPLE_RATE / GRID - 1e-9))  # noqa: E731
    return (blocks(core_s) + 2 * blocks(context_s)) * MIN_CORE_S


def needs_page_out(budget_mib: float | None, backend: str, window_seconds: float, channels_per_pass: int = 1) -> bool:
    """Whether the text encoder's pages must go back before windows of this length to stay in budget."""
    if budget_mib is None:
        return False
    return peak_mib(backend, window_seconds, channels_per_pass, text_pages=True) > budget_mib
