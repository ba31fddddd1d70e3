"""Robust-aggregation baselines, applied per component over the clients holding it.

Flower's own rules (Krum, MultiKrum, Bulyan, FedMedian, FedTrimmedAvg) run unchanged on each
component's replies; FLAME (HDBSCAN on cosine distances, norm clipping, noise) is ours. Clients
hold different components, so a rule that compares whole updates compares each component's
holders separately.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.common.logger import log
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy

from fedmm.core.schema import DefenseConfig
from fedmm.core.protocol import ClientUpdate
from strategies.component_fedavg import AggregateResult, ComponentFedAvg, drop_nonfinite, holders_by_component
from strategies.nodes import NodeRegistry
from strategies.per_component import VECTOR, component_replies

# A rule maps (round, component, its holders' vectors and weights, the sent vector) to the
# component's new vector, or None to keep it unchanged this round.
ComponentRule = Callable[[int, str, list[np.ndarray], list[float], np.ndarray], "np.ndarray | None"]


def assumed_attackers(holders: int, configured: int, per_attacker: int = 2) -> int:
    """Attackers a Krum-style rule may assume among `holders`: the configured count (or 30%),
    capped so the rule stays defined (n > per_attacker x f + 2)."""
    wanted = configured or int(0.3 * holders)
    return max(0, min(wanted, (holders - 3) // per_attacker))


def flower_rule(name: str, defense: DefenseConfig) -> ComponentRule:
    """One of Flower's robust strategies as a per-component rule."""

    def make(n: int) -> Strategy:
        if name == "krum":
            return Krum(num_malicious_nodes=assumed_attackers(n, defense.num_malicious))
        if name == "multikrum":
            f = assumed_attackers(n, defense.num_malicious)
            return MultiKrum(num_malicious_nodes=f, num_nodes_to_select=n - f)
        if name == "bulyan":
            return Bulyan(num_malicious_nodes=assumed_attackers(n, defense.num_malicious, per_attacker=4))
        if name == "median":
            return FedMedian()
        if name == "trimmed_mean":
            return FedTrimmedAvg(beta=defense.trim_fraction)
        raise ValueError(f"unknown Flower rule {name!r}")

    def rule(server_round: int, component: str, vectors: list[np.ndarray], weights: list[float], sent: np.ndarray):
        arrays, _ = make(len(vectors)).aggregate_train(server_round, component_replies(vectors, weights))
        return None if arrays is None else arrays[VECTOR].numpy().astype(np.float32)

    return rule


def flame_rule(noise_factor: float = 0.001, seed: int = 0) -> ComponentRule:
    """FLAME (Nguyen et al., 2022): HDBSCAN over pairwise cosine distances of the updates (min
    cluster size n/2 + 1), keep the largest cluster, clip each kept update to the median norm of all,
    average, add Gaussian noise of std noise_factor x that norm."""
    from sklearn.cluster import HDBSCAN

    def rule(server_round: int, component: str, vectors: list[np.ndarray], weights: list[float], sent: np.ndarray):
        deltas = np.stack(vectors) - sent
        n = len(deltas)
        norms = np.linalg.norm(deltas, axis=1)
        keep = np.ones(n, dtype=bool)
        if n >= 3:
            unit = deltas / np.maximum(norms, 1e-12)[:, None]
            distances = np.clip(1.0 - unit @ unit.T, 0.0, 2.0).astype(np.float64)
            labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                             allow_single_cluster=True, copy=True).fit_predict(distances)
            if (labels >= 0).any():
                keep = labels == np.bincount(labels[labels >= 0]).argmax()
        clip = float(np.median(norms))
        clipped = deltas[keep] * np.minimum(1.0, clip / np.maximum(norms[keep], 1e-12))[:, None]
        rng = np.random.default_rng([seed, server_round, n, *component.encode()])
        noise = rng.standard_normal(deltas.shape[1]) * noise_factor * clip
        return (sent + clipped.mean(axis=0) + noise).astype(np.float32)

    return rule


def aggregate_with_rule(server_round: int, updates: list[ClientUpdate], sent: Mapping[str, np.ndarray],
                        rule: ComponentRule, name: str = "rule") -> tuple[dict[str, np.ndarray], list[str]]:
    """New vector of each component that had holders, by `rule` over them, and the components the
    rule declined (left unchanged)."""
    out, declined = {}, []
    for component, holders in holders_by_component(updates).items():
        vectors = [np.array(u.arrays[component]) for u in holders]
        weights = [u.component_weights[component] for u in holders]
        new = rule(server_round, component, vectors, weights, sent[component])
        if new is None:
            log(WARNING, "round %d: %s keeps %s unchanged (%d holders)", server_round, name, component, len(holders))
            declined.append(component)
            continue
        out[component] = new
    return out, declined


RoundRules = Callable[[int, Mapping[str, np.ndarray]], ComponentRule]  # (round, sent vectors) -> that round's rule


class RobustComponentStrategy(ComponentFedAvg):
    """ComponentFedAvg's sampling and validation, with a robust rule in place of the weighted mean."""

    def __init__(self, registry: NodeRegistry, rule_for: RoundRules, name: str, **kwargs) -> None:
        super().__init__(registry, **kwargs)
        self.rule_for = rule_for
        self.name = name

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> aggregation rule per component: %s", self.name)

    def combine(self, server_round: int, updates: list[ClientUpdate],
                shapes: Mapping[str, tuple[int, ...]]) -> AggregateResult:
        finite, rejected = drop_nonfinite(updates)
        sent = self.sent_vectors()
        arrays, declined = aggregate_with_rule(server_round, finite, sent, self.rule_for(server_round, sent), self.name)
        return AggregateResult(arrays, finite, rejected, declined)


def fltrust_weights(deltas: np.ndarray, server_delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLTrust (Cao et al., 2021): trust ReLU(cos(Δ_i, g0)) and each Δ_i rescaled to ||g0||."""
    g_norm = float(np.linalg.norm(server_delta))
    norms = np.linalg.norm(deltas, axis=1)
    cos = deltas @ server_delta / np.maximum(norms * g_norm, 1e-12)
    return np.maximum(cos, 0.0), deltas * (g_norm / np.maximum(norms, 1e-12))[:, None]


def fltrust_rule(server: Mapping[str, np.ndarray]) -> ComponentRule:
    """FLTrust per component, against the server's own update on its root set this round."""

    def rule(_round: int, component: str, vectors: list[np.ndarray], weights: list[float], base: np.ndarray):
        trust, rescaled = fltrust_weights(np.stack(vectors) - base, server[component])
        if trust.sum() <= 0:
            return None
        return (base + (trust / trust.sum()).astype(np.float32) @ rescaled).astype(np.float32)

    return rule


def round_rules(defense: DefenseConfig, run, seed: int) -> RoundRules:
    """The rule of each round that `defense.name` names; FLTrust's is rebuilt each round from the
    server's update on its root set (`fedmm.robustness.root_update`)."""
    if defense.name == "fltrust":
        from fedmm.robustness.root_update import root_update

        return lambda server_round, sent: fltrust_rule(root_update(run, sent, server_round))
    rule = flame_rule(seed=seed) if defense.name == "flame" else flower_rule(defense.name, defense)
    return lambda server_round, sent: rule


def robust_strategy(defense: DefenseConfig, registry: NodeRegistry, seed: int, **kwargs) -> RobustComponentStrategy:
    """The baseline `defense.name` names, per component."""
    return RobustComponentStrategy(registry, round_rules(defense, registry.run, seed), defense.name, **kwargs)
