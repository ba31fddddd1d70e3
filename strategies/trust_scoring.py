"""TrustScoring: two-stage robust aggregation with reputation, wrapped around any Flower strategy.

Before the inner strategy aggregates, every training reply is validated and every update scored
(`fedmm.robustness.trust`): stage 1 ranks clients by a multi-indicator trust score into trusted / suspicious /
rejected, stage 2 inspects the suspicious ones layer by layer against the trusted ones, the behaviour
check (`fedmm.robustness.behaviour`) searches each client's model for a universal trigger on the
server's clean root set, and a reputation kept per client id (its partition id, stable across rounds
and restarts) drops clients that keep failing. The inner strategy then aggregates only the replies
that count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmm.core import protocol
from fedmm.core.components import ComponentLayout
from fedmm.core.schema import DefenseConfig
from fedmm.core.protocol import ClientUpdate, ReplyLimits
from fedmm.robustness.behaviour import BehaviourCheck, behaviour_outliers
from fedmm.robustness.trust import (SCREEN_REASONS, ComponentUpdates, Reputation, RoundDecision, behaviour_sample,
                                    clip_factors, decide_round)
from strategies.component_fedavg import log_rejections, round_metrics, routing_metrics, validate_replies
from strategies.nodes import NodeRegistry


def reply_updates(updates: Mapping[int, ClientUpdate], sent: Mapping[str, np.ndarray]) -> dict[str, ComponentUpdates]:
    """Per component, its holders' trained vectors as received (client order) and the sent vector:
    the defence reads the updates (trained - sent) from the reply buffers, with no stacked copy."""
    out = {}
    for component in sorted({c for u in updates.values() for c in u.arrays}):
        holders = sorted(p for p, u in updates.items() if component in u.arrays)
        out[component] = ComponentUpdates(holders, [updates[p].arrays[component] for p in holders], sent[component])
    return out


def clip_to_median(kept: list[Message], components: Mapping[str, ComponentUpdates], decision: RoundDecision,
                   node_of: Mapping[int, int], sent: Mapping[str, np.ndarray]) -> int:
    """Scale each kept update above the median norm of the kept updates (per component) down to it,
    in the replies the inner strategy reads (`node_of`: partition id -> node id); returns how many
    (client, component) updates were scaled."""
    reply_of = {r.metadata.src_node_id: r for r in kept}
    keep, count = set(decision.aggregated), 0
    for component, u in components.items():
        rows = [i for i, p in enumerate(u.client_ids) if p in keep]
        if not rows:
            continue
        for i, factor in zip(rows, clip_factors(decision.norms[component][rows]).tolist()):
            if factor < 1.0:
                vector = sent[component] + np.float32(factor) * u.delta(i)
                record = reply_of[node_of[u.client_ids[i]]].content[protocol.ARRAYS]
                record[component] = protocol.encode_arrays({component: vector})[component]
                count += 1
    return count


class TrustScoring(Strategy):
    """Decides which updates count; `inner` aggregates them."""

    def __init__(self, inner: Strategy, registry: NodeRegistry, defense: DefenseConfig,
                 layouts: Mapping[str, ComponentLayout], limits: ReplyLimits | None = None,
                 behaviour: Callable[[], BehaviourCheck] | None = None,
                 finetune: Callable[[Mapping[str, np.ndarray], int], Mapping[str, np.ndarray]] | None = None) -> None:
        self.inner = inner
        self.finetune = finetune  # (aggregated vectors, round) -> the server's root-set update, per component
        self._behaviour_factory = behaviour  # built on first use: the model and root set load once
        self.layouts = dict(layouts)  # component -> its named tensors (indicators and inspection read them)
        self.registry = registry
        self.defense = defense
        self.limits = limits
        self.reputation = Reputation()
        self.last_report: dict[int, dict] = {}  # partition id -> what the defence saw and decided
        self._sent: dict[int, tuple[str, ...]] = {}
        self._vectors: dict[str, np.ndarray] = {}
        self._behaviour: BehaviourCheck | None = None

    def summary(self) -> None:
        d = self.defense
        log(INFO, "\t├──> TrustScoring (trusted %.0f%%, rejected %.0f%%, warm-up %d rounds) around:",
            100 * d.trusted_fraction, 100 * d.rejected_fraction, d.warmup_rounds)
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent = {m.metadata.dst_node_id: tuple(m.content[protocol.ARRAYS].keys()) for m in messages}
        self._vectors = protocol.decode_record(arrays)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        shapes = {k: v.shape for k, v in self._vectors.items()}
        accepted, rejected = validate_replies(replies, self._sent, shapes, self.limits)
        partition = {n.node_id: n.partition_id for n in self.registry.nodes()}
        updates = {partition[u.node_id]: u for u in accepted if u.node_id in partition}
        d = self.defense
        strength: dict[int, dict[str, float]] = {}  # the behaviour check's readings, filled by `judge`
        behaviour_seconds = 0.0
        rng = np.random.default_rng([self.registry.run.seed, server_round, 0x7757])

        def judge(clients: list[int]) -> dict[int, str]:
            nonlocal behaviour_seconds
            started = time.perf_counter()
            read = behaviour_sample(clients, self.reputation, d.behaviour_max_clients, d.behaviour_strikes,
                                    np.random.default_rng([self.registry.run.seed, server_round, 0xBE4A]))
            strength.update(self._strengths({p: updates[p] for p in read}))
            behaviour_seconds = time.perf_counter() - started
            return behaviour_outliers(strength, d.behaviour_margin)

        components = reply_updates(updates, self._vectors)
        decision = decide_round(components, self._vectors, self.layouts,
                                self.reputation, server_round, rng,
                                trusted_fraction=d.trusted_fraction, rejected_fraction=d.rejected_fraction,
                                pass_early=d.pass_early, pass_late=d.pass_late, late_round=d.late_round,
                                warmup_rounds=d.warmup_rounds, max_relative_norm=d.max_relative_norm,
                                consensus_weight=d.consensus_weight,
                                behaviour=judge, strikes=d.behaviour_strikes)
        node_of = {p: u.node_id for p, u in updates.items()}
        for p, reason in sorted(decision.dropped.items()):
            level = WARNING if reason.split(":")[0] in SCREEN_REASONS else INFO
            log(level, "round %d: trust scoring leaves out client %d (%s)", server_round, p, reason)
        log_rejections(server_round, rejected)
        self.last_report = self._report(decision, rejected, partition, strength)
        kept_nodes = {node_of[p] for p in decision.aggregated}
        kept = [r for r in replies if r.metadata.src_node_id in kept_nodes]
        clipped = clip_to_median(kept, components, decision, node_of, self._vectors) if d.clip_to_median else 0
        arrays, _ = self.inner.aggregate_train(server_round, kept) if kept else (None, None)
        if arrays is not None and self.finetune is not None:
            arrays = self._finetuned(arrays, server_round)
        faulty = sum(reason.startswith("non-finite") for reason in decision.dropped.values())
        metrics = round_metrics(len(kept), rejected, [updates[p] for p in decision.aggregated],
                                usable=len(accepted) - faulty)
        metrics["clients-missing"] = len(self._sent) - len(replies)
        metrics.update(routing_metrics([updates[p] for p in decision.aggregated], self._sent))
        for reason in ("trusted", "suspicious", "rejected"):
            metrics[f"trust.{reason}"] = sum(c == reason for c in decision.category.values())
        metrics["trust.dropped"] = len(decision.dropped)
        if d.clip_to_median:
            metrics["trust.clipped"] = clipped
        if strength:
            metrics["trust.behaviour_caught"] = sum(r.startswith("behaviour") for r in decision.dropped.values())
            metrics["trust.behaviour_seconds_per_client"] = behaviour_seconds / len(strength)
        return arrays, metrics

    def _finetuned(self, arrays: ArrayRecord, server_round: int) -> ArrayRecord:
        """The aggregate after the server's short training on its clean root set: what the kept
        updates left of a backdoor fades where the clean data disagrees with it."""
        vectors = {**self._vectors, **protocol.decode_record(arrays)}
        update = self.finetune(vectors, server_round)
        moved = {c: vectors[c] + d for c, d in update.items() if c in arrays.keys()}
        return ArrayRecord({k: arrays[k] for k in arrays.keys()} | protocol.encode_arrays(moved))

    def _strengths(self, updates: Mapping[int, ClientUpdate]) -> dict[int, dict[str, float]]:
        """The behaviour check's trigger strengths of these clients (those past the input screen);
        empty when the check is off."""
        if not self.defense.behaviour or self._behaviour_factory is None:
            return {}
        if self._behaviour is None:
            self._behaviour = self._behaviour_factory()
        return self._behaviour.strengths(self._vectors, {p: u.arrays for p, u in updates.items()})

    def _report(self, decision: RoundDecision, rejected, partition, strength) -> dict[int, dict]:
        report: dict[int, dict] = {}
        # Each client's row in each component's results (a dict: .index per client is quadratic in N).
        position = {c: {p: i for i, p in enumerate(result.client_ids)} for c, result in decision.components.items()}
        aggregated = set(decision.aggregated)
        for p, cat in decision.category.items():
            indicators = {f"{c}.{name}": float(values[position[c][p]])
                          for c, result in decision.components.items() if p in position[c]
                          for name, values in result.indicators.items()}
            report[p] = {"trust": decision.trust[p], "consensus": decision.consensus.get(p), "category": cat,
                         "decision": "aggregated" if p in aggregated else decision.dropped.get(p, ""),
                         "inspection": decision.inspection.get(p), "indicators": indicators,
                         "behaviour": strength.get(p)}
        for p, reason in decision.dropped.items():
            report.setdefault(p, {"trust": None, "category": "unscored", "decision": reason,
                                  "behaviour": strength.get(p)})
        for node, kind, detail in rejected:
            p = partition.get(node, node)
            report[p] = {"trust": None, "category": "unscored", "decision": f"{kind}: {detail}"}
        for p, entry in report.items():
            entry["reputation"] = self.reputation.points.get(p, 0)
            entry["participations"] = self.reputation.participations.get(p, 0)
            entry["reputation_rate"] = self.reputation.rate(p)
            entry["times_caught"] = self.reputation.times_caught(p)
        return report

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def save_state(self, path: str | Path) -> None:
        """Reputation to JSON (written atomically), so a restarted server carries it on."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"reputation": self.reputation.to_json()}, sort_keys=True))
        tmp.replace(path)

    def load_state(self, path: str | Path) -> None:
        try:
            data = json.loads(Path(path).read_text())
            self.reputation = Reputation.from_json(data["reputation"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"cannot restore trust state from {str(path)!r}: {err}") from None

