"""Where a distributed run executes: an existing Ray cluster (``--ray-address auto`` or
``ray://host:10001``), or a local instance started for this run and stopped after it.

A local instance is bounded: the CPUs the pool needs (at least this machine's), a small object
store (the rows are small pickled jobs; Ray's default would reserve 30% of the RAM), no dashboard.
Ray's own messages are kept to errors: the run's progress lines are the interesting output.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

# Ray Data gives its actors unlimited restarts and unlimited task retries by default; a file that
# kills its actor every time must not loop forever. Bounded: an actor is restarted at most
# MAX_RESTARTS times, a job is retried at most MAX_TASK_RETRIES times (then it is reported lost).
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class PoolRequest:
    """What the user asked for: ``actors`` None sizes the pool to the cluster."""

    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0


@dataclass(frozen=True)
class Session:
    started_here: bool  # a local instance this run started (and stops)
    actors: int
    resources: dict[str, float]


def pool_size(pool: PoolRequest, resources: Mapping[str, float]) -> tuple[int, str | None]:
    """(actors, a warning or None): the requested count, or as many as the cluster's CPUs (GPUs
    for GPU actors) hold. More actors than fit is allowed (a cluster may autoscale), with a
    warning: Ray starts the rest when resources appear."""
    fits = int(resources.get("CPU", 0.0) // pool.cpus_per_actor) if pool.cpus_per_actor > 0 else None
    if pool.gpus_per_actor > 0:
        gpu_fits = int(resources.get("GPU", 0.0) // pool.gpus_per_actor)
        fits = gpu_fits if fits is None else min(fits, gpu_fits)
    if pool.actors is None:
        if not fits:
            return 1, (f"the cluster has no room for one actor of {pool.cpus_per_actor:g} CPU and "
                       f"{pool.gpus_per_actor:g} GPU ({_resources_text(resources)}); waiting for resources")
        return fits, None
    if fits is not None and pool.actors > fits:
        return pool.actors, (f"{pool.actors} actors of {pool.cpus_per_actor:g} CPU / {pool.gpus_per_actor:g} GPU "
                             f"do not all fit in {_resources_text(resources)}; the others wait for resources")
    return pool.actors, None


def _resources_text(resources: Mapping[str, float]) -> str:
    return f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"


def local_cpus(pool: PoolRequest) -> int:
    """CPUs a local instance declares: this machine's, or more when the user asked for a pool
    that needs more (oversubscribed on purpose, rather than a run that waits forever)."""
    cpus = os.cpu_count() or 1
    if pool.actors:
        cpus = max(cpus, math.ceil(pool.actors * max(pool.cpus_per_actor, 0.0)))
    return cpus


def connect(address: str | None, pool: PoolRequest, warn: Callable[[str], None]) -> Session:
    """Join ``address`` or start a local instance; size the pool from the cluster's resources."""
    import ray

    quiet_ray()
    if address is None:
        ray.init(num_cpus=local_cpus(pool), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 include_dashboard=False, logging_level=logging.ERROR)
    else:
        ray.init(address=address, logging_level=logging.ERROR)
    resources = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    actors, warning = pool_size(pool, resources)
    if warning:
        warn(warning)
    return Session(started_here=address is None, actors=actors, resources=resources)


def disconnect(session: Session | None) -> None:
    """Leave the cluster; a local instance stops with it (its actors too). Actors on a cluster
    we joined belong to this driver's job and end when it disconnects."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def quiet_ray() -> None:
    """Ray Data's progress bars and execution banners off (our own progress line replaces them),
    its INFO logs off, and the deprecation notice for ``max_restarts``/``max_task_retries`` on
    ``map_batches`` silenced: in this Ray version they have no other spelling."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*`ray_remote_args` is deprecated")

