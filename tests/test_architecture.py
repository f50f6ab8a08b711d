"""The package's shape, read from its source with ``ast`` (nothing is imported).

- No import cycle between modules, counting imports inside functions too (a lazy import is still
  a dependency; it only hides the cycle until run time).
- One direction: worker -> engine -> model -> base (errors, devices, options, process_memory). The audio I/O
  modules of the engine sit on the base alone, so the model and the audio files never meet.
- Modules and functions of a readable size.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dsu_audiosep"
ROOT = "dsu_audiosep"

# Lower ranks never import higher ones. The package root holds only version constants and a
# lazy re-export of the seed API (``from dsu_audiosep import build_audiosep``), so anyone may
# import it and its own lazy import is not counted.
BASE = {f"{ROOT}.errors", f"{ROOT}.devices", f"{ROOT}.options", f"{ROOT}.process_memory", ROOT}
RANKS = {"base": 0, "model": 1, "engine": 2, "worker": 3, "entry": 4}
AUDIO_IO = {f"{ROOT}.engine.{m}" for m in ("audio_read", "audio_memory", "audio_decode_av", "audio_encode_av", "resampling",
                                           "output_options", "audio_write", "partials")}

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package_of(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str) -> set[str]:
    """Modules of the package that ``name`` imports, anywhere in its body."""
    found: set[str] = set()
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name)
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # ``from pkg import sub`` names a module when ``sub`` is one, else an attribute of pkg.
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # ``import a.b.c`` of a package: keep what exists
                target = target.rpartition(".")[0]
            if target.startswith(ROOT) and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> str:
    if name in BASE:
        return "base"
    second = name.split(".")[1]
    return second if second in ("model", "engine", "worker") else "entry"


def test_the_graph_sees_every_kind_of_import():
    # Guards the parser itself, on edges that exist: inside a function, ``from . import sub``,
    # ``from .sub import name``, ``from .. import name, sub`` and ``from ..pkg.sub import name``.
    assert f"{ROOT}.seed_api" in GRAPH[ROOT]
    assert {f"{ROOT}.engine.partials", f"{ROOT}.engine.audio_read"} <= GRAPH[f"{ROOT}.engine.audio_write"]
    assert f"{ROOT}.errors" in GRAPH[f"{ROOT}.worker.loop"]
    assert f"{ROOT}.model.constants" in GRAPH[f"{ROOT}.engine.separate"]


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if nxt == ROOT:  # the root's only import is its lazy re-export (see BASE)
                continue
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(MODULES):
        if name not in state and name != ROOT:
            visit(name)


def test_layers_point_one_way():
    wrong = []
    for name, targets in GRAPH.items():
        if name == ROOT:
            continue
        for target in targets:
            if RANKS[_layer(target)] > RANKS[_layer(name)]:
                wrong.append(f"{name} ({_layer(name)}) imports {target} ({_layer(target)})")
    assert not wrong, "imports against the direction worker -> engine -> model -> base:\n" + "\n".join(wrong)


def test_audio_io_stands_on_the_base_alone():
    wrong = [f"{name} imports {t}" for name in AUDIO_IO for t in GRAPH[name] if t not in AUDIO_IO and _layer(t) != "base"]
    assert not wrong, "\n".join(wrong)


def test_modules_and_functions_are_readable_sizes():
    big = []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            big.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    big.append(f"{name}.{node.name} (line {node.lineno}): {n} lines (at most {MAX_FUNCTION_LINES})")
    assert not big, "\n".join(big)


def _external_imports(name: str) -> set[str]:
    """Top-level names of the packages outside ours that ``name`` imports, anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found - {ROOT}


def test_only_the_cluster_runner_imports_ray():
    # The ray extra is optional and never in the frozen worker (setup_freeze.py excludes it):
    # nothing the worker, the engine or the local CLI runs may import it, even lazily.
    cluster = f"{ROOT}.distributed"
    wrong = sorted(name for name in MODULES if {"ray", "pyarrow"} & _external_imports(name)
                   and not name.startswith(cluster + "."))
    assert not wrong, f"imports ray outside {cluster}: {wrong}"
    assert "ray" in _external_imports(f"{cluster}.run")  # the check sees the lazy imports it guards against
    # flags stays importable without the extra: the CLI builds its parser from it
    assert not {"ray", "pyarrow"} & _external_imports(f"{cluster}.flags")
