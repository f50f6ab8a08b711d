"""Audio queries through the worker, over real pipes (also run against the frozen binary by
scripts/test.sh): query_audio / spans / lists / query_weight / query_embedding on separate, the embed
command, load_audio_branch, converted folders, and every error code, the worker serving on."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from worker_client import WorkerClient, worker_argv

RNG = np.random.default_rng(12)


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def files(tmp_path_factory, fixtures_dir):
    d = tmp_path_factory.mktemp("aq")
    fx = np.load(fixtures_dir / "public" / "audio_query_3p3s.npz")
    out = {"fixture_embedding": fx["embedding"]}
    sf.write(d / "q48.wav", fx["waveform48k"], 48000, subtype="FLOAT")
    out["q48"] = d / "q48.wav"
    other = (0.3 * np.sin(2 * np.pi * 220 * np.arange(48000 * 2) / 48000)).astype(np.float32)
    sf.write(d / "tone48.wav", other, 48000, subtype="FLOAT")
    out["tone48"] = d / "tone48.wav"
    long = (0.2 * RNG.standard_normal(48000 * 25)).astype(np.float32)
    sf.write(d / "long48.wav", long, 48000, subtype="FLOAT")
    out["long48"], out["long"] = d / "long48.wav", long
    sf.write(d / "crop48.wav", long[48000 * 7:48000 * 17], 48000, subtype="FLOAT")  # exactly 10 s
    out["crop48"] = d / "crop48.wav"
    x32 = (0.25 * RNG.standard_normal(32000 * 2)).astype(np.float32)
    sf.write(d / "q32.wav", x32, 32000, subtype="FLOAT")
    out["q32"], out["x32"] = d / "q32.wav", x32
    sf.write(d / "silent.wav", np.zeros(48000, np.float32), 48000, subtype="FLOAT")
    out["silent"] = d / "silent.wav"
    mix = (0.1 * RNG.standard_normal(32000 * 2)).astype(np.float32)
    sf.write(d / "mix.wav", mix, 32000)
    out["mix"] = d / "mix.wav"
    (d / "not_audio.wav").write_text("this is not audio")
    out["not_audio"] = d / "not_audio.wav"
    (d / "empty.wav").write_bytes(b"")
    out["empty"] = d / "empty.wav"
    out["dir"] = d
    return out


@pytest.fixture(scope="module")
def worker(model_files):
    client = WorkerClient(worker_argv())
    client.wait_ready()
    reply = client.request({"cmd": "load_model", "checkpoint_path": str(model_files["checkpoint_path"]),
                            "roberta_dir": str(model_files["roberta_dir"]), "device": "cpu"})
    assert reply["status"] == "model_loaded", reply
    yield client
    client.assert_all_json()
    client.kill()


def embed(worker, **fields) -> np.ndarray:
    reply = worker.request({"cmd": "embed", "id": "e", **fields})
    assert reply["status"] == "embedding" and reply["id"] == "e", reply
    v = np.asarray(reply["embedding"], np.float64)
    assert v.shape == (512,) and abs(np.linalg.norm(v) - 1) < 1e-5
    return v


@pytest.mark.numerics
def test_embed_48k_file_matches_the_original_fixture(worker, files):
    v = embed(worker, query_audio=str(files["q48"]))
    assert np.abs(v - files["fixture_embedding"]).max() <= 1e-5


@pytest.mark.numerics
def test_32k_file_goes_through_the_sinc_chain(worker, files, model):
    """A 32 kHz query is brought to 48 kHz by the windowed-sinc formula (evaluated here directly
    in float64) before the encoder: same embedding within float noise."""
    import torch

    from dsu_audiosep.model.audio_query import repeatpad
    from test_audio_query import _direct_sinc

    v = embed(worker, query_audio=str(files["q32"]))
    x = files["x32"]
    y = torch.tensor(_direct_sinc(x, 2, 3, (3 * x.size + 1) // 2), dtype=torch.float32)
    ref = model.embed_audio(repeatpad(y)[None])[0].numpy()
    assert np.abs(v - ref).max() <= 1e-5


@pytest.mark.numerics
def test_span_equals_the_cropped_file_and_a_long_clip_is_windowed(worker, files, model):
    """A 10 s span is embedded like the 10 s crop itself (no padding), the crop the original would
    embed; the whole 25 s clip is the normalised mean of windows at 0, 10 and 15 s."""
    import torch

    span = embed(worker, query_audio=str(files["long48"]), query_start=7.0, query_end=17.0)
    crop = embed(worker, query_audio=str(files["crop48"]))
    assert np.abs(span - crop).max() <= 1e-5
    whole = embed(worker, query_audio=str(files["long48"]))
    long = torch.from_numpy(files["long"])
    wins = [model.embed_audio(long[s * 48000:(s + 10) * 48000][None])[0].numpy() for s in (0, 10, 15)]
    assert np.abs(whole - unit(np.mean(wins, axis=0))).max() <= 1e-5
    assert np.abs(whole - span).max() > 1e-3  # a different clip: a different embedding


@pytest.mark.numerics
def test_lists_average_and_weight_mixes_with_text(worker, files):
    a = embed(worker, query_audio=str(files["q48"]))
    b = embed(worker, query_audio=str(files["tone48"]))
    both = embed(worker, query_audio=[str(files["q48"]), str(files["tone48"])])
    assert np.abs(both - unit(a + b)).max() <= 1e-5
    t = embed(worker, text="a dog barking")
    for w in (0.0, 0.25, 1.0):
        mixed = embed(worker, text="a dog barking", query_audio=str(files["q48"]), query_weight=w)
        assert np.abs(mixed - unit(w * a + (1 - w) * t)).max() <= 1e-5
    assert np.abs(embed(worker, text="a dog barking", query_audio=str(files["q48"])) - unit(a + t)).max() <= 1e-5


def test_silent_query_is_valid(worker, files):
    v = embed(worker, query_audio=str(files["silent"]))
    assert np.isfinite(v).all()


def test_separate_with_audio_query_equals_separate_with_its_embedding(worker, files):
    d = files["dir"]
    a = worker.request({"cmd": "separate", "input": str(files["mix"]), "output": str(d / "by_audio.wav"),
                        "query_audio": str(files["q48"]), "output_sr": "input"})
    assert a["status"] == "done", a
    v = embed(worker, query_audio=str(files["q48"]))
    b = worker.request({"cmd": "separate", "input": str(files["mix"]), "output": str(d / "by_vec.wav"),
                        "query_embedding": list(v * 3.0), "output_sr": "input"})  # any scale: normalised
    assert b["status"] == "done", b
    t = worker.request({"cmd": "separate", "input": str(files["mix"]), "output": str(d / "by_text.wav"),
                        "output_sr": "input"})
    ya, yb, yt = (sf.read(d / n, dtype="float32")[0] for n in ("by_audio.wav", "by_vec.wav", "by_text.wav"))
    assert np.abs(ya - yb).max() <= 2 / 32768  # the same condition, within one 16-bit step of rounding
    assert np.abs(ya - yt).max() > 2 / 32768  # the default text query is another condition


def test_stems_take_audio_queries_and_embeddings(worker, files):
    """``queries`` entries use the same query fields as a plain separate: each stem equals the
    single job with the same query; a wrong stem query names its index and writes nothing."""
    d = files["dir"]
    v = embed(worker, query_audio=str(files["tone48"]))
    stems = [{"query_audio": str(files["q48"]), "output": str(d / "stem_audio.wav")},
             {"query_embedding": list(v), "output": str(d / "stem_vec.wav")},
             {"text": "piano", "query_audio": str(files["q48"]), "query_weight": 0.25, "output": str(d / "stem_mix.wav")}]
    reply = worker.request({"cmd": "separate", "input": str(files["mix"]), "queries": stems, "output_sr": "input",
                            "output_subtype": "FLOAT"})
    assert reply["status"] == "done", reply
    assert [q["file"] for q in reply["queries"]] == [s["output"] for s in stems]
    for i, stem in enumerate(stems):
        single = {k: v for k, v in stem.items() if k != "output"}
        r = worker.request({"cmd": "separate", "input": str(files["mix"]), "output": str(d / f"single_{i}.wav"),
                            "output_sr": "input", "output_subtype": "FLOAT", **single})
        assert r["status"] == "done", r
        got, want = (sf.read(p, dtype="float32")[0] for p in (stem["output"], d / f"single_{i}.wav"))
        assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1e-6)
    bad = [{"text": "x", "output": str(d / "never_a.wav")},
           {"query_embedding": [0.1] * 511, "output": str(d / "never_b.wav")}]
    err = worker.request({"cmd": "separate", "input": str(files["mix"]), "queries": bad})
    assert err["status"] == "error" and err["code"] == "invalid_query" and '"queries"[1]' in err["message"], err
    assert not (d / "never_a.wav").exists() and not (d / "never_b.wav").exists()
    assert worker.request({"cmd": "ping"})["status"] == "pong"


def test_changed_file_is_embedded_again(worker, files):
    p = files["dir"] / "changing.wav"
    sf.write(p, np.sin(np.arange(48000) * 0.05).astype(np.float32), 48000, subtype="FLOAT")
    first = embed(worker, query_audio=str(p))
    assert np.abs(embed(worker, query_audio=str(p)) - first).max() == 0  # cached: the same value
    sf.write(p, np.sin(np.arange(48001) * 0.3).astype(np.float32), 48000, subtype="FLOAT")
    assert np.abs(embed(worker, query_audio=str(p)) - first).max() > 1e-4


BAD = [
    ("missing file", {"query_audio": "/nonexistent/q.wav"}, "file_not_found"),
    ("not audio", {"query_audio": "{not_audio}"}, "invalid_audio"),
    ("empty file", {"query_audio": "{empty}"}, "invalid_audio"),
    ("a folder", {"query_audio": "{dir}"}, "invalid_audio"),
    ("span past the end", {"query_audio": "{q48}", "query_start": 1.0, "query_end": 9.0}, "invalid_query"),
    ("start past the end", {"query_audio": "{q48}", "query_start": 5.0}, "invalid_query"),
    ("end before start", {"query_audio": "{q48}", "query_start": 2.0, "query_end": 1.0}, "invalid_query"),
    ("span with a list", {"query_audio": ["{q48}", "{tone48}"], "query_start": 0.5}, "invalid_query"),
    ("empty list", {"query_audio": []}, "invalid_query"),
    ("list of non-paths", {"query_audio": [1, 2]}, "invalid_field"),
    ("weight above 1", {"text": "x", "query_audio": "{q48}", "query_weight": 1.5}, "invalid_field"),
    ("weight below 0", {"query_audio": "{q48}", "query_weight": -0.1}, "invalid_field"),
    ("embedding too short", {"query_embedding": [0.1] * 511}, "invalid_query"),
    ("embedding too long", {"query_embedding": [0.1] * 513}, "invalid_query"),
    ("embedding with infinity", {"query_embedding": ["__1e999__"] + [0.0] * 511}, "invalid_query"),
    ("embedding with a huge integer", {"query_embedding": [10 ** 400] + [0] * 511}, "invalid_field"),
    ("embedding all zeros", {"query_embedding": [0] * 512}, "invalid_query"),
    ("embedding of strings", {"query_embedding": ["a"] * 512}, "invalid_field"),
    ("embedding and audio", {"query_embedding": [0.1] * 512, "query_audio": "{q48}"}, "invalid_query"),
    ("embedding and text", {"query_embedding": [0.1] * 512, "text": "dog"}, "invalid_query"),
]


def _fill(value, files):
    if isinstance(value, str):
        return value.format(**{k: str(v) for k, v in files.items() if k in ("not_audio", "empty", "dir", "q48", "tone48")})
    if isinstance(value, list):
        return [_fill(v, files) for v in value]
    return value


@pytest.mark.parametrize("cmd", ["embed", "separate"])
@pytest.mark.parametrize("what,fields,code", BAD, ids=[b[0] for b in BAD])
def test_bad_query_is_a_clear_error_and_the_worker_serves_on(worker, files, cmd, what, fields, code):
    line = {"cmd": cmd, "id": what, **{k: _fill(v, files) for k, v in fields.items()}}
    if cmd == "separate":
        line.update(input=str(files["mix"]), output=str(files["dir"] / "never.wav"))
    # 1e999 is valid JSON that parses to infinity; it is written into the line as is.
    worker.send_bytes(json.dumps(line).replace('"__1e999__"', "1e999").encode() + b"\n")
    reply, _ = worker.read_reply()
    assert reply["status"] == "error" and reply["code"] == code and reply["id"] == what, reply
    assert isinstance(reply["message"], str) and reply["message"]
    assert not (files["dir"] / "never.wav").exists()
    assert worker.request({"cmd": "ping"})["status"] == "pong"


def test_checkpoint_without_the_audio_branch(tmp_path, files):
    """A checkpoint holding only what text queries need: text works, audio is no_audio_branch."""
    from dsu_audiosep.demo.model_files import write_audiosep_checkpoint, write_roberta_dir

    ckpt = write_audiosep_checkpoint(tmp_path / "text_only.ckpt")
    with WorkerClient(worker_argv()) as w:
        w.wait_ready()
        assert w.request({"cmd": "load_model", "checkpoint_path": str(ckpt), "device": "cpu",
                          "roberta_dir": str(write_roberta_dir(tmp_path / "rb"))})["status"] == "model_loaded"
        assert w.request({"cmd": "embed", "text": "dog"})["status"] == "embedding"
        reply = w.request({"cmd": "embed", "query_audio": str(files["q48"])})
        assert reply["status"] == "error" and reply["code"] == "no_audio_branch", reply
        assert str(ckpt) in reply["message"]
        assert w.request({"cmd": "ping"})["status"] == "pong"


def test_embed_needs_a_model_and_load_audio_branch_loads_it(model_files, files):
    with WorkerClient(worker_argv()) as w:
        w.wait_ready()
        reply = w.request({"cmd": "embed", "query_audio": str(files["q48"])})
        assert reply["status"] == "error" and reply["code"] == "model_not_loaded"
        loaded = w.request({"cmd": "load_model", "checkpoint_path": str(model_files["checkpoint_path"]),
                            "roberta_dir": str(model_files["roberta_dir"]), "device": "cpu",
                            "load_audio_branch": True})
        assert loaded["status"] == "model_loaded", loaded
        v = embed(w, query_audio=str(files["q48"]))
        assert np.abs(v - files["fixture_embedding"]).max() <= 1e-5


@pytest.mark.parametrize("with_branch", [True, False])
def test_converted_folder_with_and_without_the_branch(tmp_path, model_files, files, with_branch):
    from dsu_audiosep.model.convert import convert

    out = convert(checkpoint_path=str(model_files["checkpoint_path"]), roberta_dir=str(model_files["roberta_dir"]),
                  out_dir=str(tmp_path / "fast"), with_audio_branch=with_branch)
    assert (out / "audio_encoder.safetensors").exists() == with_branch
    with WorkerClient(worker_argv()) as w:
        w.wait_ready()
        assert w.request({"cmd": "load_model", "model_dir": str(out), "device": "cpu"})["status"] == "model_loaded"
        reply = w.request({"cmd": "embed", "id": 1, "query_audio": str(files["q48"])})
        if with_branch:
            assert reply["status"] == "embedding", reply
            assert np.abs(np.asarray(reply["embedding"]) - files["fixture_embedding"]).max() <= 1e-5
        else:
            assert reply["status"] == "error" and reply["code"] == "no_audio_branch", reply
        assert w.request({"cmd": "embed", "text": "dog"})["status"] == "embedding"
