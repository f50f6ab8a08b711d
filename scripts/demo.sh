#!/usr/bin/env bash
# The main job on a fresh machine: set up, build the frozen worker, and run a real separation
# through it with a printf pipeline, exactly as a shell user would.
#
#   bash scripts/demo.sh                           UNTRAINED demo model + demo mixture (demo/)
#   AUDIOSEP_CHECKPOINT=... AUDIOSEP_ROBERTA_DIR=... DEMO_INPUT=song.wav DEMO_TEXT=vocals bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON="$PWD/.venv/bin/python" bash scripts/build_frozen.sh --if-stale
exe="$PWD/dist/dsu-audiosep/dsu-audiosep"
mkdir -p demo
if [[ -n "${AUDIOSEP_CHECKPOINT:-}" ]]; then
  ckpt=$(realpath "$AUDIOSEP_CHECKPOINT")
  roberta=$(realpath "${AUDIOSEP_ROBERTA_DIR:?set AUDIOSEP_ROBERTA_DIR to your roberta-base folder}")
else
  echo "== demo: no AUDIOSEP_CHECKPOINT given: writing the UNTRAINED demo model into demo/"
  "$exe" demo --out demo > /dev/null
  ckpt="$PWD/demo/audiosep_demo_UNTRAINED.ckpt"
  roberta="$PWD/demo/roberta-base"
fi
input=$(realpath "${DEMO_INPUT:-demo/demo_mixture.wav}")
text="${DEMO_TEXT:-piano melody}"
output="$PWD/demo/separated.wav"
echo "== demo: separating \"$text\" from $input with $exe --worker"
printf '{"cmd":"load_model","checkpoint_path":"%s","roberta_dir":"%s","mmap":true}\n{"cmd":"separate","input":"%s","output":"%s","text":"%s","id":1}\n{"cmd":"exit"}\n' \
  "$ckpt" "$roberta" "$input" "$output" "$text" | "$exe" --worker | tee demo/replies.jsonl
grep -q '"status": *"done"' demo/replies.jsonl || { echo "== demo: FAILED (no done reply)" >&2; exit 1; }
"$PWD/.venv/bin/python" -c "import soundfile as sf; i = sf.info('$output'); print(f'== demo: wrote $output: {i.duration:.2f} s, {i.samplerate} Hz, {i.channels} ch, {i.subtype}')"
