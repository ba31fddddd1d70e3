"""Time per-component aggregation from client replies to new global arrays, side by side with
(a) Flower's own FedAvg.aggregate_train on the same replies and (b) the memory floor: one vectorised
weighted mean over the same data already decoded and stacked.

Prints one JSON line per (N clients, P parameters) point, then a final JSON line for the largest point
with `ratio_vs_flower_fedavg` and `ratio_vs_memory_floor`.

    python benchmarks/aggregation.py                 # N x P from 100 x 1e5 to 1000 x 1e6
    python benchmarks/aggregation.py --points 1000x100000
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import best_of  # noqa: E402
from fedmm.core import protocol  # noqa: E402
from fedmm.core.aggregation import streaming_weighted_mean  # noqa: E402
from fedmm.core.components import flat_layouts  # noqa: E402
from strategies.component_fedavg import aggregate_replies  # noqa: E402

# On the wire each component is one flat float32 vector (see fedmm.core.components); a client holding an
# encoder and the fusion block sends two. Split of P: 60% encoder, 40% fusion.
COMPONENT_SPLIT = {"encoder.image": 0.6, "fusion.shared": 0.4}


def layout(total: int) -> dict[str, tuple[int, ...]]:
    return {component: (int(total * share),) for component, share in COMPONENT_SPLIT.items()}


def make_replies(n: int, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> list[Message]:
    rng = np.random.default_rng(seed)
    replies = []
    for node in range(n):
        arrays = {k: Array(rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}
        count = int(rng.integers(10, 100))
        metrics = MetricRecord({protocol.NUM_EXAMPLES: count, "examples.encoder.image": count,
                                "examples.fusion.shared": count})
        content = RecordDict({protocol.ARRAYS: ArrayRecord(arrays), protocol.METRICS: metrics})
        metadata = Metadata(run_id=1, message_id="", src_node_id=node + 1, dst_node_id=0,
                            reply_to_message_id="m", group_id="1", created_at=time.time(), ttl=3600.0,
                            message_type="train")
        replies.append(Message(metadata=metadata, content=content))
    return replies


def measure(n: int, p: int, repeats: int) -> dict:
    shapes = layout(p)
    replies = make_replies(n, shapes)
    holders = {r.metadata.src_node_id: tuple(COMPONENT_SPLIT) for r in replies}
    t_ours, ours = best_of(lambda: aggregate_replies(replies, holders, shapes), repeats)
    assert not ours.rejected
    flower = FedAvg()
    t_flower, (flower_arrays, _) = best_of(lambda: flower.aggregate_train(1, replies), repeats)
    # Same answer as Flower's FedAvg (checked on one tensor to bound the cost).
    key = next(iter(shapes))
    np.testing.assert_allclose(ours.arrays[key], flower_arrays[key].numpy(), rtol=1e-4, atol=1e-5)
    del flower_arrays
    weights = np.array([r.content[protocol.METRICS][protocol.NUM_EXAMPLES] for r in replies], np.float64)
    stacked = np.stack([np.concatenate([r.content[protocol.ARRAYS][k].numpy().ravel() for k in sorted(shapes)])
                        for r in replies])
    w = (weights / weights.sum()).astype(np.float32)
    t_floor, _ = best_of(lambda: w @ stacked, repeats)
    # The streaming weighted mean alone, over the already validated views: what any approach that reads
    # each reply's own buffer once (no (N, P) copy) costs before validation and bookkeeping.
    layouts = flat_layouts({c: int(np.prod(s)) for c, s in shapes.items()})
    t_stream, _ = best_of(lambda: [streaming_weighted_mean(layouts[c], [u.arrays for u in ours.accepted], weights)
                                   for c in layouts], repeats)
    del stacked, replies
    gc.collect()
    return {
        "clients": n,
        "params": sum(int(np.prod(s)) for s in shapes.values()),
        "seconds_fedmm": round(t_ours, 4),
        "seconds_flower_fedavg": round(t_flower, 4),
        "seconds_memory_floor": round(t_floor, 4),
        "ratio_vs_flower_fedavg": round(t_ours / t_flower, 4),
        "ratio_vs_memory_floor": round(t_ours / t_floor, 3),
        "seconds_streaming_mean_only": round(t_stream, 4),
        "ratio_streaming_mean_only_vs_memory_floor": round(t_stream / t_floor, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", nargs="+",
                        default=["100x100000", "1000x100000", "100x1000000", "1000x1000000"],
                        help="N x P points; 1000x1000000 needs about 12 GB of RAM")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    results = []
    for point in args.points:
        n, p = (int(float(x)) for x in point.lower().split("x"))
        results.append(measure(n, p, args.repeats))
        print(json.dumps(results[-1]), flush=True)
    headline = max(results, key=lambda r: r["clients"] * r["params"])
    print(json.dumps({"benchmark": "aggregation", **headline,
                      "worst_ratio_vs_flower_fedavg": max(r["ratio_vs_flower_fedavg"] for r in results),
                      "worst_ratio_vs_memory_floor": max(r["ratio_vs_memory_floor"] for r in results)}))


if __name__ == "__main__":
    main()
