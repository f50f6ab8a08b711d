"""Command line: ``dsu-audiosep --worker``, ``separate``, ``convert``, ``demo``, ``--version``.

Nothing heavy is imported at module level: ``--worker`` must print its first protocol line
before torch is imported, and ``--version`` must be instant.

    dsu-audiosep --worker [--max-cached-models N] [--device D] [--use-torch-stft true|false|auto]
                          [--auto-stft-seconds S] [--mmap | --no-mmap] [--chunk-seconds S]
    dsu-audiosep separate INPUT OUTPUT --text "..." (--checkpoint CKPT | --model-dir DIR) [...]
    dsu-audiosep convert ...   (see dsu-audiosep convert --help)
    dsu-audiosep demo ...      (see dsu-audiosep demo --help)
    dsu-audiosep --version
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

PROG = "dsu-audiosep"
SUBCOMMANDS = ("separate", "convert", "demo", "worker")


def _worker_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="AudioSep text-queried sound separation. Use --worker for the JSON-lines "
        "worker, or a subcommand: separate, convert, demo.",
    )
    parser.add_argument("--worker", action="store_true", help="serve JSON commands on stdin/stdout")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    # Worker settings: strings here, validated by policy.parse_setting so that a bad value is a
    # warning (the worker still starts, as the original did) rather than an argparse exit.
    parser.add_argument("--max-cached-models", metavar="N", help="models kept in memory (LRU, default 1)")
    parser.add_argument("--device", metavar="D", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--use-torch-stft", metavar="true|false|auto", help="default STFT implementation")
    parser.add_argument("--auto-stft-seconds", metavar="S", help="threshold for use_torch_stft auto (60)")
    parser.add_argument("--mmap", dest="mmap", action="store_const", const=True, default=None,
                        help="memory-map checkpoints when loading")
    parser.add_argument("--no-mmap", dest="mmap", action="store_const", const=False)
    parser.add_argument("--chunk-seconds", metavar="S", help="use_chunk auto threshold (30)")
    parser.add_argument("--precision", metavar="P", help="default precision: fp32 (exact), tf32, bf16 or fp16")
    return parser


def _worker_flags(ns: Any) -> dict[str, Any]:
    from .worker.policy import parse_setting, warn_stderr

    flags: dict[str, Any] = {}
    for key in ("max_cached_models", "device", "use_torch_stft", "auto_stft_seconds", "chunk_seconds", "mmap", "precision"):
        raw = getattr(ns, key, None)
        if raw is None:
            continue
        try:
            flags[key] = parse_setting(key, raw)
        except ValueError as exc:
            warn_stderr(f"--{key.replace('_', '-')}: {exc}; ignored")
    return flags


def _separate_main(argv: Sequence[str]) -> int:
    import argparse

    def tri(value: str) -> Any:
        low = value.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        return low  # "auto", or left for the protocol validator to reject with a clear message

    parser = argparse.ArgumentParser(prog=f"{PROG} separate", description="Separate one file (one-shot).")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--text", default="speech", help="what to extract (default: speech)")
    parser.add_argument("--checkpoint", help="AudioSep checkpoint (.ckpt)")
    parser.add_argument("--model-dir", help="converted model folder (instead of --checkpoint)")
    parser.add_argument("--config", help="AudioSep YAML config (default config/audiosep_base.yaml)")
    parser.add_argument("--clap-checkpoint", help="CLAP checkpoint (.pt), optional")
    parser.add_argument("--roberta-dir", help="roberta-base folder (tokenizer files), optional")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", help="fp32 (default, exact), tf32 (CUDA matrix units), bf16 or fp16")
    parser.add_argument("--mmap", action="store_true", default=None)
    parser.add_argument("--use-torch-stft", type=tri)
    parser.add_argument("--auto-stft-seconds", type=float)
    parser.add_argument("--use-chunk", type=tri)
    parser.add_argument("--chunk-seconds", type=float)
    parser.add_argument("--chunk-length", type=float)
    parser.add_argument("--context-seconds", type=float, help="context on each side of a chunk (default 0.64; 3.52 is exact)")
    parser.add_argument("--output-sr", help="Hz or 'input' (default 44100)")
    parser.add_argument("--output-subtype", help="PCM_16 (default), PCM_24 or FLOAT")
    parser.add_argument("--output-channels", help="stereo (default) or input")
    parser.add_argument("--mode", help="extract (default) or remove")
    parser.add_argument("--residual-output", help="also write the rest of the mixture here")
    ns = parser.parse_args(list(argv))
    return _separate_one(*_separate_commands(ns))


def _separate_commands(ns: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parsed flags as the worker's load_model and separate fields (None: not given)."""
    output_sr: Any = ns.output_sr
    if output_sr is not None and output_sr.strip().lower() != "input":
        try:
            output_sr = int(output_sr)
        except ValueError:
            pass  # the validator names the field

    load = {
        "cmd": "load_model",
        "checkpoint_path": ns.checkpoint,
        "model_dir": ns.model_dir,
        "config_path": ns.config,
        "clap_checkpoint_path": ns.clap_checkpoint,
        "roberta_dir": ns.roberta_dir,
        "device": ns.device,
        "precision": ns.precision,
        "mmap": ns.mmap,
        "use_torch_stft": ns.use_torch_stft,
        "auto_stft_seconds": ns.auto_stft_seconds,
        "chunk_seconds": ns.chunk_seconds,
        "chunk_length": ns.chunk_length,
    }
    job = {
        "cmd": "separate",
        "input": ns.input,
        "output": ns.output,
        "text": ns.text,
        "use_chunk": ns.use_chunk,
        "chunk_seconds": ns.chunk_seconds,
        "chunk_length": ns.chunk_length,
        "context_seconds": ns.context_seconds,
        "output_sr": output_sr,
        "output_subtype": ns.output_subtype,
        "output_channels": ns.output_channels,
        "mode": ns.mode,
        "residual_output": ns.residual_output,
    }
    return load, job


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
    from .memory import tune_allocator

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
            from .demo import demo_main

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
