# Sourced by the scripts: sets $py to the interpreter they should use.
# $PYTHON wins, then the project's .venv (Linux/macOS, or Git Bash on Windows), then python3.
if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
elif [[ -x .venv/Scripts/python.exe ]]; then
  py=.venv/Scripts/python.exe
else
  py=python3
fi
