"""The separator body's backends (engine/backends.py, engine/backend_openvino.py): which one a load
picks, that OpenVINO computes the same function as torch in strict float32, that its export is
cached, and that a backend which fails leaves the model on torch with a warning.

The parity suite (test_parity.py) and the chunked = full pass tests (test_engine.py) run on every
backend through the ``backend_model`` fixture; the worker's ``backend`` field is driven over real
pipes in test_worker_backend.py.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_same_function
from dsu_audiosep.engine import backends
from dsu_audiosep.engine.backends import CpuInfo, attach, choose, use_backend

XEON = CpuInfo("x86_64", "Intel(R) Xeon(R)", frozenset({"avx2", "avx512f", "amx_tile"}))
ZEN3 = CpuInfo("x86_64", "AMD EPYC 7B13", frozenset({"avx2", "fma"}))
OLD_X86 = CpuInfo("x86_64", "Intel(R) Core(TM)2", frozenset({"sse4_2"}))
APPLE = CpuInfo("arm64", "Apple M2", frozenset())


def everything(name: str) -> bool:
    return True


def nothing(name: str) -> bool:
    return False


@pytest.mark.parametrize("cpu, installed, expected", [
    (XEON, everything, "openvino"),
    (ZEN3, everything, "openvino"),
    (OLD_X86, everything, "torch"),  # no AVX2: not measured, torch stays
    (APPLE, everything, "torch"),  # arm64: not measured here (README)
    (ZEN3, nothing, "torch"),  # not installed
])
def test_auto_follows_the_cpu_table(cpu, installed, expected):
    assert choose("auto", "cpu", "fp32", cpu, installed) == (expected, None)


@pytest.mark.parametrize("device, precision", [("cuda", "fp32"), ("cuda:1", "tf32"), ("mps", "fp32"), ("cpu", "bf16")])
def test_gpus_and_reduced_precision_stay_on_torch(device, precision):
    assert choose("auto", device, precision, XEON, everything) == ("torch", None)
    name, note = choose("openvino", device, precision, XEON, everything)
    assert name == "torch" and "CPU in fp32 only" in note


def test_explicit_choices():
    assert choose("torch", "cpu", "fp32", XEON, everything) == ("torch", None)
    assert choose("openvino", "cpu", "fp32", OLD_X86, everything) == ("openvino", None)  # asked for: tried
    name, note = choose("openvino", "cpu", "fp32", XEON, nothing)
    assert name == "torch" and "not installed" in note


def test_cpu_info_reads_this_machine():
    info = backends.cpu_info()
    assert info.arch
    if os.path.exists("/proc/cpuinfo") and info.arch in backends.X86:
        assert info.model and "sse2" in info.flags


def test_cpu_info_without_proc_cpuinfo_asks_torch(tmp_path):
    """Windows and macOS have no /proc/cpuinfo: the flags come from torch's dispatcher, so an AVX2
    laptop there gets OpenVINO from auto as on Linux, and an ARM Mac stays on torch."""
    missing = str(tmp_path / "no-cpuinfo")
    info = backends.cpu_info(missing, capability=lambda: "AVX2")
    assert "avx2" in info.flags
    assert "avx512f" in backends.cpu_info(missing, capability=lambda: "AVX512").flags
    assert backends.cpu_info(missing, capability=lambda: "DEFAULT").flags == frozenset()
    x86 = backends.CpuInfo("amd64", "Intel64 Family 6", info.flags)  # what platform.machine() says on Windows
    assert choose("auto", "cpu", "fp32", x86, lambda name: True) == ("openvino", None)


def _reference(model, sep_fixture):
    x = torch.from_numpy(sep_fixture["mixture"])[None]
    c = torch.from_numpy(sep_fixture["condition"])
    return x, c


def test_a_backend_that_fails_to_load_leaves_torch_with_a_warning(model, sep_fixture):
    warnings: list[str] = []

    def broken(name, ss_model):
        raise RuntimeError("no such runtime here")

    assert use_backend(model, "openvino", cpu=XEON, installed=everything, warn=warnings.append, build=broken) == "torch"
    assert model.backend == "torch" and model.ss_model.body_runner is None
    assert len(warnings) == 1 and "no such runtime here" in warnings[0] and "using torch" in warnings[0]
    x, c = _reference(model, sep_fixture)
    y = model.separate(x, c)[0].numpy()
    assert np.abs(y - sep_fixture["out_torchlibrosa"]).max() <= 5e-5 * np.abs(sep_fixture["out_torchlibrosa"]).max()


def test_a_backend_that_fails_in_a_job_falls_back_for_good(model, sep_fixture):
    warnings: list[str] = []
    calls = []

    class FailsOnFirstShape:
        name = "flaky"

        def __call__(self, x, condition):
            calls.append(tuple(x.shape))
            raise RuntimeError("cannot compile this shape")

    try:
        assert attach(model, "flaky", warnings.append, build=lambda name, ss: FailsOnFirstShape()) == "flaky"
        assert model.backend == "flaky"
        x, c = _reference(model, sep_fixture)
        y = model.separate(x, c)[0].numpy()
        assert model.backend == "torch" and model.ss_model.body_runner is None
        assert len(calls) == 1 and len(warnings) == 1 and "continuing on torch" in warnings[0]
        ref = sep_fixture["out_torchlibrosa"]
        assert np.abs(y - ref).max() <= 5e-5 * np.abs(ref).max()
    finally:
        attach(model, "torch", warnings.append)


# ---- OpenVINO itself ---------------------------------------------------------------------------


@pytest.mark.numerics
def test_openvino_body_is_the_torch_body(model, openvino_model):
    """The same function, input to maps, at two window lengths (two compiled shapes)."""
    g = torch.Generator().manual_seed(3)
    condition = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1)
    runner = openvino_model.ss_model.body_runner
    for frames in (64, 320):
        x = torch.rand(1, 1, frames, 1024, generator=g) * 3
        with torch.inference_mode():
            expected = model.ss_model.body_with_film(x, condition)
        actual = runner(x, condition)
        assert actual.dtype == torch.float32
        assert_same_function(actual, expected)


def test_openvino_compiles_in_strict_fp32_once_per_shape(openvino_model):
    runner = openvino_model.ss_model.body_runner.runner
    first, _ = runner.compiled_for((1, 1, 32, 1024))
    assert str(first.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")
    assert runner.compiled_for((1, 1, 32, 1024))[0] is first


def test_openvino_keeps_one_compiled_shape_at_a_time(openvino_model):
    """Each compiled shape holds its whole activation plan: a new shape frees the old one first,
    so a file's two window shapes never sit in memory together (the CPU memory target)."""
    runner = openvino_model.ss_model.body_runner.runner
    runner.compiled_for((1, 1, 32, 1024))
    runner.compiled_for((1, 1, 64, 1024))
    assert list(runner.compiled) == [(1, 1, 64, 1024)]


def test_the_export_is_cached_by_weights_and_versions(model, tmp_path):
    from dsu_audiosep.engine import backend_openvino as bo

    runtime = bo.runtime_version()
    key = bo.weights_key(model.ss_model, runtime)
    assert bo.weights_key(model.ss_model, runtime) == key
    assert bo.weights_key(model.ss_model, runtime + "-other") != key
    changed = copy.deepcopy(model.ss_model)
    with torch.no_grad():
        changed.base.decoder_block3.conv_block2.conv2.weight[0, 0, 0, 0] += 1e-3
    assert bo.weights_key(changed, runtime) != key

    first = bo.OpenVinoBody(model.ss_model, tmp_path)
    ir = tmp_path / f"{key}.xml"
    assert ir.exists() and ir.with_suffix(".bin").exists()
    weights = ir.with_suffix(".bin")
    written = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    second = bo.OpenVinoBody(model.ss_model, tmp_path)  # reads the IR back: no second export
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == written
    x = torch.rand(1, 1, 32, 1024)
    c = torch.nn.functional.normalize(torch.rand(1, 512), dim=-1)
    assert_same_function(second(x, c), first(x, c))
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left over


def test_the_export_cache_keeps_the_most_recently_used(model, tmp_path):
    """About 100 MB per export: the cache keeps the last few models, not every one ever loaded,
    and no compiled blobs at all (a 100 MB blob per window shape is what CACHE_DIR would write)."""
    from dsu_audiosep.engine import backend_openvino as bo

    for i in range(bo.KEPT_EXPORTS + 2):
        for suffix in (".xml", ".bin"):
            old = tmp_path / f"old{i}{suffix}"
            old.write_text("an export of another model")
            os.utime(old, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / "compiled" / "native").mkdir(parents=True)
    runner = bo.OpenVinoBody(model.ss_model, tmp_path)
    runner(torch.rand(1, 1, 32, 1024), torch.nn.functional.normalize(torch.rand(1, 512), dim=-1))
    kept = sorted(p.name for p in tmp_path.glob("*.xml"))
    newest_old = [f"old{i}.xml" for i in range(bo.KEPT_EXPORTS + 1, 2, -1)]
    assert kept == sorted([runner.ir_path.name] + newest_old)
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == sorted(k[:-4] + ".bin" for k in kept)
    assert not (tmp_path / "compiled").exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix not in (".xml", ".bin")] == []


def test_plain_install_brings_the_cpu_backend_on_x86_64_only():
    """`pip install dsu-audiosep` runs what the frozen bundle runs on x86-64 Linux and Windows;
    arm64 and macOS never download OpenVINO (the torch body runs there)."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    openvino = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "openvino"]
    assert len(openvino) == 1 and openvino[0].marker is not None
    where = {("x86_64", "linux"): True, ("AMD64", "win32"): True, ("aarch64", "linux"): False,
             ("arm64", "darwin"): False, ("x86_64", "darwin"): False}
    for (machine, system), expected in where.items():
        assert openvino[0].marker.evaluate({"platform_machine": machine, "sys_platform": system}) is expected, (machine, system)
