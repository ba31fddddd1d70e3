"""Per-task accuracy from evaluate replies: exact counts summed over clients, bad replies dropped."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from flwr.app import Message, MetricRecord

from fedmm import protocol

_MAX_COUNT = 10**9  # far above any client's test split; a larger claim would swamp the pooled accuracy


def _count(value: object, what: str) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not float(value).is_integer() or not 0 <= value <= _MAX_COUNT):
        raise ValueError(f"{what} must be an integer in 0..{_MAX_COUNT}, got {value!r}")
    return int(value)


def parse_scores(reply: Message, tasks: Iterable[str]) -> dict[str, tuple[int, int, float]]:
    """{task: (correct, count, loss sum)} from one evaluate reply, for exactly the node's own tasks."""
    if reply.has_error():
        raise ValueError(reply.error.reason)
    if set(reply.content.keys()) != {protocol.METRICS} or not isinstance(
            reply.content[protocol.METRICS], MetricRecord):
        raise ValueError(f"expected one MetricRecord {protocol.METRICS!r}")
    metrics = reply.content[protocol.METRICS]
    tasks = list(tasks)
    prefixes = (protocol.CORRECT_PREFIX, protocol.COUNT_PREFIX, protocol.LOSS_SUM_PREFIX)
    expected = {f"{p}{t}" for p in prefixes for t in tasks} | {protocol.NUM_EXAMPLES}
    if set(metrics.keys()) != expected:
        raise ValueError(f"metrics {sorted(set(metrics.keys()) ^ expected)[:4]} do not match the node's tasks")
    scores = {}
    for task in tasks:
        n = _count(metrics[f"{protocol.COUNT_PREFIX}{task}"], f"count.{task}")
        c = _count(metrics[f"{protocol.CORRECT_PREFIX}{task}"], f"correct.{task}")
        s = metrics[f"{protocol.LOSS_SUM_PREFIX}{task}"]
        if c > n or isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise ValueError(f"inconsistent scores for {task}")
        scores[task] = (c, n, float(s))
    return scores


def task_scores(replies: Iterable[Message], node_tasks: Mapping[int, Iterable[str]],
                order: Mapping[int, int] | None = None) -> tuple[dict[str, dict[str, float]], list[tuple[int, str]]]:
    """{task: {accuracy, loss, count}} pooled over clients, and the (node, reason) of dropped replies.

    Replies are pooled in `order` (node id -> rank, e.g. partition id) so float sums never depend on
    arrival order.
    """
    correct: dict[str, int] = {}
    count: dict[str, int] = {}
    loss: dict[str, float] = {}
    dropped: list[tuple[int, str]] = []
    rank = order or {}
    for reply in sorted(replies, key=lambda r: (rank.get(r.metadata.src_node_id, -1), r.metadata.src_node_id)):
        node = reply.metadata.src_node_id
        try:
            if node not in node_tasks:
                raise ValueError("reply from a node that was not asked")
            parsed = parse_scores(reply, node_tasks[node])
        except (ValueError, KeyError, TypeError) as err:
            dropped.append((node, str(err)))
            continue
        for task, (c, n, s) in parsed.items():
            correct[task] = correct.get(task, 0) + c
            count[task] = count.get(task, 0) + n
            loss[task] = loss.get(task, 0.0) + s
    scores = {
        t: {"accuracy": correct[t] / count[t], "loss": loss[t] / count[t], "count": float(count[t])}
        for t in sorted(count) if count[t] > 0
    }
    return scores, dropped
