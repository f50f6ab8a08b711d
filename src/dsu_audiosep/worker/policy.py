"""Worker settings and where they come from, plus how relative paths are resolved.

Precedence, highest first: a field on the job > a command-line flag > an environment variable >
the runtime policy file > the built-in default. This module resolves everything below "job
field"; the worker applies job fields on top with ``pick``.

Runtime policy file: ``~/.dsu/runtime_policy.json`` (or the path in ``DSU_RUNTIME_POLICY_PATH``),
shared by the DSU app's workers. Keys are read from the ``global`` section, then the ``audiosep``
section on top of it. It is read once, at start-up. A missing file is normal; an unreadable or
malformed one, or a bad value, is reported on stderr and ignored (the worker must start anyway).

Which settings exist, their environment variables, policy keys and values: ``dsu_audiosep.options``
(the one table; docs/settings.md is printed from it).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from .. import options

POLICY_ENV = "DSU_RUNTIME_POLICY_PATH"
DEFAULT_POLICY_PATH = Path("~/.dsu/runtime_policy.json")
POLICY_SECTIONS = ("global", "audiosep")  # later sections win

DEFAULTS: dict[str, Any] = {s.name: s.default for s in options.WORKER_SETTINGS}

Warn = Callable[[str], None]


def warn_stderr(message: str) -> None:
    try:
        sys.stderr.write(f"dsu-audiosep: warning: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# The worker-level settings, plus ``sources``: which layer supplied each value ("flag", "env",
# "policy", "default"), shown in get_status; and the policy file's path.
Settings = options.worker_settings_record()


def parse_setting(name: str, value: Any) -> Any:
    """A flag's, environment variable's or policy file's value; ValueError says what was expected."""
    return options.BY_NAME[name].from_text(value)


# --------------------------------------------------------------------------------------------
# Layers


def policy_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    override = env.get(POLICY_ENV)
    if override:
        return Path(override).expanduser()
    return DEFAULT_POLICY_PATH.expanduser()


def read_policy(path: Path, warn: Warn = warn_stderr) -> dict[str, Any]:
    """Valid settings from the policy file; {} when absent or broken (with a warning)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # a directory, no permission, ...
        warn(f"cannot read runtime policy {path}: {exc}; using defaults")
        return {}
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        warn(f"runtime policy {path} is not valid JSON ({exc}); using defaults")
        return {}
    if not isinstance(data, dict):
        warn(f"runtime policy {path} must be a JSON object with \"audiosep\"/\"global\" sections; using defaults")
        return {}
    merged: dict[str, Any] = {}
    for section in POLICY_SECTIONS:
        block = data.get(section)
        if block is None:
            continue
        if not isinstance(block, dict):
            warn(f"runtime policy {path}: section \"{section}\" is not an object; ignored")
            continue
        for setting in options.POLICY_SETTINGS:
            key = setting.name
            if key not in block or block[key] is None:
                continue
            try:
                merged[key] = setting.from_text(block[key])
            except ValueError as exc:
                warn(f"runtime policy {path}: {section}.{exc}; ignored")
    return merged


def read_env(env: Mapping[str, str] | None = None, warn: Warn = warn_stderr) -> dict[str, Any]:
    env = os.environ if env is None else env
    out: dict[str, Any] = {}
    for setting in options.WORKER_SETTINGS:
        var = setting.env
        raw = env.get(var)
        if raw is None or raw.strip() == "":
            continue
        try:
            out[setting.name] = setting.from_text(raw)
        except ValueError as exc:
            warn(f"environment {var}: {exc}; ignored")
    return out


def resolve_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    warn: Warn = warn_stderr,
) -> Settings:
    """Flags (already parsed; None = not given) > environment > policy file > defaults."""
    path = policy_path(env)
    layers = [
        ("flag", {k: v for k, v in (flags or {}).items() if v is not None}),
        ("env", read_env(env, warn)),
        ("policy", read_policy(path, warn)),
        ("default", DEFAULTS),
    ]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in DEFAULTS:
        for layer_name, layer in layers:
            if key in layer:
                values[key] = layer[key]
                sources[key] = layer_name
                break
    return Settings(**values, sources=sources, policy_path=str(path))


def pick(job_value: Any, fallback: Any) -> Any:
    """The job field when given, else the worker-level setting."""
    return fallback if job_value is None else job_value


# --------------------------------------------------------------------------------------------
# Paths


def base_dirs() -> list[Path]:
    """Folders a relative model path is looked up in, first match wins.

    Frozen build: the executable's folder (the original worker's rule; its checkpoint/ and
    config/ folders sit beside the binary). From source: the repository root (where config/
    lives, so "config/audiosep_base.yaml" works from any working directory), then the package
    folder. The current directory comes last in both cases, for people typing relative paths
    in a shell.
    """
    dirs: list[Path] = []
    if getattr(sys, "frozen", False):
        dirs.append(Path(sys.executable).resolve().parent)
    else:
        package_dir = Path(__file__).resolve().parents[1]
        repo_root = package_dir.parents[1]
        if (repo_root / "config").is_dir():
            dirs.append(repo_root)
        dirs.append(package_dir)
    try:
        cwd = Path.cwd()
        if cwd not in dirs:
            dirs.append(cwd)
    except OSError:  # the working directory was deleted
        pass
    return dirs


def resolve_path(path: str, bases: list[Path] | None = None) -> str:
    """Absolute paths (after ~ expansion) are kept; relative ones resolve against ``base_dirs``.

    When the file exists under none of them, the first base is used so the error message names
    the place the worker expected it.
    """
    expanded = Path(os.path.expanduser(path))
    if expanded.is_absolute():
        return str(expanded)
    bases = base_dirs() if bases is None else bases
    for base in bases:
        candidate = base / expanded
        if candidate.exists():
            return os.path.abspath(candidate)
    return os.path.abspath(bases[0] / expanded) if bases else os.path.abspath(expanded)
