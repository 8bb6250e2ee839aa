# Sourced by the queues of training runs (sweeps.sh retain, retain_choices.sh, retain_gemma.sh, reprofiled.sh).
# run NAME OPTIONS...: train $RUNS/NAME (RUNS: $R/runs unless the caller sets it) with the caller's TRAIN array
# and OPTIONS through $CPL; skipped when finished, resumed from its checkpoint when stopped; the weights and the
# checkpoint are dropped at the end (the records stay).
run() {
  local dir="${RUNS:-$R/runs}/$1"; shift
  [ -f "$dir/run.json" ] && return
  if [ -d "$dir/checkpoint" ]; then $CPL train --resume "$dir"; else $CPL train --out "$dir" "${TRAIN[@]}" "$@"; fi
  rm -rf "$dir/model" "$dir/checkpoint"
}
