#!/usr/bin/env bash
# The project's test command (what CI runs after installing):
#   1. builds the frozen worker dist/dsu-audiosep/dsu-audiosep when it is missing or older than
#      its sources (scripts/build_frozen.sh --if-stale);
#   2. runs the quick pytest suite (everything not marked slow), with the frozen-binary tests
#      required (DSU_REQUIRE_FROZEN=1: a missing build fails instead of skipping);
#   3. runs the worker suites (protocol, robustness, lifecycle, audio queries, stems, batch,
#      models-dir/cache, backend: WORKER_SUITES below) against the frozen binary over real pipes
#      (DSU_WORKER_CMD). They drive the worker only through its pipes, so the frozen run proves
#      what a source run would and more (the bundle): step 2 leaves them out, and only their few
#      tests that need the source tree (marker source_tree) run from source. With --no-frozen
#      they run from source in step 2;
#   4. on x86-64 with AVX2, runs the in-process numerics tests (marker "numerics": parity with the
#      original, two code paths of one computation) again with AVX2-only kernels
#      (scripts/avx2_only.env), so an AVX-512/AMX machine also checks what an AMD Zen 1-3 or older
#      Intel user computes.
#
#   scripts/test.sh                 all four steps
#   scripts/test.sh --no-frozen     steps 2 and 4, frozen tests skipped (no build needed)
#   scripts/test.sh -- ARGS...      extra pytest arguments for step 2 only (e.g. -k ping, -x)
#
# Python: $PYTHON, else the repo's .venv, else python3. Ends with one summary line
# "summary: N passed, N failed, N skipped" over all pytest runs.
set -euo pipefail

cd "$(dirname "$0")/.."

frozen=1
extra=()
while (( $# )); do
  case "$1" in
    --no-frozen) frozen=0 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "test.sh: unknown argument: $1 (pytest arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done

source scripts/_python.sh  # after the cd above: relative to the repository root
export PYTHON="$py"

start=$(date +%s)
reports=$(mktemp -d)
# Every temporary file of the run (pytest's folders, test models, worker caches) goes under one
# folder that is removed when the run ends, passed or failed.
run_tmp=$(mktemp -d "${TMPDIR:-/tmp}/dsu-audiosep-test.XXXXXX")
chmod 1777 "$run_tmp"  # like /tmp: the permission tests act as an unprivileged user inside it
export TMPDIR="$run_tmp"
# Its size, sampled every 2 s: pytest removes a passing session's folders at its end, so only a
# sample taken while a step runs shows the step's peak.
peak_file="$reports/temporary-peak-mb"
echo 0 > "$peak_file"
(
  while sleep 2; do
    mb=$(du -sm "$run_tmp" 2>/dev/null | cut -f1) || continue
    if [[ -n "$mb" ]] && (( mb > $(cat "$peak_file") )); then echo "$mb" > "$peak_file"; fi
  done
) &
sampler=$!
trap 'kill "$sampler" 2>/dev/null; rm -rf "$reports" "$run_tmp"' EXIT
failed_steps=()
WORKER_SUITES=(tests/test_worker.py tests/test_robustness.py tests/test_lifecycle.py tests/test_worker_audio_query.py
               tests/test_stems.py tests/test_batch.py tests/test_models_dir_cache.py tests/test_worker_backend.py)
# Worker tests inside other modules (whose other tests run in process): frozen only as well.
WORKER_TESTS=(tests/test_formats.py::test_worker_separates_the_new_formats_into_lossy_outputs
              tests/test_formats.py::test_worker_batch_and_bad_files)
# pytest arguments that leave all of those out (the quick suite and the AVX2 pass run in process).
not_worker=()
for suite in "${WORKER_SUITES[@]}"; do not_worker+=("--ignore=$suite"); done
for test in "${WORKER_TESTS[@]}"; do not_worker+=("--deselect=$test"); done

exe=dist/dsu-audiosep/dsu-audiosep
if (( frozen )); then
  echo "== test.sh: frozen build (if stale)"
  if ! scripts/build_frozen.sh --if-stale; then
    failed_steps+=("frozen build")
  fi
  [[ -f "$exe.exe" ]] && exe="$exe.exe"
  export DSU_REQUIRE_FROZEN=1
else
  export DSU_REQUIRE_FROZEN=0
fi

# pytest exit codes: 0 all passed, 1 some failed, 5 nothing collected (a broken selection or
# an empty tests/ here, so it counts as a failure), anything else an internal/usage error.
run_pytest() {
  local name="$1"; shift
  local rc=0
  "$py" -m pytest -q -p no:cacheprovider --junitxml="$reports/$name.xml" "$@" || rc=$?
  case "$rc" in
    0) ;;
    5) echo "test.sh: $name: pytest collected no tests" >&2; failed_steps+=("$name (no tests)") ;;
    *) failed_steps+=("$name (pytest exit $rc)") ;;
  esac
  echo "test.sh: $name: temporary files at most $(cat "$peak_file") MB (sampled every 2 s)" >&2
  echo 0 > "$peak_file"
  rm -rf "${run_tmp:?}"/pytest-of-* 2>/dev/null || true
}

echo "== test.sh: quick suite"
if (( frozen )); then
  run_pytest quick-suite "${not_worker[@]}" ${extra[@]+"${extra[@]}"}
  echo "== test.sh: worker-suite tests that need the source tree"
  run_pytest worker-source-tree -m "source_tree and not slow" "${WORKER_SUITES[@]}"
  echo "== test.sh: worker suites against the frozen binary ($exe)"
  DSU_WORKER_CMD="$(printf '%q' "$PWD/$exe") --worker" run_pytest frozen-worker-suite "${WORKER_SUITES[@]}" "${WORKER_TESTS[@]}"
else
  run_pytest quick-suite ${extra[@]+"${extra[@]}"}
fi

if [[ "$(uname -m)" == x86_64 ]] && grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  echo "== test.sh: numerics tests with AVX2-only kernels (scripts/avx2_only.env)"
  mapfile -t avx2_vars < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' scripts/avx2_only.env)
  export "${avx2_vars[@]}"
  # In process only: the worker suites' numerics cases run the same engine over pipes (their
  # kernels are the ones checked here), and a worker per case would double this pass.
  run_pytest numerics-avx2 -m "numerics and not slow" "${not_worker[@]}"
  unset "${avx2_vars[@]%%=*}"
fi

"$py" - "$reports" "$(( $(date +%s) - start ))" ${failed_steps[@]+"${failed_steps[@]}"} <<'PYEOF'
import sys, xml.etree.ElementTree as ET
from pathlib import Path
reports, seconds, failed_steps = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
tests = failures = skipped = 0
for xml in sorted(reports.glob("*.xml")):
    for suite in ET.parse(xml).getroot().iter("testsuite"):
        tests += int(suite.get("tests", 0))
        failures += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
passed = tests - failures - skipped
if failed_steps:
    print(f"test.sh: FAILED steps: {'; '.join(failed_steps)} ({seconds} s)")
else:
    print(f"test.sh: all steps passed ({seconds} s)")
print(f"summary: {passed} passed, {failures} failed, {skipped} skipped")
PYEOF

(( ${#failed_steps[@]} == 0 ))
