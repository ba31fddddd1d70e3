"""Per-task accuracy from evaluate replies: exact counts summed over clients, bad replies dropped."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flwr.app import Message, MetricRecord

from fedmm.core import protocol

_MAX_COUNT = 10**9  # far above any client's test split; a larger claim would swamp the pooled accuracy


def _count(value: object, what: str) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not float(value).is_integer() or not 0 <= value <= _MAX_COUNT):
        raise ValueError(f"{what} must be an integer in 0..{_MAX_COUNT}, got {value!r}")
    return int(value)


DEFAULT_VIEWS = ("global", "personal")


def parse_scores(reply: Message, tasks: Iterable[str],
                 views: Iterable[str] = DEFAULT_VIEWS) -> dict[tuple[str, str], tuple[int, int, float]]:
    """{(view, task): (correct, count, loss sum)} from one evaluate reply, for exactly the node's own
    tasks, for each view (global model, personal model, and the backdoor measurement when asked)."""
    if reply.has_error():
        raise ValueError(reply.error.reason)
    if set(reply.content.keys()) != {protocol.METRICS} or not isinstance(
            reply.content[protocol.METRICS], MetricRecord):
        raise ValueError(f"expected one MetricRecord {protocol.METRICS!r}")
    metrics = reply.content[protocol.METRICS]
    tasks = list(tasks)
    kinds = (protocol.CORRECT_PREFIX, protocol.COUNT_PREFIX, protocol.LOSS_SUM_PREFIX)
    prefixes = {view: protocol.VIEW_PREFIXES[view] for view in views}
    expected = {f"{v}{k}{t}" for v in prefixes.values() for k in kinds for t in tasks} | {protocol.NUM_EXAMPLES}
    if set(metrics.keys()) != expected:
        raise ValueError(f"metrics {sorted(set(metrics.keys()) ^ expected)[:4]} do not match the node's tasks")
    scores = {}
    for view, prefix in prefixes.items():
        for task in tasks:
            n = _count(metrics[f"{prefix}{protocol.COUNT_PREFIX}{task}"], f"{prefix}count.{task}")
            c = _count(metrics[f"{prefix}{protocol.CORRECT_PREFIX}{task}"], f"{prefix}correct.{task}")
            s = metrics[f"{prefix}{protocol.LOSS_SUM_PREFIX}{task}"]
            if c > n or isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
                raise ValueError(f"inconsistent {view} scores for {task}")
            scores[(view, task)] = (c, n, float(s))
    return scores


@dataclass
class EvaluationResult:
    record: dict[str, float]  # metrics.jsonl keys: global.<task>.accuracy, personal.<task>.accuracy, ...
    per_client: dict[int, dict[str, float]]  # partition (or node) -> {"<view>.<task>": accuracy}
    dropped: list[tuple[int, str]]  # (node, reason)


def pool_scores(replies: Iterable[Message], node_tasks: Mapping[int, Iterable[str]],
                order: Mapping[int, int] | None = None, views: Iterable[str] = DEFAULT_VIEWS) -> EvaluationResult:
    """Pool evaluate replies in `order` (node id -> rank, e.g. partition id), so float sums never depend
    on arrival order.

    `global.<task>.accuracy` pools every test example (correct / count over clients);
    `<view>.<task>.client_mean_accuracy` and `personal.<task>.accuracy` average the clients holding the
    task, each client counting once (how personalization is judged). `backdoor.<task>.success_rate`
    pools the triggered test inputs, and `attack.success_rate` pools them over every task.
    """
    rank = order or {}
    totals: dict[tuple[str, str], list[float]] = {}
    per_client: dict[int, dict[str, float]] = {}
    dropped: list[tuple[int, str]] = []
    for reply in sorted(replies, key=lambda r: (rank.get(r.metadata.src_node_id, -1), r.metadata.src_node_id)):
        node = reply.metadata.src_node_id
        try:
            if node not in node_tasks:
                raise ValueError("reply from a node that was not asked")
            parsed = parse_scores(reply, node_tasks[node], views)
        except (ValueError, KeyError, TypeError) as err:
            dropped.append((node, str(err)))
            continue
        mine = per_client.setdefault(rank.get(node, node), {})
        for (view, task), (c, n, s) in parsed.items():
            total = totals.setdefault((view, task), [0, 0, 0.0, 0.0, 0])
            total[0] += c
            total[1] += n
            total[2] += s
            if n:
                total[3] += c / n
                total[4] += 1
                mine[f"{view}.{task}"] = c / n
    record: dict[str, float] = {}
    for (view, task), (c, n, s, acc_sum, clients) in sorted(totals.items()):
        if not n:
            continue
        client_mean = acc_sum / clients
        if view == "backdoor":
            record[f"backdoor.{task}.success_rate"] = c / n
        elif view == "global":
            record.update({f"global.{task}.accuracy": c / n, f"global.{task}.loss": s / n,
                           f"global.{task}.count": float(n), f"global.{task}.client_mean_accuracy": client_mean})
        else:
            record.update({f"personal.{task}.accuracy": client_mean, f"personal.{task}.loss": s / n})
    hits = [(c, n) for (view, _), (c, n, *_rest) in totals.items() if view == "backdoor"]
    if hits and sum(n for _, n in hits):
        record["attack.success_rate"] = sum(c for c, _ in hits) / sum(n for _, n in hits)
    record["evaluate.clients-dropped"] = float(len(dropped))
    return EvaluationResult(record, per_client, dropped)
