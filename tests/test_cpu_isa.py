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


def _cpu_has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def probe(extra_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in avx2_only_env()}
    env.update(extra_env, ONEDNN_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not _cpu_has_avx2(),
                    reason="the AVX2 emulation is for x86-64 CPUs that have AVX2")
def test_avx2_only_env_selects_avx2_kernels_in_each_library():
    env = avx2_only_env()
    assert set(env) == {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"}
    out = probe(env)
    assert re.search(r"^aten AVX2$", out, re.M), out
    onednn_isa = re.search(r"onednn_verbose.*isa:(.*)$", out, re.M)
    assert onednn_isa and onednn_isa.group(1).strip() == "Intel AVX2", out
    mkl_banner = next((line for line in out.splitlines() if line.startswith("MKL_VERBOSE oneMKL")), "")
    assert "(Intel(R) AVX2)" in mkl_banner and "AVX-512" not in mkl_banner, out


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


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not _cpu_has_avx2(),
                    reason="the AVX2 emulation is for x86-64 CPUs that have AVX2")
def test_openvino_obeys_onednn_max_cpu_isa():
    """OpenVINO's CPU plugin is built on oneDNN and takes its limit from the same variable, so the
    AVX2-only pass needs no line of its own for it (its executed graph names the kernels)."""
    limited = openvino_primitives(avx2_only_env())
    kernels = re.findall(r"^primitive (\S+)", limited, re.M)
    assert any("avx2" in k for k in kernels) and not any("avx512" in k for k in kernels), limited
    if " avx512f" in Path("/proc/cpuinfo").read_text():
        assert "avx512" in openvino_primitives({}), "this CPU has AVX-512: the unlimited run should use it"
