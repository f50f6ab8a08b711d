"""File in, file out: query embedding -> chunk plan -> forward passes -> written output.

The pipeline streams: the input is read block by block, resampled to 32 kHz on the fly, cut into
grid-aligned windows (see chunking.py), separated, resampled to the output rate and written
through an atomic writer. Memory therefore depends on the window length, not the file length.
A "full pass" is the same pipeline with one window covering the whole file.

Channels are separated independently (the model is mono); when the output has fewer channels
than the input (``output_channels="stereo"`` on a 5.1 file) the downmix happens first, so only
what is written gets separated.

The source and the sinks are passed in (``run_job``): a file read by ``BlockReader`` and atomic
file writers (``run_plan``), or an array in memory and in-memory sinks (audio_memory.py, the
Python API's way); the pipeline between them is the same.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import numpy as np
import torch

from ..errors import CANCELLED, OUT_OF_MEMORY, OUTPUT_ERROR, AudioSepError
from ..model.constants import GRID, N_FFT, SAMPLE_RATE
from .audio_read import BlockReader, probe
from .audio_write import prepare_output, same_file
from .chunking import Window, plan_windows, seconds_to_samples
from .output_options import OutputOptions, map_channels, output_channel_count
from .queries import Stem, check_distinct_outputs
from .resampling import StreamResampler, resampled_length
from .query import Query, query_embedding
from . import memory
from .resolve import JobPlan, SeparateOptions, fit_memory, plan_job

log = logging.getLogger(__name__)

# From about 7 s on, a window's activations (~100 MB per second on CPU) plus the text encoder's
# resident pages (~335 MB after a query) would pass the peak of the longest default window
# without them (10.88 s): page them out first. Shorter windows keep them (no re-read on the next query).
RELEASE_TEXT_PAGES_S = 7.0
MIN_WINDOW = N_FFT  # reflect padding of the centred STFT needs more than n_fft / 2 samples
READ_BLOCK = 1 << 16

# Where a job reads its mixture: called with the job's warnings list, it opens a fresh reader with
# BlockReader's interface (samplerate, channels, frames, read(), close, context manager). An OOM
# retry calls it again: every attempt reads from the start.
Source = Callable[[list[str]], ContextManager[Any]]


def file_source(path: str) -> Source:
    """The mixture read from a file, block by block."""
    return lambda warnings: BlockReader(path, READ_BLOCK, warnings=warnings)


@dataclass
class SeparationResult:
    files: list[str]
    duration: float
    chunked: bool
    windows: int
    chunk_length: float | None
    use_torch_stft: bool
    warnings: list[str] = field(default_factory=list)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text or "not enough memory" in text)


def _run_window(model, x: np.ndarray, cond: torch.Tensor) -> np.ndarray:
    """Separate [C, n] float32 at 32 kHz; short windows are zero-padded to what the STFT needs."""
    n = x.shape[1]
    if n < MIN_WINDOW:
        x = np.pad(x, ((0, 0), (0, MIN_WINDOW - n)))
    wav = torch.from_numpy(np.ascontiguousarray(x)).to(model.device)
    if model.device.type == "cpu":
        # On CPU a batch of two is no faster than two passes (the convolutions already fill both
        # cores), and it doubles the peak memory: channels go one at a time.
        y = torch.cat([model.separate(wav[c : c + 1], cond) for c in range(wav.shape[0])])
    else:
        y = model.separate(wav, cond)
    return y[:, :n].float().cpu().numpy()


def _resample_in_threads(device: torch.device) -> bool:
    """Per-channel resampling in parallel threads pays where the CPU is otherwise idle (a GPU
    does the forward passes); on CPU those cores are busy with the convolutions."""
    return device.type != "cpu"


class _Stopped(Exception):
    """Another stage of the pipeline failed; this one just leaves."""


_END = object()


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            q.put(item, timeout=0.05)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            continue


class _Pipeline:
    """One attempt at a job with a fixed window plan; raises on OOM so the caller can retry.

    Three stages run at once, handing whole windows over bounded queues: a reader thread (decode,
    downmix, resample to 32 kHz, cut windows), the calling thread (forward passes, where CUDA
    errors and cancellation surface), and a writer thread (resample back, mix, write). On a GPU
    the audio work on the CPU then hides behind the forward passes instead of adding to them; on
    CPU it is about 1% of the time either way. The queues hold at most two windows each, so
    memory stays bounded by the window length.
    """

    def __init__(self, model, source: Source, plans: list, options: SeparateOptions,
                 queries: tuple[Stem, ...], conds: list[torch.Tensor], stems: bool,
                 chunk_samples: int | None, progress, cancelled, warnings: list[str]):
        # plans: one per query, in order, then the residual's if asked for; each an OutputPlan or
        # anything with its samplerate, channels, channel_mode and writer() (an in-memory sink)
        self.model, self.source, self.plans, self.opt = model, source, plans, options
        self.queries, self.conds, self.stems, self.chunk_samples = queries, conds, stems, chunk_samples
        self.residual = len(plans) > len(queries)
        self.progress, self.cancelled, self.warnings = progress, cancelled, warnings
        self.parallel = _resample_in_threads(model.device)

    def run(self) -> int:
        with self.source(self.warnings) as reader:
            sr, c_in, frames = reader.samplerate, reader.channels, reader.frames
            mode = self.opt.output_channels
            c_sep = output_channel_count(c_in, mode) if mode == "stereo" and c_in > 2 else c_in
            n32 = resampled_length(frames, sr, SAMPLE_RATE)
            ctx = seconds_to_samples(self.opt.context_seconds)
            windows = plan_windows(n32, self.chunk_samples, ctx)
            out_sr = self.plans[0].samplerate
            out_frames = resampled_length(frames, sr, out_sr)
            mix_fifo: deque[np.ndarray] = deque()
            stop = threading.Event()
            segments: queue.Queue = queue.Queue(maxsize=2)
            separated: queue.Queue = queue.Queue(maxsize=2)
            errors: list[BaseException] = []

            def stage(fn, *args):
                try:
                    fn(*args)
                except _Stopped:
                    pass
                except BaseException as exc:  # handed to the calling thread, which raises it
                    errors.append(exc)
                    stop.set()

            writers = [p.writer(expected_frames=out_frames, warnings=self.warnings) for p in self.plans]
            threads = [
                threading.Thread(target=stage, name="dsu-read", daemon=True,
                                 args=(self._read, reader, windows, c_in, c_sep, n32, out_frames, mix_fifo, segments, stop)),
                threading.Thread(target=stage, name="dsu-write", daemon=True,
                                 args=(self._write, writers, windows, c_sep, out_sr, out_frames, mix_fifo, separated, stop)),
            ]

            def halt() -> None:
                stop.set()
                for t in threads:
                    if t.is_alive():
                        t.join()

            try:
                for w in writers:
                    w.open()
                for t in threads:
                    t.start()
                done, total = 0, max(1, n32) * len(self.conds)
                while True:
                    if self.cancelled is not None and self.cancelled():
                        raise AudioSepError(CANCELLED, "separation cancelled")
                    item = _get(segments, stop)
                    if item is _END:
                        break
                    win, seg = item
                    kept = []
                    for cond in self.conds:  # every query on the same window: one read for all
                        y = _run_window(self.model, seg, cond)
                        kept.append(y[:, win.keep_start - win.start : win.keep_end - win.start])
                        done += win.keep_end - win.keep_start
                        if self.progress is not None:
                            self.progress(done / total)
                    _put(separated, (win, kept), stop)
                _put(separated, _END, stop)
                for t in threads:
                    t.join()
                if errors:
                    raise errors[0]
                for w in writers:
                    w.commit()
            except BaseException as exc:
                halt()  # no stage may touch a writer while it is aborted
                for w in writers:
                    w.abort()
                if isinstance(exc, _Stopped) and errors:
                    raise errors[0] from None
                raise
            return len(windows)

    def _read(self, reader, windows: list[Window], c_in: int, c_sep: int, n32: int, out_frames: int,
              mix_fifo: deque, segments: queue.Queue, stop: threading.Event) -> None:
        """Decode, resample to 32 kHz and hand over each window's samples, in order."""
        mode = self.opt.output_channels
        to32 = StreamResampler(c_sep, reader.samplerate, SAMPLE_RATE, parallel=self.parallel)
        mix_rs = (StreamResampler(c_sep, reader.samplerate, self.plans[0].samplerate, parallel=self.parallel)
                  if self._needs_mixture() else None)
        parts: list[np.ndarray] = []  # 32 kHz samples not yet dropped, joined lazily (once per window)
        base = 0  # absolute 32 kHz index of the first sample in parts
        have = 0  # absolute 32 kHz index one past the last sample in parts
        eof = False

        def pull() -> None:
            nonlocal have, eof
            if stop.is_set():
                raise _Stopped
            block = reader.read()
            last = block.shape[1] == 0
            if not last and c_sep != c_in:
                block = map_channels(block, mode)
            if last:
                block = np.zeros((c_sep, 0), np.float32)
            y = to32.process(block, last=last, length=n32 if last else None)
            if mix_rs is not None:
                mix_fifo.append(mix_rs.process(block, last=last, length=out_frames if last else None))
            if y.shape[1]:
                parts.append(y)
                have += y.shape[1]
            eof = last

        for i, win in enumerate(windows):
            while not eof and have < win.end:
                pull()
            if i + 1 == len(windows):
                while not eof:  # flush the mixture resampler before the last window is written
                    pull()
            if len(parts) > 1:
                parts[:] = [np.concatenate(parts, axis=1)]
            seg = np.ascontiguousarray(parts[0][:, win.start - base : win.end - base]) if parts else np.zeros((c_sep, 0), np.float32)
            next_start = windows[i + 1].start if i + 1 < len(windows) else win.end
            if parts and next_start > base:
                parts[0] = parts[0][:, next_start - base :]
                base = next_start
            _put(segments, (win, seg), stop)
        _put(segments, _END, stop)

    def _write(self, writers, windows: list[Window], c_sep: int, out_sr: int, out_frames: int,
               mix_fifo: deque, separated: queue.Queue, stop: threading.Event) -> None:
        """Resample each window's kept centre back to the output rate and write it, in order."""
        backs = [StreamResampler(c_sep, SAMPLE_RATE, out_sr, parallel=self.parallel) for _ in self.queries]
        last_win = windows[-1]
        while True:
            item = _get(separated, stop)
            if item is _END:
                return
            win, kept = item
            last = win is last_win
            outs = [back.process(k, last=last, length=out_frames if last else None) for back, k in zip(backs, kept)]
            self._emit(writers, outs, mix_fifo)

    def _needs_mixture(self) -> bool:
        """The mixture at the output rate is needed for "remove" and for a residual output."""
        return self.residual or any(q.mode == "remove" for q in self.queries)

    def _emit(self, writers, outs: list[np.ndarray], mix_fifo: deque) -> None:
        n = outs[0].shape[1]  # the same resampling of the same lengths: every query's block is as long
        if n == 0:
            return
        mix = _take(mix_fifo, n, outs[0].shape[0]) if self._needs_mixture() else None
        blocks = [out if q.mode == "extract" else mix - out for q, out in zip(self.queries, outs)]
        if self.residual:
            if not self.stems and self.queries[0].mode == "remove":
                blocks.append(outs[0])  # a plain job's residual is its other output: the removed sound
            else:
                blocks.append(mix - np.sum(outs, axis=0) if len(outs) > 1 else mix - outs[0])
        for w, plan, b in zip(writers, self.plans, blocks):
            w.write(map_channels(b, plan.channel_mode) if plan.channels != b.shape[0] else b)


def _take(fifo: deque, n: int, channels: int) -> np.ndarray:
    """Pop exactly ``n`` frames of mixture from the FIFO (the mixture resampler runs ahead: the reader
    has resampled at least up to the end of a window before the window is separated)."""
    parts, got = [], 0
    while got < n and fifo:
        head = fifo[0]
        need = n - got
        if head.shape[1] <= need:
            parts.append(head)
            got += head.shape[1]
            fifo.popleft()
        else:
            parts.append(head[:, :need])
            fifo[0] = head[:, need:]
            got = n
    out = np.concatenate(parts, axis=1) if parts else np.zeros((channels, 0), np.float32)
    if out.shape[1] < n:
        out = np.pad(out, ((0, 0), (0, n - out.shape[1])))
    return out


def _check_files_distinct(input_path: str, targets: list[str]) -> None:
    """The files themselves (links, case-folding file systems): none is the input, none twice."""
    for i, t in enumerate(targets):
        if same_file(t, input_path):
            raise AudioSepError(OUTPUT_ERROR, f"output {t} is the input file; choose another output path")
        for other in targets[:i]:
            if same_file(t, other):
                raise AudioSepError(OUTPUT_ERROR, f"outputs {other} and {t} are the same file")


def separate_file(model, input_path: str, output_path: str, text: str | None, options: SeparateOptions | None = None,
                  progress: Callable[[float], None] | None = None,
                  cancelled: Callable[[], bool] | None = None, query: Query | None = None) -> SeparationResult:
    """Separate the sound described by ``text`` (or ``query``: audio examples, an embedding) from
    ``input_path`` into ``output_path``, with the model's own STFT; chunking decided by engine/resolve.py."""
    opt = (options or SeparateOptions()).validate()
    query = query if query is not None else Query.from_fields(text)
    info = probe(input_path)
    plan = plan_job(input_path, output_path, query.text or "", opt, info, use_torch_stft=model.use_torch_stft,
                    auto_stft_seconds=math.inf, device=str(model.device), precision=model.precision, query=query)
    return run_plan(model, plan, progress, cancelled)


def run_plan(model, plan: JobPlan, progress: Callable[[float], None] | None = None,
             cancelled: Callable[[], bool] | None = None) -> SeparationResult:
    """Run a planned job (see engine/resolve.py) on ``model``, whose STFT the caller has set."""
    input_path, opt, queries = plan.input_path, plan.options, plan.all_queries
    targets = [q.output for q in queries] + ([opt.residual_output] if opt.residual_output else [])
    check_distinct_outputs(input_path, targets)
    # A file that could not be probed while planning is probed again here, so that its read
    # error is the one reported.
    if plan.info is None:
        plan = dataclasses.replace(plan, info=probe(input_path))
    info = plan.info
    _check_files_distinct(input_path, targets)
    out_opts = OutputOptions.for_job(opt.output_sr, opt.output_subtype, opt.output_channels, opt.output_bitrate)
    plans = [prepare_output(t, out_opts, info.samplerate, info.channels) for t in targets]
    return run_job(model, plan, file_source(input_path), plans, progress, cancelled)


def run_job(model, plan: JobPlan, source: Source, outputs: list, progress: Callable[[float], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> SeparationResult:
    """Run a planned job whose outputs are checked: the mixture from ``source`` (a file or memory),
    one output per query then the residual's (OutputPlan, or in-memory sinks with its interface).
    ``plan.info`` describes what ``source`` reads."""
    # The windows the memory budget allows on this model's backend (files and arrays alike).
    backend = getattr(model, "backend", "torch")
    per_pass = 1 if model.device.type == "cpu" else max(1, plan.info.channels)
    plan = fit_memory(plan, backend, per_pass)
    opt, queries, info = plan.options, plan.all_queries, plan.info
    warnings: list[str] = list(plan.warnings)
    conds = [query_embedding(model, q.what) for q in queries]

    duration = info.frames / info.samplerate
    chunked, chunk_len = plan.chunked, plan.chunk_length
    window_s = min(duration, chunk_len + 2 * opt.context_seconds) if chunked else duration
    if ((window_s >= RELEASE_TEXT_PAGES_S or memory.needs_page_out(plan.memory_budget, backend, window_s, per_pass))
            and hasattr(model, "release_text_pages")):
        # The activations of a long window would sit on top of the idle text encoder: hand its
        # memory-mapped pages back first (a later new query reads them again, ~0.1-0.4 s).
        model.release_text_pages()
        if hasattr(model, "release_audio_pages"):
            model.release_audio_pages()
    while True:
        chunk_samples = seconds_to_samples(chunk_len) if chunked else None
        pipe = _Pipeline(model, source, outputs, opt, queries, conds, bool(plan.queries), chunk_samples,
                         progress, cancelled, warnings)
        try:
            n_windows = pipe.run()
            break
        except AudioSepError:
            raise
        except Exception as exc:
            if not _is_oom(exc):
                raise
            gc.collect()
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            smaller = (chunk_len if chunked else duration) / 2
            if smaller * SAMPLE_RATE < 2 * GRID:
                raise AudioSepError(OUT_OF_MEMORY, f"out of memory on {model.device} even with {smaller:.2f} s chunks") from None
            log.warning("out of memory on %s; retrying with %.1f s chunks", model.device, smaller)
            warnings.append(f"out of memory; retried with {smaller:.1f} s chunks")
            chunked, chunk_len = True, smaller
    return SeparationResult(
        files=[p.path for p in outputs], duration=duration, chunked=chunked, windows=n_windows,
        chunk_length=chunk_len if chunked else None, use_torch_stft=model.use_torch_stft, warnings=warnings,
    )
