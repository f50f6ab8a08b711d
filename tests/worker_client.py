"""The tests' worker client: the package's pipe client (dsu_audiosep.worker.client) with the
tests' defaults.

The command that starts the worker comes from ``worker_argv()``: ``DSU_WORKER_CMD`` (a shell-style
command line, e.g. ``dist/dsu-audiosep/dsu-audiosep --worker``) when set, else this Python
running ``-m dsu_audiosep --worker``. So the same tests drive the source tree and the frozen build.
The environment is ``clean_env()`` unless a test passes one; reads time out after
``DSU_TEST_TIMEOUT`` seconds (60).
"""
from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path
from typing import Any, Iterable

from dsu_audiosep.worker import client
from dsu_audiosep.worker.client import WorkerExited  # noqa: F401  (re-exported for the tests)
from dsu_audiosep.worker.protocol import NON_TERMINAL_STATUSES as NON_TERMINAL
from dsu_audiosep.worker.protocol import PARENT_TERMINAL_STATUSES as PARENT_TERMINAL

DEFAULT_TIMEOUT = float(os.environ.get("DSU_TEST_TIMEOUT", "60"))

__all__ = ["NON_TERMINAL", "PARENT_TERMINAL", "WorkerClient", "WorkerExited", "clean_env", "worker_argv"]


def worker_argv() -> list[str]:
    override = os.environ.get("DSU_WORKER_CMD")
    if override:
        return shlex.split(override, posix=os.name != "nt")
    return client.default_argv()


TEST_BACKEND_CACHE = Path(tempfile.gettempdir()) / "dsu-audiosep-tests-backend-cache"


def clean_env(policy_path: str | os.PathLike | None = None, **extra: str) -> dict[str, str]:
    """The test process's environment without worker settings, with an isolated policy file.

    The user's ~/.dsu/runtime_policy.json must not change test results: point the worker at a
    file that does not exist unless a test passes one.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOSEP_")}
    # The worker suites expect the CPU's per-device defaults (conv STFT, one channel at a time)
    # whatever the machine has; the CUDA path has its own tests (test_cuda.py, explicit device).
    env["AUDIOSEP_DEVICE"] = "cpu"
    # OpenVINO exports and compiled blobs of the test weights: shared by the test runs, never the user's.
    env["AUDIOSEP_BACKEND_CACHE"] = str(TEST_BACKEND_CACHE)
    if policy_path is None:
        policy_path = Path(tempfile.gettempdir()) / "dsu-audiosep-tests-no-policy" / "none.json"
    env["DSU_RUNTIME_POLICY_PATH"] = str(policy_path)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


class WorkerClient(client.WorkerClient):
    def __init__(self, argv: list[str] | None = None, extra_args: Iterable[str] = (),
                 env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None, **options: Any):
        options.setdefault("timeout", DEFAULT_TIMEOUT)
        super().__init__(argv or worker_argv(), extra_args, env if env is not None else clean_env(), cwd, **options)
