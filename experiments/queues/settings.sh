# Sourced by every queue, run from the repository root. Sets CPL (the cpl-masks command) and PYTHON (the
# interpreter of the Python steps), both overridable, and defines
#   settings NAME TABLE [VAR=VALUE ...] [--OPTION=VALUE ...]
# which reads TABLE of experiments/configs/NAME.toml into the array ARGS, one argument an element
# (settings.py says how). With DRY_RUN=1 the queues print each command instead of running it, wait for
# nothing and delete nothing; the settings are still read.
CPL="${CPL:-.venv/bin/cpl-masks}"
PYTHON="${PYTHON:-.venv/bin/python}"
SETTINGS_PYTHON="$PYTHON"
if [ -n "${DRY_RUN:-}" ]; then CPL="echo $CPL"; PYTHON="echo $PYTHON"; fi
settings() {
  local text
  text=$("$SETTINGS_PYTHON" "$(dirname "${BASH_SOURCE[0]}")/settings.py" "$@") || exit 2
  ARGS=()
  [ -z "$text" ] || mapfile -t ARGS <<< "$text"
}
