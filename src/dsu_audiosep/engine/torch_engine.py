"""The engine the worker and the one-shot CLI drive: the few operations they need, on torch.

The worker receives an engine object (tests pass a fake one with the same methods) and never
imports the model or the audio code itself:

- ``start()`` imports the runtime and returns its version; ``resolve_device(name)``;
  ``warm_up(warn)`` pays import costs early;
- ``plan_load(requested, defaults)`` -> ``LoadPlan`` and ``load_model(paths, plan, trust)``;
- ``plan_job(requested, load)`` -> ``JobPlan`` (probes the input once, decides everything) and
  ``separate(model, plan, progress, cancelled)`` -> ``JobOutcome``;
- ``release_memory()``, ``sweep_partials(folder)``, ``discard_partials()`` for housekeeping.

Models it returns have ``set_stft(bool)`` and ``sources`` (the files they were loaded from).
Nothing heavy is imported at module level: the worker builds its engine before torch is loaded.
"""
from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from . import resolve
from .resolve import JobPlan, LoadPlan, WorkerDefaults

# Imported while the parent reads "ready", so that the first job does not pay for them.
WARM_UP_MODULES = ("dsu_audiosep.model.checkpoints", "dsu_audiosep.engine.separate", "soundfile")


@dataclass(frozen=True)
class ModelPaths:
    """The files of one model, resolved (absolute, defaults applied); None where not used."""

    config_path: str | None = None
    checkpoint_path: str | None = None
    clap_checkpoint_path: str | None = None
    roberta_dir: str | None = None
    model_dir: str | None = None


@dataclass(frozen=True)
class JobOutcome:
    """What a separation wrote, and what the engine reports beside it (reply fields)."""

    files: list[str]
    details: dict[str, Any] = field(default_factory=dict)


class TorchEngine:
    def start(self) -> str:
        """Import torch (the slow part of starting); its version."""
        import torch

        return str(getattr(torch, "__version__", ""))

    def resolve_device(self, name: str | None) -> str:
        from ..devices import resolve_device

        return resolve_device(name)

    def warm_up(self, warn: Callable[[str], None]) -> None:
        for module in WARM_UP_MODULES:
            try:
                __import__(module)
            except Exception as exc:
                warn(f"pre-import of {module} failed ({exc!r}); it will be retried when needed")

    # ---- models ----------------------------------------------------------------------------

    def plan_load(self, requested: Any, defaults: WorkerDefaults) -> LoadPlan:
        return resolve.plan_load(requested, defaults, self.resolve_device)

    def load_model(self, paths: ModelPaths, plan: LoadPlan, trust_checkpoint: bool) -> Any:
        """The model, its body on the backend the plan asks for (``model.backend`` says which ran)."""
        model = self._load_torch_model(paths, plan, trust_checkpoint)
        from .backends import prepare_window, use_backend
        from .chunking import seconds_to_samples

        first = plan.first_window_seconds(model.backend) if use_backend(model, plan.backend) != "torch" else None
        if first is not None:
            # The first window of a file over the memory budget compiles while the worker answers
            # model_loaded and waits for a job (0.3-0.5 s that job would otherwise pay first).
            prepare_window(model, seconds_to_samples(first))
        return model

    def backend_status(self, model: Any) -> dict[str, Any]:
        """What get_status reports about the model's backend: its compile counts (engine/backends.py)."""
        from .backends import compile_counts

        return compile_counts(model)

    def _load_torch_model(self, paths: ModelPaths, plan: LoadPlan, trust_checkpoint: bool) -> Any:
        from ..model.checkpoints import load_model, read_config

        if paths.model_dir is not None:
            # A converted folder: load it directly (load_model would check the precision here
            # and again in load_converted, and mmap does not apply: safetensors always maps).
            from ..model.converted import load_converted

            read_config(paths.config_path)
            model = load_converted(paths.model_dir, device=plan.device, use_torch_stft=plan.stft_value,
                                   precision=plan.precision)
            if plan.load_audio_branch:
                model.load_audio_branch()
            return model
        model = load_model(
            config_path=paths.config_path,
            checkpoint_path=paths.checkpoint_path,
            clap_checkpoint_path=paths.clap_checkpoint_path,
            roberta_dir=paths.roberta_dir,
            device=plan.device,
            mmap=plan.mmap,
            use_torch_stft=plan.stft_value,
            precision=plan.precision,
            trust_checkpoint=trust_checkpoint,
        )
        if plan.load_audio_branch:
            model.load_audio_branch()
        return model

    # ---- jobs ------------------------------------------------------------------------------

    def probe(self, path: str) -> Any:
        """The input's AudioInfo; None when unreadable (the separation reports the real problem)."""
        try:
            from .audio_read import probe

            return probe(path)
        except Exception:
            return None

    def plan_job(self, requested: Any, load: LoadPlan) -> JobPlan:
        """``requested``: the separate fields (input, output, text, options; None = not given)."""
        return resolve.plan_requested_job(requested, load, self.probe)

    def separate(self, model: Any, plan: JobPlan, progress: Callable[[float], None] | None,
                 cancelled: Callable[[], bool] | None) -> JobOutcome:
        from .separate import run_plan

        model.set_stft(plan.use_torch_stft)
        result = run_plan(model, plan, progress, cancelled)
        details: dict[str, Any] = {"duration": result.duration, "chunked": result.chunked}
        if result.warnings:
            details["warnings"] = [str(w) for w in result.warnings]
        if plan.queries:  # stems: each query with its file, in order (the residual's file comes last)
            details["queries"] = [dict(q.describe(), file=str(f)) for q, f in zip(plan.queries, result.files)]
        return JobOutcome(files=[str(f) for f in result.files], details=details)

    def embed(self, model: Any, requested: Any) -> list[float]:
        """The 512 numbers of the query the ``embed`` fields describe (text and/or query_audio)."""
        from .query import Query, query_embedding

        query = Query.from_fields(requested.text, requested.query_audio, requested.query_start, requested.query_end,
                                  requested.query_weight, requested.query_embedding)
        return [float(v) for v in query_embedding(model, query)]

    # ---- housekeeping ----------------------------------------------------------------------

    def release_memory(self) -> None:
        """Give freed tensors back: Python cycles first, then the accelerator's caching allocator."""
        openvino_body = sys.modules.get(f"{__package__}.backend_openvino")  # only if a model ever used it
        if openvino_body is not None:
            openvino_body.wait_for_background_compiles(timeout=60)  # they hold their model until done
        gc.collect()
        torch = sys.modules.get("torch")  # never import torch just to clean up
        if torch is None:
            return
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except Exception:  # a broken driver must not turn cleanup into a failure
            pass
        try:
            mps = getattr(torch, "mps", None)
            if mps is not None and torch.backends.mps.is_available():
                mps.empty_cache()
        except Exception:
            pass

    def sweep_partials(self, folder: str) -> None:
        """Remove partial outputs that killed workers left in ``folder``."""
        from . import partials

        partials.sweep(folder)

    def discard_partials(self) -> None:
        """Delete this process's unfinished outputs (at exit). Nothing to do when no output was
        ever started, and the audio code is not imported just to find that out."""
        writing = sys.modules.get("dsu_audiosep.engine.audio_write")
        if writing is not None:
            writing.cleanup_partial_files(final=True)
