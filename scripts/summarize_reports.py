"""Print the markdown tables of docs/evaluation.md and docs/backtesting.md from the report files
written by `make backtest` (reports/evaluation-*/evaluation.json, reports/replay-*/report.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("reports")
DATASETS = ["smd", "smap", "msl", "nab", "synthetic"]


def f(x: object, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


print("## Evaluation (batch), mean over entities\n")
print("| dataset | method | best-F1 | F1 @ label-free threshold | AUC-PR | PA best-F1 |")
print("|---|---|---|---|---|---|")
for ds in DATASETS:
    p = ROOT / f"evaluation-{ds}" / "evaluation.json"
    if not p.exists():
        continue
    rep = json.loads(p.read_text())
    for meth, s in rep["summary"].items():
        name = f"**{meth}**" if meth == "model" else meth
        print(f"| {ds} | {name} | {f(s.get('best_f1'))} | {f(s.get('f1_at_threshold'))} | "
              f"{f(s.get('auc_pr'))} | {f(s.get('pa_best_f1'))} |")

def replay_reports():
    """(dataset, report) of every replay report under ROOT, in DATASETS order."""
    for ds in DATASETS:
        p = ROOT / f"replay-{ds}" / "report.json"
        if p.exists():
            yield ds, json.loads(p.read_text())


print("\n## Replay (through Kafka), mean over entities\n")
print("| dataset | entities | readings | best-F1 | F1 @ label-free threshold | AUC-PR | PA best-F1 "
      "| random best-F1 | random PA best-F1 | HitRate@100% | HitRate@150% | parity max abs "
      "| readings/s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for ds, rep in replay_reports():
    s, m = rep["summary"], rep["summary"]["mean"]
    print(f"| {ds} | {s['entities']} | {s['readings']:,} | {f(m.get('best_f1'))} | "
          f"{f(m.get('f1_at_threshold'))} | {f(m.get('auc_pr'))} | {f(m.get('pa_best_f1'))} | "
          f"{f(m.get('random_best_f1'))} | {f(m.get('random_pa_best_f1'))} | "
          f"{f(m.get('hitrate_100'))} | {f(m.get('hitrate_150'))} | "
          f"{s['parity_max_abs']:.1e} | {s['throughput_readings_per_s']:,.0f} |")

print("\n## Alert episodes (replay), mean over entities\n")
print("| dataset | episodes per entity | incident recall | episode precision | event F1 "
      "| random event F1 | false episodes per 10k readings | alert share | median delay |")
print("|---|---|---|---|---|---|---|---|---|")
for ds, rep in replay_reports():
    m = rep["summary"]["mean"]
    if "event_f1" not in m:  # a report from before the episode metrics
        continue
    print(f"| {ds} | {f(m.get('alerts'), '.1f')} | {f(m.get('incident_recall'))} | "
          f"{f(m.get('episode_precision'))} | {f(m.get('event_f1'))} | "
          f"{f(m.get('random_event_f1'))} | {f(m.get('false_episodes_per_10k'), '.1f')} | "
          f"{f(m.get('alert_share'))} | {f(m.get('delay_p50'), '.1f')} |")
