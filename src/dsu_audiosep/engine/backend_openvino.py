"""The separator's body on OpenVINO's CPU runtime: exported from our own module, compiled per window
shape, strict float32.

What runs here is ``ResUNet30.body_with_film`` (the U-Net and its FiLM layers, input [B, 1, T', 1024]
and the 512-d condition, output the three maps [B, 3, T', 1024]); the STFT, the masks and the ISTFT
stay in torch (the ISTFT's ``F.fold`` does not export). The export is an OpenVINO IR file written once
into a cache folder, named by a hash of the weights, the torch and OpenVINO versions and this
module's format, so a new model, runtime or export recipe never reads a stale file; the
``KEPT_EXPORTS`` most recently used are kept (about 100 MB each), older ones deleted.

Compiled shapes are not cached on disk: OpenVINO's ``CACHE_DIR`` writes a 100 MB blob per window
shape (a folder of files of many lengths makes dozens) and saved nothing measurable here: a
compile from the IR takes 0.3-0.5 s, from the blob 0.3-0.5 s (BENCHMARKS.md).

Shapes are static. One compile with a dynamic time dimension would spare the compile of each new
window length, but measured against static shapes in one process it ran 5-43% slower per window
(1.3 to 10.88 s windows) and peaked about 300 MB higher at 10.88 s (BENCHMARKS.md, 2026-12-04): on
a stereo clip that penalty is about one compile (0.2-1.3 s against 0.4-0.7 s), and every chunked
file or repeated length would pay it with nothing saved. Instead,
``prepare`` compiles at load, in the background, the first window of a file over the memory budget.

OpenVINO is imported here only, when a model is first put on this backend: the worker's first line
and ``ready`` never wait for it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..model.constants import CONDITION_SIZE

log = logging.getLogger(__name__)

EXPORT_FORMAT = "body-ir-v1"  # change when the export recipe changes
BODY_BINS = 1024  # the body sees 1025 bins less the last one
KEPT_EXPORTS = 4  # exported models kept in the cache folder (one per model and runtime version)
MAX_COMPILED_SHAPES = 1  # each compiled shape holds its own activation plan (see OpenVinoBody)


# Background compiles started by OpenVinoBody.prepare: each holds its model until it ends, so a
# model evicted meanwhile can only be freed after it (wait_for_background_compiles).
_PREPARING: set[threading.Thread] = set()
_PREPARING_LOCK = threading.Lock()


def wait_for_background_compiles(timeout: float | None = None) -> None:
    """Let every background compile end (each takes under a second), so that what they hold can go."""
    with _PREPARING_LOCK:
        threads = list(_PREPARING)
    for thread in threads:
        thread.join(timeout)
        if not thread.is_alive():
            with _PREPARING_LOCK:
                _PREPARING.discard(thread)


def runtime_version() -> str:
    import openvino

    return str(openvino.get_version())


def default_cache_dir() -> Path:
    """``AUDIOSEP_BACKEND_CACHE`` or the user's cache folder (XDG on Linux, LOCALAPPDATA on Windows)."""
    given = os.environ.get("AUDIOSEP_BACKEND_CACHE")
    if given:
        return Path(given)
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "dsu-audiosep" / "backends"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsu-audiosep" / "backends"


def prune_exports(cache_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently used exports (and the compiled-blob folder that
    earlier versions wrote); a file another process holds open or just removed is skipped."""
    shutil.rmtree(cache_dir / "compiled", ignore_errors=True)
    exports = sorted(cache_dir.glob("*.xml"), key=lambda p: p.stat().st_mtime if p.exists() else 0.0, reverse=True)
    for old in exports[keep:]:
        for path in (old, old.with_suffix(".bin")):
            try:
                path.unlink()
            except OSError:
                pass


def weights_key(ss_model: torch.nn.Module, runtime: str) -> str:
    """A hash of everything the exported graph depends on (the body's and FiLM's weights, the
    torch and runtime versions, the export recipe). About 0.1 s for the 100 MB separator."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{EXPORT_FORMAT}|torch {torch.__version__}|openvino {runtime}".encode())
    for name, tensor in ss_model.state_dict().items():
        if ".stft." in name or ".istft." in name or name.startswith(("base.stft", "base.istft")):
            continue  # the STFT stays in torch
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Body(torch.nn.Module):
    """What is exported: (x, condition) -> maps, through the model's own code."""

    def __init__(self, ss_model: torch.nn.Module):
        super().__init__()
        self.ss_model = ss_model

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.ss_model.body_with_film(x, condition)


def export_body(ss_model: torch.nn.Module, path: Path) -> None:
    """Convert the body with OpenVINO's PyTorch front-end (a TorchScript trace of our module, batch
    and time dynamic) and save it as IR (``path``: the .xml, its .bin beside) atomically. ONNX
    would need the ``onnx`` package as well; the IR needs nothing but OpenVINO to read back."""
    import openvino

    path.parent.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(1, 1, 64, 1024), torch.zeros(1, CONDITION_SIZE))
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: the branches traced are the inference ones, as meant
        body = _Body(ss_model).eval()
        body(*example)  # derive the folded inference constants first: the trace then sees them as constants
        traced = torch.jit.trace(body, example, check_trace=False)  # the re-trace check compares graph text only
        model = openvino.convert_model(traced, example_input=example,
                                       input=[openvino.PartialShape([-1, 1, -1, BODY_BINS]),
                                              openvino.PartialShape([1, CONDITION_SIZE])])
    model.inputs[0].get_tensor().set_names({"x"})
    model.inputs[1].get_tensor().set_names({"condition"})
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.xml")
    try:
        openvino.save_model(model, str(tmp), compress_to_fp16=False)  # the default would halve the weights
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            if leftover.exists():
                leftover.unlink()


class OpenVinoBody:
    """A ``ResUNet30.body_runner``: the body compiled by OpenVINO for the window shape it meets.

    Memory (the CPU target: peak RSS under 1.5 GiB). A compiled shape holds its whole activation
    plan (about 0.45 MB per frame of a mono window, ~510 MB for the default 10.88 s window) for as
    long as it lives, so one shape is kept at a time: a chunked file compiles its windows' shape
    and, when the last window is shorter, that one (0.3-0.5 s each). The IR read for a compile is dropped after it (the compiled model has its own
    weights), and the torch body's weights are handed back to the kernel when they are a file
    mapping (process_memory.page_out); they only come back if the model falls back to torch.
    """

    name = "openvino"

    def __init__(self, ss_model: torch.nn.Module, cache_dir: Path | None = None, threads: int | None = None):
        import openvino

        self.runtime = runtime_version()
        self.ss_model = ss_model  # to export again should the IR be pruned while this model lives
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.ir_path = cache_dir / f"{weights_key(ss_model, self.runtime)}.xml"
        if not (self.ir_path.exists() and self.ir_path.with_suffix(".bin").exists()):
            export_body(ss_model, self.ir_path)
        try:
            os.utime(self.ir_path)  # most recently used: the last to be pruned
            prune_exports(cache_dir, KEPT_EXPORTS)
        except OSError as exc:  # a read-only cache folder still serves its exports
            log.warning("OpenVINO export cache not pruned (%s)", exc)
        self.core = openvino.Core()
        config: dict[str, Any] = {
            # Strict float32: on CPUs with AMX (or AVX512-BF16) OpenVINO would compute in bf16.
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        }
        self.core.set_property("CPU", config)
        self.core.read_model(str(self.ir_path))  # fail here, at load, on an unreadable IR
        self.compiled: OrderedDict[tuple[int, ...], Any] = OrderedDict()  # shape -> (compiled, request)
        self._lock = threading.Lock()
        self.compiles = 0  # shapes compiled so far, at load (prepare) or on a job's first window of a shape
        self.prepared = 0  # of those, compiled by prepare() in the background
        from ..process_memory import page_out

        page_out(ss_model.state_dict().values())  # hashed and exported: not needed again unless torch runs

    def compiled_for(self, shape: tuple[int, ...]) -> tuple[Any, Any]:
        """The model compiled for one input shape and its inference request (whose buffers are
        reused from window to window); compiled once and kept until another shape comes."""
        with self._lock:
            return self._entry(shape)

    def _entry(self, shape: tuple[int, ...]) -> tuple[Any, Any]:
        """compiled_for with the lock held."""
        entry = self.compiled.get(shape)
        if entry is None:
            while len(self.compiled) >= MAX_COMPILED_SHAPES:
                self.compiled.popitem(last=False)  # free its plan before the next one is made
            if not self.ir_path.exists():  # pruned by another process since this load
                export_body(self.ss_model, self.ir_path)
            model = self.core.read_model(str(self.ir_path))
            model.reshape({"x": list(shape), "condition": [1, CONDITION_SIZE]})
            compiled = self.core.compile_model(model, "CPU")
            entry = self.compiled[shape] = (compiled, compiled.create_infer_request())
            self.compiles += 1
        self.compiled.move_to_end(shape)
        return entry

    def prepare(self, shape: tuple[int, ...]) -> threading.Thread:
        """Compile ``shape`` in a background thread (at load: the default window's shape, so that the
        first job does not wait 0.3-0.5 s for it). A job that arrives meanwhile waits for the lock,
        i.e. for the compile in progress; a failure here is only logged (the job compiles again)."""
        def run() -> None:
            try:
                with self._lock:  # one acquisition: a job's shape compiled meanwhile is never evicted here
                    if self.compiled:
                        return  # a job came first and compiled what it needs: leave its shape in place
                    self._entry(shape)
                    self.prepared += 1
            except Exception as exc:
                log.warning("OpenVINO: compiling the %s window shape at load failed (%r); jobs compile it", shape, exc)

        # Not a daemon: a process that ends while OpenVINO compiles (a one-shot CLI job refused at
        # once, an exit right after a load) must wait for the compile, since tearing the runtime
        # down under a running compile aborts the process (SIGABRT) instead of exiting cleanly.
        thread = threading.Thread(target=run, name="dsu-openvino-prepare", daemon=False)
        with _PREPARING_LOCK:
            _PREPARING.add(thread)
        thread.start()
        return thread

    def __call__(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        compiled, request = self.compiled_for(tuple(x.shape))
        feed = {"x": x.detach().float().contiguous().cpu().numpy(),
                "condition": condition.detach().float().reshape(1, -1).contiguous().cpu().numpy()}
        with self._lock:  # one request per shape: calls from two threads take turns
            result = request.infer(feed)
            return torch.from_numpy(result[compiled.output(0)].copy())
