#!/usr/bin/env bash
# Set up .venv on a fresh machine: torch pinned by constraints.txt (never a CUDA download by
# accident), then this package with its test and freeze extras. Idempotent.
#   scripts/setup.sh             test and freeze extras
#   scripts/setup.sh --with-ray  also the ray extra (what CI runs: tests/test_distributed.py needs it)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="test,freeze,openvino"
for arg in "$@"; do
  case "$arg" in
    --with-ray) extras="$extras,ray" ;;
    *) echo "setup.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
if [[ ! -x .venv/bin/python ]]; then
  echo "== setup: creating .venv with $(${PYTHON:-python3} --version 2>&1)"
  "${PYTHON:-python3}" -m venv .venv
fi
py="$PWD/.venv/bin/python"
# This machine's pip configuration lists local indexes that lack most projects; pip warns once
# per project. Drop those lines, keep everything else (and pip's exit status).
pip_install() {
  "$py" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
echo "== setup: torch (constraints.txt)"
pip_install -c constraints.txt torch
echo "== setup: dsu-audiosep[$extras] (editable)"
pip_install -c constraints.txt -e ".[$extras]"
"$py" -c "import sys, torch; print(f'== setup: python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}')"
