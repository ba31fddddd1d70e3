"""Could any threshold on the behaviour check's reading have caught the attackers a trust run missed?

Reads the per-client trust reports of finished `defense.name=trust` runs (`metrics.jsonl`): each
client's trigger lift per round (its best universal trigger's flip rate minus the cohort median, the
larger over its modalities: what `behaviour_outliers` compares with `defense.behaviour_margin`). For
each attacked run it sweeps the threshold and reports the one with the best min(precision, recall) over
client-rounds, chosen on that run itself (an upper bound for any fixed margin; the check's floor,
BACKDOOR_FLOOR, is left out, which could only lower recall), the highest of equally good ones; for each
run without an attack, how many honest client-rounds that threshold would have flagged. A reading is taken after
the run's own decisions (caught clients leave the aggregate), so it is the check's view of that run.

    python benchmarks/behaviour_separation.py --attacked RUN... --clean RUN...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def lifts(run: Path) -> tuple[list[tuple[int, int, float]], set[int]]:
    """(round, client, trigger lift) for every client the check read, and the run's attackers."""
    summary = json.loads((run / "summary.json").read_text())
    attackers = set(summary.get("attack.malicious_clients") or [])
    readings = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        best: dict[int, float] = {}
        for modality in ("image", "text"):
            values = {int(c): r["behaviour"][modality] for c, r in record.get("trust", {}).items()
                      if r.get("behaviour") and modality in r["behaviour"]}
            if values:
                median = float(np.median(list(values.values())))
                for client, value in values.items():
                    best[client] = max(best.get(client, -1.0), value - median)
        readings += [(record["round"], c, v) for c, v in sorted(best.items())]
    return readings, attackers


def best_threshold(readings: list[tuple[int, int, float]], attackers: set[int]) -> dict:
    """The threshold on the lift with the best min(precision, recall) over client-rounds."""
    positives = sum(c in attackers for _, c, _ in readings)
    best = {"min_precision_recall": -1.0}
    for threshold in np.arange(0.0, 1.0, 0.01):
        flagged = [(c in attackers) for _, c, v in readings if v > threshold]
        precision = sum(flagged) / max(len(flagged), 1)
        recall = sum(flagged) / max(positives, 1)
        if min(precision, recall) >= best["min_precision_recall"]:  # ties: the highest, fewest false flags
            best = {"min_precision_recall": round(min(precision, recall), 3), "threshold": round(float(threshold), 2),
                    "precision": round(precision, 3), "recall": round(recall, 3)}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacked", nargs="+", type=Path, required=True)
    parser.add_argument("--clean", nargs="*", type=Path, default=[])
    args = parser.parse_args()
    clean = {str(run): lifts(run)[0] for run in args.clean}
    for run in args.attacked:
        readings, attackers = lifts(run)
        if not attackers:
            raise SystemExit(f"{run}: summary.json names no malicious clients; pass runs without an attack as --clean")
        best = best_threshold(readings, attackers)
        best["false_flags_without_attack"] = {
            name: f"{sum(v > best['threshold'] for _, _, v in rows)} of {len(rows)}" for name, rows in clean.items()}
        print(json.dumps({"run": str(run), **best}))


if __name__ == "__main__":
    main()
