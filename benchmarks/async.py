"""Synchronous against asynchronous rounds when client speeds differ tenfold (simulated).

Runs `fedmm simulate` (Ray) on the default federation with `clients.speed_spread=10`: each client's
jobs take a log-uniform factor in [1, 10] of simulated seconds (seeded). Sync: 12 rounds of all 12
clients, each round as long as its slowest client. Async (`strategy.mode=async`): all 12 clients
busy, a new global version every 4 replies, 36 versions (the same number of client jobs), replies
discounted by 1/sqrt(1 + staleness). Time is the simulated clock both runs record
(`time.simulated_s`), not this machine's. Accuracy is the global test accuracy averaged over the
three tasks, measured after every round / version.

`time_to_sync_accuracy_ratio`: simulated time async needs to first reach the sync run's final
accuracy (within `--tolerance`, the noise of a 360-example test set) over the sync run's total
simulated time; None when it never does. Means over seeds; one JSON line per run, then the summary;
`async.png` plots accuracy against simulated time for every run.

    python benchmarks/async.py --seeds 2 --out results/async
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.runs import simulate_cached  # noqa: E402

TASKS = ("img_shape", "txt_color", "vqa")
SETTING = ["clients.speed_spread=10"]
MODES = {"sync": ["rounds=12"],
         "async": ["strategy.mode=async", "strategy.buffer_size=4", "rounds=36"]}


def curve(folder: Path) -> list[tuple[float, float]]:
    """(simulated seconds, mean accuracy over tasks) after each round, from metrics.jsonl."""
    points = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "stage" in row or row["round"] == 0:
            continue
        points.append((row["time.simulated_s"], float(np.mean([row[f"global.{t}.accuracy"] for t in TASKS]))))
    return points


def run_one(mode: str, seed: int, out: Path, extra: list[str]) -> dict:
    folder = out / f"{mode}-seed{seed}"
    summary = simulate_cached(folder, [*SETTING, *MODES[mode], f"seed={seed}", *extra])
    points = curve(folder)
    result = {"mode": mode, "seed": seed, "simulated_s": points[-1][0],
              "final_accuracy": float(np.mean([summary[f"final.global.{t}.accuracy"] for t in TASKS])),
              "curve": points}
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    return result


def plot(runs: list[dict], path: Path) -> None:
    """Accuracy against simulated time, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        t, acc = zip(*run["curve"])
        ax.plot(t, acc, label=f"{run['mode']}, seed {run['seed']}", linestyle="-" if run["mode"] == "async" else "--")
    ax.set_xlabel("simulated seconds")
    ax.set_ylabel("global accuracy (mean over tasks)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in points if acc >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--out", default="results/async")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for both modes")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ratios, finals, curves = [], {"sync": [], "async": []}, []
    for seed in range(args.seeds):
        sync, asyn = (run_one(mode, seed, out, args.overrides) for mode in ("sync", "async"))
        curves += [sync, asyn]
        reached = time_to_reach(asyn["curve"], sync["curve"][-1][1] - args.tolerance)
        ratios.append(None if reached is None else reached / sync["simulated_s"])
        finals["sync"].append(sync["final_accuracy"])
        finals["async"].append(asyn["final_accuracy"])
    (out / "async.json").write_text(json.dumps({"ratios": ratios, "finals": finals}, indent=2))
    plot(curves, out / "async.png")
    print(json.dumps({"benchmark": "async", "setting": " ".join([*SETTING, *args.overrides]), "seeds": args.seeds,
                      "tolerance": args.tolerance, "ratio_per_seed": ratios,
                      "time_to_sync_accuracy_ratio": None if None in ratios else float(np.mean(ratios)),
                      "final_accuracy": {m: float(np.mean(v)) for m, v in finals.items()}}))


if __name__ == "__main__":
    main()
