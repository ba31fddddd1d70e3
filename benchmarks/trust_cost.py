"""Cost of trust scoring next to the plain weighted mean and Flower's Krum, on the same stacked updates.

One component of P parameters in ten tensors, N clients (30% of them sending scaled updates), stacked
as an (N, P) float32 matrix of updates. Times are the best of --repeats runs, measured side by side
in one process; peak memory is what numpy allocates during a call (tracemalloc), relative to the
stacked updates. The behaviour check (a model per client, not a matrix) is timed apart, in seconds per
client at the default model size. Prints one JSON line:

    python benchmarks/trust_cost.py --clients 1000 --params 1000000
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.timing import best_of  # noqa: E402
from fedmm.core.components import ComponentLayout  # noqa: E402
from fedmm.robustness.trust import ComponentUpdates, Reputation, decide_round  # noqa: E402

COMPONENT = "fusion.shared"


def make_updates(n: int, p: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, ComponentLayout]:
    rng = np.random.default_rng(seed)
    layers = 10
    size = p // layers
    layout = ComponentLayout(names=tuple(f"layer{i}.weight" for i in range(layers)),
                             shapes=tuple((size,) for _ in range(layers)),
                             offsets=tuple(i * size for i in range(layers)), size=size * layers)
    deltas = np.empty((n, layout.size), dtype=np.float32)
    common = rng.standard_normal(layout.size, dtype=np.float32) * 0.01
    for row in deltas:  # honest: a shared direction plus client noise
        rng.standard_normal(layout.size, dtype=np.float32, out=row)
        row *= 0.01
        row += common
    deltas[: int(0.3 * n)] *= 4.0  # attackers: scaled
    sent = rng.standard_normal(layout.size, dtype=np.float32)
    return deltas, sent, layout


def peak_bytes(fn) -> int:
    gc.collect()
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def krum_seconds(deltas: np.ndarray, sent: np.ndarray) -> float:
    """Flower's Krum.aggregate_train on the same updates, as the replies it reads (one run)."""
    from flwr.serverapp.strategy import Krum

    from strategies.robust_baselines import _replies, assumed_attackers

    n = len(deltas)
    replies = _replies([sent + row for row in deltas], [1.0] * n)
    krum = Krum(num_malicious_nodes=assumed_attackers(n, 0))
    start = time.perf_counter()
    krum.aggregate_train(1, replies)
    return time.perf_counter() - start


def behaviour_seconds_per_client(clients: int) -> float:
    """The behaviour check's seconds per client on CPU at the default model size: each client one of
    the three default profiles, its model the initial global one moved by a small random update."""
    from fedmm.core.config import load_config
    from fedmm.models.model import client_components, initial_global_vectors
    from fedmm.robustness.root_update import behaviour_check

    run = load_config()
    check = behaviour_check(run)
    sent = initial_global_vectors(run)
    rng = np.random.default_rng(3)
    profiles = list(run.clients.profiles.values())
    models = {}
    for c in range(clients):
        mine = client_components(list(profiles[c % len(profiles)]), run)
        models[c] = {k: sent[k] + 0.01 * rng.standard_normal(sent[k].shape).astype(np.float32) for k in mine}
    check.strengths(sent, {0: models[0]})  # first call: lazy imports and allocations
    start = time.perf_counter()
    check.strengths(sent, models)
    return (time.perf_counter() - start) / clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-krum", action="store_true", help="Krum's O(N^2 P) distances take minutes at N=1000")
    parser.add_argument("--behaviour-clients", type=int, default=6,
                        help="client models the behaviour check scores at the default model size (0: skip)")
    args = parser.parse_args()
    n = args.clients
    deltas, sent, layout = make_updates(n, args.params)
    weights = np.random.default_rng(1).integers(50, 500, n).astype(np.float64)
    w = (weights / weights.sum()).astype(np.float32)
    t_mean, _ = best_of(lambda: w @ deltas, args.repeats)

    def score():
        updates = {COMPONENT: ComponentUpdates(list(range(n)), deltas)}
        return decide_round(updates, {COMPONENT: sent}, {COMPONENT: layout}, Reputation(), 1,
                            np.random.default_rng(2))

    t_trust, decision = best_of(score, args.repeats)
    malicious = set(range(int(0.3 * n)))
    flagged = set(decision.dropped)
    stacked_bytes = deltas.nbytes
    peak_trust = peak_bytes(score)
    peak_mean = peak_bytes(lambda: w @ deltas)
    result = {
        "benchmark": "trust_cost", "clients": n, "params": layout.size,
        "seconds_weighted_mean": round(t_mean, 4), "seconds_trust": round(t_trust, 4),
        f"ratio_vs_weighted_mean_n{n}": round(t_trust / t_mean, 2),
        "peak_memory_trust_vs_stacked": round(peak_trust / stacked_bytes, 3),
        "peak_memory_weighted_mean_vs_stacked": round(peak_mean / stacked_bytes, 3),
        "scaled_clients_left_out": len(flagged & malicious), "honest_clients_left_out": len(flagged - malicious),
    }
    if not args.skip_krum:
        t_krum = krum_seconds(deltas, sent)
        result["seconds_flower_krum"] = round(t_krum, 3)
        result[f"krum_ratio_vs_weighted_mean_n{n}"] = round(t_krum / t_mean, 2)
    if args.behaviour_clients:
        result["behaviour_seconds_per_client_cpu"] = round(behaviour_seconds_per_client(args.behaviour_clients), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
