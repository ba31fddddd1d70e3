"""Clients of different LoRA ranks: accuracy of each way to combine their adapters, and the server's
redistribution time at LLM size.

Accuracy: `fedmm simulate` (Ray) on the default federation with a global LoRA rank of 16 and client
ranks 2, 4, 8, 16 (cycled over the 12 clients), once per method and seed: `qr` (the exact weighted sum
of B·A, each client's best rank-r part by QR + a small SVD), `hetlora` (zero-padding, A and B averaged
apart, leading terms: `strategy.lora_aggregation=factors`), `flexlora` (the exact sum by a dense SVD:
`dense_svd`), `flora` (the exact sum, stacked, merged into the frozen base weights each round; every
client restarts a fresh adapter of its rank: `flora`). Accuracy is the final global test accuracy
averaged over the three tasks, then seeds.

Redistribution: 100 clients' factors at d = 4096 (ranks 2, 4, 8, 16 cycled, R = 750 stacked), the
best rank-16 approximation of their weighted sum by QR against the dense SVD of ΔW (best of
`--repeats` for QR, one dense run); the error is the largest relative Frobenius error of the rank-r
parts r = 2, 4, 8, 16 against the dense ones.

Prints one JSON line per run and, last, `{"accuracy": {...}, "redistribution_seconds": {"qr": s,
"dense_svd": s}, "qr_vs_dense_max_rel_error": e, "speedup": x}`.

    python benchmarks/hetero_rank.py --seeds 2 --out results/hetero_rank
    python benchmarks/hetero_rank.py --timing-only
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
from benchmarks.timing import best_of  # noqa: E402
from fedmm.core import lora_ranks  # noqa: E402

METHODS = {"qr": "qr", "hetlora": "factors", "flexlora": "dense_svd", "flora": "flora"}
SETTING = ["model.lora_r=16", "clients.lora_ranks=2,4,8,16"]
CLIENT_RANKS = (2, 4, 8, 16)
TASKS = ("img_shape", "txt_color", "vqa")


def run_one(method: str, seed: int, out: Path, extra: list[str]) -> dict:
    start = time.monotonic()
    summary = simulate_cached(out / f"{method}-seed{seed}",
                              [*SETTING, f"strategy.lora_aggregation={METHODS[method]}", f"seed={seed}", *extra])
    result = {"method": method, "seed": seed, "seconds": round(time.monotonic() - start, 1),
              **{task: summary[f"final.global.{task}.accuracy"] for task in TASKS}}
    result["accuracy"] = float(np.mean([result[t] for t in TASKS]))
    print(json.dumps(result), flush=True)
    return result


def redistribution(d: int = 4096, clients: int = 100, repeats: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ranks = [CLIENT_RANKS[i % len(CLIENT_RANKS)] for i in range(clients)]
    # LoRA-like factors: A at its initial scale, B small (a few steps of training from zero)
    factors = [(0.01 * rng.standard_normal((d, r)), rng.standard_normal((r, d)) / np.sqrt(3 * d)) for r in ranks]
    weights = rng.integers(50, 500, clients).astype(float)
    b, a = lora_ranks.stack_factors(factors, weights)
    top = max(CLIENT_RANKS)
    t_qr, fast = best_of(lambda: lora_ranks.truncate(b, a, top), repeats)
    t_dense, dense = best_of(lambda: lora_ranks.truncate_dense(b, a, top), 1)
    error = max(lora_ranks.relative_error(fast[0][:, :r], fast[1][:r], dense[0][:, :r], dense[1][:r])
                for r in CLIENT_RANKS)
    result = {"d": d, "clients": clients, "stacked_rank": int(b.shape[1]), "qr_seconds": t_qr,
              "dense_svd_seconds": t_dense, "speedup": t_dense / t_qr, "max_rel_error": error}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timing-only", action="store_true", help="only the redistribution timing")
    parser.add_argument("--out", default="results/hetero_rank")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timing = redistribution(repeats=args.repeats)
    accuracy: dict[str, float | None] = {}
    if not args.timing_only:
        runs = [run_one(m, s, out, args.overrides) for m in args.methods for s in range(args.seeds)]
        accuracy = {m: float(np.mean([r["accuracy"] for r in runs if r["method"] == m])) for m in args.methods}
        (out / "hetero_rank.json").write_text(json.dumps({"runs": runs, "timing": timing}, indent=2))
    print(json.dumps({"benchmark": "hetero_rank", "setting": " ".join([*SETTING, *args.overrides]),
                      "seeds": args.seeds, "accuracy": accuracy,
                      "redistribution_seconds": {"qr": timing["qr_seconds"], "dense_svd": timing["dense_svd_seconds"]},
                      "qr_vs_dense_max_rel_error": timing["max_rel_error"], "speedup": timing["speedup"]}))


if __name__ == "__main__":
    main()
