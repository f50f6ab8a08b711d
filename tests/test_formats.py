"""Formats beyond libsndfile (issue 24): AAC, ALAC, Opus in WebM, FLAC in Matroska, WMA, AC-3, video
soundtracks in; MP3, Opus, M4A out. Files are made here with PyAV's own encoders from a known
signal (CI has no ffmpeg program), once per module; short signals keep the module fast.

Lengths: an MP4 track's declared length is the file's length (priming and padding trimmed);
elsewhere, what FFmpeg decodes (counted here with PyAV directly, as the reference).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bad_inputs as bad
from dsu_audiosep import errors as E
from dsu_audiosep.engine import audio_read, audio_write, output_options
from dsu_audiosep.errors import AudioSepError

av = pytest.importorskip("av")

SR = 48000  # a rate every codec here codes (Opus only 8/12/16/24/48 kHz)
N = 72_500  # not a multiple of any codec's frame size (1024, 960, 1536, 4096)


def _signal() -> np.ndarray:
    """[N, 2]: two tones and a little noise, exactly representable in 16 bits (for the lossless ones)."""
    x = bad.tone(N, SR, 2, amp=0.4) + bad.noise(N, 2, amp=0.02, seed=3)
    return (np.round(x * 32768) / 32768).astype(np.float32)


# name -> (file name, codec, container, encode keywords)
LOSSLESS = {
    "alac-m4a": ("alac.m4a", "alac", "mp4", {"sample_format": "s16p"}),
    "flac-mkv": ("flac.mkv", "flac", "matroska", {"sample_format": "s16"}),
}
LOSSY = {
    "aac-m4a": ("aac.m4a", "aac", "mp4", {}),
    "aac-adts": ("adts.aac", "aac", "adts", {}),
    "opus-webm": ("opus.webm", "libopus", "webm", {}),
    # FFmpeg's own Vorbis encoder (the wheel has no libvorbis) is marked experimental
    "vorbis-webm": ("vorbis.webm", "vorbis", "webm", {"options": {"strict": "experimental"}}),
    "wma": ("wma.wma", "wmav2", "asf", {"bit_rate": 128000}),
    "ac3": ("ac3.ac3", "ac3", "ac3", {}),
    "eac3": ("eac3.eac3", "eac3", "eac3", {}),
    "aac-mov": ("aac.mov", "aac", "mov", {}),
    "mp4-video": ("video.mp4", "aac", "mp4", {"video": True}),
    "mkv-video": ("video.mkv", "libopus", "matroska", {"video": True}),
    "avi-video": ("video.avi", "ac3", "avi", {"video": True}),
}
# Aligned with the source (priming trimmed by the container), so an SNR against it means something.
ALIGNED = {"aac-m4a", "opus-webm", "vorbis-webm", "aac-mov", "mp4-video", "mkv-video"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    x = _signal()
    out = {"source": bad.write_audio(d / "source.wav", x, SR)}
    for name, (fname, codec, fmt, kw) in {**LOSSLESS, **LOSSY}.items():
        out[name] = bad.encode_av(d / fname, x, SR, codec, fmt, **kw)
    out["two-streams"] = bad.encode_av(d / "two.mkv", x, SR, "libopus", "matroska", streams=2)
    return out


def _ffmpeg_decodes(path) -> int:
    with av.open(str(path)) as c:
        s = c.streams.best("audio")
        return sum(f.samples for f in c.decode(s))


def _declared(path) -> int | None:
    with av.open(str(path)) as c:
        s = c.streams.best("audio")
        if "mov" in c.format.name and s.duration:
            return int(round(s.duration * s.time_base * s.codec_context.sample_rate))
    return None


def snr_db(ref: np.ndarray, est: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - est).astype(np.float64) ** 2)))


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_is_sample_exact(files, name):
    y, sr = audio_read.read_audio(files[name])
    src, _ = audio_read.read_audio(files["source"])
    assert sr == SR and y.shape == src.shape
    assert np.max(np.abs(y - src)) <= 1e-5


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_lossy_length_and_quality(files, name):
    info = audio_read.probe(files[name])
    declared = _declared(files[name])
    expected = declared if declared is not None else _ffmpeg_decodes(files[name])
    assert abs(info.frames - expected) <= SR // 1000  # within 1 ms
    if declared is not None:
        # priming and end padding trimmed: the declared count exactly, within 1 ms of the source
        assert info.frames == declared and abs(info.frames - N) <= SR // 1000
    y, sr = audio_read.read_audio(files[name])
    assert sr == SR and y.shape == (2, info.frames) and abs(info.duration - info.frames / SR) < 1e-9
    if name in ALIGNED:
        src, _ = audio_read.read_audio(files["source"])
        # FFmpeg's experimental Vorbis encoder is far from transparent at its default quality
        assert snr_db(src[:, : y.shape[1]], y[:, : src.shape[1]]) > (6 if name == "vorbis-webm" else 12)


@pytest.mark.parametrize("name", ["aac-m4a", "opus-webm", "alac-m4a"])
def test_blocks_neither_lose_nor_double_frames(files, name):
    whole, _ = audio_read.read_audio(files[name])
    with audio_read.BlockReader(files[name], blocksize=1000) as r:
        blocks = list(r)
        assert all(b.shape[1] == 1000 for b in blocks[:-1])
        assert r.frames == whole.shape[1]
    assert np.array_equal(np.concatenate(blocks, axis=1), whole)
    with audio_read.BlockReader(files[name], blocksize=777) as r:
        r.seek(12_345)
        rest = np.concatenate(list(r), axis=1)
    assert np.array_equal(rest, whole[:, 12_345:])


def test_several_audio_streams_use_the_default_and_say_so(files):
    warnings: list[str] = []
    with audio_read.BlockReader(files["two-streams"], warnings=warnings) as r:
        y = np.concatenate(list(r), axis=1)
    assert any("audio streams" in w for w in warnings)
    src, _ = audio_read.read_audio(files["source"])
    assert snr_db(src[:, : y.shape[1]], y[:, : src.shape[1]]) > 12  # the first (default), not the half-level one


def _expect_invalid(path, *words):
    with pytest.raises(AudioSepError) as ei:
        audio_read.read_audio(path)
    assert ei.value.code == E.INVALID_AUDIO
    return ei.value


def test_damaged_containers_are_invalid_audio(files, tmp_path):
    _expect_invalid(bad.cut_in_the_middle(files["aac-m4a"], tmp_path / "cut.m4a"))  # its index (written last) gone
    # index first ("faststart"): the file opens, declares its length, and its data stops half way
    whole = bad.encode_av(tmp_path / "fast.m4a", _signal(), SR, "aac", "mp4", container_options={"movflags": "faststart"})
    assert abs(audio_read.probe(whole).frames - N) <= SR // 1000  # the edit list counts whole ms
    cut = bad.cut_in_the_middle(whole, tmp_path / "fast_cut.m4a")
    _expect_invalid(cut)
    with audio_read.BlockReader(cut) as r:  # an error, not a short read, however it is read
        with pytest.raises(AudioSepError):
            for _ in r:
                pass
    _expect_invalid(bad.zeroed_header(files["aac-m4a"], tmp_path / "zero.m4a"))
    _expect_invalid(bad.zeroed_header(files["opus-webm"], tmp_path / "zero.webm"))
    _expect_invalid(bad.random_bytes(tmp_path / "random.m4a"))
    _expect_invalid(bad.random_bytes(tmp_path / "random.webm", seed=2))


def test_no_audio_stream_says_so(tmp_path):
    err = _expect_invalid(bad.silent_video(tmp_path / "silent.mp4"))
    assert "no audio stream" in err.message
    _expect_invalid(bad.picture(tmp_path / "picture.png"))


# -- outputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext,rate", [("mp3", 44100), ("m4a", 44100), ("opus", 48000), ("mp3", 48000), ("m4a", 48000)])
def test_lossy_outputs_keep_the_length(tmp_path, ext, rate):
    x = _signal()[:, :].T
    warnings: list[str] = []
    out = tmp_path / f"o.{ext}"
    stats = audio_write.write_audio(out, x, SR, output_options.OutputOptions(samplerate=rate), warnings=warnings)
    assert stats.frames == N * rate // SR or stats.frames == round(N * rate / SR)
    y, sr = audio_read.read_audio(out)
    assert sr == rate and y.shape[1] == round(N * rate / SR)
    if rate == SR:
        assert snr_db(x, y) > 12
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # nothing partial left


def test_opus_output_rate_is_chosen_and_said(tmp_path):
    warnings: list[str] = []
    x = _signal().T
    audio_write.write_audio(tmp_path / "o.opus", x, SR, output_options.OutputOptions(samplerate=44100),
                            warnings=warnings)
    info = audio_read.probe(tmp_path / "o.opus")
    assert info.samplerate == 48000 and info.frames == N  # 44.1 kHz asked: 48 kHz written, same duration
    assert any("48000" in w for w in warnings)


def test_bitrate_setting(tmp_path):
    x = _signal().T
    sizes = {}
    for kbps in (48, 256):
        p = tmp_path / f"o{kbps}.m4a"
        audio_write.write_audio(p, x, SR, output_options.OutputOptions(samplerate="input", bitrate=kbps))
        sizes[kbps] = p.stat().st_size
    assert sizes[256] > sizes[48]
    with pytest.raises(AudioSepError) as ei:
        audio_write.write_audio(tmp_path / "o.mp3", x, SR, output_options.OutputOptions(bitrate=500))
    assert ei.value.code == E.INVALID_FIELD
    for bad_value in (0, 2000, "fast", True):
        with pytest.raises(AudioSepError):
            output_options.OutputOptions(bitrate=bad_value).validate()
    assert output_options.OutputOptions(bitrate="160k").validate().bitrate == 160


def test_subtype_with_a_lossy_output_is_refused(tmp_path):
    opts = output_options.OutputOptions.for_job(44100, "PCM_24", "stereo")
    for ext in ("mp3", "opus", "m4a"):
        with pytest.raises(AudioSepError) as ei:
            audio_write.prepare_output(tmp_path / f"o.{ext}", opts, 44100, 2)
        assert ei.value.code == E.INVALID_FIELD and "output_subtype" in ei.value.message
    plan = audio_write.prepare_output(tmp_path / "o.mp3", output_options.OutputOptions.for_job(44100, None, "stereo"),
                                      44100, 2)
    assert (plan.format, plan.subtype) == ("MP3", "MP3")
    assert list(tmp_path.iterdir()) == []


def test_encoder_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    from dsu_audiosep.engine import audio_encode_av

    def broken(self, buf):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(audio_encode_av.AvSink, "write", broken)
    (tmp_path / "o.mp3").write_bytes(b"old")
    with pytest.raises(AudioSepError):
        audio_write.write_audio(tmp_path / "o.mp3", _signal().T, SR)
    assert [p.name for p in tmp_path.iterdir()] == ["o.mp3"] and (tmp_path / "o.mp3").read_bytes() == b"old"


def test_mp3_refuses_more_than_two_channels(tmp_path):
    with pytest.raises(AudioSepError) as ei:
        audio_write.write_audio(tmp_path / "o.mp3", np.zeros((6, 100), np.float32), SR,
                                output_options.OutputOptions(channels="input"))
    assert ei.value.code == E.INVALID_FIELD


def test_av_is_not_imported_until_such_a_file_arrives(files):
    # The worker's start must not wait for PyAV: importing the worker and reading a WAV leave it out.
    code = ("import sys; import dsu_audiosep.worker.loop, dsu_audiosep.engine.separate, dsu_audiosep.cli; "
            "from dsu_audiosep.engine.audio_read import read_audio; read_audio(sys.argv[1]); "
            "print('av' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(files["source"])], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -- over the worker's pipes (scripts/test.sh reruns this part against the frozen binary) ---------


@pytest.fixture(scope="module")
def worker(model_files, tmp_path_factory):
    """A worker whose PATH holds nothing: no ffmpeg program can be found, only PyAV's libraries."""
    from worker_client import WorkerClient, clean_env, worker_argv

    empty = tmp_path_factory.mktemp("empty-path")
    client = WorkerClient(worker_argv(), env=clean_env(PATH=str(empty)))
    try:
        client.wait_ready(300)
        reply = client.request({"cmd": "load_model", "checkpoint_path": str(model_files["checkpoint_path"]),
                                "roberta_dir": str(model_files["roberta_dir"]), "device": "cpu"}, timeout=600)
        assert reply["status"] == "model_loaded", reply
        yield client
        client.assert_all_json()
    finally:
        client.kill()


def test_worker_separates_the_new_formats_into_lossy_outputs(worker, files, tmp_path):
    # .m4a in, .mp3 out with a residual as .m4a; a WebM in, .opus out; a video's soundtrack in.
    jobs = [(files["aac-m4a"], tmp_path / "a.mp3", {"residual_output": str(tmp_path / "a_rest.m4a")}),
            (files["opus-webm"], tmp_path / "b.opus", {"output_bitrate": 64}),
            (files["mp4-video"], tmp_path / "c.wav", {"query_audio": str(files["alac-m4a"])})]
    for src, out, extra in jobs:
        reply = worker.request({"cmd": "separate", "input": str(src), "output": str(out), "text": "a tone",
                                "output_sr": "input", **extra}, timeout=600)
        assert reply["status"] == "done", reply
        expected = audio_read.probe(src).duration
        for written in reply["files"]:
            assert abs(audio_read.probe(written).duration - expected) <= 0.001, written
    assert audio_read.probe(tmp_path / "b.opus").samplerate == 48000


def test_worker_batch_and_bad_files(worker, files, tmp_path):
    cut = bad.cut_in_the_middle(files["aac-m4a"], tmp_path / "cut.m4a")
    silent = bad.silent_video(tmp_path / "silent.mp4")
    noise = bad.random_bytes(tmp_path / "noise.m4a")
    jobs = [{"input": str(files["wma"]), "output": str(tmp_path / "w.wav")},
            {"input": str(files["ac3"]), "output": str(tmp_path / "x.m4a")},
            {"input": str(cut), "output": str(tmp_path / "cut.wav")},
            {"input": str(silent), "output": str(tmp_path / "silent.wav")},
            {"input": str(noise), "output": str(tmp_path / "noise.wav")},
            {"input": str(files["source"]), "output": str(tmp_path / "sub.mp3"), "output_subtype": "PCM_24"}]
    reply = worker.request({"cmd": "batch", "id": "fmt", "jobs": [{"text": "x", **j} for j in jobs]}, timeout=900)
    assert reply["status"] == "done", reply
    codes = [r.get("code") if r["status"] == "error" else r["status"] for r in reply["results"]]
    assert codes == ["done", "done", "invalid_audio", "invalid_audio", "invalid_audio", "invalid_field"], reply
    assert "no audio stream" in reply["results"][3]["message"]
    # nothing partial or failed was left next to the outputs
    assert [Path(j["output"]).name for j in jobs if Path(j["output"]).exists()] == ["w.wav", "x.m4a"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert worker.request({"cmd": "ping"})["status"] == "pong"
