"""The memory budget (engine/memory.py, resolve.fit_memory): every command's windows fit it.

Planning (no model): a full pass over the budget becomes windows with the parity context and a
warning; chunked jobs are shortened; bad values are invalid_field. Through the worker over pipes:
``use_chunk: false`` on a file longer than a small budget allows is delivered in windows, says so,
stays within 1e-5 of the full pass's peak, and the worker's peak RSS stays under the budget.
"""
from __future__ import annotations

import sys
import time
import types

import numpy as np
import pytest

from dsu_audiosep.engine import memory, resolve
from dsu_audiosep.errors import INVALID_FIELD, AudioSepError
from dsu_audiosep.model.constants import GRID, SAMPLE_RATE
from dsu_audiosep.worker import protocol as P
from dsu_audiosep.worker.policy import Settings

from test_worker import load
from worker_client import WorkerClient, worker_argv


def info(seconds, channels=2):
    return types.SimpleNamespace(frames=int(seconds * 44100), samplerate=44100, channels=channels, duration=seconds)


def plan(seconds, backend="openvino", device="cpu", **fields):
    load = resolve.plan_load(P.LoadModelArgs(device=device), Settings(sources={}), lambda name: name)
    job = P.SeparateArgs(input="in.wav", output="out.wav", **fields)
    return resolve.fit_memory(resolve.plan_requested_job(job, load, lambda path: info(seconds)), backend)


def window_seconds(p):
    return memory.window_s(p.chunk_length, p.options.context_seconds)


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_full_pass_within_the_budget_stays_a_full_pass(backend):
    p = plan(8.0, backend, use_chunk=False)
    assert p.memory_budget == memory.DEFAULT_CPU_BUDGET_MIB and not p.chunked and not p.warnings


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_full_pass_over_the_budget_becomes_windows_with_the_parity_context(backend):
    p = plan(60.0, backend, use_chunk=False)
    assert p.chunked and p.options.context_seconds >= memory.PARITY_CONTEXT_S
    assert memory.peak_mib(backend, window_seconds(p)) <= memory.DEFAULT_CPU_BUDGET_MIB
    assert any("use_chunk false" in w and "memory_budget" in w for w in p.warnings), p.warnings
    # the longest windows that fit: one more grid block would not
    longer = memory.window_s(p.chunk_length + GRID / SAMPLE_RATE, p.options.context_seconds)
    assert memory.peak_mib(backend, longer) > memory.DEFAULT_CPU_BUDGET_MIB


def test_a_job_budget_overrides_the_load_and_bounds_auto_chunking():
    small = plan(20.0, use_chunk="auto", memory_budget=1200)  # under chunk_seconds: a full pass was asked
    assert small.chunked and small.memory_budget == 1200
    assert memory.peak_mib("openvino", window_seconds(small)) <= 1200
    default = plan(40.0, use_chunk=True)  # the default 9.6 s centres fit 2048 MiB: unchanged, no warning
    assert default.chunk_length == resolve.CPU_CHUNK_LENGTH and not default.warnings


def test_budget_precedence_job_over_load_over_worker_setting():
    worker = Settings(memory_budget=1500.0, sources={"memory_budget": "env"})
    load = resolve.plan_load(P.LoadModelArgs(device="cpu"), worker, lambda n: n)
    job = resolve.plan_requested_job(P.SeparateArgs(input="a", output="b"), load, lambda p: info(5.0))
    assert load.memory_budget == 1500 and job.memory_budget == 1500
    load = resolve.plan_load(P.LoadModelArgs(device="cpu", memory_budget=1700), worker, lambda n: n)
    job = resolve.plan_requested_job(P.SeparateArgs(input="a", output="b", memory_budget=1900), load, lambda p: info(5.0))
    assert load.memory_budget == 1700 and job.memory_budget == 1900


def test_chunk_length_over_the_budget_is_shortened_with_a_warning():
    p = plan(60.0, use_chunk=True, chunk_length=30.0, memory_budget=1500)
    assert p.chunk_length < 30.0 and memory.peak_mib("openvino", window_seconds(p)) <= 1500
    assert any("chunk_length 30" in w for w in p.warnings), p.warnings
    quiet = plan(60.0, use_chunk=True, memory_budget=1500)  # the default length: shortened silently
    assert quiet.chunk_length == p.chunk_length and not quiet.warnings


def test_a_budget_below_the_smallest_window_runs_the_smallest_windows_with_a_warning():
    p = plan(30.0, use_chunk=False, memory_budget=100)
    assert p.chunked and p.chunk_length == pytest.approx(GRID / SAMPLE_RATE)
    assert any("below" in w and "smallest window" in w for w in p.warnings), p.warnings


def test_cuda_keeps_its_free_memory_rule():
    load = resolve.plan_load(P.LoadModelArgs(device="cuda", memory_budget=100), Settings(sources={}), lambda n: n)
    assert resolve.cpu_budget(load.device, load.memory_budget) is None


@pytest.mark.parametrize("bad", [0, -5, "2048", float("inf"), True])
def test_bad_budgets_are_invalid_fields(bad):
    with pytest.raises(AudioSepError) as err:
        P.parse_object({"cmd": "separate", "input": "a.wav", "output": "b.wav", "memory_budget": bad})
    assert err.value.code == INVALID_FIELD and "memory_budget" in err.value.message


def test_windows_fitted_to_the_budget_are_grid_aligned_and_fit():
    for budget in (900, 1100, 1500, 2048, 4096):
        for backend in ("torch", "openvino"):
            for ctx in (0.0, 0.64, 1.92):
                longest = memory.longest_window_s(budget, backend)
                core = memory.core_for_window(longest, ctx)
                assert round(core * SAMPLE_RATE) % GRID == 0
                assert memory.window_s(core, ctx) <= max(longest, memory.window_s(GRID / SAMPLE_RATE, ctx)) + 1e-9


# --------------------------------------------------------------------------------------------
# Through the worker


def write_mono_32k(path, seconds):
    import soundfile as sf

    rng = np.random.default_rng(3)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    x = 0.2 * np.sin(2 * np.pi * 330 * t) * (np.sin(2 * np.pi * 0.7 * t) > 0) + 0.05 * rng.standard_normal(t.size)
    sf.write(str(path), x.astype(np.float32), SAMPLE_RATE, subtype="FLOAT")
    return path


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


SMALL_BUDGET = 1200  # MiB: an 8 s full pass does not fit on either backend (memory.COSTS)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the worker's VmHWM from /proc")
@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_use_chunk_false_over_a_small_budget_is_windowed_exact_and_bounded(backend, demo_model, tmp_path):  # noqa: F811
    import soundfile as sf

    if backend == "openvino":
        pytest.importorskip("openvino")
    src = write_mono_32k(tmp_path / "in.wav", 8.0)
    out = dict(output_sr="input", output_subtype="FLOAT", output_channels="input", text="a tone")
    client = WorkerClient(worker_argv())
    try:
        client.wait_ready()
        assert load(client, demo_model, backend=backend, memory_budget=SMALL_BUDGET)["backend"] == backend
        windowed = client.request({"cmd": "separate", "input": str(src), "output": str(tmp_path / "w.wav"),
                                   "use_chunk": False, **out}, timeout=600)
        assert windowed["status"] == "done" and windowed["chunked"] is True, windowed
        assert any("memory_budget" in w for w in windowed["warnings"]), windowed
        status = client.request({"cmd": "get_status"})
        peak = peak_rss_mib(client.proc.pid)
        assert status["memory_budget"] == SMALL_BUDGET and status["peak_rss_mib"] <= peak + 1
        assert peak <= SMALL_BUDGET, f"peak RSS {peak:.0f} MiB over the {SMALL_BUDGET} MiB budget"
        full = client.request({"cmd": "separate", "input": str(src), "output": str(tmp_path / "f.wav"),
                               "use_chunk": False, "memory_budget": 8192, **out}, timeout=600)
        assert full["status"] == "done" and full["chunked"] is False and not full.get("warnings"), full
    finally:
        client.kill()
    ref = sf.read(str(tmp_path / "f.wav"), dtype="float64")[0]
    got = sf.read(str(tmp_path / "w.wav"), dtype="float64")[0]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= memory.PARITY_ERROR * np.abs(ref).max()


def test_openvino_compiles_the_first_window_at_load_and_the_first_job_uses_it(demo_model, tmp_path):  # noqa: F811
    """load_model compiles, in the background, the first window of a file over the budget; a first
    job whose window has that shape then compiles nothing (get_status counts the compiles)."""
    pytest.importorskip("openvino")
    budget = 1400  # short windows keep the test short
    load_plan = resolve.plan_load(P.LoadModelArgs(device="cpu", memory_budget=budget), Settings(sources={}), lambda n: n)
    src = write_mono_32k(tmp_path / "first.wav", load_plan.first_window_seconds("openvino"))
    client = WorkerClient(worker_argv())
    try:
        client.wait_ready()
        assert load(client, demo_model, backend="openvino", memory_budget=budget)["backend"] == "openvino"
        deadline = time.monotonic() + 120
        while (status := client.request({"cmd": "get_status"}))["prepared"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status["compiles"] == status["prepared"] == 1, status
        done = client.request({"cmd": "separate", "input": str(src), "output": str(tmp_path / "o.wav"),
                               "use_chunk": False, "output_channels": "input"}, timeout=600)
        assert done["status"] == "done" and done["chunked"] is False, done
        assert client.request({"cmd": "get_status"})["compiles"] == 1  # the job compiled nothing
    finally:
        client.kill()
