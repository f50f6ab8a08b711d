"""The folder run's cluster flags (``--ray``, ``--ray-address``, ``--actors``, ``--cpus-per-actor``,
``--gpus-per-actor``). They are not settings of the options table: like ``--out-dir`` they say how
a CLI run is carried out, not what a separation does, and no worker command takes them."""
from __future__ import annotations

import argparse
import math
from typing import Any

RAY_FLAGS = ("ray_address", "actors", "cpus_per_actor", "gpus_per_actor")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1 is needed, got {text!r}")
    return value


def _amount(minimum_exclusive: bool):
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (minimum_exclusive and value == 0):
            raise argparse.ArgumentTypeError(f"a number {'>' if minimum_exclusive else '>='} 0 is needed, got {text!r}")
        return value

    return check


def add_ray_arguments(parser: Any) -> None:
    group = parser.add_argument_group("on a Ray cluster (extra dsu-audiosep[ray])")
    group.add_argument("--ray", action="store_true",
                       help="run the files on a Ray cluster: the one at --ray-address, else a local instance")
    group.add_argument("--ray-address", metavar="ADDRESS",
                       help='join this cluster ("auto", "HOST:PORT" or "ray://HOST:10001") instead of starting one')
    group.add_argument("--actors", type=_positive_int, metavar="N",
                       help="actors, each holding the model once (default: as many as the cluster's CPUs, "
                            "or GPUs with --gpus-per-actor, hold)")
    group.add_argument("--cpus-per-actor", type=_amount(True), default=None, metavar="N",
                       help="CPUs reserved per actor, also its torch threads (default 1)")
    group.add_argument("--gpus-per-actor", type=_amount(False), default=None, metavar="N",
                       help="GPUs per actor (default 0; 1 for one model per GPU, 0.5 for two)")


def ray_flag_misuse(ns: Any) -> str | None:
    """A message when a cluster flag is given without ``--ray`` (it would silently do nothing)."""
    if getattr(ns, "ray", False):
        return None
    given = [name for name in RAY_FLAGS if getattr(ns, name, None) is not None]
    if given:
        return f"--{given[0].replace('_', '-')} needs --ray"
    return None


def pool_request(ns: Any) -> Any:
    from .session import PoolRequest

    return PoolRequest(actors=ns.actors, cpus_per_actor=1.0 if ns.cpus_per_actor is None else ns.cpus_per_actor,
                       gpus_per_actor=0.0 if ns.gpus_per_actor is None else ns.gpus_per_actor)


def ray_missing() -> str | None:
    """Why ``--ray`` cannot run here (the extra is not installed, or this is the frozen worker,
    which never ships it), or None."""
    import importlib.util

    try:
        ready = all(importlib.util.find_spec(name) is not None for name in ("ray", "ray.data", "dsu_audiosep.distributed.run"))
    except (ImportError, ValueError):
        ready = False
    if ready:
        return None
    return ('--ray needs the Ray extra: pip install "dsu-audiosep[ray]" (the frozen worker never includes it; '
            "run the pip-installed dsu-audiosep)")
