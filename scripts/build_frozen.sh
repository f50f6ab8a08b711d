#!/usr/bin/env bash
# Build the frozen worker dist/dsu-audiosep/dsu-audiosep with cx_Freeze (setup_freeze.py).
#
#   scripts/build_frozen.sh              build now (replaces dist/dsu-audiosep)
#   scripts/build_frozen.sh --if-stale   build only when the executable is missing or older
#                                        than anything it is built from
#   scripts/build_frozen.sh --measure    after building (or with --if-stale, maybe not), print
#                                        bundle size and start-up times (median of 5 spawns)
#
# Python: $PYTHON, else the repo's .venv, else python3. Run from anywhere.
set -euo pipefail

cd "$(dirname "$0")/.."

if_stale=0
measure=0
for arg in "$@"; do
  case "$arg" in
    --if-stale) if_stale=1 ;;
    --measure) measure=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "build_frozen.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

source scripts/_python.sh  # after the cd above: relative to the repository root

exe=dist/dsu-audiosep/dsu-audiosep
[[ -f "$exe.exe" ]] && exe="$exe.exe"

stale_reason() {
  if [[ ! -f "$exe" ]]; then
    echo "$exe does not exist"
    return
  fi
  # Anything newer than the executable that goes into the bundle.
  local newer
  newer=$(find src config setup_freeze.py pyproject.toml -type f -newer "$exe" \
            ! -path '*/__pycache__/*' ! -path '*.egg-info/*' ! -name '*.pyc' 2>/dev/null | head -n 1)
  if [[ -n "$newer" ]]; then
    echo "$newer is newer than $exe"
  fi
}

build=1
if (( if_stale )); then
  reason=$(stale_reason)
  if [[ -z "$reason" ]]; then
    echo "build_frozen: $exe is up to date"
    build=0
  else
    echo "build_frozen: rebuilding: $reason"
  fi
fi

if (( build )); then
  start=$(date +%s)
  "$py" setup_freeze.py build_exe
  # cx_Freeze keeps the source files' mtimes; touch the executable so --if-stale compares
  # against the time of this build.
  touch "$exe"
  echo "build_frozen: built $exe in $(( $(date +%s) - start )) s"
  "$exe" --version
fi

if (( measure )); then
  "$py" - "$exe" <<'EOF'
import json, os, statistics, subprocess, sys, time

exe = os.path.abspath(sys.argv[1])
N = 5

def du(path):
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total

def frozen_once():
    t0 = time.perf_counter()
    p = subprocess.Popen([exe, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    first = json.loads(p.stdout.readline())
    t_first = time.perf_counter() - t0
    assert first["status"] == "loading", first
    while True:
        msg = json.loads(p.stdout.readline())
        if msg["status"] == "ready":
            break
    t_ready = time.perf_counter() - t0
    p.stdin.write(b'{"cmd":"exit"}\n'); p.stdin.close()
    p.wait(30)
    return t_first, t_ready

def import_torch_once():
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - t0

frozen_once()  # warm the page cache: every later run sees the same disk state
runs = [frozen_once() for _ in range(N)]
torch_runs = [import_torch_once() for _ in range(N)]
first = statistics.median(r[0] for r in runs)
ready = statistics.median(r[1] for r in runs)
imp = statistics.median(torch_runs)
print(f"bundle size: {du(os.path.dirname(exe)) / 2**20:.0f} MiB ({os.path.dirname(exe)})")
print(f"frozen spawn -> first line (loading): median {first:.3f} s of {N}: {[round(r[0], 3) for r in runs]}")
print(f"frozen spawn -> ready:                median {ready:.3f} s of {N}: {[round(r[1], 3) for r in runs]}")
print(f"python -c 'import torch' (spawn->exit): median {imp:.3f} s of {N}: {[round(t, 3) for t in torch_runs]}")
print(f"ready minus bare import torch: {ready - imp:+.3f} s")
EOF
fi
