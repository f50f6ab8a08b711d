"""Which runtime runs the separator's body, and putting a loaded model on it.

torch is the reference and the only backend on CUDA/MPS and in reduced precision. On a CPU in
strict float32 the body (the U-Net with its FiLM layers; STFT and ISTFT stay in torch) can run on
OpenVINO (engine/backend_openvino.py). ``"auto"`` picks from a table keyed by the CPU's
architecture and instruction sets, not from a calibration at load: the table is what
BENCHMARKS.md measured (OpenVINO 1.5x torch on an AVX2-only AMD EPYC, faster on an AVX-512/AMX
Xeon too), while a calibration would cost a compile and several forward passes at the first load
and, on a shared machine, measure the neighbours as much as the runtimes.

A backend that cannot be imported, exported or compiled leaves the model on torch with a warning,
never an error; so does one that fails later, on a window shape it meets first in a job.
"""
from __future__ import annotations

import importlib.util
import logging
import platform
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino")
X86 = {"x86_64", "amd64", "i686", "x86"}


@dataclass(frozen=True)
class CpuInfo:
    arch: str
    model: str
    flags: frozenset[str]


# What torch's own dispatcher found (torch.backends.cpu.get_cpu_capability), as instruction-set flags:
# the source where /proc/cpuinfo does not exist (Windows, macOS). It obeys ATEN_CPU_CAPABILITY.
CAPABILITY_FLAGS = {"AVX2": frozenset({"avx2"}), "AVX512": frozenset({"avx2", "avx512f"})}


def _torch_capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def cpu_info(cpuinfo: str = "/proc/cpuinfo", capability: Callable[[], str] = _torch_capability) -> CpuInfo:
    """This machine's CPU: architecture, model name and instruction-set flags (Linux: ``cpuinfo``;
    elsewhere the flags torch's dispatcher found, so Windows and Intel Macs get AVX2 too)."""
    model, flags = platform.processor() or "", frozenset()
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model.strip(" x86_64"):
                    model = value.strip()
                elif key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
                if flags and key == "model name":
                    break
    except OSError:
        pass
    if not flags:
        try:
            flags = CAPABILITY_FLAGS.get(capability().upper(), frozenset())
        except Exception:  # an older torch without the query: no flags, so auto stays on torch
            flags = frozenset()
    return CpuInfo(platform.machine().lower(), model, flags)


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def choose(requested: str, device: str, precision: str, cpu: CpuInfo,
           installed: Callable[[str], bool]) -> tuple[str, str | None]:
    """(backend, warning or None) for a load. ``installed(name)`` says whether a runtime is there."""
    if requested == "torch":
        return "torch", None
    if not device.startswith("cpu") or precision != "fp32":
        why = f"device {device}" if not device.startswith("cpu") else f"precision {precision}"
        note = None if requested == "auto" else f"backend {requested!r} runs on CPU in fp32 only; {why} uses torch"
        return "torch", note
    if requested == "openvino":
        if installed("openvino"):
            return "openvino", None
        return "torch", "backend 'openvino' is not installed; using torch"
    # auto: the measured table (BENCHMARKS.md, "backends"): OpenVINO wherever its x86 CPU plugin
    # has AVX2 kernels; torch elsewhere (arm64 untested here, see docs/backends.md).
    if cpu.arch in X86 and "avx2" in cpu.flags and installed("openvino"):
        return "openvino", None
    return "torch", None


def make_runner(name: str, ss_model: Any) -> Any:
    if name == "openvino":
        from .backend_openvino import OpenVinoBody

        return OpenVinoBody(ss_model)
    raise ValueError(f"unknown backend {name!r}")


class _Guarded:
    """A runner that, if it ever fails, puts the model back on torch (with a warning) for good."""

    def __init__(self, runner: Any, ss_model: Any, model: Any, warn: Callable[[str], None]):
        self.runner, self.ss_model, self.model, self.warn = runner, ss_model, model, warn
        self.name = runner.name

    def __call__(self, x: Any, condition: Any) -> Any:
        try:
            return self.runner(x, condition)
        except Exception as exc:
            self.warn(f"backend {self.name} failed ({exc!r}); continuing on torch")
            self.ss_model.body_runner = None
            self.model.backend = "torch"
            return self.ss_model.body_with_film(x, condition)


def attach(model: Any, name: str, warn: Callable[[str], None],
           build: Callable[[str, Any], Any] = make_runner) -> str:
    """Run ``model``'s body on backend ``name`` (a choice, not "auto"); the backend in use."""
    ss_model = model.ss_model
    ss_model.body_runner = None
    model.backend = "torch"
    if name == "torch":
        return "torch"
    try:
        runner = build(name, ss_model)
    except Exception as exc:
        warn(f"backend {name} could not be loaded ({exc!r}); using torch")
        return "torch"
    ss_model.body_runner = _Guarded(runner, ss_model, model, warn)
    model.backend = name
    return name


def body_shape(window_samples: int) -> tuple[int, int, int, int]:
    """The body's input shape for one mono window of ``window_samples`` at 32 kHz: the centred
    STFT's frames, padded to the pooling grid (ResUNet30Base.mask_input), 1024 bins."""
    from ..model.constants import HOP, TIME_DOWNSAMPLE

    frames = window_samples // HOP + 1
    return (1, 1, -(-frames // TIME_DOWNSAMPLE) * TIME_DOWNSAMPLE, 1024)


def prepare_window(model: Any, window_samples: int) -> bool:
    """Have the model's backend compile the shape of a window in the background (a backend that
    compiles per shape; torch needs nothing); whether a compile was started."""
    guarded = getattr(model.ss_model, "body_runner", None)
    prepare = getattr(getattr(guarded, "runner", None), "prepare", None)
    if prepare is None:
        return False
    prepare(body_shape(window_samples))
    return True


def compile_counts(model: Any) -> dict[str, int]:
    """How many shapes the backend compiled (``compiles``) and how many of those at load
    (``prepared``); empty on torch. Reported by get_status."""
    runner = getattr(getattr(model.ss_model, "body_runner", None), "runner", None)
    if runner is None or not hasattr(runner, "compiles"):
        return {}
    return {"compiles": int(runner.compiles), "prepared": int(getattr(runner, "prepared", 0))}


def use_backend(model: Any, requested: str, cpu: CpuInfo | None = None,
                installed: Callable[[str], bool] | None = None,
                warn: Callable[[str], None] | None = None, build: Callable[[str, Any], Any] = make_runner) -> str:
    """Put ``model``'s body on the backend ``requested`` ("auto", "torch", "openvino") resolves to
    for its device and precision; the backend in use. Warnings go to ``warn`` (default: the log,
    i.e. stderr), and any failure leaves the model on torch."""
    warn = warn or (lambda message: log.warning("%s", message))
    cpu = cpu if cpu is not None else cpu_info()
    installed = installed or (lambda name: name == "openvino" and openvino_installed())
    name, note = choose(requested, str(model.device), model.precision, cpu, installed)
    if note:
        warn(note)
    return attach(model, name, warn, build)
