"""Personalization: TAP against its baselines on a heterogeneous federation, with fixed seeds.

Runs `fedmm simulate` (Flower's Simulation Engine, Ray) once per method and seed on one federation:
clients holding one or two modality-task pairs in five profile groups, half of them sampled per round.
Writes `personalization.md` (per task, per method: mean +- std over seeds of the personal accuracy
averaged over the clients holding the task) and `personalization.json`, and prints as its last line a
JSON object with `mean_client_accuracy` per method (each client's mean personal accuracy over its
tasks, averaged over clients and seeds). A method and seed whose folder already holds a finished
run with the same config is read back, not run again.

    python benchmarks/personalization.py --seeds 2 --out results/personalization
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.runs import simulate_cached  # noqa: E402

METHODS = ("tap", "fedavg", "fedavg_ft", "local", "tap_no_distill")
TASKS = ("img_shape", "txt_color", "vqa")
FEDERATION = [
    "clients.num=15",
    "clients.profiles.image=img_shape",
    "clients.profiles.text=txt_color",
    "clients.profiles.vqa=vqa",
    "clients.profiles.image_text=img_shape,txt_color",
    "clients.profiles.image_vqa=img_shape,vqa",
    "strategy.fraction_train=0.5",
    "rounds=10",
    "data.examples_per_task=1800",
    "data.dirichlet_alpha=0.5",
]


def run_one(method: str, seed: int, out: Path, extra: list[str]) -> dict:
    """One run, or the summary a finished run with exactly this config left in its folder."""
    start = time.monotonic()
    summary = simulate_cached(out / f"{method}-seed{seed}", [*FEDERATION, f"personal.method={method}",
                                                              f"seed={seed}", *extra])
    per_client = summary["final.per_client"]
    client_means = [np.mean([v for k, v in scores.items() if k.startswith("personal.")])
                    for scores in per_client.values()]
    result = {
        "method": method, "seed": seed, "seconds": round(time.monotonic() - start, 1),
        "mean_client_accuracy": float(np.mean(client_means)),
        **{task: summary[f"final.personal.{task}.accuracy"] for task in TASKS},
    }
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict]) -> str:
    lines = ["| method | " + " | ".join(TASKS) + " | mean client accuracy |", "|---" * (len(TASKS) + 2) + "|"]
    best = {k: max(np.mean([r[k] for r in results if r["method"] == m]) for m in METHODS)
            for k in (*TASKS, "mean_client_accuracy")}
    for method in METHODS:
        mine = [r for r in results if r["method"] == method]
        cells = []
        for key in (*TASKS, "mean_client_accuracy"):
            values = [r[key] for r in mine]
            mark = " **best**" if np.isclose(np.mean(values), best[key]) else ""
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}{mark}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default="results/personalization")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_one(m, s, out, args.overrides) for s in range(args.seeds) for m in METHODS]
    md = (f"Personal accuracy (mean ± std over {args.seeds} seed(s)); config: "
          f"`{' '.join(FEDERATION + args.overrides)}`\n\n{table(results)}\n")
    (out / "personalization.md").write_text(md)
    (out / "personalization.json").write_text(json.dumps(results, indent=2))
    print(md)
    means = {m: float(np.mean([r["mean_client_accuracy"] for r in results if r["method"] == m])) for m in METHODS}
    print(json.dumps({"benchmark": "personalization", "seeds": args.seeds, "mean_client_accuracy": means}))


if __name__ == "__main__":
    main()
