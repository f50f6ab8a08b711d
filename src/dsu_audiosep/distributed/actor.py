"""The Ray Data callable class: each actor loads the model once, in ``__init__``, on its own device
(Ray gives a GPU actor its GPU through CUDA_VISIBLE_DEVICES, so device "auto" finds it), then runs
planned file jobs on it with the same engine call as the local folder run (``run_file_job``),
so its outputs are the local run's.

Rows carry pickled ``FileJob`` records and come back with pickled ``OutputResult`` lists: Arrow
stores them as plain binary columns, whatever fields the records have. Nothing of Ray is imported
here: Ray imports this class on each node from the installed package.
"""
from __future__ import annotations

import dataclasses
import pickle
import socket
from typing import Any


class FileSeparator:
    """``load``: the load_model fields (model paths already absolute); ``fields``: the separate
    fields shared by every job (output format, chunking); ``threads``: torch threads, the CPUs
    Ray reserved for this actor (two actors on two cores must not each start two threads)."""

    def __init__(self, load: dict[str, Any], fields: dict[str, Any], threads: int | None = None):
        from ..engine.torch_engine import TorchEngine
        from ..worker.failures import describe_exception

        self.engine = TorchEngine()
        self.fields = dict(fields)
        self.host = socket.gethostname()
        self.failure: tuple[str, str] | None = None
        try:
            self._load(load, threads)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            # Raised here, Ray would restart the actor a few times and abort the run with its own
            # wrapper of the error (our code lost, a page of tracebacks). Kept, every file this
            # actor gets is an error result with the code and the reason: one clear line each.
            code, message, _extra = describe_exception(exc, self.engine.release_memory)
            self.failure = (code, f"the model could not be loaded on {self.host}: {message}")

    def _load(self, load: dict[str, Any], threads: int | None) -> None:
        from ..worker import protocol as P
        from ..worker.model_paths import check_exists, resolve_model_paths
        from ..worker.policy import resolve_settings

        self.engine.start()
        if threads:
            import torch

            torch.set_num_threads(threads)
        args = P.parse_object({k: v for k, v in load.items() if v is not None}).args
        paths = resolve_model_paths(args)
        self.load_plan = self.engine.plan_load(args, resolve_settings({}))
        check_exists(paths)
        self.model = self.engine.load_model(paths, self.load_plan, bool(args.trust_checkpoint))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One row per job (batch_size 1, one job per block: a retried task redoes one file)."""
        from ..folder.plan import run_file_job

        results = []
        for blob in batch["job"]:
            job = pickle.loads(bytes(blob))
            if self.failure is not None:
                job = dataclasses.replace(job, error=self.failure)
                results.append(pickle.dumps(run_file_job(self.engine, None, None, job, self.fields)))
            else:
                results.append(pickle.dumps(run_file_job(self.engine, self.model, self.load_plan, job, self.fields)))
        return {"index": batch["index"], "results": results, "host": [self.host] * len(results)}
