"""Folder runs as a shell user makes them: ``python -m dsu_audiosep separate INPUT... --out-dir DIR``,
with plain progress lines in a pipe and a redrawn bar under a pseudo-terminal."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dsu_audiosep.folder.plan import expand_inputs, output_name, plan_run, safe_query_name


@pytest.fixture(scope="module")
def demo(demo_files):
    return dict(demo_files)


def model_flags(demo) -> list[str]:
    return ["--checkpoint", demo["checkpoint_path"], "--roberta-dir", demo["roberta_dir"]]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dsu_audiosep", *args]


def write(path: Path, seconds: float = 0.3, sr: int = 44100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.random.default_rng(len(str(path))).standard_normal((int(seconds * sr), 2)).astype(np.float32) * 0.1, sr)
    return path


def music_folder(root: Path) -> Path:
    write(root / "in" / "a.wav")
    write(root / "in" / "sub" / "b.flac")
    (root / "in" / "notes.txt").write_text("not audio, not an input")
    (root / "in" / "sub" / "broken.wav").write_bytes(b"RIFF this is no wave file")
    return root / "in"


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_run_with_plain_lines_manifest_and_resume(demo, tmp_path):
    folder = music_folder(tmp_path)
    out, manifest = tmp_path / "out", tmp_path / "results.jsonl"
    args = cli("separate", str(folder), str(tmp_path / "gone.wav"), "--out-dir", str(out), "--text", "a dog",
               "--text", "Piano / keys!", "--manifest", str(manifest), *model_flags(demo))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stderr  # a broken file and a missing one: failed, but every other output written
    summary = json.loads(proc.stdout)
    assert summary == {"status": "done", "files": 4, "outputs": 8, "written": 4, "skipped": 0, "failed": 4}
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a_Piano_keys.wav", "a_a_dog.wav", "sub/b_Piano_keys.flac", "sub/b_a_dog.flac"]
    lines = read_manifest(manifest)
    assert len(lines) == 8 and all(set(r) >= {"input", "query", "output", "elapsed", "error"} for r in lines)
    by = {(Path(r["input"]).name, r["query"]): r for r in lines}
    assert by[("a.wav", "a dog")]["error"] is None and by[("a.wav", "a dog")]["output"] == str(out / "a_a_dog.wav")
    assert by[("broken.wav", "a dog")]["code"] == "invalid_audio"
    assert by[("gone.wav", "Piano / keys!")]["code"] == "file_not_found"
    assert "\r" not in proc.stderr
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("[")]
    assert len(progress) == 4 and progress[-1].startswith("[4/4]"), proc.stderr

    # resume: the written outputs are left alone (same bytes, same time), only the failures run again
    stamp = (out / "a_a_dog.wav").stat().st_mtime_ns
    (out / "sub" / "b_a_dog.flac").unlink()  # as if the first run had been interrupted there
    again = subprocess.run(args[:-len(model_flags(demo))] + ["--skip-existing", *model_flags(demo)],
                           capture_output=True, text=True, timeout=900)
    assert json.loads(again.stdout) == {"status": "done", "files": 4, "outputs": 8, "written": 1, "skipped": 3, "failed": 4}
    assert (out / "a_a_dog.wav").stat().st_mtime_ns == stamp and (out / "sub" / "b_a_dog.flac").exists()
    resumed = read_manifest(manifest)[8:]
    assert sorted((Path(r["input"]).name, r["query"], bool(r.get("skipped"))) for r in resumed if not r["error"]) == [
        ("a.wav", "Piano / keys!", True), ("a.wav", "a dog", True), ("b.flac", "Piano / keys!", True), ("b.flac", "a dog", False)]


@pytest.mark.skipif(os.name != "posix", reason="pseudo-terminal")
def test_progress_bar_under_a_terminal(demo, tmp_path):
    import pty

    write(tmp_path / "in" / "x.wav", 1.0)
    write(tmp_path / "in" / "y.wav", 1.0)
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(cli("separate", str(tmp_path / "in" / "*.wav"), "--out-dir", str(tmp_path / "out"),
                                "--text", "bird", "--use-chunk", "true", "--chunk-length", "0.32", *model_flags(demo)),
                            stdout=subprocess.PIPE, stderr=secondary, stdin=subprocess.DEVNULL)
    os.close(secondary)
    seen = b""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(primary)
    assert proc.wait(timeout=60) == 0
    text = seen.decode()
    frames = [f for f in text.split("\r") if f.strip()]
    assert len(frames) >= 3, text  # redrawn in place, not one line per file
    assert "0/2 files" in frames[0] and "2/2 files" in frames[-1] and " left" in frames[-1]
    assert "s audio" in frames[-1] and "2/2 s audio" in frames[-1]
    assert len(list((tmp_path / "out").iterdir())) == 2


def test_planning_names_duplicates_and_globs(tmp_path):
    assert safe_query_name(" a dog / barking! ") == "a_dog_barking" and safe_query_name("../..") == "query"
    assert output_name("{stem}-{query}.{ext}", "x/song.MP3", "vocals") == "song-vocals.wav"
    with pytest.raises(Exception, match="name-template"):
        output_name("{stem}_{nope}.wav", "a.wav", "q")
    write(tmp_path / "d" / "s.wav")
    write(tmp_path / "d" / "s.flac")
    write(tmp_path / "d" / "out" / "old_result.wav")  # the output folder inside the input folder
    inputs, missing = expand_inputs([str(tmp_path / "d"), str(tmp_path / "d" / "*.wav"), "nothing*.wav"],
                                    exclude_dir=str(tmp_path / "d" / "out"))
    assert [Path(f.path).name for f in inputs] == ["s.flac", "s.wav"] and missing == ["nothing*.wav"]
    jobs = plan_run(inputs, missing, ["a", "b"], str(tmp_path / "d" / "out"), "{stem}_{query}.wav")
    assert jobs[0].error[0] == "file_not_found"
    assert jobs[1].error is None and jobs[2].error[0] == "duplicate_output"  # s.flac and s.wav -> s_a.wav
    same = plan_run(inputs[:1], [], ["a", "b"], str(tmp_path / "d" / "out"), "{stem}.wav")
    assert same[0].error[0] == "duplicate_output"  # two queries, one name
    own = plan_run(inputs[:1], [], ["a"], str(tmp_path / "d"), "{stem}.flac")
    assert own[0].error[0] == "output_error"  # would overwrite its input


def test_folder_run_with_example_audio_queries(model_files, tmp_path):
    """``--query-audio`` beside ``--text``: one output per query per file, named by the example's stem,
    each equal to a one-shot separate with that query; the single-query flags are refused. (The
    checkpoint of conftest.model_files carries the CLAP audio branch; the demo model does not.)"""
    demo = {k: str(v) for k, v in model_files.items()}
    write(tmp_path / "in" / "a.wav", 0.5)
    kick = write(tmp_path / "examples" / "my kick.wav", 0.4, sr=48000)
    out, manifest = tmp_path / "out", tmp_path / "m.jsonl"
    proc = subprocess.run(cli("separate", str(tmp_path / "in"), "--out-dir", str(out), "--text", "piano",
                              "--query-audio", str(kick), "--output-subtype", "FLOAT", "--manifest", str(manifest),
                              *model_flags(demo)), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a_my_kick.wav", "a_piano.wav"]
    assert {r["query"] for r in read_manifest(manifest)} == {"piano", str(kick)}
    one = tmp_path / "one.wav"
    single = subprocess.run(cli("separate", str(tmp_path / "in" / "a.wav"), str(one), "--query-audio", str(kick),
                                "--output-subtype", "FLOAT", *model_flags(demo)), capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr
    got, want = (sf.read(str(p), dtype="float32")[0] for p in (out / "a_my_kick.wav", one))
    assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1e-6)
    refused = subprocess.run(cli("separate", str(tmp_path / "in"), "--out-dir", str(out), "--query-audio", str(kick),
                                 "--query-start", "0.1", *model_flags(demo)), capture_output=True, text=True, timeout=900)
    assert refused.returncode == 2 and "--query-start" in refused.stderr


def test_folders_find_the_new_formats_and_extensions_narrows_them(demo, tmp_path):
    """Folders are searched for .m4a, .webm, video and the other formats PyAV reads; ``--extensions``
    keeps only the ones named (a file named outright is still taken)."""
    import bad_inputs as bad

    pytest.importorskip("av")
    x = np.random.default_rng(1).standard_normal((8000, 2)).astype(np.float32) * 0.1
    write(tmp_path / "in" / "a.wav", seconds=0.2)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    bad.encode_av(tmp_path / "in" / "b.m4a", x, 44100, "aac", "mp4")
    bad.encode_av(tmp_path / "in" / "sub" / "c.webm", x, 48000, "libopus", "webm")
    (tmp_path / "in" / "notes.txt").write_text("not audio")
    everything, _ = expand_inputs([str(tmp_path / "in")])
    assert sorted(Path(f.path).name for f in everything) == ["a.wav", "b.m4a", "c.webm"]
    from dsu_audiosep.folder.plan import parse_extensions

    narrowed, _ = expand_inputs([str(tmp_path / "in")], extensions=parse_extensions(" WAV,.webm"))
    assert sorted(Path(f.path).name for f in narrowed) == ["a.wav", "c.webm"]
    out = tmp_path / "out"
    proc = subprocess.run(cli("separate", str(tmp_path / "in"), "--out-dir", str(out), "--text", "x", "--extensions",
                              "m4a,webm", *model_flags(demo)), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["written"] == 2
    assert sorted(p.name for p in out.rglob("*.wav")) == ["b_x.wav", "c_x.wav"]
    assert sf.info(str(out / "b_x.wav")).duration == pytest.approx(8000 / 44100, abs=1e-3)
    refused = subprocess.run(cli("separate", str(tmp_path / "in"), "--out-dir", str(out), "--text", "x",
                                 "--extensions", ",", *model_flags(demo)), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--extensions" in refused.stderr
