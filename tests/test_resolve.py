"""engine/resolve.py: the per-device and "auto" decisions, and what the cache keys on."""
from __future__ import annotations

import types

import pytest

from dsu_audiosep.engine import resolve
from dsu_audiosep.worker import protocol as P
from dsu_audiosep.worker.cache import ModelKey
from dsu_audiosep.worker.policy import Settings


def devices(name):
    return {"auto": "cuda", None: "cuda"}.get(name, name)


def test_per_device_defaults_apply_only_when_nobody_chose():
    plan = resolve.plan_load(P.LoadModelArgs(), Settings(sources={}), devices)
    assert plan.device == "cuda" and plan.use_torch_stft is True  # torch.stft on CUDA
    plan = resolve.plan_load(P.LoadModelArgs(device="cpu"), Settings(sources={}), devices)
    assert plan.use_torch_stft is False and plan.stft_mode == "force" and plan.stft_value is False
    chosen = Settings(use_torch_stft=False, mmap=False, sources={"use_torch_stft": "env", "mmap": "policy"})
    plan = resolve.plan_load(P.LoadModelArgs(), chosen, devices)
    assert plan.use_torch_stft is False and plan.mmap is False  # a setting wins over the device


def info(seconds, channels=2):
    return types.SimpleNamespace(frames=int(seconds * 44100), samplerate=44100, channels=channels, duration=seconds)


@pytest.mark.parametrize("seconds,stft,chunked", [(10.0, False, False), (30.0, False, True), (61.0, True, True)])
def test_auto_stft_and_auto_chunking_from_one_probe(seconds, stft, chunked):
    load = resolve.plan_load(P.LoadModelArgs(device="cpu", use_torch_stft="auto"), Settings(sources={}), devices)
    job = P.SeparateArgs(input="in.wav", output="out.wav", use_chunk="auto")
    plan = resolve.plan_requested_job(job, load, lambda path: info(seconds))
    assert plan.use_torch_stft_mode == "auto" and plan.use_torch_stft is stft and plan.chunked is chunked
    assert plan.chunk_length == resolve.CPU_CHUNK_LENGTH


def test_unreadable_input_counts_as_short():
    load = resolve.plan_load(P.LoadModelArgs(device="cpu", use_torch_stft="auto"), Settings(sources={}), devices)
    plan = resolve.plan_requested_job(P.SeparateArgs(input="x", output="y", use_chunk="auto"), load, lambda p: None)
    assert plan.info is None and plan.use_torch_stft is False and plan.chunked is False


def test_converted_folder_is_cached_once_whatever_mmap_said():
    fields = dict(config_path=None, checkpoint_path=None, clap_checkpoint_path=None, roberta_dir=None,
                  device="cpu", precision="fp32")
    assert ModelKey(model_dir="/md", mmap=True, **fields) == ModelKey(model_dir="/md", mmap=False, **fields)
    ckpt = dict(fields, checkpoint_path="/a.ckpt", model_dir=None)
    assert ModelKey(mmap=True, **ckpt) != ModelKey(mmap=False, **ckpt)


@pytest.mark.parametrize("device,capability,expected", [
    ("cpu", None, "fp32"), ("mps", None, "fp32"),
    ("cuda", (7, 5), "fp32"),  # Turing: no TF32, fp32 is the only float32 mode
    ("cuda:1", (8, 0), resolve.TF32_GPU_DEFAULT_PRECISION), ("cuda", (9, 0), resolve.TF32_GPU_DEFAULT_PRECISION),
])
def test_default_precision_per_device(device, capability, expected):
    assert resolve.default_precision(device, capability) == expected


def test_precision_default_only_when_nobody_chose():
    asked = []

    def capability(device):
        asked.append(device)
        return (7, 0)  # a pre-Ampere GPU: whatever the TF32 default, this one runs fp32

    plan = resolve.plan_load(P.LoadModelArgs(), Settings(sources={}), devices, capability)
    assert plan.precision == "fp32" and asked == ["cuda"]
    chosen = Settings(precision="tf32", sources={"precision": "flag"})
    assert resolve.plan_load(P.LoadModelArgs(), chosen, devices, capability).precision == "tf32"
    assert resolve.plan_load(P.LoadModelArgs(precision="bf16"), chosen, devices, capability).precision == "bf16"
