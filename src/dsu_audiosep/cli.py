"""Command line: ``dsu-audiosep --worker``, ``separate``, ``convert``, ``demo``, ``--version``.

Nothing heavy is imported at module level: ``--worker`` must print its first protocol line
before torch is imported, and ``--version`` must be instant.

    dsu-audiosep --worker [worker settings: flags from dsu_audiosep.options, see --help]
    dsu-audiosep separate INPUT OUTPUT --text "..." (--checkpoint CKPT | --model-dir DIR) [...]
    dsu-audiosep separate INPUT... --out-dir DIR --text "..." [--text ...] [--name-template T]
                 [--skip-existing] [--manifest FILE.jsonl] (folder run, see folder/)
                 [--ray [--ray-address A] [--actors N] ...] (on a Ray cluster, see distributed/)
    dsu-audiosep convert ...   (see dsu-audiosep convert --help)
    dsu-audiosep demo ...      (see dsu-audiosep demo --help)
    dsu-audiosep --version
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

PROG = "dsu-audiosep"
SUBCOMMANDS = ("separate", "convert", "demo", "worker")
SEPARATE_USAGE = (f"{PROG} separate [options] INPUT OUTPUT\n"
                  f"       {PROG} separate [options] INPUT... --out-dir DIR")


def _worker_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="AudioSep text-queried sound separation. Use --worker for the JSON-lines "
        "worker, or a subcommand: separate, convert, demo.",
    )
    parser.add_argument("--worker", action="store_true", help="serve JSON commands on stdin/stdout")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    # Worker settings, from the options table: strings here, validated by the table so that a bad
    # value is a warning (the worker still starts, as the original did) rather than an argparse exit.
    from .options import BOOL, WORKER_SETTINGS

    for setting in WORKER_SETTINGS:
        if setting.kind is BOOL:
            parser.add_argument(setting.flag, dest=setting.name, action="store_const", const=True, default=None,
                                help=setting.flag_help)
            parser.add_argument("--no-" + setting.flag[2:], dest=setting.name, action="store_const", const=False,
                                help=f"the opposite of {setting.flag}")
        else:
            parser.add_argument(setting.flag, dest=setting.name, metavar=setting.kind.metavar, help=setting.flag_help)
    return parser


def _worker_flags(ns: Any) -> dict[str, Any]:
    from .options import WORKER_SETTINGS
    from .worker.policy import warn_stderr

    flags: dict[str, Any] = {}
    for setting in WORKER_SETTINGS:
        raw = getattr(ns, setting.name, None)
        if raw is None:
            continue
        try:
            flags[setting.name] = setting.from_text(raw)
        except ValueError as exc:
            warn_stderr(f"{setting.flag}: {exc}; ignored")
    return flags


def _separate_parser(folder: bool = False):
    """``separate`` flags, from the options table: every field of load_model and separate that has
    a command-line spelling (input and output are the positional arguments). ``folder``: the
    folder run (inputs, --out-dir, one or more --text)."""
    import argparse

    from .options import BOOL, LOAD, PATHS, SEPARATE, SETTINGS

    if folder:
        from .folder.local import NOT_IN_FOLDER_RUNS, REPEATED, add_folder_arguments

        parser = argparse.ArgumentParser(prog=f"{PROG} separate", description="Separate files, folders and globs into --out-dir.")
        add_folder_arguments(parser)
        from .distributed.flags import add_ray_arguments

        add_ray_arguments(parser)
    else:
        parser = argparse.ArgumentParser(
            prog=f"{PROG} separate", usage=SEPARATE_USAGE,
            description="Separate one file into OUTPUT, or many files, folders and globs into --out-dir "
            f"(their own flags: {PROG} separate --out-dir DIR --help).")
        for setting in SETTINGS:
            if setting.required and SEPARATE in setting.commands:
                parser.add_argument(setting.name, metavar=setting.name.upper(), help=setting.help)
    for setting in SETTINGS:
        if not {LOAD, SEPARATE} & set(setting.commands) or not setting.cli_flag:
            continue
        if folder and (setting.name in REPEATED or setting.name in NOT_IN_FOLDER_RUNS):
            continue  # repeated: one output per query per file (add_folder_arguments); or one query's only
        if setting.kind is BOOL:
            parser.add_argument(setting.cli_flag, dest=setting.name, action="store_const", const=True,
                                default=None, help=setting.flag_help)
        elif setting.kind is PATHS:  # repeat the flag for several files
            parser.add_argument(setting.cli_flag, dest=setting.name, metavar=setting.kind.metavar, action="append",
                                help=setting.flag_help)
        else:
            parser.add_argument(setting.cli_flag, dest=setting.name, metavar=setting.kind.metavar,
                                help=setting.flag_help)
    return parser


def _separate_commands(ns: Any) -> tuple[dict, dict]:
    """The load_model and separate commands the flags describe (values checked by the table;
    ValueError names the flag)."""
    from .options import LOAD, SEPARATE, SETTINGS

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = getattr(ns, setting.name, None)
        if raw is None:
            continue
        try:
            values[setting.name] = setting.from_text(raw)
        except ValueError as exc:
            raise ValueError(f"{setting.cli_flag or setting.name}: {exc}") from None
    load = {"cmd": LOAD, **{s.name: values.get(s.name) for s in SETTINGS if LOAD in s.commands}}
    job = {"cmd": SEPARATE, **{s.name: values.get(s.name) for s in SETTINGS if SEPARATE in s.commands}}
    return load, job


def _is_folder_run(argv: Sequence[str]) -> bool:
    return any(a == "--out-dir" or a.startswith("--out-dir=") for a in argv)


def _separate_main(argv: Sequence[str]) -> int:
    from .errors import INVALID_FIELD

    if _is_folder_run(argv):
        from .folder.local import folder_main

        from .folder.local import take_queries

        ns = _separate_parser(folder=True).parse_args(list(argv))
        queries = take_queries(ns)
        try:
            load, job = _separate_commands(ns)
        except ValueError as exc:
            sys.stderr.write(f"{PROG}: error ({INVALID_FIELD}): {exc}\n")
            return 1
        from .distributed.flags import ray_flag_misuse, ray_missing

        misuse = ray_flag_misuse(ns) or (ray_missing() if ns.ray else None)
        if misuse:
            sys.stderr.write(f"{PROG}: error ({INVALID_FIELD}): {misuse}\n")
            return 1
        if ns.ray:
            from .distributed.run import ray_main

            return ray_main(ns, queries, load, job)
        return folder_main(ns, queries, load, job)
    ns = _separate_parser().parse_args(list(argv))
    try:
        load, job = _separate_commands(ns)
    except ValueError as exc:  # a flag's value: the same report as any other failure
        sys.stderr.write(f"{PROG}: error ({INVALID_FIELD}): {exc}\n")
        return 1
    return _separate_one(load, job)


def _separate_one(load: dict[str, Any], job: dict[str, Any]) -> int:
    """Load, plan and run one separation with the engine; the ``done`` reply on stdout."""
    import json
    import time

    from .engine.torch_engine import TorchEngine
    from .worker import protocol as P
    from .worker.failures import describe_exception
    from .worker.model_paths import check_exists, resolve_model_paths
    from .worker.policy import resolve_settings

    def command(raw: dict[str, Any]) -> Any:
        """The fields validated as the worker validates them (same errors, same messages)."""
        return P.parse_object({k: v for k, v in raw.items() if v is not None}).args

    def status(stage: str, **fields: Any) -> None:
        sys.stderr.write(json.dumps(P.reply(stage, **fields), ensure_ascii=True, separators=(",", ":")) + "\n")

    engine = TorchEngine()
    settings = resolve_settings({})
    try:
        load_args, job_args = command(load), command(job)
        engine.start()
        paths = resolve_model_paths(load_args)
        load_plan = engine.plan_load(load_args, settings)
        check_exists(paths)
        status("loading_model", model=paths.model_dir or paths.checkpoint_path)
        model = engine.load_model(paths, load_plan, bool(load_args.trust_checkpoint))
        status("separating", input=job_args.input)
        plan = engine.plan_job(job_args, load_plan)
        started = time.perf_counter()
        outcome = engine.separate(model, plan, progress=None, cancelled=None)
        elapsed = time.perf_counter() - started
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # as the worker: a library's SystemExit is an error too
        code, message, _extra = describe_exception(exc, engine.release_memory)
        sys.stderr.write(f"{PROG}: error ({code}): {message}\n")
        return 1
    result = P.reply("done", elapsed=round(elapsed, 3), files=list(outcome.files),
                     use_torch_stft_mode=plan.use_torch_stft_mode, use_torch_stft_value=plan.use_torch_stft)
    result.update(outcome.details)
    sys.stdout.write(json.dumps(result, ensure_ascii=True) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .process_memory import tune_allocator

    tune_allocator()  # before anything imports torch
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        command, rest = args[0], args[1:]
        if command == "worker":
            args = ["--worker", *rest]
        elif command == "separate":
            return _separate_main(rest)
        elif command == "convert":
            from .model.convert import convert_main

            return int(convert_main(rest) or 0)
        elif command == "demo":
            from .demo.command import demo_main

            return int(demo_main(rest) or 0)

    parser = _worker_parser()
    ns, unknown = parser.parse_known_args(args)
    if ns.version:
        from . import PROTOCOL_VERSION, __version__

        sys.stdout.write(f"{PROG} {__version__} (protocol {PROTOCOL_VERSION})\n")
        return 0
    if not ns.worker:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{PROG}: give --worker, --version or a subcommand: separate, convert, demo\n")
        return 2
    if unknown:
        # A parent passing a flag this version does not know must not lose its worker.
        sys.stderr.write(f"{PROG}: warning: ignoring unknown arguments: {' '.join(unknown)}\n")
    from .worker.process import run_worker

    return run_worker(_worker_flags(ns))
