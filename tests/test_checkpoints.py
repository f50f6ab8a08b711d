"""Loading the real checkpoint formats, their variants, and refusing wrong files with named errors."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from dsu_audiosep import build_audiosep
from conftest import assert_same_function
from dsu_audiosep.errors import AudioSepError
from dsu_audiosep.model.checkpoints import load_model

TEXT = "pigeons are cooing in the background"


def _load(files, **kw):
    args = dict(config_path=str(files["config_path"]), checkpoint_path=str(files["checkpoint_path"]),
                roberta_dir=str(files["roberta_dir"]), device="cpu")
    args.update(kw)
    return load_model(**args)


def _err(fn, code, *words):
    with pytest.raises(AudioSepError) as ei:
        fn()
    assert ei.value.code == code, ei.value.message
    for w in words:
        assert w in ei.value.message, ei.value.message
    return ei.value


@pytest.fixture(scope="module")
def base_sd(model_files):
    return torch.load(model_files["checkpoint_path"], mmap=True, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference_embedding(model):
    return model.embed_text(TEXT)


def _save(tmp_path, name, sd):
    p = tmp_path / name
    torch.save({"state_dict": sd}, p)
    return p


@pytest.mark.numerics
def test_mmap_and_plain_loads_agree(model_files, model, sep_fixture):
    plain = _load(model_files, mmap=False)
    x = torch.from_numpy(sep_fixture["mixture"][:64000])[None]
    c = model.embed_text("vocals")
    assert_same_function(plain.embed_text("vocals"), c)
    assert_same_function(plain.separate(x, c), model.separate(x, c))


def test_audiosep_copy_of_clap_wins_over_the_clap_file(model_files, base_sd, reference_embedding, tmp_path):
    clap = torch.load(model_files["clap_checkpoint_path"], weights_only=True)
    clap["state_dict"] = {k: (v * 2 if k.startswith("module.text_projection") else v) for k, v in clap["state_dict"].items()}
    other = tmp_path / "clap_other.pt"
    torch.save(clap, other)
    m = _load(model_files, clap_checkpoint_path=str(other))
    assert torch.allclose(m.embed_text(TEXT), reference_embedding, atol=1e-6)


def test_clap_file_supplies_the_text_branch_when_the_checkpoint_lacks_it(model_files, base_sd, reference_embedding, tmp_path):
    sep_only = _save(tmp_path, "sep_only.ckpt", {k: v for k, v in base_sd.items() if k.startswith("ss_model.")})
    m = _load(model_files, checkpoint_path=str(sep_only), clap_checkpoint_path=str(model_files["clap_checkpoint_path"]))
    assert torch.allclose(m.embed_text(TEXT), reference_embedding, atol=1e-6)
    _err(lambda: _load(model_files, checkpoint_path=str(sep_only)), "invalid_checkpoint", "text encoder is incomplete")


def test_with_and_without_legacy_position_ids(model_files, base_sd, reference_embedding, tmp_path):
    key = "query_encoder.model.text_branch.embeddings.position_ids"
    assert key in base_sd  # the released (transformers < 4.31) layout
    newer = _save(tmp_path, "newer.ckpt", {k: v for k, v in base_sd.items() if k != key})
    m = _load(model_files, checkpoint_path=str(newer))
    assert torch.allclose(m.embed_text(TEXT), reference_embedding, atol=1e-6)


def test_fork_torch_stft_checkpoint_loads_in_both_modes(model_files, fixtures_dir, sep_fixture, tmp_path):
    from dsu_audiosep.demo.model_files import write_audiosep_checkpoint

    p = write_audiosep_checkpoint(tmp_path / "fork.ckpt", manifest=fixtures_dir / "manifest_audiosep_ckpt.json", use_torch_stft=True)
    x = torch.from_numpy(sep_fixture["mixture"])[None]
    c = torch.from_numpy(sep_fixture["condition"])
    for use_t, ref in ((True, "out_torchstft"), (False, "out_torchlibrosa")):
        m = _load(model_files, checkpoint_path=str(p), use_torch_stft=use_t)
        y = m.separate(x, c)[0].numpy()
        assert np.abs(y - sep_fixture[ref]).max() <= 5e-5 * np.abs(sep_fixture[ref]).max()


def test_roberta_folder_weights_are_used_below_clap(model_files, base_sd, reference_embedding, tmp_path):
    from dsu_audiosep.demo.model_files import write_roberta_dir

    rdir = write_roberta_dir(tmp_path / "roberta-base", with_weights=True)
    # checkpoint with the projection but no RoBERTa: the folder supplies RoBERTa
    keep = {k: v for k, v in base_sd.items() if not k.startswith("query_encoder.model.text_branch.")}
    p = _save(tmp_path, "no_roberta.ckpt", keep)
    m = _load(model_files, checkpoint_path=str(p), roberta_dir=str(rdir))
    assert torch.allclose(m.embed_text(TEXT), reference_embedding, atol=1e-6)


# ---- wrong files ----------------------------------------------------------------------------

def test_clap_file_given_as_the_audiosep_checkpoint(model_files):
    e = _err(lambda: _load(model_files, checkpoint_path=str(model_files["clap_checkpoint_path"])), "invalid_checkpoint", "ss_model", "CLAP")
    assert str(model_files["clap_checkpoint_path"]) in e.message


def test_audiosep_file_given_as_the_clap_checkpoint(model_files):
    _err(lambda: _load(model_files, clap_checkpoint_path=str(model_files["checkpoint_path"])), "invalid_checkpoint", "not a CLAP checkpoint")


def test_truncated_checkpoint(model_files, tmp_path):
    p = tmp_path / "cut.ckpt"
    with open(model_files["checkpoint_path"], "rb") as f:
        p.write_bytes(f.read(50_000_000))
    for mm in (False, True):
        e = _err(lambda: _load(model_files, checkpoint_path=str(p), mmap=mm), "invalid_checkpoint", "truncated")
        assert str(p) in e.message


def test_garbage_empty_and_random_pickle(model_files, tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(4096))
    _err(lambda: _load(model_files, checkpoint_path=str(junk)), "invalid_checkpoint", str(junk))
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    _err(lambda: _load(model_files, checkpoint_path=str(empty)), "invalid_checkpoint", "empty")
    lst = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], lst)
    _err(lambda: _load(model_files, checkpoint_path=str(lst)), "invalid_checkpoint", "list")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"state_dict": {"a": 1}}))
    _err(lambda: _load(model_files, checkpoint_path=str(plain)), "invalid_checkpoint", str(plain))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('DSU_EVIL_MARKER', '/tmp/dsu_evil_marker')}",))


def test_malicious_pickle_is_refused_and_not_run(model_files, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("DSU_EVIL_MARKER", str(marker))
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, p)
    for mm in (False, True):
        _err(lambda: _load(model_files, checkpoint_path=str(p), mmap=mm), "unsafe_checkpoint", str(p), "trust_checkpoint")
    assert not marker.exists()


def test_missing_and_misshapen_keys_are_named(model_files, base_sd, tmp_path):
    gone = "ss_model.base.encoder_block3.conv_block1.conv2.weight"
    p = _save(tmp_path, "missing.ckpt", {k: v for k, v in base_sd.items() if k != gone})
    _err(lambda: _load(model_files, checkpoint_path=str(p)), "invalid_checkpoint", "missing", gone)
    bad = "ss_model.film.decoder_block2->conv_block2->beta1.weight"
    sd = dict(base_sd)
    sd[bad] = torch.zeros(7, 512)
    p2 = _save(tmp_path, "shape.ckpt", sd)
    _err(lambda: _load(model_files, checkpoint_path=str(p2)), "invalid_checkpoint", "wrong shape", bad)
    sd = dict(base_sd)
    sd["query_encoder.model.text_branch.encoder.layer.3.output.dense.weight"] = torch.zeros(3, 3)
    p3 = _save(tmp_path, "text_shape.ckpt", sd)
    _err(lambda: _load(model_files, checkpoint_path=str(p3)), "invalid_checkpoint", "layer.3.output.dense.weight")


def test_missing_paths_config_and_device(model_files, tmp_path):
    _err(lambda: _load(model_files, checkpoint_path=str(tmp_path / "nope.ckpt")), "file_not_found", "nope.ckpt")
    _err(lambda: _load(model_files, checkpoint_path=str(tmp_path)), "invalid_checkpoint", "folder")
    _err(lambda: _load(model_files, roberta_dir=str(tmp_path / "no_roberta")), "file_not_found", "no_roberta")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    _err(lambda: _load(model_files, config_path=str(bad_yaml)), "invalid_config", "bad.yaml")
    other = tmp_path / "other.yaml"
    other.write_text("model:\n  model_type: Demucs\n")
    _err(lambda: _load(model_files, config_path=str(other)), "invalid_config", "Demucs")
    _err(lambda: _load(model_files, device="tpu"), "device_unavailable", "tpu")
    if not torch.cuda.is_available():
        _err(lambda: _load(model_files, device="cuda"), "device_unavailable", "CUDA")
    _err(lambda: _load(model_files, precision="int8"), "invalid_field", "precision")


def test_build_audiosep_signature_matches_the_seed(model_files):
    m = build_audiosep(str(model_files["config_path"]), str(model_files["checkpoint_path"]), "cpu", False,
                       None, str(model_files["roberta_dir"]), False)
    assert m.device.type == "cpu" and not m.use_torch_stft


def test_roberta_folder_is_found_beside_the_checkpoint_or_in_the_hf_cache(model_files, tmp_path, monkeypatch, reference_embedding):
    import shutil

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    ckpt = tmp_path / "ckpt" / "audiosep.ckpt"
    ckpt.parent.mkdir()
    os.link(model_files["checkpoint_path"], ckpt)  # a hard link: "beside the checkpoint" must not find the original folder
    _err(lambda: load_model(checkpoint_path=str(ckpt)), "file_not_found", "roberta_dir")
    snap = tmp_path / "hf" / "hub" / "models--roberta-base" / "snapshots" / "abc123"
    shutil.copytree(model_files["roberta_dir"], snap)
    m = load_model(checkpoint_path=str(ckpt))
    assert m.sources["roberta_dir"] == str(snap)
    shutil.copytree(model_files["roberta_dir"], ckpt.parent / "roberta-base")
    m = load_model(checkpoint_path=str(ckpt))
    assert m.sources["roberta_dir"] == str(ckpt.parent / "roberta-base")
    assert torch.allclose(m.embed_text(TEXT), reference_embedding, atol=1e-6)
