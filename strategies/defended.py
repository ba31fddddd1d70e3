"""A robust rule in front of any Flower strategy, on one component.

The rule (Krum, the median, FLAME, ...: `strategies.robust_baselines`) turns the component's holders'
vectors into one robust vector; the inner strategy takes that vector as the round's only reply, so a
server optimiser (FedAdam's moments, FedAvgM's momentum) follows the robust estimate instead of the
raw mean. Under DP this sits inside the DP wrapper: clipping comes first, noise last.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmm.core import protocol
from strategies.per_component import VECTOR, component_replies


class DefendedStrategy(Strategy):
    """`rule` then `strategy`. The per-component runner calls `use_rule` before each aggregation (a
    rule such as FLTrust's is built per round)."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy  # the attribute name Flower's own wrappers use for what they wrap
        self.rule = None
        self.component = ""
        self.current_arrays = ArrayRecord()

    def use_rule(self, rule, component: str) -> None:
        self.rule, self.component = rule, component

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.rule is None:
            raise RuntimeError("DefendedStrategy.aggregate_train before a rule was set")
        replies = [r for r in replies if not r.has_error()]
        if not replies:
            return None, None
        vectors = [r.content[protocol.ARRAYS][VECTOR].numpy() for r in replies]
        metrics = [r.content[protocol.METRICS] for r in replies]
        weights = [float(m[protocol.NUM_EXAMPLES]) for m in metrics]
        loss_key = getattr(self.strategy, "train_loss_key", "train_loss")
        losses = [float(m.get(loss_key, 0.0)) for m in metrics]
        robust = self.rule(server_round, self.component, vectors, weights, self.current_arrays[VECTOR].numpy())
        if robust is None:
            return None, None
        return self.strategy.aggregate_train(server_round, component_replies(
            [np.asarray(robust, dtype=np.float32)], [sum(weights)], [float(np.mean(losses))], loss_key))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
