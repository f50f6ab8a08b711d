"""The AVX2-only emulation of scripts/avx2_only.env really changes the kernels that run.

scripts/test.sh runs the ``numerics`` tests a second time under those variables so that a developer
on an AVX-512/AMX machine sees the results an AMD (Zen 1-3) or older Intel user gets. That second
pass proves something only if torch, oneDNN and MKL each obey their variable: checked here from
what each library reports about the kernels it picked.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

ENV_FILE = Path(__file__).resolve().parents[1] / "scripts" / "avx2_only.env"

PROBE = r"""
import torch
print("aten", torch.backends.cpu.get_cpu_capability(), flush=True)
conv = torch.nn.Conv2d(8, 8, 3).to(memory_format=torch.channels_last)
with torch.no_grad():
    conv(torch.randn(1, 8, 64, 64).to(memory_format=torch.channels_last))  # oneDNN (verbose via env)
a = torch.randn(256, 256)
with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
    a @ a  # MKL SGEMM: prints its banner with the instruction set
"""


def avx2_only_env() -> dict[str, str]:
    pairs = (line.split("#")[0].strip() for line in ENV_FILE.read_text().splitlines())
    return dict(p.split("=", 1) for p in pairs if p)


def cpu_capability(env_without_limits: bool = True) -> str:
    """What torch's dispatcher finds on this CPU ("AVX2", "AVX512", "DEFAULT", ...), asked in a
    fresh process without the AVX2-only limits: works where /proc/cpuinfo does not exist, and
    never depends on how a vendor spells its flags."""
    env = {k: v for k, v in os.environ.items() if not (env_without_limits and k in avx2_only_env())}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().upper()


def _x86_with_avx2() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and cpu_capability().startswith(("AVX2", "AVX512"))


needs_avx2 = pytest.mark.skipif(not _x86_with_avx2(), reason="the AVX2 emulation is for x86-64 CPUs that have AVX2")


def probe(extra_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in avx2_only_env()}
    env.update(extra_env, ONEDNN_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def limited_probe() -> str:
    env = avx2_only_env()
    assert set(env) == {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"}
    return probe(env)


def reported_isa(library: str, out: str) -> str | None:
    """The instruction set a library says it dispatched to, or None where it does not say.
    torch and oneDNN always name it; oneMKL's verbose banner names it on Intel CPUs only (on AMD
    it reads "... for Intel(R) 64 architecture Intel(R) Architecture processors, Lnx ..."), so
    an absent name is "not reported", never a failure and never a pass."""
    if library == "torch":
        m = re.search(r"^aten (\S+)$", out, re.M)
        return m.group(1) if m else None
    if library == "oneDNN":
        m = re.search(r"onednn_verbose.*isa:(.*)$", out, re.M)
        return m.group(1).strip() if m else None
    banner = next((line for line in out.splitlines() if line.startswith("MKL_VERBOSE oneMKL")), "")
    m = re.search(r"\(Intel\(R\) ([^)]*)\)", banner)
    return m.group(1) if m else None


def test_banners_without_an_instruction_set_are_not_reported():
    """The wording seen on each kind of CPU (AMD EPYC Zen 4, Intel Xeon) reads as intended."""
    amd = ("MKL_VERBOSE oneMKL 2024.0 Update 2 Product build 20240605 for Intel(R) 64 architecture Intel(R) "
           "Architecture processors, Lnx 2.60GHz lp64 gnu_thread")
    intel = ("MKL_VERBOSE oneMKL 2024.0 Update 2 Product build 20240605 for Intel(R) 64 architecture Intel(R) "
             "Advanced Vector Extensions 2 (Intel(R) AVX2) enabled processors, Lnx 2.10GHz lp64 gnu_thread")
    assert reported_isa("oneMKL", amd) is None
    assert reported_isa("oneMKL", intel) == "AVX2"
    assert reported_isa("oneDNN", "onednn_verbose,v1,info,cpu,isa:Intel AVX2\n") == "Intel AVX2"


@needs_avx2
@pytest.mark.parametrize("library", ["torch", "oneDNN", "oneMKL"])
def test_avx2_only_env_selects_avx2_kernels_in_each_library(limited_probe, library):
    isa = reported_isa(library, limited_probe)
    if isa is None:
        pytest.skip(f"{library} does not report its instruction set on this CPU (not reported); output:\n{limited_probe[-2000:]}")
    assert "AVX2" in isa.upper() and "512" not in isa, (library, isa)


@pytest.mark.numerics
@pytest.mark.skipif("ATEN_CPU_CAPABILITY" not in os.environ, reason="only in the AVX2-only pass of scripts/test.sh")
def test_this_pass_runs_the_kernels_it_asks_for():
    import torch

    assert torch.backends.cpu.get_cpu_capability() == os.environ["ATEN_CPU_CAPABILITY"].upper()


OPENVINO_PROBE = r"""
import numpy as np
import openvino as ov
import openvino.opset13 as ops

x = ops.parameter([1, 16, 64, 64], np.float32)
w = ops.constant(np.random.default_rng(0).standard_normal((16, 16, 3, 3)).astype(np.float32))
conv = ops.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1])
core = ov.Core()
core.set_property("CPU", {"INFERENCE_PRECISION_HINT": "f32"})
compiled = core.compile_model(ov.Model([ops.relu(conv)], [x]), "CPU")
for op in compiled.get_runtime_model().get_ordered_ops():
    info = op.get_rt_info()
    if "primitiveType" in info:
        print("primitive", info["primitiveType"].astype(str))
"""


def openvino_primitives(extra_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in avx2_only_env()}
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", OPENVINO_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@needs_avx2
def test_openvino_obeys_onednn_max_cpu_isa():
    """OpenVINO's CPU plugin is built on oneDNN and takes its limit from the same variable, so the
    AVX2-only pass needs no line of its own for it (its executed graph names the kernels)."""
    limited = openvino_primitives(avx2_only_env())
    kernels = re.findall(r"^primitive (\S+)", limited, re.M)
    assert any("avx2" in k for k in kernels) and not any("avx512" in k for k in kernels), limited
    if cpu_capability().startswith("AVX512"):
        assert "avx512" in openvino_primitives({}), "this CPU has AVX-512: the unlimited run should use it"
