"""SPEAR against its baselines: held-out first-try accuracy of a language model fine-tuned online from
feedback, after the same federated run with each objective.

`fedmm simulate` (Ray) with the shipped base `fedmm:arith-lm` (a tiny GPT-2 that half knows multi-step
arithmetic), clients partitioned by problem kind (Dirichlet 1.0), once per objective and seed: `spear`,
`feedback_sft` (SPEAR without unlikelihood), `rejection_sft` (first-try wins only), `grpo` (group of 4,
0/1 reward, KL to the received model). `base` is the round-0 evaluation (the base with fresh adapters,
which leave it unchanged). Accuracy is greedy first try on every client's held-out prompts pooled
(`final.global.arithmetic.accuracy`), then averaged over seeds.

Prints one JSON line per run and, last, `{"base": acc, "spear": acc, "feedback_sft": acc,
"rejection_sft": acc, "grpo": acc}`.

    python benchmarks/spear.py --seeds 2 --out results/spear
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

OBJECTIVES = ("spear", "feedback_sft", "rejection_sft", "grpo")
# The SPEAR setting measured in the README; each objective runs the same rounds, clients and arrivals.
SETTING = ["model.language_model=fedmm:arith-lm", "data.source=arithmetic", "clients.num=4", "rounds=16",
           "train.local_steps=12", "train.batch_size=32", "train.lr=0.003", "model.lora_r=16", "model.lora_alpha=32",
           "feedback.prompts_per_round=96", "clients.num_cpus=1"]


def run_one(objective: str, seed: int, out: Path, extra: list[str]) -> dict:
    start = time.monotonic()
    summary = simulate_cached(out / f"{objective}-seed{seed}",
                              [*SETTING, f"train.objective={objective}", f"seed={seed}", *extra])
    history = [json.loads(line) for line in (out / f"{objective}-seed{seed}" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in history if "train.feedback.prompts" in r]
    result = {"objective": objective, "seed": seed, "seconds": round(time.monotonic() - start, 1),
              "base": summary["initial.global.arithmetic.accuracy"],
              "accuracy": summary["final.global.arithmetic.accuracy"],
              "wins_per_round": float(np.mean([r["train.feedback.wins"] for r in trained])),
              "revision_success": float(np.mean([r["train.feedback.revision-success"] for r in trained]))}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only-seed", type=int, help="run this seed alone (two processes can share the work)")
    parser.add_argument("--out", default="results/spear")
    parser.add_argument("--objectives", nargs="*", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    seeds = [args.only_seed] if args.only_seed is not None else range(args.seeds)
    runs = [run_one(o, seed, out, args.overrides) for seed in seeds for o in args.objectives]
    final = {"base": float(np.mean([r["base"] for r in runs if r["objective"] == args.objectives[0]]))}
    final |= {o: float(np.mean([r["accuracy"] for r in runs if r["objective"] == o])) for o in args.objectives}
    print(json.dumps(final))


if __name__ == "__main__":
    main()
