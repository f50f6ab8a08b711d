"""Build the frozen worker with cx_Freeze: ``python setup_freeze.py build_exe``.

Result: ``dist/dsu-audiosep/dsu-audiosep`` (``dsu-audiosep.exe`` on Windows), a console
executable running ``dsu_audiosep.cli:main``, with ``config/audiosep_base.yaml`` beside it
(relative paths in worker commands resolve against the executable's folder).

Runs on Linux, Windows and macOS with the torch wheel installed in the building environment
(CPU, CUDA or MPS build: the bundle ships whatever torch it finds). Nothing here is
platform-specific except the blocks marked ``PLATFORM``.

Environment knobs (all optional):
  DSU_FREEZE_TARGET  output folder (default ``dist/dsu-audiosep``)
  DSU_FREEZE_ENTRY   entry script to freeze instead of the generated launcher (debugging only)
  DSU_FREEZE_VERBOSE=1  show cx_Freeze's full output, including the missing-modules report
"""
from __future__ import annotations

import importlib.util
import os
import py_compile
import shutil
import sys
from pathlib import Path

from cx_Freeze import Executable, setup
from cx_Freeze.command.build_exe import build_exe as _BuildExe

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "src"
TARGET_DIR = Path(os.environ.get("DSU_FREEZE_TARGET", ROOT / "dist" / "dsu-audiosep"))
BUILD_TMP = ROOT / "build" / "freeze"
IS_WINDOWS = sys.platform == "win32"  # PLATFORM
EXE_NAME = "dsu-audiosep.exe" if IS_WINDOWS else "dsu-audiosep"

# The finder follows imports from the launcher; the packages below are forced in whole because
# they (or their users) import submodules lazily, which a static scan cannot see.
PACKAGES = [
    "dsu_audiosep",
    "torch",
    "numpy",
    "soundfile",
    "_soundfile_data",  # soundfile's bundled libsndfile (a data package, found by path)
    "soxr",
    "tokenizers",
    "safetensors",
    "yaml",
    # PyAV: FFmpeg's libraries inside its wheel (av.libs) decode AAC/ALAC/WebM/WMA/AC-3 and video
    # soundtracks and encode MP3/Opus/AAC; its Cython modules import one another at run time.
    "av",
]
# The CPU runtime of the separator body (engine/backend_openvino.py), when installed (the
# `openvino` extra) and not turned off with DSU_FREEZE_OPENVINO=0 (the slim bundle: torch only).
WITH_OPENVINO = os.environ.get("DSU_FREEZE_OPENVINO", "1") != "0" and importlib.util.find_spec("openvino") is not None
if WITH_OPENVINO:
    PACKAGES.append("openvino")
# What of OpenVINO the CPU backend never uses: the GPU/NPU plugins, the front-ends other than
# PyTorch (the export) and IR (reading it back), headers and CMake files (~70 MB).
OPENVINO_UNUSED_LIBS = ("intel_gpu_plugin", "intel_npu_plugin", "tensorflow", "paddle", "jax_frontend",
                        "gguf_frontend", "onnx_frontend")
OPENVINO_UNUSED_DIRS = ("include", "cmake", "frontend/tensorflow", "frontend/paddle", "frontend/jax",
                        "frontend/onnx")

# Never needed at inference time. torch's compiler stack itself stays, because eager code
# reaches it: every torch._check() imports torch.fx.experimental.symbolic_shapes (hence sympy,
# mpmath), and functions wrapped by torch._disable_dynamo import torch._dynamo (which imports
# part of torch._inductor) on first call; e.g. a tensor factory under torch.device("meta")
# runs Python decompositions that do both. What only compiling/exporting needs goes: networkx,
# jinja2, filelock, fsspec (torch.compile would fail, as it must here anyway: no compiler).
EXCLUDES = [
    # the ray extra (folder runs on a cluster): a pip install, never the frozen worker. Its
    # modules import ray lazily, which the finder would otherwise follow into the bundle; only
    # distributed.flags stays (the CLI parses --ray and says the extra is missing)
    "dsu_audiosep.distributed.run", "dsu_audiosep.distributed.session", "dsu_audiosep.distributed.actor",
    "ray", "pyarrow",
    # installed with the ray extra; torch imports requests optionally (hub downloads), which a
    # build in a venv without the extra never bundled
    "requests", "urllib3", "certifi", "charset_normalizer", "idna",
    # test-time oracles and tooling
    "transformers", "huggingface_hub", "torchvision", "torchaudio", "torchcodec",
    "pytest", "_pytest", "hypothesis", "IPython", "cx_Freeze",
    "setuptools", "pkg_resources", "_distutils_hack", "pip", "wheel",
    # GUI / plotting / science stacks nothing of ours uses
    "tkinter", "_tkinter", "matplotlib", "scipy", "pandas", "PIL",
    # torch's compiler stack and what only it needs
    "networkx", "jinja2", "markupsafe", "filelock", "fsspec",
    "torch.utils.tensorboard", "tensorboard",
    # optional pretty-printers and debug helpers pulled in by tqdm/torch extras
    "rich", "pygments", "markdown_it", "mdurl", "sqlite3", "xmlrpc", "pydoc_data",
    "readline", "curses",  # only interactive pdb/cmd use them, inside try/except
    # test and example trees
    "numpy.tests", "torch.testing._internal.opinfo", "torch.testing._internal.distributed",
    # sympy fields that torch's shape reasoning never touches (it uses core, logic, functions,
    # printing and what sympy itself imports at start)
    "sympy.physics", "sympy.stats", "sympy.vector", "sympy.diffgeom", "sympy.crypto",
    "sympy.liealgebras", "sympy.categories", "sympy.sandbox", "sympy.holonomic",
    "sympy.benchmarks",
]


if not WITH_OPENVINO:
    EXCLUDES.append("openvino")  # imported lazily by engine/backend_openvino.py: the finder would follow it


def _test_packages(*top_level: str) -> list[str]:
    """Dotted names of every ``tests`` package inside the given installed packages."""
    names = []
    for top in top_level:
        spec = importlib.util.find_spec(top)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for init in root.rglob("tests/__init__.py"):
            rel = init.parent.relative_to(root.parent)
            names.append(".".join(rel.parts))
    return sorted(names)


def _launcher() -> Path:
    """The script cx_Freeze turns into the executable: a small trampoline to the CLI."""
    override = os.environ.get("DSU_FREEZE_ENTRY")
    if override:
        return Path(override).resolve()
    BUILD_TMP.mkdir(parents=True, exist_ok=True)
    script = BUILD_TMP / "dsu_audiosep_launcher.py"
    # The python executable ignores SIGPIPE and SIGXFSZ at start (a write to a vanished reader
    # or past a size limit becomes an OSError); cx_Freeze's launcher leaves the default action,
    # which kills the process. Restore python's behaviour so the frozen build acts like
    # `python -m dsu_audiosep` (getattr: Windows has neither signal).
    script.write_text(
        "import signal\n"
        "import sys\n"
        "for _name in ('SIGPIPE', 'SIGXFSZ'):\n"
        "    if hasattr(signal, _name):\n"
        "        signal.signal(getattr(signal, _name), signal.SIG_IGN)\n"
        "from dsu_audiosep.cli import main\n"
        "sys.exit(main())\n",
        encoding="utf-8",
    )
    return script


def _torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise SystemExit("setup_freeze.py: torch is not installed in this environment")
    return Path(spec.origin).parent


def _overload_sources() -> list[tuple[Path, str]]:
    """torch sources that mention ``_overload``, to ship as .py files.

    torch.jit reads the source of every ``@_overload``/``@_overload_method`` function at import
    time and warns on stderr when it cannot (RNN.forward, tensordot, norm, ...). The cx_Freeze
    hook only covers the spelling ``@torch.jit._overload_method``; modules alias the decorator
    (``from torch._jit_internal import _overload as overload``), so match the bare name.
    """
    torch_dir = _torch_dir()
    site = torch_dir.parent
    skipped = {"testing", "include", "share", "bin"}
    found = []
    for src in torch_dir.rglob("*.py"):
        rel = src.relative_to(site)
        if len(rel.parts) > 2 and rel.parts[1] in skipped:
            continue
        if b"_overload" in src.read_bytes():
            found.append((src, (Path("lib") / rel).as_posix()))
    return sorted(found)


_TEST_LIBS = ("torchbind_test", "jitbackend_test", "backend_with_compiler", "aoti_custom_ops")


def _prune(target: Path) -> None:
    """Remove what the hooks copy wholesale but inference never touches."""
    # torch/bin: only the shared-memory manager is used at run time (tensor sharing between
    # processes); the rest is C++ test binaries and protoc (~49 MB).
    torch_bin = target / "lib" / "torch" / "bin"
    if torch_bin.is_dir():
        for entry in torch_bin.iterdir():
            if entry.name.startswith("torch_shm_manager"):
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    # torch/lib: C++ test extensions that nothing links against or loads outside torch's tests.
    torch_lib = target / "lib" / "torch" / "lib"
    if torch_lib.is_dir():
        for entry in torch_lib.iterdir():
            if any(tag in entry.name for tag in _TEST_LIBS):
                entry.unlink()
    # The torch hook copies every config.py as a file, even inside excluded packages: left
    # there they would turn those into importable namespace packages that fail half-way.
    excluded_dirs = [Path("lib", *name.split(".")) for name in EXCLUDES]
    openvino_dirs = [Path("lib/openvino", d) for d in OPENVINO_UNUSED_DIRS]
    for lib in (target / "lib" / "openvino" / "libs").glob("*"):
        if any(tag in lib.name for tag in OPENVINO_UNUSED_LIBS):
            lib.unlink()
    for rel in [Path("lib/torch/include"), Path("lib/torch/share"), *excluded_dirs, *openvino_dirs]:
        p = target / rel
        if p.is_dir():
            shutil.rmtree(p)
    # PyAV's Cython declarations and type stubs: for building against it and for editors only.
    # Its shared libraries all stay: libavcodec links every codec library it was built with
    # (x265, SVT-AV1, ...), so none can go without the decoder failing to load.
    for pattern in ("*.pxd", "*.pyi", "*.pyx"):
        for f in (target / "lib" / "av").rglob(pattern):
            f.unlink()


def _compile_shipped_sources(target: Path) -> int:
    """Give every shipped .py an unchecked-hash cache so start-up never recompiles it.

    A .py beside a .pyc wins the import, so without this the interpreter compiles it on every
    start where the install folder is read-only (Program Files, signed app bundles) and on the
    first start elsewhere. Unchecked hashes also survive installers that rewrite mtimes.
    """
    count = 0
    for src in sorted((target / "lib").rglob("*.py")):
        cache = importlib.util.cache_from_source(str(src))
        try:
            py_compile.compile(
                str(src), cfile=cache, doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        except py_compile.PyCompileError as exc:
            # torch test helpers written for a newer Python (py312_intrinsics.py): this
            # interpreter could never import them, so they only cost space.
            print(f"setup_freeze: dropping {src.relative_to(target)}: {exc.exc_type_name}")
            src.unlink()
            continue
        stale = src.with_suffix(".pyc")
        if stale.exists():
            stale.unlink()  # dead weight: the .py shadows it
        count += 1
    return count


class BuildFrozen(_BuildExe):
    """build_exe that starts from a clean folder and post-processes the bundle."""

    def run(self) -> None:
        target = Path(self.build_exe)
        if target.exists():
            shutil.rmtree(target)  # stale files from an older build would ship silently
        super().run()
        _prune(target)
        n = _compile_shipped_sources(target)
        print(f"setup_freeze: pruned torch/bin, cached {n} shipped sources -> {target}")


def main() -> None:
    if len(sys.argv) == 1:
        sys.argv.append("build_exe")
    # The package is imported from the source tree, not whatever is installed.
    sys.path.insert(0, str(SRC))
    # torch's import graph is deep enough to exceed the default limit in the finder.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    include_files = [
        (str(ROOT / "config" / "audiosep_base.yaml"), "config/audiosep_base.yaml"),
        *((str(s), t) for s, t in _overload_sources()),
    ]

    setup(
        name="dsu-audiosep",
        version=_version(),
        description="dsu-audiosep frozen worker",
        cmdclass={"build_exe": BuildFrozen},
        options={
            "build_exe": {
                "build_exe": str(TARGET_DIR),
                "packages": PACKAGES,
                "excludes": EXCLUDES + _test_packages("sympy", "mpmath"),
                "include_files": include_files,
                # Keep co_filename relative to lib/: tracebacks don't leak the build machine's
                # paths, and nothing can silently find sources in the build venv during tests.
                "replace_paths": [("*", "")],
                "include_msvcr": IS_WINDOWS,  # PLATFORM: VC++ runtime beside the .exe
                # The missing-modules report (hundreds of optional CUDA/JAX/... imports) is
                # noise unless you are chasing an ImportError: DSU_FREEZE_VERBOSE=1 shows it.
                "silent_level": 0 if os.environ.get("DSU_FREEZE_VERBOSE") == "1" else 2,
            }
        },
        executables=[Executable(str(_launcher()), base="console", target_name=EXE_NAME)],
    )


def _version() -> str:
    init = (SRC / "dsu_audiosep" / "__init__.py").read_text(encoding="utf-8")
    for line in init.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "0"


if __name__ == "__main__":
    main()
