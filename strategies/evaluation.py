"""Per-task accuracy from evaluate replies: exact counts summed over clients, bad replies dropped."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message

from fedmm import protocol


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not float(value).is_integer():
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def task_scores(replies: Iterable[Message]) -> tuple[dict[str, dict[str, float]], list[tuple[int, str]]]:
    """{task: {accuracy, loss, count}} pooled over clients, and the (node, reason) of dropped replies."""
    correct: dict[str, int] = {}
    count: dict[str, int] = {}
    loss: dict[str, float] = {}
    dropped: list[tuple[int, str]] = []
    for reply in replies:
        node = reply.metadata.src_node_id
        try:
            if reply.has_error():
                raise ValueError(reply.error.reason)
            metrics = reply.content[protocol.METRICS]
            parsed = {}
            for key in metrics.keys():
                if key.startswith(protocol.COUNT_PREFIX):
                    task = key[len(protocol.COUNT_PREFIX):]
                    n = _count(metrics[key], key)
                    c = _count(metrics[f"{protocol.CORRECT_PREFIX}{task}"], f"correct.{task}")
                    s = float(metrics[f"{protocol.LOSS_SUM_PREFIX}{task}"])
                    if c > n or s != s or s < 0:
                        raise ValueError(f"inconsistent scores for {task}")
                    parsed[task] = (c, n, s)
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
