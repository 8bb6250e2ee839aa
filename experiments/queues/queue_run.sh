# Sourced by the queues of training runs (sweeps.sh retain, retain_choices.sh, retain_gemma.sh, reprofiled.sh,
# refresh_cost.sh), after settings.sh.
# run NAME OPTIONS...: train $RUNS/NAME (RUNS: $R/runs unless the caller sets it) with the caller's TRAIN array
# and OPTIONS through $CPL; skipped when finished, resumed from its checkpoint when stopped; the weights and the
# checkpoint are dropped at the end (the records stay).
# run_all CONFIG TABLE [VAR=VALUE ...]: run each run of TABLE in experiments/configs/CONFIG.toml (a table of
# runs: name -> options), in the file's order.
run() {
  local dir="${RUNS:-$R/runs}/$1"; shift
  [ -f "$dir/run.json" ] && return
  if [ -d "$dir/checkpoint" ]; then $CPL train --resume "$dir"; else $CPL train --out "$dir" "${TRAIN[@]}" "$@"; fi
  [ -n "${DRY_RUN:-}" ] || rm -rf "$dir/model" "$dir/checkpoint"
}
run_all() {
  local config=$1 table=$2 name names; shift 2
  settings "$config" "$table" "$@"; names=("${ARGS[@]}")
  for name in "${names[@]}"; do
    settings "$config" "$table.$name" "$@"
    run "$name" "${ARGS[@]}"
  done
}
