"""Every per-device and "auto" decision, made in one place: once per load, once per job.

A load gets a ``LoadPlan`` (device, mmap, precision, the STFT setting and the chunking settings
that jobs start from); a job gets a ``JobPlan`` (STFT on or off, chunked or not, chunk length,
context) decided from what the job asked for, the load's settings and the input file's probe.
Replies report these records, so what a reply says is what ran.

Precedence for a value: the job's field > the load's value > the worker's settings (flag,
environment, policy file) > the built-in default. When nobody chose (the default applies), some
defaults depend on the device; they are decided here and nowhere else.

Nothing here imports torch at module level: the worker imports this before torch is loaded, and
only the CUDA memory measurements need torch.
"""
from __future__ import annotations

import logging
import os
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from .. import options
from ..errors import AudioSepError
from . import memory
from .queries import Stem
from .query import Query

log = logging.getLogger(__name__)

CPU_CHUNK_LENGTH = 9.6
CUDA_MAX_CHUNK = 30.72  # longer windows are no faster on an H100 and delay the first write
CUDA_MIN_CHUNK = 2.56
# Besides the budget, a job's windows may take at most this share of the RAM free when it starts
# (a budget larger than the machine's free memory must not end in an out-of-memory failure).
FREE_RAM_SHARE = 0.5
# Measured on an H100 (torch.cuda.max_memory_allocated, cuDNN workspaces included), per mono
# second, by precision (tf32 computes in float32 storage).
CUDA_BYTES_PER_SECOND = {"fp32": 130e6, "tf32": 130e6, "bf16": 50e6, "fp16": 50e6}


# Precision when nobody chose one. Strict fp32 is exact on every device. On CUDA GPUs with TF32
# matrix units (compute capability 8.0, Ampere, and newer) the default is the mode measured to be
# at least as fast as the original on that GPU and no further from the exact CPU result than the
# original is there (scripts/cuda_default.py is the rule, `bench_cuda.py --quick` the run).
# That run is pending (no GPU has been lent since the rule was written): strict fp32 until it has run.
TF32_MIN_CAPABILITY = (8, 0)
TF32_GPU_DEFAULT_PRECISION = "fp32"


def default_precision(device: str, capability: tuple[int, int] | None) -> str:
    """The precision a load runs in when no command, flag, environment or policy chose one;
    ``capability``: the CUDA device's compute capability (None elsewhere)."""
    if _is_cuda(device) and capability is not None and tuple(capability) >= TF32_MIN_CAPABILITY:
        return TF32_GPU_DEFAULT_PRECISION
    return "fp32"


def cuda_capability(device: str) -> tuple[int, int] | None:
    """The compute capability of a CUDA device; None for other devices (and where CUDA is absent)."""
    if not _is_cuda(device):
        return None
    import torch

    if not torch.cuda.is_available():
        return None

    return tuple(torch.cuda.get_device_capability(torch.device(device)))


def _default(name: str) -> Any:
    return options.BY_NAME[name].default


@dataclass
class SeparateOptions:
    """How one file is separated; the defaults are the options table's."""

    use_chunk: bool | str = _default("use_chunk")  # True | False | "auto" (chunk from chunk_seconds on)
    chunk_seconds: float = _default("chunk_seconds")  # the "auto" threshold (seed meaning)
    chunk_length: float | None = None  # kept centre of each chunk, seconds; None: per-device default
    context_seconds: float = _default("context_seconds")  # context fed on each side of a chunk
    output_sr: int | str = _default("output_sr")
    # None: not chosen, the container's own (PCM_16 for PCM files); a lossy output refuses a given one
    output_subtype: str | None = None
    output_bitrate: int | str = _default("output_bitrate")
    output_channels: str = _default("output_channels")
    mode: str = _default("mode")  # "extract" | "remove"
    residual_output: str | None = None
    memory_budget: float | None = None  # MiB; None: the per-device default (memory.py)

    def validate(self) -> "SeparateOptions":
        """For Python callers (the API's way in): each given value checked and made canonical by
        its setting in the options table. The worker's fields were checked by the protocol."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, options.BY_NAME[f.name].from_python(value))
        return self


class WorkerDefaults(Protocol):
    """What a load falls back to (the worker's Settings): values and which layer set each."""

    device: str
    mmap: bool
    precision: str
    backend: str
    use_torch_stft: bool | str
    auto_stft_seconds: float
    chunk_seconds: float
    memory_budget: float | None
    sources: Mapping[str, str]


class AudioProbe(Protocol):
    """What planning needs to know about the input file (engine.audio_read.AudioInfo)."""

    frames: int
    samplerate: int
    channels: int
    duration: float


def _given(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


def _unchosen(job_value: Any, defaults: WorkerDefaults, name: str) -> bool:
    """Neither the command nor a flag, the environment or the policy file set ``name``: the
    built-in default applies, which is then picked per device."""
    return job_value is None and defaults.sources.get(name, "default") == "default"


def stft_mode(setting: bool | str) -> tuple[str, bool]:
    """The original worker's (mode, value) pair: "auto" starts with the convolution STFT."""
    if setting == "auto":
        return "auto", False
    return "force", bool(setting)


# --------------------------------------------------------------------------------------------
# Loads


@dataclass(frozen=True)
class LoadPlan:
    """What a load_model runs with, and the settings its separate jobs start from."""

    device: str
    mmap: bool
    precision: str
    use_torch_stft: bool | str  # the setting: True, False or "auto"
    auto_stft_seconds: float
    chunk_seconds: float
    chunk_length: float | None
    load_audio_branch: bool = False  # read the CLAP audio branch at load, not on the first audio query
    backend: str = "auto"  # as asked; the backend in use is the model's (engine/backends.py)
    memory_budget: float | None = None  # MiB as given (job > load > flag/env/policy); None: per device

    def first_window_seconds(self, backend: str) -> float | None:
        """The first window of a file too long for one pass under this load's budget on ``backend``
        (``use_chunk: false``, the default and the parent app's: fit_memory's windows with
        memory.PARITY_CONTEXT_S of context): what a backend that compiles per shape prepares at
        load. None where no budget applies (CUDA)."""
        budget = cpu_budget(self.device, self.memory_budget)
        if budget is None:
            return None
        context = memory.PARITY_CONTEXT_S
        core = memory.core_for_window(memory.longest_window_s(budget, backend), context)
        return memory.window_s(core, context) - memory.window_s(0, context) / 2  # no context on its left

    @property
    def stft_mode(self) -> str:
        return stft_mode(self.use_torch_stft)[0]

    @property
    def stft_value(self) -> bool:
        """The STFT the model is loaded with ("auto" loads the convolution STFT)."""
        return stft_mode(self.use_torch_stft)[1]


def plan_load(requested: Any, defaults: WorkerDefaults, resolve_device: Callable[[str], str],
              capability: Callable[[str], tuple[int, int] | None] = cuda_capability) -> LoadPlan:
    """``requested``: the load_model fields (device, mmap, precision, use_torch_stft,
    auto_stft_seconds, chunk_seconds, chunk_length; None = not given)."""
    device = resolve_device(_given(requested.device, defaults.device))
    precision = _given(requested.precision, defaults.precision)
    if _unchosen(requested.precision, defaults, "precision"):
        precision = default_precision(device, capability(device))
    mmap = bool(_given(requested.mmap, defaults.mmap))
    if _unchosen(requested.mmap, defaults, "mmap"):
        # Nobody chose: map the weights (loads in ~0.1 s instead of ~0.7 s, and on CPU the idle
        # text encoder's pages can go back to the kernel during long separations). Not on
        # Windows, where a mapped checkpoint could not be replaced or deleted while loaded.
        mmap = os.name != "nt"
    stft = _given(requested.use_torch_stft, defaults.use_torch_stft)
    if _unchosen(requested.use_torch_stft, defaults, "use_torch_stft"):
        # Nobody chose: pick per device from measurements. On an H100 torch.stft (cuFFT) makes
        # the whole pass 5-20% faster than the conv STFT; on CPU the two cost the same, and the
        # conv STFT uses the checkpoint's own kernels (the seed's default).
        stft = device.startswith("cuda")
    return LoadPlan(
        device=device,
        mmap=mmap,
        precision=precision,
        backend=_given(requested.backend, defaults.backend),
        use_torch_stft=stft,
        auto_stft_seconds=float(_given(requested.auto_stft_seconds, defaults.auto_stft_seconds)),
        chunk_seconds=float(_given(requested.chunk_seconds, defaults.chunk_seconds)),
        chunk_length=requested.chunk_length,
        load_audio_branch=bool(_given(getattr(requested, "load_audio_branch", None),
                                      getattr(defaults, "load_audio_branch", False))),
        memory_budget=_given(getattr(requested, "memory_budget", None), getattr(defaults, "memory_budget", None)),
    )


# --------------------------------------------------------------------------------------------
# Jobs


@dataclass(frozen=True)
class JobPlan:
    """What one separation runs: the files, the options asked for, and the decisions taken."""

    input_path: str
    output_path: str
    text: str
    options: SeparateOptions  # as requested (output format, mode, residual, context, chunking asks)
    info: AudioProbe | None  # the input's probe; None when unreadable (the run then says why)
    use_torch_stft_mode: str  # "auto" or "force"
    use_torch_stft: bool
    chunked: bool
    chunk_length: float  # kept centre per window when chunked (also the base of OOM retries)
    warnings: tuple[str, ...] = ()
    query: Query | None = None  # what to extract (None: the text above); engine/query.py
    # Stems: every query run on the same windows (output_path and text are the first one's). Empty
    # for a plain one-query job, whose residual is "the other output" (the rest, or under
    # "remove" the removed sound); with queries it is the mixture minus every extracted sound.
    queries: tuple[Stem, ...] = ()
    memory_budget: float | None = None  # MiB the job's windows must fit (None: CUDA, free GPU memory decides)

    @property
    def the_query(self) -> Query:
        return self.query if self.query is not None else Query.from_fields(self.text)

    @property
    def all_queries(self) -> tuple[Stem, ...]:
        return self.queries or (Stem(self.the_query, self.output_path, self.options.mode),)


def job_options(requested: Any, load: LoadPlan) -> SeparateOptions:
    """The separate fields over the load's values; fields left None take SeparateOptions' defaults."""
    wanted: dict[str, Any] = {
        "use_chunk": _given(requested.use_chunk, False),
        "chunk_seconds": _given(requested.chunk_seconds, load.chunk_seconds),
        "chunk_length": _given(requested.chunk_length, load.chunk_length),
        "context_seconds": requested.context_seconds,
        "output_sr": requested.output_sr,
        "output_subtype": requested.output_subtype,
        "output_bitrate": requested.output_bitrate,
        "output_channels": requested.output_channels,
        "mode": requested.mode,
        "residual_output": os.path.expanduser(requested.residual_output) if requested.residual_output else None,
        "memory_budget": _given(getattr(requested, "memory_budget", None), load.memory_budget),
    }
    # the protocol checked every field on the way in: nothing to validate again
    return SeparateOptions(**{k: v for k, v in wanted.items() if v is not None})


def plan_job(input_path: str, output_path: str, text: str, options: SeparateOptions, info: AudioProbe | None, *,
             use_torch_stft: bool | str, auto_stft_seconds: float, device: str, precision: str,
             query: Query | None = None, queries: tuple[Stem, ...] = ()) -> JobPlan:
    """Decide the STFT and the chunking of one job. ``use_torch_stft`` is the setting in force
    (True, False or "auto": torch.stft from ``auto_stft_seconds`` of input on). ``queries``: a
    stems job (``output_path``/``text`` then repeat the first query's)."""
    duration = info.duration if info is not None else None
    mode, stft = stft_mode(use_torch_stft)
    if mode == "auto":
        stft = duration is not None and duration >= auto_stft_seconds
    chunked = options.use_chunk is True or (
        options.use_chunk == "auto" and duration is not None and duration >= options.chunk_seconds
    )
    chunk_length = options.chunk_length or default_chunk_length(device, precision)
    warnings: list[str] = []
    # CUDA: the GPU's free memory decides here; elsewhere the memory budget does, in fit_memory
    if _is_cuda(device) and not chunked and info is not None and duration > full_pass_limit_seconds(device, min(info.channels, 2), precision):
        log.warning("%.0f s is too long for one pass on %s: separating in exact chunks instead", duration, device)
        warnings.append("file too long for a single pass in memory; separated in chunks (same output within float rounding)")
        chunked = True
        options = dataclasses.replace(options, context_seconds=max(options.context_seconds, memory.PARITY_CONTEXT_S))
    return JobPlan(input_path=input_path, output_path=output_path, text=text, options=options, info=info,
                   use_torch_stft_mode=mode, use_torch_stft=stft, chunked=chunked, chunk_length=chunk_length,
                   warnings=tuple(warnings), query=query, queries=tuple(queries),
                   memory_budget=cpu_budget(device, options.memory_budget))


def requested_query(fields: Any) -> Query:
    """The query that a command's (or one stem's) query fields describe."""
    return Query.from_fields(fields.text, fields.query_audio, fields.query_start, fields.query_end,
                             fields.query_weight, fields.query_embedding)


def requested_queries(requested: Any, default_mode: str) -> tuple[Stem, ...]:
    """The ``queries`` of a separate command as engine records (paths expanded, each query's
    mode falling back to the command's); a wrong query's error names its index."""
    stems = []
    for i, q in enumerate(requested.queries or ()):
        try:
            stems.append(Stem(requested_query(q), os.path.expanduser(q.output), q.mode or default_mode))
        except AudioSepError as exc:
            raise AudioSepError(exc.code, f'"queries"[{i}]: {exc.message}') from None
    return tuple(stems)


def plan_requested_job(requested: Any, load: LoadPlan, probe: Callable[[str], AudioProbe | None]) -> JobPlan:
    """A worker job: ``requested`` holds the separate fields (input, output, text, the options;
    None = not given), ``load`` the values they fall back to, ``probe`` reads the input's length."""
    input_path = os.path.expanduser(requested.input)
    opts = job_options(requested, load)
    queries = requested_queries(requested, opts.mode)
    first = queries[0] if queries else Stem(requested_query(requested), os.path.expanduser(requested.output), opts.mode)
    return plan_job(
        input_path, first.output, first.what.text or "", opts, probe(input_path), query=first.what, queries=queries,
        use_torch_stft=_given(requested.use_torch_stft, load.use_torch_stft),
        auto_stft_seconds=_given(requested.auto_stft_seconds, load.auto_stft_seconds),
        device=load.device, precision=load.precision,
    )


# --------------------------------------------------------------------------------------------
# Per-device memory budgets


def _is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def _cuda_bytes_per_second(precision: str) -> float:
    return CUDA_BYTES_PER_SECOND.get(precision, CUDA_BYTES_PER_SECOND["fp32"])


def _cuda_free_bytes(device: str) -> int:
    """Free memory as the caching allocator sees it: the driver's free bytes plus torch's own idle cache."""
    import torch

    dev = torch.device(device)
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))


def default_chunk_length(device: str, precision: str = "fp32") -> float:
    """Kept centre per window, seconds.

    CPU: 9.6 s (30 grid blocks) + 2 x 0.64 s context = 10.88 s windows, one channel at a time:
    about 0.9 GB of activations and 13% of extra work for the context (a 40 s file costs 1.13x
    its full pass). CUDA: 30.72 s (4% context overhead; longer windows are no faster on an H100),
    shorter if half the free memory cannot hold a stereo batch of that length.
    """
    if _is_cuda(device):
        per_second = 2 * _cuda_bytes_per_second(precision)
        return float(max(CUDA_MIN_CHUNK, min(CUDA_MAX_CHUNK, _cuda_free_bytes(device) * 0.5 / per_second)))
    return CPU_CHUNK_LENGTH


def full_pass_limit_seconds(device: str, channels: int, precision: str = "fp32") -> float:
    """Longest file separated as one window on a CUDA device (60% of its free memory); above it the
    engine chunks (same output within the parity bound, see chunking.py) rather than exhausting
    memory. Other devices: ``fit_memory`` and the memory budget decide."""
    if _is_cuda(device):
        return _cuda_free_bytes(device) * 0.6 / (max(1, channels) * _cuda_bytes_per_second(precision))
    return _free_ram_window_s("auto", 1)


# --------------------------------------------------------------------------------------------
# The memory budget (memory.py): decided once the backend in use is known, at the start of a run


def cpu_budget(device: str, given: float | None) -> float | None:
    """The budget a job on ``device`` runs under, MiB: the one given, else DEFAULT_CPU_BUDGET_MIB;
    None on CUDA, where the GPU's free memory decides (default_chunk_length, full_pass_limit_seconds)."""
    if _is_cuda(device):
        return None
    return float(given) if given is not None else memory.DEFAULT_CPU_BUDGET_MIB


def _free_ram_window_s(backend: str, channels_per_pass: int) -> float:
    """The longest window that FREE_RAM_SHARE of the RAM free now could hold (at least 30 s, as
    before the budget: a momentary shortage must not shrink windows to nothing)."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # Windows: no sysconf
        avail = 8 << 30
    per_second = memory.cost(backend).mib_per_second * max(1, channels_per_pass) * 2**20
    return max(30.0, avail * FREE_RAM_SHARE / per_second)


def _fitted_core(longest: float, context: float, budget: float, backend: str, cpp: int, warnings: list[str]) -> float:
    """The kept centre of the longest window that fits; the smallest window (with a warning) when
    even that does not fit the budget."""
    core = memory.core_for_window(longest, context)
    need = memory.peak_mib(backend, memory.window_s(core, context), cpp)
    if need > budget:
        warnings.append(f"memory_budget {budget:.0f} MiB is below the {need:.0f} MiB that the smallest window "
                        f"({memory.window_s(core, context):.2f} s) needs on {backend}; separated with the smallest windows")
    return core


def fit_memory(plan: JobPlan, backend: str, channels_per_pass: int = 1) -> JobPlan:
    """The plan with its windows fitted to its memory budget on ``backend`` (the model's; the
    channels of one forward pass: 1 on CPU). A full pass that would not fit becomes windows with
    memory.PARITY_CONTEXT_S of context (its output within memory.PARITY_ERROR of the full pass's
    peak), said in ``warnings``; chunked windows are shortened, with a warning when the
    chunk_length was the caller's."""
    budget, info, opts = plan.memory_budget, plan.info, plan.options
    if budget is None or info is None:
        return plan
    cpp = max(1, channels_per_pass)
    longest = min(memory.longest_window_s(budget, backend, cpp), _free_ram_window_s(backend, cpp))
    warnings = list(plan.warnings)
    if not plan.chunked:
        if info.duration <= longest:
            return plan
        context = max(opts.context_seconds, memory.PARITY_CONTEXT_S)
        core = _fitted_core(longest, context, budget, backend, cpp, warnings)
        need = memory.peak_mib(backend, info.duration, cpp)
        log.warning("a full pass of %.1f s needs about %.0f MiB, over the %.0f MiB budget: windows instead", info.duration, need, budget)
        warnings.append(f"use_chunk false: a full pass of {info.duration:.1f} s would need about {need:.0f} MiB, over "
                        f"memory_budget {budget:.0f} MiB; separated in {memory.window_s(core, context):.2f} s windows with "
                        f"{context:.2f} s of context (the full pass's output within {memory.PARITY_ERROR:g} of its peak)")
        return dataclasses.replace(plan, chunked=True, chunk_length=core, warnings=tuple(warnings),
                                   options=dataclasses.replace(opts, context_seconds=context))
    if memory.window_s(plan.chunk_length, opts.context_seconds) <= longest:
        return plan
    core = _fitted_core(longest, opts.context_seconds, budget, backend, cpp, warnings)
    if opts.chunk_length is not None:  # the caller's length, not the default: say why it changed
        warnings.append(f"chunk_length {opts.chunk_length:g} s does not fit memory_budget {budget:.0f} MiB; "
                        f"separated with {core:.2f} s chunks")
    return dataclasses.replace(plan, chunk_length=min(core, plan.chunk_length), warnings=tuple(warnings))
