"""The federation loop: initial evaluation, then train / aggregate / evaluate / record per round."""

from __future__ import annotations

import importlib
import random
import time
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedmm import protocol
from fedmm.config import ConfigError, RunConfig
from fedmm.components import unflatten
from fedmm.model import all_tasks_model, component_vectors, parameter_bytes, trainable_layouts
from fedmm.results import RunResults, print_table, summary_dict
from strategies import ComponentFedAvg, NodeRegistry
from strategies.component_fedavg import aggregate_replies
from strategies.evaluation import task_scores
from strategies.nodes import array_shapes, node_messages


def _import_strategy(path: str) -> type[Strategy]:
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"config key 'strategy.name'={path!r} cannot be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"config key 'strategy.name'={path!r} is not a Flower Strategy class")
    return cls


def build_strategy(run: RunConfig, registry: NodeRegistry) -> Strategy:
    s = run.strategy
    if s.name == "fedmm":
        return ComponentFedAvg(registry, s.fraction_train, s.min_train_nodes, s.fraction_evaluate)
    cls = _import_strategy(s.name)
    held = {tuple(sorted(tasks)) for tasks in run.clients.profiles.values()}
    if len(held) > 1:
        raise ConfigError(
            f"config key 'strategy.name'={s.name!r}: a plain Flower strategy sends every client the same "
            f"arrays, but the profiles hold different tasks {sorted(held)}; use strategy.name=fedmm"
        )
    return cls(fraction_train=s.fraction_train, fraction_evaluate=s.fraction_evaluate,
               min_train_nodes=s.min_train_nodes, min_available_nodes=run.clients.num)


def _uplink_bytes(reply) -> int:
    if reply.has_error():
        return 0
    return sum(len(a.data) for record in reply.content.array_records.values() for a in record.values())


def _prevalidate(run_round: int, replies: list, registry: NodeRegistry, arrays: ArrayRecord) -> list:
    """For plain Flower strategies: drop replies that fail fedmm's validation before they aggregate."""
    sent = {n.node_id: n.components for n in registry.nodes()}
    result = aggregate_replies(replies, sent, array_shapes(arrays))
    bad = {node for node, _, _ in result.rejected}
    for node, _, detail in result.rejected:
        log(WARNING, "round %d: dropped reply of node %d (%s)", run_round, node, detail)
    return [r for r in replies if r.metadata.src_node_id not in bad]


def evaluate_global(grid: Grid, registry: NodeRegistry, arrays: ArrayRecord, server_round: int,
                    run: RunConfig) -> dict[str, float]:
    nodes = registry.sample(run.strategy.fraction_evaluate, 1, server_round, salt=1)
    messages = node_messages(nodes, arrays, {protocol.SERVER_ROUND: server_round}, MessageType.EVALUATE)
    scores, dropped = task_scores(grid.send_and_receive(messages, timeout=_timeout(run)))
    for node, reason in dropped:
        log(WARNING, "round %d: evaluation reply of node %d dropped (%s)", server_round, node, reason)
    record = {f"global.{t}.{k}": v for t, s in scores.items() for k, v in s.items()}
    record["evaluate.clients-dropped"] = len(dropped)
    return record


def _timeout(run: RunConfig) -> float | None:
    return run.strategy.reply_timeout or None


def _parameters(arrays: ArrayRecord, layouts) -> dict[str, np.ndarray]:
    """Component vectors -> tensors keyed by parameter name (what checkpoints hold)."""
    out: dict[str, np.ndarray] = {}
    for component, layout in layouts.items():
        out.update(unflatten(layout, protocol.decode_array(arrays[component], component, (layout.size,))))
    return out


def run_federation(grid: Grid, run: RunConfig) -> dict[str, Any]:
    """Run every round and write the results folder; returns the summary."""
    random.seed(run.seed)  # Flower's own strategies sample with `random`
    model = all_tasks_model(run)
    arrays = protocol.to_array_record(component_vectors(model))
    layouts = trainable_layouts(model)
    full_bytes = parameter_bytes(model)
    trainable_bytes = sum(len(a.data) for a in arrays.values())
    results = RunResults(run.out, run)
    registry = NodeRegistry(run)
    registry.discover(grid)
    strategy = build_strategy(run, registry)
    strategy.summary()
    uplink: list[int] = []
    console = Console(stderr=True)
    columns = [TextColumn("[bold]round {task.completed}/{task.total}"), BarColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}")]
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("evaluating the initial model", total=run.rounds)
        record = {"round": 0, **evaluate_global(grid, registry, arrays, 0, run)}
        results.log_round(record)
        results.checkpoint(0, _parameters(arrays, layouts))
        for server_round in range(1, run.rounds + 1):
            start = time.monotonic()
            progress.update(bar, description=f"training round {server_round}")
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
            replies = list(grid.send_and_receive(messages, timeout=_timeout(run)))
            uplink += [_uplink_bytes(r) for r in replies if not r.has_error()]
            if not isinstance(strategy, ComponentFedAvg):
                replies = _prevalidate(server_round, replies, registry, arrays)
            new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = new_arrays
            else:
                log(WARNING, "round %d: no usable reply; global model unchanged", server_round)
            record = {"round": server_round, "train.clients-sampled": len(messages)}
            record.update({f"train.{k}": v for k, v in (train_metrics or {}).items()})
            record.update(evaluate_global(grid, registry, arrays, server_round, run))
            record["time.round_s"] = time.monotonic() - start
            results.log_round(record)
            results.checkpoint(server_round, _parameters(arrays, layouts))
            accs = "  ".join(f"{k.split('.')[1]} {v:.3f}" for k, v in record.items()
                             if k.startswith("global.") and k.endswith(".accuracy"))
            progress.update(bar, completed=server_round, description=accs)
            log(INFO, "round %d: %s", server_round, accs)
    summary = summary_dict(run, results.history, uplink, full_bytes, trainable_bytes)
    results.write_summary(summary)
    results.plot()
    print_table(summary, console)
    return summary
