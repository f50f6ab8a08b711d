"""Folder runs on a Ray cluster (``dsu-audiosep separate INPUT... --out-dir DIR --ray``): the optional
extra ``dsu-audiosep[ray]``, never part of the frozen worker.

- ``session``: join a cluster or start a bounded local instance, size the actor pool;
- ``actor``: the Ray Data callable class, one model per actor, loaded once, running planned file
  jobs with the same engine as the worker and the local folder run;
- ``run``: the driver: plan as the local run does, stream the jobs through ``map_batches``, write
  the manifest, progress and summary as results arrive, stop cleanly on Ctrl-C.

Only these modules import ``ray``, and only inside functions: the worker and the rest of the CLI
never see it (tests/test_architecture.py checks).
"""
