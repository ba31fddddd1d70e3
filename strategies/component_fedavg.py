"""ComponentFedAvg: FedAvg per component, over the clients that hold each component.

Clients hold different modalities and tasks, so each receives and returns only its own components.
Every reply is validated; a bad one is dropped with its reason logged and counted, and the round
goes on with the rest.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmm.core import protocol
from fedmm.robustness.attacks import evaluation_views
from fedmm.core.aggregation import ComponentInputs, aggregate_component
from fedmm.core.components import ComponentLayout, flat_layouts, is_expert
from fedmm.core.lora_ranks import combine_lora_pairs, lora_pairs, merge_lora_pairs
from fedmm.core.protocol import ClientUpdate, ReplyError, ReplyLimits
from strategies.evaluation import EvaluationResult, pool_scores
from strategies.nodes import NodeRegistry, array_shapes, node_messages

Rejection = tuple[int, str, str]  # (node id, kind, detail)


@dataclass
class AggregateResult:
    arrays: dict[str, np.ndarray]  # new vectors of every component that had a valid holder
    accepted: list[ClientUpdate]
    rejected: list[Rejection] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)  # components with holders that a robust rule left unchanged


def validate_replies(replies: Iterable[Message], node_components: Mapping[int, Iterable[str]],
                     shapes: Mapping[str, tuple[int, ...]],
                     limits: ReplyLimits | None = None) -> tuple[list[ClientUpdate], list[Rejection]]:
    """Check each reply against the component vectors its node was sent (`shapes` keyed by component)."""
    accepted, rejected = [], []
    for reply in replies:
        node_id = reply.metadata.src_node_id
        try:
            if node_id not in node_components and reply.has_error():  # the SuperLink's, for a node it lost
                raise ReplyError("node-unavailable", f"the SuperLink answered for a node: {reply.error.reason}")
            if node_id not in node_components:
                raise ReplyError("unknown-node", f"node {node_id} was not sent this round")
            components = list(node_components[node_id])
            expected = {c: shapes[c] for c in components}
            accepted.append(protocol.validate_train_reply(reply, expected, components, limits))
        except ReplyError as err:
            rejected.append((node_id, err.kind, str(err)))
    return accepted, rejected


def holders_by_component(updates: Iterable[ClientUpdate]) -> dict[str, list[ClientUpdate]]:
    """Each component any update carries, in name order, with the updates that carry it (in their order)."""
    updates = list(updates)
    return {c: [u for u in updates if c in u.arrays] for c in sorted({c for u in updates for c in u.arrays})}


def aggregate_updates(updates: list[ClientUpdate], layouts: Mapping[str, ComponentLayout]) -> AggregateResult:
    """Weighted mean of each component over its holders; a client with a non-finite value anywhere
    is dropped from every component and the means are taken again without it."""
    rejected: list[Rejection] = []
    while True:
        out: dict[str, np.ndarray] = {}
        dropped: set[int] = set()
        for component, layout in layouts.items():
            holders = [u for u in updates if component in u.component_weights]
            if not holders:
                continue
            inputs = ComponentInputs([u.node_id for u in holders], [u.arrays for u in holders],
                                     [u.component_weights[component] for u in holders])
            arrays, bad = aggregate_component(layout, inputs)
            out.update(arrays)
            dropped.update(bad)
        if not dropped:
            return AggregateResult(out, updates, rejected)
        rejected += [(n, "non-finite", f"node {n} sent NaN or Inf values") for n in sorted(dropped)]
        updates = [u for u in updates if u.node_id not in dropped]


def aggregate_replies(replies: Iterable[Message], node_components: Mapping[int, Iterable[str]],
                      shapes: Mapping[str, tuple[int, ...]], limits: ReplyLimits | None = None) -> AggregateResult:
    """Replies -> validated updates -> new vectors of every component that had a valid holder."""
    accepted, rejected = validate_replies(replies, node_components, shapes, limits)
    result = aggregate_updates(accepted, flat_layouts({c: math.prod(s) for c, s in shapes.items()}))
    result.rejected = rejected + result.rejected
    return result


def drop_nonfinite(updates: Iterable[ClientUpdate]) -> tuple[list[ClientUpdate], list[Rejection]]:
    """The updates whose arrays are all finite, and a rejection for each of the others (exact check,
    one pass per update; for rules that cannot lean on the weighted mean's cheap signal)."""
    finite, rejected = [], []
    for u in updates:
        if all(np.isfinite(v).all() for v in u.arrays.values()):
            finite.append(u)
        else:
            rejected.append((u.node_id, "non-finite", f"node {u.node_id} sent NaN or Inf values"))
    return finite, rejected


def round_metrics(accepted: int, rejected: list[Rejection], updates: Iterable[ClientUpdate] = (),
                  usable: int | None = None) -> MetricRecord:
    """Accepted / rejected counts (by kind) and the mean training loss per task. `usable` counts the
    replies that passed the checks (default: `accepted`; a defence may aggregate fewer of them)."""
    updates = list(updates)
    metrics = MetricRecord({"clients-accepted": accepted, "clients-usable": accepted if usable is None else usable,
                            "clients-rejected": len(rejected)})
    for kind, count in sorted(Counter(kind for _, kind, _ in rejected).items()):
        metrics[f"rejected.{kind}"] = count
    losses: dict[str, list[float]] = {}
    for update in updates:
        for key, value in update.metrics.items():
            if key.startswith(protocol.TRAIN_LOSS_PREFIX):
                losses.setdefault(key, []).append(value)
    for key, values in sorted(losses.items()):
        metrics[key] = float(np.mean(values))
    metrics.update(rank_metrics(updates))
    metrics.update(feedback_metrics(updates))
    return metrics


def feedback_metrics(updates: Iterable[ClientUpdate]) -> dict[str, float]:
    """A language-model round from its clients' feedback counts ({} otherwise): each count summed,
    first-try accuracy on the arrivals, revision success (wrong first tries a revision fixed), and
    each loss averaged over the clients that trained."""
    updates = [u for u in updates if f"{protocol.FEEDBACK_PREFIX}prompts" in u.metrics]
    if not updates:
        return {}
    key = protocol.FEEDBACK_PREFIX
    out = {f"{key}{k}": float(sum(u.metrics.get(f"{key}{k}", 0.0) for u in updates)) for k in protocol.FEEDBACK_COUNTS}
    out[f"{key}first-try-accuracy"] = out[f"{key}first-correct"] / max(out[f"{key}prompts"], 1.0)
    out[f"{key}revision-success"] = out[f"{key}revised-correct"] / max(out[f"{key}wrong"], 1.0)
    for loss in protocol.FEEDBACK_LOSSES:
        values = [u.metrics[f"{key}{loss}"] for u in updates if f"{key}{loss}" in u.metrics]
        if values:
            out[f"{key}{loss}"] = float(np.mean(values))
    return out


def rank_metrics(updates: Iterable[ClientUpdate]) -> dict[str, float]:
    """Where clients' LoRA ranks differ: per rank, the clients aggregated and their mean training loss."""
    by_rank: dict[int, list[ClientUpdate]] = {}
    for u in updates:
        if protocol.LORA_RANK in u.metrics:
            by_rank.setdefault(int(u.metrics[protocol.LORA_RANK]), []).append(u)
    out: dict[str, float] = {}
    for rank, group in sorted(by_rank.items()):
        out[f"rank.{rank}.clients"] = len(group)
        losses = [v for u in group for k, v in u.metrics.items() if k.startswith(protocol.TRAIN_LOSS_PREFIX)]
        if losses:
            out[f"rank.{rank}.train-loss"] = float(np.mean(losses))
    return out


def routing_metrics(updates: Iterable[ClientUpdate], sent: Mapping[int, Iterable[str]]) -> dict[str, float]:
    """Mixture-of-experts figures of a round ({} without experts): tokens routed to each expert per
    modality (`moe.routed.<modality>.<expert>`), each expert's share of its modality's routing slots in
    its layer (`moe.utilisation.…`), the mean routing entropy, and experts sent / experts held averaged
    over the replies (`moe.experts-sent-fraction`)."""
    routed: dict[tuple[str, str], float] = {}
    entropies, fractions = [], []
    for u in updates:
        held = [c for c in sent.get(u.node_id, ()) if is_expert(c)]
        if not held:
            continue
        fractions.append(sum(c in u.arrays for c in held) / len(held))
        if protocol.ROUTING_ENTROPY in u.metrics:
            entropies.append(u.metrics[protocol.ROUTING_ENTROPY])
        for key, value in u.metrics.items():
            if key.startswith(protocol.ROUTED_PREFIX):
                modality, component = key[len(protocol.ROUTED_PREFIX):].split(".", 1)
                routed[modality, component] = routed.get((modality, component), 0.0) + value
    if not fractions:
        return {}
    out = {"moe.experts-sent-fraction": float(np.mean(fractions))}
    if entropies:
        out["moe.routing-entropy"] = float(np.mean(entropies))
    layer_totals: dict[tuple[str, str], float] = {}
    for (modality, component), n in routed.items():
        layer = component.rsplit(".", 1)[0]
        layer_totals[modality, layer] = layer_totals.get((modality, layer), 0.0) + n
    for (modality, component), n in sorted(routed.items()):
        out[f"moe.routed.{modality}.{component}"] = n
        out[f"moe.utilisation.{modality}.{component}"] = n / layer_totals[modality, component.rsplit(".", 1)[0]]
    return out


def log_rejections(server_round: int, rejected: list[Rejection]) -> None:
    for node_id, _, detail in rejected:
        log(WARNING, "round %d: dropped reply of node %d (%s)", server_round, node_id, detail)


class ComponentFedAvg(Strategy):
    """Per-component weighted FedAvg for clients with different modality-task profiles."""

    def __init__(self, registry: NodeRegistry, fraction_train: float = 1.0, min_train_nodes: int = 2,
                 fraction_evaluate: float = 1.0, limits: ReplyLimits | None = None,
                 lora_aggregation: str = "factors", layouts: Mapping[str, ComponentLayout] | None = None,
                 lora_scaling: float | None = None) -> None:
        if lora_aggregation != "factors" and layouts is None:
            raise ValueError(f"lora_aggregation={lora_aggregation!r} needs the components' layouts")
        if lora_aggregation == "flora" and lora_scaling is None:
            raise ValueError("lora_aggregation='flora' needs the adapters' scaling (alpha / r) to merge B·A")
        self.lora_aggregation = lora_aggregation
        self.lora_scaling = lora_scaling
        self.layouts = dict(layouts or {})  # component -> its named tensors, where LoRA pairs are found
        self.registry = registry
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.fraction_evaluate = fraction_evaluate
        self.limits = limits
        self._arrays: ArrayRecord | None = None
        self._sent: dict[int, tuple[str, ...]] = {}

    def summary(self) -> None:
        log(INFO, "\t├──> ComponentFedAvg: fraction_train %.2f, min_train_nodes %d, fraction_evaluate %.2f",
            self.fraction_train, self.min_train_nodes, self.fraction_evaluate)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.registry.refresh(grid)
        nodes = self.registry.sample(self.fraction_train, self.min_train_nodes, server_round)
        if len(nodes) < self.min_train_nodes:
            log(WARNING, "round %d: only %d nodes online, fewer than min_train_nodes=%d", server_round,
                len(nodes), self.min_train_nodes)
        self._arrays = arrays
        self._sent = {n.node_id: n.components for n in nodes}
        config = dict(config) | {protocol.SERVER_ROUND: server_round}
        return node_messages(nodes, arrays, config, MessageType.TRAIN)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._arrays is None:
            raise RuntimeError("aggregate_train called before configure_train")
        # Partition order, not arrival order: a seeded run sums in the same order every time.
        rank = self.registry.order()
        replies = sorted(replies, key=lambda r: (rank.get(r.metadata.src_node_id, -1), r.metadata.src_node_id))
        shapes = array_shapes(self._arrays)
        accepted, rejected = validate_replies(replies, self._sent, shapes, self.limits)
        result = self.combine(server_round, accepted, shapes)
        result.rejected = rejected + result.rejected
        log_rejections(server_round, result.rejected)
        metrics = round_metrics(len(result.accepted), result.rejected, result.accepted)
        metrics["clients-missing"] = len(self._sent) - len(replies)
        metrics["components-declined"] = len(result.declined)
        metrics.update(routing_metrics(result.accepted, self._sent))
        if not result.arrays:
            return None, metrics
        merged = {k: self._arrays[k] for k in self._arrays.keys()}
        merged.update({k: Array(np.ascontiguousarray(v)) for k, v in result.arrays.items()})
        return ArrayRecord(merged), metrics

    def combine(self, server_round: int, updates: list[ClientUpdate],
                shapes: Mapping[str, tuple[int, ...]]) -> AggregateResult:
        """Validated updates -> new component vectors: the weighted mean (subclasses swap the rule); with
        `lora_aggregation` qr or dense_svd each LoRA pair is the exact sum of the clients' B·A instead,
        with flora that sum merged into the base weight and the adapter restarted."""
        result = aggregate_updates(updates, flat_layouts({c: math.prod(s) for c, s in shapes.items()}))
        if self.lora_aggregation == "factors":
            return result
        sent = self.sent_vectors() if self.lora_aggregation == "flora" else {}
        for component, mean in list(result.arrays.items()):
            layout = self.layouts.get(component)
            if layout is None or not lora_pairs(layout):
                continue
            holders = [u for u in result.accepted if component in u.arrays]
            vectors, weights = [u.arrays[component] for u in holders], [u.component_weights[component] for u in holders]
            result.arrays[component] = (
                merge_lora_pairs(layout, vectors, weights, mean, sent[component], self.lora_scaling)
                if self.lora_aggregation == "flora"
                else combine_lora_pairs(layout, vectors, weights, mean, self.lora_aggregation))
        return result

    def sent_vectors(self) -> dict[str, np.ndarray]:
        """This round's global component vectors, as sent."""
        if self._arrays is None:
            raise RuntimeError("no round configured yet")
        return protocol.decode_record(self._arrays)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self.registry.refresh(grid)
        nodes = self.registry.sample(self.fraction_evaluate, 1, server_round, salt=1)
        config = dict(config) | {protocol.SERVER_ROUND: server_round}
        return node_messages(nodes, arrays, config, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return MetricRecord(self.pool_evaluation(server_round, replies).record)

    def pool_evaluation(self, server_round: int, replies: Iterable[Message]) -> EvaluationResult:
        """Global and personal scores per task, pooled over the nodes' replies; bad replies dropped."""
        node_tasks = {n.node_id: n.tasks for n in self.registry.nodes()}
        result = pool_scores(replies, node_tasks, self.registry.order(), evaluation_views(self.registry.run.attack))
        for node, reason in result.dropped:
            log(WARNING, "round %d: evaluation reply of node %d dropped (%s)", server_round, node, reason)
        return result
