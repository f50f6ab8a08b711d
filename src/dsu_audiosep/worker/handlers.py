"""One function per command: each takes the worker and the parsed command and returns the
command's terminal reply (or raises; ``Worker.execute`` turns the exception into an error reply).

Handlers touch the model only through the worker's engine (``worker.engine``): loading, planning
and running a separation, releasing memory. The decisions a reply reports (device, STFT,
chunking) come from the engine's plans (engine/resolve.py).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

from .. import PROTOCOL_VERSION, __version__, errors
from ..engine.resolve import LoadPlan, cpu_budget, stft_mode
from ..engine.torch_engine import ModelPaths
from ..errors import AudioSepError
from ..process_memory import peak_rss_mib
from . import protocol as P
from .batch import batch
from .cache import CacheEntry, ModelKey, file_fingerprint
from .jobs import ProgressReporter
from .model_paths import check_exists, resolve_model_paths

# The loop's Worker, which imports this module; named, not imported back, so imports stay one way.
Worker = Any

Handler = Callable[["Worker", P.Command], dict]


@dataclass
class Session:
    """What the last load_model chose; separate jobs start from it."""

    load: LoadPlan
    stft_value: bool  # the STFT the model is set to now (the last job's, under "auto")


def _announce(w: "Worker", cmd: P.Command, stage: str, **fields: Any) -> ProgressReporter | None:
    """The command's status line (repeated by heartbeats), and its progress lines if asked."""
    w.heartbeat.status(P.reply(stage, cmd.id, **fields))
    progress = ProgressReporter(w.heartbeat.send, cmd.id, stage) if cmd.progress else None
    if progress:
        progress.start()
    return progress


# --------------------------------------------------------------------------------------------
# Small commands


def ping(w: "Worker", cmd: P.Command) -> dict:
    return P.reply("pong", cmd.id, model_loaded=w.current is not None)


def exit_(w: "Worker", cmd: P.Command) -> dict:
    return P.reply("exiting", cmd.id)


def get_status(w: "Worker", cmd: P.Command) -> dict:
    key = w.current.key if w.current else None
    session = w.session
    mode, value = stft_mode(w.settings.use_torch_stft)
    reply = P.reply(
        "status",
        cmd.id,
        ready=True,
        device=key.device if key else w.device,
        model_loaded=w.current is not None,
        checkpoint_path=key.checkpoint_path if key else None,
        config_path=key.config_path if key else None,
        clap_checkpoint_path=key.clap_checkpoint_path if key else None,
        roberta_dir=key.roberta_dir if key else None,
        model_dir=key.model_dir if key else None,
        precision=key.precision if key else None,
        backend=getattr(w.current.model, "backend", "torch") if w.current else None,
        use_torch_stft_mode=session.load.stft_mode if session else mode,
        use_torch_stft_value=session.stft_value if session else value,
        auto_stft_seconds=session.load.auto_stft_seconds if session else w.settings.auto_stft_seconds,
        chunk_seconds=session.load.chunk_seconds if session else w.settings.chunk_seconds,
        cache_size=len(w.cache),
        max_cached_models=w.cache.capacity,
        version=__version__,
        protocol=PROTOCOL_VERSION,
        settings_sources=dict(w.settings.sources),
        # the budget jobs run under now, MiB (null on CUDA, where the GPU's free memory decides)
        memory_budget=cpu_budget(session.load.device, session.load.memory_budget) if session
        else cpu_budget(w.device, w.settings.memory_budget),
        peak_rss_mib=peak_rss_mib(),
    )
    if w.current is not None and hasattr(w.engine, "backend_status"):
        reply.update(w.engine.backend_status(w.current.model))  # compiles, prepared: OpenVINO's shapes
    return reply


def _describe_models(w: "Worker") -> list[dict]:
    models = []
    seen = set()
    for entry in w.cache.entries():
        info = entry.describe()
        info["current"] = entry is w.current
        models.append(info)
        seen.add(entry.key)
    if w.current is not None and w.current.key not in seen:  # max_cached_models 0
        info = w.current.describe()
        info["current"] = True
        models.insert(0, info)
    return models


def list_models(w: "Worker", cmd: P.Command) -> dict:
    return P.reply(
        "models",
        cmd.id,
        models=_describe_models(w),
        cache_size=len(w.cache),
        max_cached_models=w.cache.capacity,
        model_loaded=w.current is not None,
    )


# unload_model and clear_cache answer with status "models" (the cache after the change): it is
# one of the statuses the parent app waits for, so it cannot hang a client that only knows the
# original protocol.
def unload_model(w: "Worker", cmd: P.Command) -> dict:
    unloaded = []
    if w.current is not None:
        unloaded.append(w.current.describe())
        w.cache.remove(w.current.key)
        w.current = None
        w.session = None
        w.engine.release_memory()
    reply = list_models(w, cmd)
    reply["unloaded"] = unloaded
    return reply


def set_cache_size(w: "Worker", cmd: P.Command) -> dict:
    """max_cached_models at run time: the least recently used models beyond ``n`` go at once
    (the current model stays in use, as with max_cached_models 0)."""
    evicted = w.cache.resize(cmd.args.n)  # type: ignore[union-attr]  (releases memory itself)
    reply = list_models(w, cmd)
    reply["evicted"] = evicted
    return reply


def clear_cache(w: "Worker", cmd: P.Command) -> dict:
    unloaded = _describe_models(w)
    w.current = None
    w.session = None
    w.cache.clear()
    w.engine.release_memory()
    reply = list_models(w, cmd)
    reply["unloaded"] = unloaded
    return reply


# --------------------------------------------------------------------------------------------
# load_model


def load_model(w: "Worker", cmd: P.Command) -> dict:
    args: P.LoadModelArgs = cmd.args  # type: ignore[assignment]
    started = time.perf_counter()
    paths = resolve_model_paths(args, w.settings.models_dir)
    plan = w.engine.plan_load(args, w.settings)
    check_exists(paths)
    progress = _announce(w, cmd, "loading_model", model=paths.model_dir or paths.checkpoint_path)
    key = _model_key(paths, plan)
    entry = _cached_entry(w, key)
    cached = entry is not None
    if entry is None:
        entry = _load_and_install(w, key, paths, plan, bool(args.trust_checkpoint))
    else:
        entry.model.set_stft(plan.stft_value)
        w.current = entry
    w.session = Session(load=plan, stft_value=plan.stft_value)
    if progress:
        progress.finish()
    return _model_loaded_reply(w, cmd, started, paths, plan, entry, cached)


def _model_key(paths: ModelPaths, plan: LoadPlan) -> ModelKey:
    return ModelKey(
        **dataclasses.asdict(paths),
        device=plan.device,
        mmap=plan.mmap,
        precision=plan.precision,
        backend=plan.backend,
        fingerprint=file_fingerprint(dataclasses.asdict(paths).values()),
    )


def _cached_entry(w: "Worker", key: ModelKey) -> CacheEntry | None:
    entry = w.cache.get(key)
    if entry is None and w.current is not None and w.current.key == key:
        entry = w.current  # max_cached_models 0 still keeps the current model
    return entry


def _load_and_install(w: "Worker", key: ModelKey, paths: ModelPaths, plan: LoadPlan, trust: bool) -> CacheEntry:
    load_started = time.perf_counter()
    model = w.engine.load_model(paths, plan, trust)
    if w.tracker.cancelled():
        # Not installed: the client asked for this load not to happen.
        del model
        w.engine.release_memory()
        raise AudioSepError(errors.CANCELLED, "load_model was cancelled")
    entry = CacheEntry(key=key, model=model, load_seconds=time.perf_counter() - load_started)
    del model
    # Install first, then let the cache evict: the previous current model is released only once
    # the new one is in place.
    previous_key = w.current.key if w.current is not None else None
    w.current = entry
    w.cache.put(entry)
    if previous_key is not None and previous_key not in w.cache and w.cache.capacity == 0:
        w.engine.release_memory()  # nothing cached: the replaced model was the only reference
    return entry


def _model_loaded_reply(w: "Worker", cmd: P.Command, started: float, paths: ModelPaths, plan: LoadPlan,
                        entry: CacheEntry, cached: bool) -> dict:
    result = P.reply(
        "model_loaded",
        cmd.id,
        elapsed=round(time.perf_counter() - started, 3),
        config_path=paths.config_path,
        checkpoint_path=paths.checkpoint_path,
        clap_checkpoint_path=paths.clap_checkpoint_path,
        # the folder the loader settled on when none was given (roberta-base beside the checkpoint)
        roberta_dir=paths.roberta_dir or entry.model.sources.get("roberta_dir"),
        device=plan.device,
        cached=cached,
        cache_size=len(w.cache),
        max_cached_models=w.cache.capacity,
        use_torch_stft_mode=plan.stft_mode,
        use_torch_stft_value=plan.stft_value,
        auto_stft_seconds=plan.auto_stft_seconds,
        chunk_seconds=plan.chunk_seconds,
        mmap=plan.mmap,
        precision=plan.precision,
        backend=getattr(entry.model, "backend", "torch"),
    )
    if paths.model_dir is not None:
        result["model_dir"] = paths.model_dir
    return result


# --------------------------------------------------------------------------------------------
# separate


def separate(w: "Worker", cmd: P.Command) -> dict:
    args: P.SeparateArgs = cmd.args  # type: ignore[assignment]
    if w.current is None or w.session is None:
        raise AudioSepError(errors.MODEL_NOT_LOADED, "no model is loaded: send load_model first")
    entry, session = w.current, w.session
    progress = _announce(w, cmd, "separating", input=args.input)
    if w.tracker.cancelled():
        raise AudioSepError(errors.CANCELLED, "separate was cancelled")
    plan = w.engine.plan_job(args, session.load)
    session.stft_value = plan.use_torch_stft
    started = time.perf_counter()
    outcome = w.engine.separate(entry.model, plan, progress=w.progress_sink(progress), cancelled=w.tracker.cancelled)
    elapsed = time.perf_counter() - started
    if progress:
        progress.finish()
    reply = P.reply(
        "done",
        cmd.id,
        elapsed=round(elapsed, 3),
        files=list(outcome.files),
        use_torch_stft_mode=plan.use_torch_stft_mode,
        use_torch_stft_value=plan.use_torch_stft,
    )
    reply.update(outcome.details)  # duration, chunked, warnings: what the engine reports
    return reply


def embed(w: "Worker", cmd: P.Command) -> dict:
    """The query embedding as numbers, for the parent to store and reuse (``query_embedding``).
    ``embedding`` is an extension status: only a client that sends ``embed`` waits for it."""
    if w.current is None:
        raise AudioSepError(errors.MODEL_NOT_LOADED, "no model is loaded: send load_model first")
    started = time.perf_counter()
    values = w.engine.embed(w.current.model, cmd.args)
    return P.reply("embedding", cmd.id, embedding=values, elapsed=round(time.perf_counter() - started, 3))


# Every command the job thread runs (``cancel`` is answered by the reader thread).
HANDLERS: dict[str, Handler] = {
    "load_model": load_model,
    "separate": separate,
    "embed": embed,
    "batch": batch,
    "get_status": get_status,
    "ping": ping,
    "list_models": list_models,
    "unload_model": unload_model,
    "clear_cache": clear_cache,
    "set_cache_size": set_cache_size,
    "exit": exit_,
}
