"""Process memory (process_memory.py): idle text-encoder pages go back to the kernel without changing a
value, and the tuned allocator returns freed tensors to the OS. Linux only (madvise, glibc)."""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise/mallopt are Linux facilities")
SRC = Path(__file__).resolve().parents[1] / "src"


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def converted(model_files, tmp_path_factory):
    from dsu_audiosep.model.convert import convert

    out = tmp_path_factory.mktemp("conv") / "model"
    convert(checkpoint_path=str(model_files["checkpoint_path"]), roberta_dir=str(model_files["roberta_dir"]), out_dir=str(out))
    yield out
    shutil.rmtree(out, ignore_errors=True)  # 628 MB: gone with the module, not at the session's end


def test_text_pages_go_back_and_come_back_unchanged(converted):
    from dsu_audiosep.model.converted import load_converted

    m = load_converted(converted, device="cpu")
    first = m.embed_text("a dog barking").clone()
    before = _rss_mb()
    advised = m.release_text_pages()
    after = _rss_mb()
    assert advised > 400e6  # the whole RoBERTa in float32
    assert before - after > 100, (before, after)  # its touched pages left the resident set
    m.text_encoder.clear_cache()
    again = m.embed_text("a dog barking")  # computed again, from pages read back in
    assert torch.equal(first, again)


# A measurement of glibc's allocator (two fresh processes, their peaks compared), not a check of
# our logic: it depends on the C library and kernel, so it is kept out of the quick suite
# (pytest -m slow runs it) and its figure belongs to BENCHMARKS.md.
@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tune_allocator tunes glibc's malloc (mallopt); other C libraries are left alone")
def test_tuned_allocator_lowers_the_peak_of_a_separation(converted):
    """The same forward passes in two fresh processes, glibc's default allocator vs tune_allocator:
    the tuned one must peak lower (freed activations go back instead of fragmenting the heap)."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(SRC)!r})
        if sys.argv[1] == "1":
            from dsu_audiosep.process_memory import tune_allocator
            tune_allocator()
        import torch
        torch.set_num_threads(2)
        from dsu_audiosep.model.converted import load_converted
        m = load_converted({str(converted)!r}, device="cpu")
        c = m.embed_text("vocals")
        m.release_text_pages()
        x = 0.1 * torch.randn(1, 4 * 32000, generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            m.separate(x, c)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                print(int(line.split()[1]) / 1024)
    """)
    peak = {}
    for tune in ("0", "1"):
        env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* / THP_* from the caller
        out = subprocess.run([sys.executable, "-c", code, tune], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        peak[tune] = float(out.stdout.strip().splitlines()[-1])
    assert peak["1"] < peak["0"] - 40, peak
