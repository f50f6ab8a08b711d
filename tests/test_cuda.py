"""The CUDA path, driven as a user would. Skipped where no CUDA device exists (CI has none); run on
a GPU machine with ``python -m pytest tests/test_cuda.py``."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import snr_db

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SR = 32000
EXACT = dict(output_sr="input", output_subtype="FLOAT", output_channels="input")


def _peak_err(y, ref) -> float:
    return float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))


def _load(model_files, **kw):
    from dsu_audiosep.model.checkpoints import load_model

    return load_model(checkpoint_path=str(model_files["checkpoint_path"]), roberta_dir=str(model_files["roberta_dir"]),
                      device="cuda", **kw)


@pytest.fixture(scope="module")
def cuda_model(model_files):
    return _load(model_files)


def _signal(seconds: float, sr: int = SR, channels: int = 2, seed: int = 0) -> np.ndarray:
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    rng = np.random.default_rng(seed)
    chans = [0.3 * np.sin(2 * np.pi * (440 + 110 * c) * t) * np.sin(2 * np.pi * 0.5 * t) + 0.05 * rng.standard_normal(n)
             for c in range(channels)]
    return np.stack(chans, 1).astype(np.float32)


@pytest.mark.parametrize("use_torch_stft", [False, True])
def test_fp32_on_cuda_matches_the_original_even_with_torch_tf32_default(model_files, sep_fixture, use_torch_stft):
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's own default: "fp32" must not inherit it
    m = _load(model_files, use_torch_stft=use_torch_stft)
    y = m.separate(torch.from_numpy(sep_fixture["mixture"])[None].cuda(), torch.from_numpy(sep_fixture["condition"]))
    ref = sep_fixture["out_torchstft" if use_torch_stft else "out_torchlibrosa"]
    assert _peak_err(y[0].cpu().numpy(), ref) <= 5e-5
    assert torch.backends.cudnn.allow_tf32 is True  # restored after the pass


@pytest.mark.parametrize("precision,min_db", [("tf32", 40.0), ("fp16", 35.0), ("bf16", 20.0)])
def test_reduced_precisions_stay_close(model_files, sep_fixture, precision, min_db):
    m = _load(model_files, precision=precision)
    y = m.separate(torch.from_numpy(sep_fixture["mixture"])[None].cuda(), torch.from_numpy(sep_fixture["condition"]))
    y = y[0].float().cpu().numpy()
    assert np.isfinite(y).all()
    assert snr_db(sep_fixture["out_torchlibrosa"], y) >= min_db


def test_cuda_file_equals_cpu_file(cuda_model, model, tmp_path):
    from dsu_audiosep import separate_audio

    src = tmp_path / "in.wav"
    sf.write(src, _signal(12.0, 44100), 44100, subtype="FLOAT")
    separate_audio(cuda_model, str(src), "vocals", str(tmp_path / "gpu.wav"), output_subtype="FLOAT")
    separate_audio(model, str(src), "vocals", str(tmp_path / "cpu.wav"), output_subtype="FLOAT")
    a, _ = sf.read(tmp_path / "gpu.wav", dtype="float32")
    b, _ = sf.read(tmp_path / "cpu.wav", dtype="float32")
    assert a.shape == b.shape and snr_db(b, a) > 80


@pytest.mark.parametrize("chunk_length", [2.56, 10.0])
def test_chunked_equals_full_pass_on_cuda(cuda_model, tmp_path, chunk_length):
    from dsu_audiosep import separate_audio

    src = tmp_path / "in.wav"
    sf.write(src, _signal(40.0), SR, subtype="FLOAT")
    full = separate_audio(cuda_model, str(src), "vocals", str(tmp_path / "full.wav"), use_chunk=False, **EXACT)
    part = separate_audio(cuda_model, str(src), "vocals", str(tmp_path / "part.wav"), use_chunk=True, chunk_length=chunk_length, **EXACT)
    assert not full.chunked and part.chunked and part.windows >= 4
    a, _ = sf.read(tmp_path / "full.wav", dtype="float32")
    b, _ = sf.read(tmp_path / "part.wav", dtype="float32")
    assert snr_db(a, b) >= 60


def test_real_cuda_oom_retries_with_smaller_chunks(cuda_model, model, tmp_path):
    """Fill the GPU so that a 60 s window cannot fit: the engine must retry with shorter chunks."""
    from dsu_audiosep import separate_audio
    from dsu_audiosep.errors import AudioSepError

    src = tmp_path / "in.wav"
    sf.write(src, _signal(60.0), SR, subtype="FLOAT")
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(max(0, free - (3 << 30)), dtype=torch.uint8, device="cuda")  # leave ~3 GiB
    try:
        r = separate_audio(cuda_model, str(src), "vocals", str(tmp_path / "o.wav"), use_chunk=True, chunk_length=60.0, **EXACT)
        assert r.chunked and r.chunk_length < 60 and any("out of memory" in w for w in r.warnings)
        # Even the smallest chunk cannot fit in a few MB: a clean out_of_memory error, no output.
        torch.cuda.empty_cache()
        hog2 = torch.empty(max(0, torch.cuda.mem_get_info()[0] - (16 << 20)), dtype=torch.uint8, device="cuda")
        with pytest.raises(AudioSepError) as ei:
            separate_audio(cuda_model, str(src), "vocals", str(tmp_path / "never.wav"), use_chunk=True, chunk_length=60.0, **EXACT)
        assert ei.value.code == "out_of_memory" and not (tmp_path / "never.wav").exists()
        del hog2
    finally:
        del hog
        torch.cuda.empty_cache()
    a, _ = sf.read(tmp_path / "o.wav", dtype="float32")
    separate_audio(model, str(src), "vocals", str(tmp_path / "cpu.wav"), use_chunk=False, **EXACT)
    b, _ = sf.read(tmp_path / "cpu.wav", dtype="float32")
    assert snr_db(b, a) >= 60


def test_worker_on_cuda(model_files, tmp_path):
    from worker_client import WorkerClient

    src = tmp_path / "in.wav"
    sf.write(src, _signal(20.0, 44100), 44100)
    with WorkerClient() as w:
        w.wait_ready()
        r = w.request({"cmd": "load_model", "checkpoint_path": str(model_files["checkpoint_path"]),
                       "roberta_dir": str(model_files["roberta_dir"]), "device": "cuda", "precision": "tf32"})
        assert r["status"] == "model_loaded" and r["device"].startswith("cuda")
        assert r["use_torch_stft_value"] is True  # the per-device default: cuFFT is faster there
        r = w.request({"cmd": "separate", "input": str(src), "output": str(tmp_path / "out.wav"), "text": "vocals"})
        assert r["status"] == "done"
    y, sr = sf.read(tmp_path / "out.wav")
    assert sr == 44100 and y.shape == (20 * 44100, 2) and np.isfinite(y).all()
