"""The converted fast-loading folder: same model, safetensors only, clear errors for broken folders."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import assert_same_function
from dsu_audiosep.errors import AudioSepError
from dsu_audiosep.model.checkpoints import load_model


@pytest.fixture(scope="module")
def converted(model_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "audiosep-fast"
    proc = subprocess.run(
        [sys.executable, "-m", "dsu_audiosep", "convert", "--checkpoint", str(model_files["checkpoint_path"]),
         "--roberta-dir", str(model_files["roberta_dir"]), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reply["status"] == "done" and reply["model_dir"] == str(out)
    yield out
    shutil.rmtree(out, ignore_errors=True)  # 628 MB: gone with the module, not at the session's end


@pytest.mark.numerics
def test_converted_folder_is_the_same_model(converted, model, sep_fixture):
    assert sorted(p.name for p in converted.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    m = load_model(model_dir=str(converted), device="cpu")
    x = torch.from_numpy(sep_fixture["mixture"][:48000])[None]
    c = model.embed_text("a dog barking")
    assert_same_function(m.embed_text("a dog barking"), c)
    assert_same_function(m.separate(x, c), model.separate(x, c))
    t = load_model(model_dir=str(converted), use_torch_stft=True)
    assert t.use_torch_stft and torch.allclose(t.separate(x, c), model.separate(x, c), atol=5e-6)


@pytest.mark.numerics
def test_fp16_storage_is_close(model_files, model, sep_fixture, tmp_path):
    from dsu_audiosep.model.convert import convert

    out = convert(checkpoint_path=str(model_files["checkpoint_path"]), roberta_dir=str(model_files["roberta_dir"]),
                  out_dir=str(tmp_path / "half"), fp16=True)
    m = load_model(model_dir=str(out))
    assert m.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(m.embed_text("rain"), model.embed_text("rain"), dim=0) > 0.999


def test_broken_converted_folders(converted, tmp_path):
    for name, make in {
        "empty": lambda d: None,
        "badjson": lambda d: (d / "config.json").write_text("{not json") or (d / "model.safetensors").write_bytes(b"x"),
        "truncated": lambda d: ((d / "config.json").write_text((converted / "config.json").read_text()),
                                (d / "model.safetensors").write_bytes((converted / "model.safetensors").read_bytes()[:10_000_000])),
    }.items():
        d = tmp_path / name
        d.mkdir()
        make(d)
        with pytest.raises(AudioSepError) as ei:
            load_model(model_dir=str(d))
        assert ei.value.code == "invalid_checkpoint" and str(d) in ei.value.message, ei.value.message
    with pytest.raises(AudioSepError) as ei:
        load_model(model_dir=str(tmp_path / "nowhere"))
    assert ei.value.code == "file_not_found"
