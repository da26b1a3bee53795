#!/usr/bin/env bash
# Train several dense default-model candidates side by side on one GPU (a small model leaves most of an
# H100 idle), each for MINUTES of training, then copy their logs and weights to OUT (files over 15 MiB are
# split into parts: cat NAME.part-* > NAME; logs in logs.tar.gz;
# at most 8 files come back from a device call). Candidates: NAME|extra train_default.py arguments.
#
#   MINUTES=9 TOTAL=19 OUT=$OUT bash benchmarks/train_sweep.sh "a|--set model.optim.lr=3e-4" "b|..."
set -u
MINUTES=${MINUTES:-9}
TOTAL=${TOTAL:-$MINUTES}
OUT=${OUT:-outputs/sweep_out}
ROOT=${ROOT:-outputs/sweep}
mkdir -p "$OUT" "$ROOT"
pids=()
for candidate in "$@"; do
  name=${candidate%%|*}
  extra=${candidate#*|}
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 python benchmarks/train_default.py dense --run-dir "$ROOT/$name" \
    --minutes "$MINUTES" --total-minutes "$TOTAL" --workers 3 $extra > "$ROOT/$name.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
logs=()
for candidate in "$@"; do
  name=${candidate%%|*}
  logs+=("$ROOT/$name.log" "$ROOT/$name/stages.json" "$ROOT/$name/teacher.json")
  logs+=($(ls "$ROOT/$name"/dense/logs/version_*/metrics.csv 2>/dev/null))
  weights="$ROOT/$name/teacher.safetensors"
  if [ -f "$weights" ]; then
    if [ "$(stat -c %s "$weights")" -gt 15728640 ]; then
      split -b 15M -d "$weights" "$OUT/$name.teacher.safetensors.part-"
    else
      cp "$weights" "$OUT/$name.teacher.safetensors"
    fi
  fi
done
tar czf "$OUT/logs.tar.gz" --ignore-failed-read "${logs[@]}" 2>/dev/null
exit $status
