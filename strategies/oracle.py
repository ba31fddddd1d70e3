"""The oracle bound: per-component FedAvg over the clients the simulator did not make malicious.

Not a defence: it reads the simulator's list of malicious clients, which no server has. It is the
best any defence that works by leaving clients out can do, so the robustness grid reports it next
to the defences. Where it fails an attack bound, no detector can meet that bound in that setting.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from strategies.component_fedavg import ComponentFedAvg
from strategies.nodes import NodeRegistry


class OracleExclusion(ComponentFedAvg):
    """ComponentFedAvg that drops the training replies of the `excluded` partitions."""

    def __init__(self, registry: NodeRegistry, excluded: Iterable[int], **kwargs) -> None:
        super().__init__(registry, **kwargs)
        self.excluded = frozenset(excluded)

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> oracle: leaves out the %d malicious clients (a bound, not a defence)", len(self.excluded))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        partition = {n.node_id: n.partition_id for n in self.registry.nodes()}
        kept = [r for r in replies if partition.get(r.metadata.src_node_id) not in self.excluded]
        arrays, metrics = super().aggregate_train(server_round, kept)
        if metrics is not None:
            metrics["oracle.left-out"] = len(replies) - len(kept)
        return arrays, metrics
