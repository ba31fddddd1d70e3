"""Any Flower strategy on a mismatched federation: one instance per component, over its holders.

Clients hold different components, so a strategy that expects every reply to carry the same arrays
runs once per component: its own instance (server-side optimiser state lives per component), primed
with the component's global vector through its public `configure_train`, then given each holder's
vector of that component as a one-array reply weighted by the examples (or, for an expert, the routed
tokens) that trained it. Sampling and reply validation stay fedmm's (`ComponentFedAvg`).
"""

from __future__ import annotations

import inspect
import json
import logging
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT
from safetensors.numpy import load_file, save_file

from fedmm.core import protocol
from fedmm.core.protocol import ClientUpdate
from fedmm.core.schema import ConfigError, DpConfig
from strategies.component_fedavg import AggregateResult, ComponentFedAvg, drop_nonfinite, holders_by_component
from strategies.differential_privacy import PrivacyLedger, is_adaptive, is_client_side
from strategies.nodes import NodeRegistry

VECTOR = "v"  # the one array of a per-component reply


def component_replies(vectors: list[np.ndarray], weights: list[float], losses: list[float] | None = None,
                      loss_key: str = "train_loss", extra: list[dict[str, float]] | None = None) -> list[Message]:
    """Each holder's vector of one component as the one-array train reply Flower's strategies read;
    with `losses`, each reply also reports its holder's training loss under `loss_key` (QFedAvg), and
    with `extra`, further metrics of each reply (the norm bit client-side adaptive clipping reads)."""
    out = []
    for i, (vector, weight) in enumerate(zip(vectors, weights)):
        metrics = MetricRecord({protocol.NUM_EXAMPLES: int(weight)})
        if losses is not None:
            metrics[loss_key] = float(losses[i])
        if extra is not None:
            metrics.update(extra[i])
        metadata = Metadata(run_id=0, message_id=f"component-{i}", src_node_id=i + 1, dst_node_id=0,
                            reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                            message_type="train")
        content = RecordDict({protocol.ARRAYS: ArrayRecord({VECTOR: Array(vector)}),
                              protocol.METRICS: metrics})
        out.append(Message(metadata=metadata, content=content))
    return out


class _Holders(Grid):
    """What a strategy's `configure_train` sees of one component: `count` nodes, never messaged."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self) -> Iterable[int]:
        return range(1, self.count + 1)

    def set_run(self, run) -> None:  # pragma: no cover - never called by configure_train
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        raise NotImplementedError


@contextmanager
def _quiet_flower():
    """A strategy logs its sampling and aggregation once per call; per component that is noise."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class PerComponentStrategy(ComponentFedAvg):
    """`make()` builds one Flower strategy per component (the inner strategy, behind a robust rule
    and a DP wrapper where configured); each aggregates its component's holders.

    `rule_for(round, sent vectors)` gives the round's robust rule to a `DefendedStrategy` layer;
    `dp` the DP configuration, whose clipping this class checks (client side) and whose privacy
    `ledger` accounts."""

    def __init__(self, registry: NodeRegistry, make: Callable[[], Strategy], name: str,
                 rule_for: Callable[[int, Mapping[str, np.ndarray]], Callable] | None = None,
                 dp: DpConfig | None = None, ledger: PrivacyLedger | None = None, **kwargs) -> None:
        super().__init__(registry, **kwargs)
        self.make = make
        self.name = name
        self.rule_for = rule_for
        self.dp = dp if dp is not None and dp.name != "none" else None
        self.ledger = ledger
        self.instances: dict[str, Strategy] = {}
        self._template: Strategy | None = None  # an instance that only ever configures, for train_config
        self._norms_sent: dict[str, float] = {}  # client-side DP: the bound each component was sent with

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> per component: %s", self.name)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """fedmm's sampling and messages, carrying whatever train config the strategy itself adds (FedProx's
        `proximal-mu`, which the client's local training reads) and, under client-side DP, each
        component's clipping norm (adaptive clipping moves them apart)."""
        added = self.train_config(server_round)
        if self.dp is not None and is_client_side(self.dp):
            added.pop(KEY_CLIPPING_NORM, None)
            self._norms_sent = {c: float(self.instance(c).clipping_norm) for c in arrays.keys()}
            added.update({f"{protocol.CLIPPING_NORM_PREFIX}{c}": n for c, n in self._norms_sent.items()})
        return super().configure_train(server_round, arrays, ConfigRecord({**added, **dict(config)}), grid)

    def train_config(self, server_round: int) -> dict:
        """The config entries the strategy's own `configure_train` puts in a train message."""
        if self._template is None:
            self._template = self.make()
        template = self._template
        messages = _prime(template, server_round, ArrayRecord(), holders=1)
        if not messages:
            return {}
        key = getattr(_innermost(template), "configrecord_key", protocol.CONFIG)
        added = dict(messages[0].content[key]) if key in messages[0].content else {}
        added.pop(protocol.SERVER_ROUND, None)
        return added

    def instance(self, component: str) -> Strategy:
        if component not in self.instances:
            self.instances[component] = self.make()
        return self.instances[component]

    def combine(self, server_round: int, updates: list[ClientUpdate],
                shapes: Mapping[str, tuple[int, ...]]) -> AggregateResult:
        finite, rejected = drop_nonfinite(updates)
        sent = self.sent_vectors()
        if self.dp is not None and is_client_side(self.dp):
            finite, unclipped = check_client_clipping(finite, sent, self._norms_sent, is_adaptive(self.dp))
            rejected += unclipped
        rule = self.rule_for(server_round, sent) if self.rule_for is not None else None
        arrays, declined, releases = {}, [], {u.node_id: 0 for u in finite}
        for component, holders in holders_by_component(finite).items():
            strategy = self.instance(component)
            for layer in _layers(strategy):
                if hasattr(layer, "num_sampled_clients"):  # DP noise is sigma * C / (this round's holders)
                    layer.num_sampled_clients = len(holders)
                if hasattr(layer, "use_rule"):  # strategies.defended.DefendedStrategy
                    layer.use_rule(rule, component)
            # The public way a strategy learns the round's global arrays (FedOpt's moments need them).
            _prime(strategy, server_round, ArrayRecord({VECTOR: Array(sent[component])}), len(holders))
            # Under DP each holder counts once: the noise is calibrated to an unweighted mean.
            weights = [1.0 if self.dp else u.component_weights[component] for u in holders]
            extra = [{KEY_NORM_BIT: u.metrics.get(f"{protocol.NORM_BIT_PREFIX}{component}", 0.0)}
                     for u in holders] if self.dp else None
            with _quiet_flower():
                new, _ = strategy.aggregate_train(server_round, component_replies(
                    [np.asarray(u.arrays[component]) for u in holders], weights,
                    [_train_loss(u) for u in holders], getattr(_innermost(strategy), "train_loss_key", "train_loss"),
                    extra))
            for u in holders:
                releases[u.node_id] += 1
            if new is None:
                declined.append(component)
                continue
            vector = new[VECTOR].numpy() if VECTOR in new else None
            if vector is None or vector.shape != sent[component].shape or not np.isfinite(vector).all():
                # The global model never takes a malformed or non-finite value; the component waits a round.
                log(WARNING, "round %d: %s returned an unusable %s (%s); kept unchanged", server_round, self.name,
                    component, "missing" if vector is None else f"shape {vector.shape}, finite {np.isfinite(vector).all()}")
                declined.append(component)
                continue
            arrays[component] = np.ascontiguousarray(vector, dtype=np.float32)
        if self.ledger is not None and releases:
            self.ledger.record_round(max(releases.values()), max(len(finite), 1), self.instance(next(iter(arrays or sent))))
        return AggregateResult(arrays, finite, rejected, declined)

    def save_state(self, path: str | Path) -> None:
        """Every instance's array state (optimiser moments, momentum, its copy of the global vector)
        to safetensors, and its plain numbers in the file's metadata, so a resumed run is exact."""
        tensors, scalars = {}, {}
        for component, strategy in sorted(self.instances.items()):
            for depth, layer in enumerate(_layers(strategy)):
                for attr, value in vars(layer).items():
                    where = ".".join(["strategy"] * depth + [attr])  # a wrapper's inner strategy is `.strategy`
                    for key, array in _arrays_of(value).items():
                        tensors[f"{component}/{where}/{key}"] = np.ascontiguousarray(array)
                    if isinstance(value, (bool, int, float)) and not isinstance(value, np.generic):
                        scalars[f"{component}/{where}"] = value
        metadata = {"scalars": json.dumps(scalars)}
        if self.ledger is not None:
            metadata["privacy"] = self.ledger.state()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)

    def load_state(self, path: str | Path) -> None:
        from safetensors import safe_open

        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="numpy") as f:
                metadata = f.metadata() or {}
            scalars = json.loads(metadata.get("scalars", "{}"))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot restore the strategy's state from {str(path)!r}: {err}") from None
        grouped: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for name, array in tensors.items():
            component, where, key = name.split("/", 2)
            grouped.setdefault((component, where), {})[key] = array
        for (component, where), arrays in grouped.items():
            _set_at(self.instance(component), where, _restored(arrays))
        for name, value in scalars.items():
            component, where = name.split("/", 1)
            _set_at(self.instance(component), where, value)
        if self.ledger is not None and "privacy" in metadata:
            self.ledger.restore(metadata["privacy"])


def check_client_clipping(updates: list[ClientUpdate], sent: Mapping[str, np.ndarray], norms: Mapping[str, float],
                          need_norm_bits: bool) -> tuple[list[ClientUpdate], list]:
    """Client-side DP trusts each node to clip; the server checks it did: every component's update
    within the norm it was sent (float32 rounding aside) and, under adaptive clipping, a 0/1 norm bit
    for it. A node that did not is dropped from the round."""
    kept, rejected = [], []
    for u in updates:
        problem = None
        for component, vector in u.arrays.items():
            norm = float(np.linalg.norm(np.asarray(vector, dtype=np.float64) - sent[component]))
            bound = norms.get(component, 0.0)
            if norm > bound * (1 + 1e-4) + 1e-6:
                problem = f"{component} update norm {norm:.4g} exceeds its clipping norm {bound:.4g}"
                break
            bit = u.metrics.get(f"{protocol.NORM_BIT_PREFIX}{component}")
            if need_norm_bits and bit not in (0.0, 1.0):
                problem = f"no 0/1 {protocol.NORM_BIT_PREFIX}{component} for adaptive clipping (got {bit!r})"
                break
        if problem is None:
            kept.append(u)
        else:
            rejected.append((u.node_id, "unclipped", f"node {u.node_id}: {problem}"))
    return kept, rejected


def _layers(strategy: Strategy) -> list[Strategy]:
    """A strategy and what it wraps, outermost first (Flower's wrappers keep the inner one as `.strategy`)."""
    out = [strategy]
    while isinstance(getattr(out[-1], "strategy", None), Strategy):
        out.append(out[-1].strategy)
    return out


def _innermost(strategy: Strategy) -> Strategy:
    return _layers(strategy)[-1]


def _set_at(strategy: Strategy, where: str, value: object) -> None:
    *path, attr = where.split(".")
    target = strategy
    for step in path:
        target = getattr(target, step)
    setattr(target, attr, value)


def _train_loss(update: ClientUpdate) -> float:
    """A client's training loss this round: the mean over the tasks it trained (loss-based strategies
    such as QFedAvg weigh clients by it)."""
    losses = [v for k, v in update.metrics.items() if k.startswith(protocol.TRAIN_LOSS_PREFIX)]
    return float(np.mean(losses)) if losses else 0.0


def _prime(strategy: Strategy, server_round: int, arrays: ArrayRecord, holders: int) -> list[Message]:
    """`strategy.configure_train` on a stand-in grid of `holders` nodes (at least the counts the strategy
    waits for), quietly: the messages are never sent, but the strategy records the round's arrays and
    puts its own train config in them."""
    # Every layer's counts: a wrapper's inner strategy would otherwise wait forever for more nodes.
    nodes = max([holders] + [getattr(layer, attr, 1) for layer in _layers(strategy)
                             for attr in ("min_available_nodes", "min_train_nodes")])
    with _quiet_flower():
        return list(strategy.configure_train(server_round, arrays, ConfigRecord(), _Holders(nodes)))


def _arrays_of(value: object) -> dict[str, np.ndarray]:
    """The arrays an attribute holds, by a key that says where: an array, a list of arrays, a dict of
    arrays or an ArrayRecord (Flower's strategies keep their state in these)."""
    if isinstance(value, np.ndarray):
        return {"array": value}
    if isinstance(value, ArrayRecord):
        return {f"record:{k}": v.numpy() for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
        return {f"list:{i}": v for i, v in enumerate(value)}
    if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
        return {f"dict:{k}": v for k, v in value.items()}
    return {}


def _restored(arrays: dict[str, np.ndarray]) -> object:
    """An attribute rebuilt from what `_arrays_of` saved."""
    kind = next(iter(arrays)).split(":", 1)[0]
    if kind == "array":
        return arrays["array"]
    if kind == "record":
        return ArrayRecord({k.split(":", 1)[1]: Array(v) for k, v in arrays.items()})
    if kind == "list":
        return [arrays[f"list:{i}"] for i in range(len(arrays))]
    return {k.split(":", 1)[1]: v for k, v in arrays.items()}


# fedmm samples the clients of a round itself; a per-component instance's own sampling is never used.
SAMPLING_ARGUMENTS = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
                      "min_available_nodes")


def strategy_arguments(cls: type[Strategy], args: Mapping[str, str]) -> dict[str, object]:
    """`strategy.args.<name>=text` -> keyword arguments of `cls`, each converted to the type its
    signature names; an unknown name or a value of the wrong type is a ConfigError naming both."""
    params = inspect.signature(cls).parameters
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: fall back to reading values as YAML scalars
        hints = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out: dict[str, object] = {}
    for name, text in args.items():
        key = f"strategy.args.{name}"
        if name in SAMPLING_ARGUMENTS:
            raise ConfigError(f"config key {key!r}: fedmm samples each round's clients itself; set "
                              f"'strategy.{name.replace('_evaluate_nodes', '_train_nodes')}' instead"
                              if name != "min_available_nodes" else
                              f"config key {key!r}: fedmm waits for clients.num nodes itself; leave it out")
        if name not in params and not takes_any:
            accepted = sorted(n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
            raise ConfigError(f"config key {key!r}: {cls.__name__} has no argument {name!r} "
                              f"(it takes {', '.join(accepted)})")
        out[name] = _convert(key, cls.__name__, str(text), hints.get(name))
    return out


def _convert(key: str, owner: str, text: str, hint: object) -> object:
    """`text` as the type `hint` names (bool, int, float, str, and their Optional / union forms)."""
    import yaml

    if hint is None or hint is typing.Any:  # not annotated: read it as a YAML scalar
        return yaml.safe_load(text) if text.strip() else ""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = typing.get_args(hint) if union else (hint,)
    word = text.strip().lower()
    if word in ("none", "null", "~") and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and word in ("true", "false"):
            return word == "true"
        if kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                continue
        if kind is str:
            return text
    names = " | ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"config key {key!r}: {owner} wants {names}, got {text!r}")
