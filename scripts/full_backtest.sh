#!/usr/bin/env bash
# Train, evaluate and replay every dataset in ../shared/data: the runs behind
# docs/evaluation.md and docs/backtesting.md. About 5 minutes on a 2-core machine.
#   scripts/full_backtest.sh [DATA_ROOT]      (default ../shared/data)
# Environment: TRAIN_SET="KEY=VALUE ..." passes training options to every dataset (train --set),
# ARTIFACTS and REPORTS name the output folders (default artifacts, reports), e.g. the
# long-term option's backtest beside the default one:
#   TRAIN_SET="long_term_alpha=0.05" ARTIFACTS=artifacts/long-term REPORTS=reports/long-term \
#     make backtest
#   .venv/bin/python scripts/summarize_reports.py reports/long-term
# EVAL_ARGS adds options to every evaluate (e.g. "--baselines random --no-plots"), REPLAY=0
# skips the replays (scripts/window_study.sh runs the trainings and evaluations only).
set -euo pipefail
DATA=${1:-../shared/data}
SD=${SD:-.venv/bin/stream-detector}
RP=${RP:-.venv/bin/replay}
ART=${ARTIFACTS:-artifacts}
REP=${REPORTS:-reports}
sets=()
for kv in ${TRAIN_SET:-}; do sets+=(--set "$kv"); done
eval_args=()
for x in ${EVAL_ARGS:-}; do eval_args+=("$x"); done
run() { echo "+ $*" >&2; /usr/bin/time -f "%e s wall, %M KiB max RSS" "$@"; }
for spec in "synthetic:" "smd:$DATA/smd" "smap:$DATA/smap_msl" "msl:$DATA/smap_msl" "nab:$DATA/nab"; do
  ds=${spec%%:*}; dir=${spec#*:}
  dd=(); [ -n "$dir" ] && dd=(--data-dir "$dir")
  run "$SD" train --dataset "$ds" "${dd[@]}" --out "$ART/$ds" "${sets[@]}" 2>&1 | grep -v "it/s\]" | tail -3
  run "$SD" evaluate --dataset "$ds" "${dd[@]}" --artifact "$ART/$ds" --out "$REP/evaluation-$ds" \
    "${eval_args[@]}" > /dev/null
  [ "${REPLAY:-1}" = 0 ] && continue
  run "$RP" --dataset "$ds" "${dd[@]}" --artifact "$ART/$ds" --out "$REP/replay-$ds" > /dev/null
done
