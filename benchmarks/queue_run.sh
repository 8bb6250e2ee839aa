# Sourced by the queues of training runs (sweeps.sh retain, retain_choices.sh, retain_gemma.sh).
# run NAME OPTIONS...: train $R/runs/NAME with the caller's TRAIN array and OPTIONS through $CPL; skipped when
# finished, resumed from its checkpoint when stopped; the weights are dropped at the end (the records stay).
run() {
  local dir="$R/runs/$1"; shift
  [ -f "$dir/run.json" ] && return
  if [ -d "$dir/checkpoint" ]; then $CPL train --resume "$dir"; else $CPL train --out "$dir" "${TRAIN[@]}" "$@"; fi
  rm -rf "$dir/model"
}
