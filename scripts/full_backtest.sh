#!/usr/bin/env bash
# Train, evaluate and replay every dataset in ../shared/data: the runs behind
# docs/evaluation.md and docs/backtesting.md. About 5 minutes on a 2-core machine.
#   scripts/full_backtest.sh [DATA_ROOT]      (default ../shared/data)
set -euo pipefail
DATA=${1:-../shared/data}
SD=${SD:-.venv/bin/stream-detector}
RP=${RP:-.venv/bin/replay}
run() { echo "+ $*" >&2; /usr/bin/time -f "%e s wall, %M KiB max RSS" "$@"; }
for spec in "synthetic:" "smd:$DATA/smd" "smap:$DATA/smap_msl" "msl:$DATA/smap_msl" "nab:$DATA/nab"; do
  ds=${spec%%:*}; dir=${spec#*:}
  dd=(); [ -n "$dir" ] && dd=(--data-dir "$dir")
  run "$SD" train --dataset "$ds" "${dd[@]}" --out "artifacts/$ds" 2>&1 | grep -v "it/s\]" | tail -3
  run "$SD" evaluate --dataset "$ds" "${dd[@]}" --artifact "artifacts/$ds" --out "reports/evaluation-$ds" > /dev/null
  run "$RP" --dataset "$ds" "${dd[@]}" --artifact "artifacts/$ds" --out "reports/replay-$ds" > /dev/null
done
