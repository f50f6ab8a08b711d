"""The Python API: ``Separator``, audio in memory in, audio in memory out.

    from dsu_audiosep import Separator
    sep = Separator("checkpoint/audiosep_base_4M_steps.ckpt")
    dog = sep.separate(mix, 44100, text="a dog barking")       # float32 [channels, frames]
    stems = sep.separate_stems("mix.flac", queries=["vocals", "drums"], residual="rest")

The audio runs through the worker's own pipeline (engine/separate.py): an array is read block by
block like a file (engine/audio_memory.py) and the outputs are filled like FLOAT files, so an array
gives what the same samples written to a float WAV give, within float rounding, and a long array
is separated in windows with flat extra memory. Models load as the worker's ``load_model`` loads
them (worker/model_paths.py for the files, engine/resolve.py for the per-device choices), from the
keywords only: the worker's environment variables and policy file do not apply here.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Literal, Mapping, Sequence, Union, cast

import numpy as np

from . import options
from .engine.audio_memory import MemoryAudio, MemoryOutput, memory_audio, read_file_object
from .engine.audio_read import probe
from .engine.queries import Stem
from .engine.query import Query, query_embedding
from .engine.resolve import SeparateOptions, plan_job
from .engine.separate import Source, file_source, run_job
from .engine.torch_engine import TorchEngine
from .errors import DUPLICATE_OUTPUT, INVALID_FIELD, MISSING_FIELD, AudioSepError
from .worker.model_paths import check_exists, resolve_model_paths

if TYPE_CHECKING:
    import torch

__all__ = ["Separator", "AudioInput", "QuerySpec", "Mode", "Progress", "Cancel"]

# A path, an open binary file object, a numpy array or a torch tensor (1-D, or [channels, frames]).
AudioInput = Union[str, "os.PathLike[str]", BinaryIO, np.ndarray, "torch.Tensor"]
# One stem: its text, or a dict of text / query_audio / query_start / query_end / query_weight /
# query_embedding / mode (and "name" in a list).
QuerySpec = Union[str, Mapping[str, Any]]
PathLike = Union[str, "os.PathLike[str]"]
Mode = Literal["extract", "remove"]
Progress = Callable[[float], None]
Cancel = Union[Callable[[], bool], threading.Event]

_PATH_FIELDS = ("config_path", "checkpoint_path", "clap_checkpoint_path", "roberta_dir", "model_dir")
# Settings of a separation, fixed per Separator (the table's meaning, engine/resolve.py applies them).
JOB_SETTINGS = ("use_torch_stft", "auto_stft_seconds", "use_chunk", "chunk_seconds", "chunk_length", "context_seconds",
                "memory_budget")
# Settings of the load: the load_model fields besides the files and the device.
LOAD_SETTINGS = tuple(s.name for s in options.for_command(options.LOAD) if s.name not in _PATH_FIELDS + ("device",))
_STEM_FIELDS = ("text", "query_audio", "query_start", "query_end", "query_weight", "query_embedding", "mode")
# A long array is chunked from chunk_seconds on (flat memory); the worker keeps the seed's False.
DEFAULT_USE_CHUNK = "auto"
_LoadArgs = options.args_record(options.LOAD, "LoadArgs")
# A load where nobody chose anything: the per-device defaults of engine/resolve.py apply.
_NO_CHOICES = options.worker_settings_record()()


@dataclass(frozen=True)
class _JobSettings:
    use_torch_stft: bool | str
    auto_stft_seconds: float
    use_chunk: bool | str
    chunk_seconds: float
    chunk_length: float | None
    context_seconds: float
    memory_budget: float | None  # MiB; None: the device's default (engine/memory.py)


def _checked_settings(given: Mapping[str, Any], allowed: Sequence[str], who: str) -> dict[str, Any]:
    """Each setting checked by its row of the options table; None means not given."""
    out = {}
    for name, value in given.items():
        if name not in allowed:
            raise TypeError(f"{who} got an unexpected keyword argument {name!r}; its settings are: {', '.join(allowed)}")
        if value is not None:
            out[name] = options.BY_NAME[name].from_python(value)
    return out


def _job_settings(settings: Mapping[str, Any], use_torch_stft: bool | str, chunk_seconds: float,
                  auto_stft_seconds: float, chunk_length: float | None) -> _JobSettings:
    return _JobSettings(
        use_torch_stft=settings.get("use_torch_stft", use_torch_stft),
        auto_stft_seconds=settings.get("auto_stft_seconds", auto_stft_seconds),
        use_chunk=settings.get("use_chunk", DEFAULT_USE_CHUNK),
        chunk_seconds=settings.get("chunk_seconds", chunk_seconds),
        chunk_length=settings.get("chunk_length", chunk_length),
        context_seconds=settings.get("context_seconds", options.BY_NAME["context_seconds"].default),
        memory_budget=settings.get("memory_budget"),
    )


def _path_field(name: str, value: PathLike | None) -> str | None:
    return None if value is None else options.BY_NAME[name].from_python(os.fspath(value))


class Separator:
    """A loaded AudioSep model that separates audio given as arrays, tensors, file objects or paths.

    Calls on one Separator run one at a time (a lock); separate models separate in parallel.

    Attributes:
      model: the AudioSep model itself (what ``build_audiosep`` returns; ``separate_audio`` takes it).
    """

    def __init__(self, checkpoint_path: PathLike | None = None, *, clap_checkpoint_path: PathLike | None = None,
                 roberta_dir: PathLike | None = None, model_dir: PathLike | None = None,
                 config_path: PathLike | None = None, models_dir: PathLike | None = None, device: str = "auto",
                 **settings: Any):
        """Load a model as the worker's ``load_model`` does.

        Args:
          checkpoint_path: the AudioSep checkpoint (.ckpt); relative paths resolve like the worker's.
          clap_checkpoint_path: the CLAP checkpoint (.pt), for audio queries (default: beside the worker).
          roberta_dir: the roberta-base tokenizer folder (default: found like the worker finds it).
          model_dir: a converted model folder, instead of checkpoint_path.
          config_path: the AudioSep YAML config (default config/audiosep_base.yaml when present).
          models_dir: where to look first when no checkpoint_path/model_dir is given (config/,
            checkpoint/, roberta-base/; the seed's flat file names; or a converted folder).
          device: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps".
          **settings: other rows of the options table: mmap, precision, backend, use_torch_stft,
            auto_stft_seconds, load_audio_branch, trust_checkpoint, and the chunking of every
            separation: use_chunk (default "auto": chunked from chunk_seconds, 30 s, on),
            chunk_seconds, chunk_length, context_seconds; memory_budget (MiB: windows are sized to
            fit it, default 2048 on CPU).

        Raises:
          TypeError: a keyword that is not a setting of this class.
          AudioSepError: a bad value (INVALID_FIELD), a missing file (FILE_NOT_FOUND, MISSING_FIELD),
            a bad checkpoint (INVALID_CHECKPOINT...), an unavailable device (DEVICE_UNAVAILABLE).
        """
        checked = _checked_settings(settings, LOAD_SETTINGS + ("use_chunk", "context_seconds"), "Separator()")
        fields = {name: _path_field(name, value) for name, value in zip(
            _PATH_FIELDS, (config_path, checkpoint_path, clap_checkpoint_path, roberta_dir, model_dir))}
        args = _LoadArgs(**fields, device=options.BY_NAME["device"].from_python(device),
                         **{k: v for k, v in checked.items() if k in LOAD_SETTINGS})
        paths = resolve_model_paths(args, _path_field("models_dir", models_dir))
        engine = TorchEngine()
        load = engine.plan_load(args, _NO_CHOICES)
        check_exists(paths)
        model = engine.load_model(paths, load, bool(args.trust_checkpoint))
        self._setup(model, _job_settings(checked, load.use_torch_stft, load.chunk_seconds, load.auto_stft_seconds,
                                         load.chunk_length))

    @classmethod
    def from_model(cls, model: Any, **settings: Any) -> "Separator":
        """Wrap a model already loaded (``build_audiosep``'s, or another Separator's ``model``).

        Args:
          model: an AudioSep model, left on its device, precision and backend.
          **settings: the separation settings: use_chunk, chunk_seconds, chunk_length,
            context_seconds, use_torch_stft (default: the model's STFT as it is), auto_stft_seconds.
        """
        checked = _checked_settings(settings, JOB_SETTINGS, "Separator.from_model()")
        self = cls.__new__(cls)
        self._setup(model, _job_settings(checked, model.use_torch_stft, options.BY_NAME["chunk_seconds"].default,
                                         options.BY_NAME["auto_stft_seconds"].default, None))
        return self

    def _setup(self, model: Any, job: _JobSettings) -> None:
        self.model = model
        self._job = job
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        """Where the model runs, e.g. "cpu" or "cuda:0"."""
        return str(self.model.device)

    def __repr__(self) -> str:
        return f"Separator(device={self.device!r}, backend={getattr(self.model, 'backend', 'torch')!r})"

    # ---- separating ------------------------------------------------------------------------

    def separate(self, audio: AudioInput, sample_rate: int | None = None, *, text: str | None = None,
                 query_audio: PathLike | Sequence[PathLike] | None = None, query_start: float | None = None,
                 query_end: float | None = None, query_weight: float | None = None,
                 query_embedding: Sequence[float] | np.ndarray | None = None, mode: Mode = "extract",
                 progress: Progress | None = None, cancel: Cancel | None = None) -> np.ndarray:
        """Separate one sound from ``audio``.

        Args:
          audio: a numpy array or torch tensor (1-D mono, or [channels, frames]; float, or int16 /
            int32 / int8 / uint8 PCM), an open binary file object (e.g. io.BytesIO of a FLAC), or a path.
          sample_rate: the rate of an array or tensor in Hz (required for them); with a file it may be
            omitted, and must equal the file's rate if given.
          text: what to listen for, in words.
          query_audio: an example of the sound: an audio file, or a list of files (averaged).
          query_start: start of the span of the one query_audio file to use, seconds.
          query_end: end of that span, seconds.
          query_weight: the audio's share when text and query_audio are both given (0..1, default 0.5).
          query_embedding: 512 numbers from ``embed``, instead of text and query_audio.
          mode: "extract" the sound, or "remove" it from the mixture.
          progress: called with the fraction done (0..1, never decreasing) after each window.
          cancel: a callable returning True, or a threading.Event set, to stop: AudioSepError CANCELLED.

        Returns:
          float32 numpy array [channels, frames]: the input's channels, rate and length (always 2-D).

        Raises:
          AudioSepError: INVALID_AUDIO (bad samples or file), INVALID_FIELD / MISSING_FIELD (bad or
            missing sample_rate or option), INVALID_QUERY / INVALID_TEXT (query), CANCELLED.
        """
        query = _query(text, query_audio, query_start, query_end, query_weight, query_embedding)
        stem = Stem(query, "output", options.BY_NAME["mode"].from_python(mode))
        return self._run(audio, sample_rate, (stem,), False, None, progress, cancel)["output"]

    def separate_stems(self, audio: AudioInput, sample_rate: int | None = None, *,
                       queries: Mapping[str, QuerySpec] | Sequence[QuerySpec], residual: str | None = None,
                       progress: Progress | None = None, cancel: Cancel | None = None) -> dict[str, np.ndarray]:
        """Separate several sounds in one pass over ``audio`` (each window is read once for all).

        Args:
          audio: as for ``separate``.
          sample_rate: as for ``separate``.
          queries: {name: query} or a list of queries; a query is a text, or a dict of text /
            query_audio / query_start / query_end / query_weight / query_embedding / mode (in a
            list, its "name", else its text, names it).
          residual: also return the mixture minus every extracted sound, under this name.
          progress: as for ``separate`` (over all the queries).
          cancel: as for ``separate``.

        Returns:
          {name: float32 [channels, frames]} in the order of ``queries``, then the residual.
        """
        stems = _stems(queries)
        if residual is not None:
            residual = _name(residual, "residual")
            if residual in {s.output for s in stems}:
                raise AudioSepError(DUPLICATE_OUTPUT, f"residual {residual!r} is also the name of a query")
        return self._run(audio, sample_rate, stems, True, residual, progress, cancel)

    def embed(self, text: str | None = None, query_audio: PathLike | Sequence[PathLike] | None = None, *,
              query_start: float | None = None, query_end: float | None = None,
              query_weight: float | None = None) -> np.ndarray:
        """The query's 512-d embedding, to store (a preset) and pass back as ``query_embedding``.

        Args:
          text: the sound in words.
          query_audio: an example audio file, or a list of files (averaged).
          query_start: start of the span of the one query_audio file, seconds.
          query_end: end of that span, seconds.
          query_weight: the audio's share when text and query_audio are both given (0..1).

        Returns:
          float32 numpy array of shape (512,), L2-normalised.
        """
        query = _query(text, query_audio, query_start, query_end, query_weight, None)
        with self._lock:
            vector = query_embedding(self.model, query)
        return vector.detach().cpu().numpy().astype(np.float32)

    def _run(self, audio: AudioInput, sample_rate: Any, stems: tuple[Stem, ...], is_stems: bool,
             residual: str | None, progress: Progress | None, cancel: Cancel | None) -> dict[str, np.ndarray]:
        source, info = _mixture(audio, sample_rate)
        job, first = self._job, stems[0]
        opts = SeparateOptions(use_chunk=job.use_chunk, chunk_seconds=job.chunk_seconds, chunk_length=job.chunk_length,
                               context_seconds=job.context_seconds, output_sr="input", output_subtype="FLOAT",
                               output_channels="input", mode="extract" if is_stems else first.mode,
                               residual_output=residual, memory_budget=job.memory_budget)
        plan = plan_job("<memory>", first.output, first.text or "", opts, info, use_torch_stft=job.use_torch_stft,
                        auto_stft_seconds=job.auto_stft_seconds, device=str(self.model.device),
                        precision=getattr(self.model, "precision", "fp32"), query=first.what,
                        queries=stems if is_stems else ())
        names = [s.output for s in plan.all_queries] + ([residual] if residual else [])
        outputs = [MemoryOutput(name, info.samplerate, info.channels) for name in names]
        cancelled = cancel.is_set if isinstance(cancel, threading.Event) else cancel
        with self._lock:
            self.model.set_stft(plan.use_torch_stft)
            run_job(self.model, plan, source, outputs, progress, cancelled)
        return {o.path: o.result() for o in outputs}


# --------------------------------------------------------------------------------------------
# Arguments


def _mixture(audio: AudioInput, sample_rate: Any) -> tuple[Source, Any]:
    """Where the pipeline reads ``audio`` from, and its probe (frames, rate, channels)."""
    if isinstance(audio, (str, os.PathLike)):
        path = os.path.expanduser(os.fsdecode(os.fspath(audio)))
        info = probe(path)
        _same_rate(sample_rate, info.samplerate, f"'{path}'")
        return file_source(path), info
    if hasattr(audio, "read"):  # decoded whole: an object cannot be re-read on an OOM retry
        mem: MemoryAudio = read_file_object(cast(BinaryIO, audio))
        _same_rate(sample_rate, mem.samplerate, "the file object")
    else:
        if sample_rate is None:
            raise AudioSepError(MISSING_FIELD, "sample_rate is required with an array or tensor (its rate in Hz)")
        mem = memory_audio(_as_numpy(audio), sample_rate)
    return mem.reader, mem


def _same_rate(given: Any, actual: int, what: str) -> None:
    """A file states its own rate: a different one given beside it is a mistake, not a resampling."""
    if given is not None and given != actual:
        raise AudioSepError(INVALID_FIELD, f"sample_rate {given!r} given, but {what} is at {actual} Hz; "
                            "omit sample_rate for files (their header has it)")


def _as_numpy(audio: Any) -> Any:
    """A torch tensor as a numpy view (bfloat16, which numpy lacks, as float32); anything else as is."""
    if type(audio).__module__.split(".")[0] == "torch" and hasattr(audio, "detach"):
        import torch

        t = audio.detach()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.cpu().numpy()
    return audio


def _plain(values: Any) -> Any:
    """Arrays and tensors as Python lists (the query checks want plain numbers)."""
    values = _as_numpy(values)
    return values.tolist() if isinstance(values, np.ndarray) else values


def _query(text: Any, query_audio: Any, start: Any, end: Any, weight: Any, embedding: Any) -> Query:
    if text is None and query_audio is None and embedding is None:
        raise AudioSepError(MISSING_FIELD, "give text, query_audio or query_embedding: what to separate")
    if query_audio is not None:
        query_audio = (os.fspath(query_audio) if isinstance(query_audio, (str, os.PathLike))
                       else [os.fspath(p) if isinstance(p, os.PathLike) else p for p in query_audio])
    return Query.from_fields(text, query_audio, start, end, weight, _plain(embedding))


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise AudioSepError(INVALID_FIELD, f"{what} must be a non-empty string (a name), got {value!r}")
    return value


def _stem(name: Any, spec: Any, where: str) -> Stem:
    if isinstance(spec, str):
        spec = {"text": spec}
    if not isinstance(spec, Mapping):
        raise AudioSepError(INVALID_FIELD, f"{where} must be a text or a dict of query fields, got {type(spec).__name__}")
    fields = dict(spec)
    label = fields.pop("name", None)
    unknown = sorted(set(fields) - set(_STEM_FIELDS))
    if unknown:
        raise AudioSepError(INVALID_FIELD, f"{where}: unknown field(s) {', '.join(unknown)}; fields: {', '.join(_STEM_FIELDS)}")
    name = name if name is not None else label if label is not None else fields.get("text")
    mode = options.BY_NAME["mode"].from_python(fields.pop("mode", "extract"))
    query = _query(fields.get("text"), fields.get("query_audio"), fields.get("query_start"), fields.get("query_end"),
                   fields.get("query_weight"), fields.get("query_embedding"))
    return Stem(query, _name(name, f"{where}'s name (give \"name\")"), mode)


def _stems(queries: Any) -> tuple[Stem, ...]:
    """``queries`` as engine stems named by their keys (a dict) or their name / text (a list)."""
    if isinstance(queries, str) or not isinstance(queries, (Mapping, Sequence)):
        raise AudioSepError(INVALID_FIELD, "queries must be a dict {name: query} or a list of queries")
    items = list(queries.items()) if isinstance(queries, Mapping) else [(None, q) for q in queries]
    if not items:
        raise AudioSepError(INVALID_FIELD, "queries is empty: give at least one")
    stems, seen = [], set()
    for i, (name, spec) in enumerate(items):
        where = f"queries[{name!r}]" if name is not None else f"queries[{i}]"
        try:
            stem = _stem(name, spec, where)
        except AudioSepError as exc:
            raise AudioSepError(exc.code, exc.message if exc.message.startswith(where) else f"{where}: {exc.message}") from None
        if stem.output in seen:
            raise AudioSepError(DUPLICATE_OUTPUT, f"{where}: the name {stem.output!r} is used twice")
        seen.add(stem.output)
        stems.append(stem)
    return tuple(stems)
