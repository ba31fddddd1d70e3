"""Cost of trust scoring's defended path next to the plain weighted mean and Flower's Krum, from the
same training replies.

The replies carry a realistic mix of components (each client holds all of them): two encoders
adapted by LoRA (factor pairs on the query and value projections of --layers layers, rank --rank,
width --hidden), a dense fusion block (--hidden x --hidden), and three classification heads; 30%
of the clients send scaled updates. Three paths are timed on those replies, best of --repeats each,
side by side in one process:

- weighted mean: what ComponentFedAvg does with them (validate, stream the weighted mean);
- trust: what TrustScoring.aggregate_train does (validate, read every update once from the reply
  buffers: its exact norm and this round's sampled coordinates, score both stages and the reputation,
  then the inner ComponentFedAvg over the kept replies), with the behaviour check off; its parts are
  timed apart too;
- Flower's Krum.aggregate_train on the same Message objects.

What no defence reading exact norms can go under is timed too: validation, one read of every
update (trained - sent into a scratch row, its exact norm, nothing kept) and the mean of the kept
replies (`floor_ratio_vs_weighted_mean`); and the exact LoRA spectra (ΔW's singular values from the
whole factors, what trust read before it sampled them: `exact_lora_spectra_ratio_vs_weighted_mean`).

The behaviour check (a model per client, not a matrix) is timed apart, in seconds per client at the
default model size. Peak memory is what numpy allocates during a call (tracemalloc), relative to
one stacked copy of the updates (what trust made before it read the reply buffers). Prints one JSON line:

    python benchmarks/trust_cost.py --clients 1000
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from flwr.app import Message, Metadata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.timing import best_of  # noqa: E402
from fedmm.core import protocol  # noqa: E402
from fedmm.core.components import ComponentLayout  # noqa: E402
from fedmm.robustness.trust import Reputation, component_kind, decide_round, lora_indicators  # noqa: E402
from strategies.component_fedavg import aggregate_replies, validate_replies  # noqa: E402
from strategies.trust_scoring import reply_updates  # noqa: E402

ATTACKER_SHARE = 0.3


def layout_of(tensors: dict[str, tuple[int, ...]]) -> ComponentLayout:
    names, shapes = tuple(tensors), tuple(tensors.values())
    offsets = tuple(int(x) for x in np.cumsum([0, *[math.prod(s) for s in shapes[:-1]]]))
    return ComponentLayout(names, shapes, offsets, sum(math.prod(s) for s in shapes))


def realistic_mix(hidden: int, rank: int, layers: int) -> dict[str, ComponentLayout]:
    """Components named as the model bank names them, so each is judged by its own indicator set."""
    def encoder() -> dict[str, tuple[int, ...]]:
        tensors = {}
        for i in range(layers):
            for proj in ("query", "value"):
                stem = f"encoder.layer.{i}.attention.{proj}"
                tensors[f"{stem}.lora_A.default.weight"] = (rank, hidden)
                tensors[f"{stem}.lora_B.default.weight"] = (hidden, rank)
        return tensors

    layouts = {"encoder.image": layout_of(encoder()), "encoder.text": layout_of(encoder()),
               "fusion.shared": layout_of({"fusion.proj.weight": (hidden, hidden), "fusion.proj.bias": (hidden,),
                                           "fusion.norm.weight": (hidden,), "fusion.norm.bias": (hidden,)})}
    for task, classes in (("img_shape", 4), ("txt_color", 4), ("vqa", 12)):
        layouts[f"head.{task}"] = layout_of({f"head.{task}.bias": (classes,), f"head.{task}.weight": (classes, hidden)})
    return layouts


def make_replies(n: int, layouts: dict[str, ComponentLayout], seed: int = 0
                 ) -> tuple[list[Message], dict[str, np.ndarray]]:
    """N replies (trained = sent + update per component) and the sent vectors. Honest updates share
    a direction plus client noise; the first 30% of clients scale theirs by 4."""
    rng = np.random.default_rng(seed)
    sent = {c: rng.standard_normal(lay.size, dtype=np.float32) * 0.05 for c, lay in layouts.items()}
    common = {c: rng.standard_normal(lay.size, dtype=np.float32) * 0.01 for c, lay in layouts.items()}
    replies = []
    for node in range(n):
        scale = 4.0 if node < ATTACKER_SHARE * n else 1.0
        trained = {c: sent[c] + scale * (rng.standard_normal(lay.size, dtype=np.float32) * 0.01 + common[c])
                   for c, lay in layouts.items()}
        count = int(rng.integers(50, 500))
        content = protocol.train_reply_content(trained, count, dict.fromkeys(layouts, count), {})
        metadata = Metadata(run_id=1, message_id="", src_node_id=node + 1, dst_node_id=0, reply_to_message_id="m",
                            group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
        replies.append(Message(metadata=metadata, content=content))
    return replies, sent


def one_read(arrays: list[dict[str, np.ndarray]], sent: dict[str, np.ndarray]) -> np.ndarray:
    """Every update read once: trained - sent into one reused scratch row, and its exact norm."""
    norms = np.empty((len(arrays), len(sent)))
    for j, (component, base) in enumerate(sent.items()):
        scratch = np.empty_like(base)
        for i, a in enumerate(arrays):
            np.subtract(a[component], base, out=scratch)
            norms[i, j] = math.sqrt(float(np.dot(scratch, scratch)))
    return norms


def lora_seconds(arrays: list[dict[str, np.ndarray]], sent: dict[str, np.ndarray],
                 layouts: dict[str, ComponentLayout], repeats: int) -> float:
    """Best time of the exact LoRA indicators (ΔW spectra) of every LoRA component, from its stack."""
    lora = {c: lay for c, lay in layouts.items() if component_kind(c, lay) == "lora"}
    deltas = {c: np.stack([a[c] - sent[c] for a in arrays]) for c in lora}
    seconds, _ = best_of(lambda: [lora_indicators(deltas[c], sent[c], lay) for c, lay in lora.items()], repeats)
    return seconds


def peak_bytes(fn) -> int:
    gc.collect()
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


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
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-krum", action="store_true", help="Krum's O(N^2 P) distances take minutes at N=1000")
    parser.add_argument("--behaviour-clients", type=int, default=6,
                        help="client models the behaviour check scores at the default model size (0: skip)")
    args = parser.parse_args()
    n = args.clients
    layouts = realistic_mix(args.hidden, args.rank, args.layers)
    replies, sent = make_replies(n, layouts)
    shapes = {c: (lay.size,) for c, lay in layouts.items()}
    holders = {r.metadata.src_node_id: tuple(layouts) for r in replies}
    partition = {node: node - 1 for node in holders}
    parts: dict[str, float] = {}

    def weighted_mean():
        result = aggregate_replies(replies, holders, shapes)
        assert not result.rejected
        return result

    def trust():
        # The steps of TrustScoring.aggregate_train, in its order (behaviour check off).
        t0 = time.perf_counter()
        accepted, _ = validate_replies(replies, holders, shapes)
        updates = {partition[u.node_id]: u for u in accepted}
        t1 = time.perf_counter()
        decision = decide_round(reply_updates(updates, sent), sent, layouts, Reputation(), 1,
                                np.random.default_rng(2), rejected_fraction=0.0)
        t2 = time.perf_counter()
        kept_nodes = {updates[p].node_id for p in decision.aggregated}
        aggregate_replies([r for r in replies if r.metadata.src_node_id in kept_nodes], holders, shapes)
        t3 = time.perf_counter()
        parts.update(validate=t1 - t0, read_and_score=t2 - t1, final_mean=t3 - t2)
        return decision

    t_mean, _ = best_of(weighted_mean, args.repeats)
    timings = []
    for _ in range(args.repeats):  # best of, keeping the parts of the fastest
        gc.collect()
        start = time.perf_counter()
        decision = trust()
        timings.append((time.perf_counter() - start, dict(parts)))
    t_trust, best_parts = min(timings, key=lambda x: x[0])
    arrays = [u.arrays for u in validate_replies(replies, holders, shapes)[0]]
    t_read, _ = best_of(lambda: one_read(arrays, sent), args.repeats)
    t_lora = lora_seconds(arrays, sent, layouts, args.repeats)
    malicious = set(range(int(ATTACKER_SHARE * n)))
    flagged = set(decision.dropped)
    stacked_bytes = n * sum(lay.size for lay in layouts.values()) * 4
    result = {
        "benchmark": "trust_cost", "clients": n, "params": sum(lay.size for lay in layouts.values()),
        "components": {c: {"kind": component_kind(c, lay), "params": lay.size} for c, lay in layouts.items()},
        "seconds_weighted_mean": round(t_mean, 4), "seconds_trust": round(t_trust, 4),
        "seconds_trust_parts": {k: round(v, 4) for k, v in best_parts.items()},
        f"ratio_vs_weighted_mean_n{n}": round(t_trust / t_mean, 2),
        "seconds_one_read": round(t_read, 4),
        "floor_ratio_vs_weighted_mean": round((best_parts["validate"] + t_read + best_parts["final_mean"]) / t_mean, 2),
        "exact_lora_spectra_ratio_vs_weighted_mean": round(t_lora / t_mean, 2),
        "peak_memory_trust_vs_stacked": round(peak_bytes(trust) / stacked_bytes, 3),
        "peak_memory_weighted_mean_vs_stacked": round(peak_bytes(weighted_mean) / stacked_bytes, 3),
        "scaled_clients_left_out": len(flagged & malicious), "honest_clients_left_out": len(flagged - malicious),
    }
    if not args.skip_krum:
        from flwr.serverapp.strategy import Krum

        from strategies.robust_baselines import assumed_attackers

        krum = Krum(num_malicious_nodes=assumed_attackers(n, 0))
        t_krum, _ = best_of(lambda: krum.aggregate_train(1, replies), args.repeats)
        result["seconds_flower_krum"] = round(t_krum, 3)
        result[f"krum_ratio_vs_weighted_mean_n{n}"] = round(t_krum / t_mean, 2)
    if args.behaviour_clients:
        result["behaviour_seconds_per_client_cpu"] = round(behaviour_seconds_per_client(args.behaviour_clients), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
