"""Decode speed per input format, encode speed per lossy output, and peak memory while streaming a
long AAC file (issue 24). Files are made with PyAV's encoders from a known signal (no ffmpeg).

    .venv/bin/python scripts/bench_formats.py                 # 60 s files, a 1-hour AAC file
    .venv/bin/python scripts/bench_formats.py --seconds 20 --long-seconds 600

Speed: x real time = audio seconds / wall seconds for ``BlockReader`` from open to the last block
(what a separation pays: for the formats counted by decoding, that count is included), best of
``--repeat``. Peak memory: a child process opens the long file with ``BlockReader`` and reads it
through; its peak RSS (ru_maxrss) is printed with the same child's RSS after the imports, so the
difference is what decoding adds. Run alone on a quiet machine: it uses one core.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import bad_inputs as bad  # noqa: E402  (the tests' encoders: the same files the tests use)

from dsu_audiosep.engine import audio_read, audio_write, output_options  # noqa: E402

# name -> (file name, codec, container, rate, keywords); None codec: written by libsndfile
FORMATS = {
    "WAV (libsndfile)": ("x.wav", None, "WAV", 44100, {}),
    "FLAC (libsndfile)": ("x.flac", None, "FLAC", 44100, {}),
    "MP3 (libsndfile)": ("x.mp3", None, "MP3", 44100, {}),
    "AAC in .m4a": ("aac.m4a", "aac", "mp4", 44100, {}),
    "AAC ADTS (.aac)": ("adts.aac", "aac", "adts", 44100, {}),
    "ALAC in .m4a": ("alac.m4a", "alac", "mp4", 44100, {"sample_format": "s16p"}),
    "Opus in WebM": ("opus.webm", "libopus", "webm", 48000, {}),
    "FLAC in Matroska": ("flac.mkv", "flac", "matroska", 44100, {"sample_format": "s16"}),
    "WMA v2 (.wma)": ("x.wma", "wmav2", "asf", 44100, {"bit_rate": 128000}),
    "AC-3 (.ac3)": ("x.ac3", "ac3", "ac3", 48000, {}),
    "E-AC-3 (.eac3)": ("x.eac3", "eac3", "eac3", 48000, {}),
    "MP4 video soundtrack (AAC)": ("video.mp4", "aac", "mp4", 44100, {"video": True}),
}

MEMORY_CHILD = r"""
import resource, sys
from dsu_audiosep.engine.audio_read import BlockReader
import av  # loaded up front so that the baseline counts the libraries, not the decoding
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = 0
with BlockReader(sys.argv[1]) as r:
    for b in r:
        n += b.shape[1]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(n, r.samplerate, base, peak)
"""


def signal(seconds: float, sr: int) -> np.ndarray:
    return bad.tone(int(seconds * sr), sr, 2, amp=0.4) + bad.noise(int(seconds * sr), 2, amp=0.02)


def make(folder: Path, name: str, seconds: float) -> Path:
    fname, codec, fmt, sr, kw = FORMATS[name]
    path = folder / fname
    x = signal(seconds, sr)
    if codec is None:
        bad.write_audio(path, x, sr, subtype="MPEG_LAYER_III" if fmt == "MP3" else "PCM_16", fmt=fmt)
    else:
        bad.encode_av(path, x, sr, codec, fmt, **kw)
    return path


def decode_speed(path: Path, repeat: int) -> tuple[float, float]:
    best = float("inf")
    for _ in range(repeat):
        from dsu_audiosep.engine import audio_decode_av

        audio_decode_av._COUNT_CACHE.clear()  # each run pays the count, as a new file would
        t = time.perf_counter()
        with audio_read.BlockReader(path) as r:
            for _b in r:
                pass
            seconds = r.frames / r.samplerate
        best = min(best, time.perf_counter() - t)
    return seconds, best


def encode_speed(folder: Path, ext: str, seconds: float) -> float:
    x = signal(seconds, 44100).T
    t = time.perf_counter()
    audio_write.write_audio(folder / f"out.{ext}", x, 44100, output_options.OutputOptions(samplerate="input"))
    return seconds / (time.perf_counter() - t)


def encode_long(path: Path, seconds: float, sr: int = 44100) -> None:
    """AAC in .m4a, one repeated minute streamed to the encoder (the maker stays small too)."""
    import av
    from fractions import Fraction

    minute = np.ascontiguousarray(signal(60.0, sr).T)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=sr, layout="stereo")
        pts = 0
        while pts < seconds * sr:
            for i in range(0, minute.shape[1], 8192):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(minute[:, i:i + 8192]), format="fltp",
                                                layout="stereo")
                fr.sample_rate, fr.pts, fr.time_base = sr, pts, Fraction(1, sr)
                pts += fr.samples
                for p in s.encode(fr):
                    c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the speed test files")
    ap.add_argument("--long-seconds", type=float, default=3600.0, help="length of the AAC file for peak memory")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"machine: {cpu}; {os.cpu_count()} logical CPUs; {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"\n| input ({args.seconds:.0f} s stereo) | audio read | x real time |")
        print("|---|---|---|")
        for name in FORMATS:
            path = make(folder, name, args.seconds)
            seconds, wall = decode_speed(path, args.repeat)
            print(f"| {name} | {seconds:.3f} s | {seconds / wall:.0f}x |")
        print(f"\n| output ({args.seconds:.0f} s stereo 44.1 kHz, default bitrate) | x real time |")
        print("|---|---|")
        for ext in ("wav", "flac", "mp3", "opus", "m4a"):
            print(f"| .{ext} | {encode_speed(folder, ext, args.seconds):.0f}x |")
        long_path = folder / "long.m4a"
        t = time.perf_counter()
        encode_long(long_path, args.long_seconds)
        made = time.perf_counter() - t
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(long_path)], capture_output=True, text=True,
                             check=True)
        n, sr, base, peak = (int(v) for v in out.stdout.split())
        print(f"\npeak memory streaming a {n / sr / 60:.0f}-minute AAC .m4a ({long_path.stat().st_size / 2**20:.0f} MiB, "
              f"made in {made:.0f} s): RSS after imports {base / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB "
              f"(+{(peak - base) / 1024:.0f} MiB); the decoded audio would be {n * 2 * 4 / 2**20:.0f} MiB as float32")


if __name__ == "__main__":
    main()
