#!/usr/bin/env bash
# Pre-registered study (2026-11-27, written down and committed at 15:16 UTC (be3b8c2) before any figure
# of it was computed): is there a window length between the default (16) and 32 that keeps
# SMD's gain from a longer window without the synthetic data's loss?
#
# Why: the default (LSTM window 16 / hidden 32) is 0.022 best-F1 below the best configuration
# on SMD (LSTM w32 h64, 0.509; docs/benchmarks.md section 7), just outside the 0.02 that the
# benchmark target allows; the window, not the hidden size, is what SMD gains from (w16 h64 is
# level with the default, w32 h32 0.503), and every window-32 model lost 0.04-0.05 on the
# synthetic data, so the default stayed by the rule of 2026-11-26 14:58.
#
# Candidates: LSTM window 20 / hidden 32 and LSTM window 24 / hidden 32, everything else the
# default (fleet-view training, per-sensor scalers, smoothing 4), trained and evaluated on the
# five datasets exactly as `make backtest` does (train, then evaluate; replay not needed).
#
# Rule (the 14:58 rule, unchanged, with two candidates): a candidate passes if
#   (a) its SMD mean best-F1 is within 0.02 of the best configuration's (the best of section 7's
#       table and these two rows: at present 0.509, so >= 0.489), and
#   (b) on none of SMAP, MSL, NAB and the synthetic data is its mean best-F1 more than 0.02
#       below the default's (0.393, 0.402, 0.299, 0.723).
# If both pass, the shorter window becomes the default (its model does less work per window, so
# it is the faster end to end; the bench's section 7 then measures it, and it must sustain
# 20,000 readings/s). If neither passes, the default stays. Nothing else is tuned from these
# figures; the test labels only score.
#
# Result (run 15:16-15:22 UTC, added afterwards): window 20 passed (SMD 0.4905; synthetic -0.0197,
# the largest loss) and is the default since a445475; window 24 failed (synthetic -0.033).
# docs/benchmarks.md section 7 has the table. With WINDOWS="16" the script reruns the old default.
#
#   scripts/window_study.sh [DATA_ROOT] [OUT]   (defaults ../shared/data, /tmp/window-study)
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-/tmp/window-study}
for w in ${WINDOWS:-20 24}; do
  # the datasets and the train / evaluate steps of `make backtest`, without its replays
  TRAIN_SET="window=$w" ARTIFACTS="$OUT/w$w/artifacts" REPORTS="$OUT/w$w/reports" REPLAY=0 \
    EVAL_ARGS="--baselines random --no-plots" scripts/full_backtest.sh "$DATA"
  .venv/bin/python scripts/summarize_reports.py "$OUT/w$w/reports" | grep -E "^\| (smd|smap|msl|nab|synthetic) \| \*\*model"
done
