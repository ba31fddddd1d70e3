"""Flower strategies on the default mismatched federation: each runs once per component over its holders.

Runs `fedmm simulate` (Flower's Simulation Engine, Ray) once per strategy on the default federation
(12 clients: image, text and multimodal profiles, 12 rounds) with one fixed seed, every strategy named
by its import path and given its arguments through `strategy.args.*`. Prints one JSON line per run,
writes `strategies.md` / `strategies.json`, and prints as its last line a JSON object
`{"initial_accuracy": {task: acc}, "final_accuracy": {row: {task: acc}}, "epsilon": {dp_row: eps}}`
with rows named by the strategy's class name.

The server optimisers get a stabilising tau (0.01): an update coordinate much smaller than tau moves
about as FedAvg would move it, a larger one by at most eta. QFedAvg weighs each holder by its training
loss (the mean over its tasks); its L = 1 / client_learning_rate must stay small against
F / (q ||delta||^2), or its step vanishes (a round here is 45 AdamW steps, ||delta|| about 1).
The DP rows wrap per-component FedAvg in Flower's central-DP wrappers with modest noise
(sigma = 0.1); their epsilon (RDP, no amplification, delta 1e-5) is what 12 clients give.

    python benchmarks/strategies.py --out results/strategies
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.runs import simulate_cached  # noqa: E402

FLOWER = "flwr.serverapp.strategy."
SERVER_OPTIMISER = ["strategy.args.eta=0.01", "strategy.args.tau=0.01"]
DP_NOISE = ["dp.noise_multiplier=0.1"]
ROWS = {  # row (the class name) -> its strategy and keys
    "FedAvg": ("FedAvg", []),
    "FedAdam": ("FedAdam", SERVER_OPTIMISER),
    "FedYogi": ("FedYogi", SERVER_OPTIMISER),
    "FedAdagrad": ("FedAdagrad", SERVER_OPTIMISER),
    "FedAvgM": ("FedAvgM", ["strategy.args.server_momentum=0.5"]),
    "FedProx": ("FedProx", ["strategy.args.proximal_mu=0.01"]),
    "QFedAvg": ("QFedAvg", ["strategy.args.client_learning_rate=1.0", "strategy.args.q=0.1"]),
    "FedMedian": ("FedMedian", []),
    "FedTrimmedAvg": ("FedTrimmedAvg", ["strategy.args.beta=0.2"]),
    "Krum": ("Krum", []),
    "MultiKrum": ("MultiKrum", ["strategy.args.num_nodes_to_select=2"]),
    "Bulyan": ("Bulyan", []),
    "DifferentialPrivacyServerSideFixedClipping": ("FedAvg", ["dp.name=server-fixed", "dp.clipping_norm=1.0", *DP_NOISE]),
    "DifferentialPrivacyClientSideAdaptiveClipping": ("FedAvg", ["dp.name=client-adaptive", "dp.clipping_norm=1.0",
                                                                 *DP_NOISE]),
}
TASKS = ("img_shape", "txt_color", "vqa")


def run_one(row: str, seed: int, out: Path, extra: list[str]) -> dict:
    start = time.monotonic()
    # allow_degraded: a strategy that leaves a component unchanged is reported (`problems`), not fatal.
    strategy, keys = ROWS[row]
    summary = simulate_cached(out / row, [f"strategy.name={FLOWER}{strategy}", *keys, f"seed={seed}",
                                          "strategy.allow_degraded=true", *extra])
    result = {"row": row, "seconds": round(time.monotonic() - start, 1), "problems": summary["problems"],
              "initial": {t: summary[f"initial.global.{t}.accuracy"] for t in TASKS},
              "final": {t: summary[f"final.global.{t}.accuracy"] for t in TASKS},
              "composition": summary["strategy.composition"]}
    if "dp" in summary:
        result["dp"] = summary["dp"]
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict]) -> str:
    lines = ["| strategy | keys | " + " | ".join(TASKS) + " | least gain | ε |", "|---" * (len(TASKS) + 4) + "|"]
    for r in results:
        args = " ".join(a.removeprefix("strategy.args.") for a in ROWS[r["row"]][1]) or "–"
        gain = min(r["final"][t] - r["initial"][t] for t in TASKS)
        eps = r.get("dp", {}).get("epsilon")
        lines.append(f"| {r['row']} | {args} | " + " | ".join(f"{r['final'][t]:.3f}" for t in TASKS)
                     + f" | {gain:+.3f} | {'–' if eps is None else f'{eps:.3g}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--out", default="results/strategies")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_one(row, args.seed, out, args.overrides) for row in args.rows]
    (out / "strategies.md").write_text(table(results) + "\n")
    final = {"initial_accuracy": results[0]["initial"], "final_accuracy": {r["row"]: r["final"] for r in results},
             "epsilon": {r["row"]: r["dp"]["epsilon"] for r in results if "dp" in r},
             "seed": args.seed, "overrides": args.overrides}
    (out / "strategies.json").write_text(json.dumps({"runs": results, "summary": final}, indent=2))
    print(table(results))
    print(json.dumps(final))


if __name__ == "__main__":
    main()
