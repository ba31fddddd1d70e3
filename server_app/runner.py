"""The federation loop: initial evaluation, then train / aggregate / evaluate / record per round."""

from __future__ import annotations

import importlib
import random
import resource
import sys
import time
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from rich.console import Console
from safetensors.numpy import load_file
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedmm.core import protocol
from fedmm.robustness.attacks import malicious_clients, resolve_attack
from fedmm.core.config import DEFENSES
from fedmm.core.schema import ConfigError, RunConfig
from fedmm.core.components import flatten, is_expert, unflatten
from fedmm.models.encoders import lora_scaling
from fedmm.models.model import initial_global_vectors, module_bank, parameter_bytes, server_model, trainable_layouts
from fedmm.core.protocol import ReplyLimits
from fedmm.core.results import (
    RunFailed,
    RunResults,
    async_state_path,
    checkpoint_path,
    detection_scores,
    print_table,
    run_problems,
    summary_dict,
    strategy_state_path,
    trust_state_path,
)
from server_app.adversary import forge_replies
from server_app.async_rounds import AsyncRounds, RealTimeRounds, sync_round_time
from server_app.replies import uplink_bytes, widen_low_rank
from strategies import ComponentFedAvg, NodeRegistry
from strategies.evaluation import EvaluationResult
from strategies.oracle import OracleExclusion
from strategies import differential_privacy
from strategies.defended import DefendedStrategy
from fedmm.robustness.root_update import behaviour_check, root_update
from strategies.robust_baselines import robust_strategy, round_rules
from strategies.trust_scoring import TrustScoring
from strategies.nodes import node_messages, send_in_batches
from strategies.per_component import PerComponentStrategy, strategy_arguments


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (under simulation it also hosts Flower's engine)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _import_strategy(path: str) -> type[Strategy]:
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"config key 'strategy.name'={path!r} cannot be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"config key 'strategy.name'={path!r} is not a Flower Strategy class")
    return cls


def reply_limits(run: RunConfig) -> ReplyLimits:
    """Bounds on a training reply's counts: the most examples a client can train on in a round (when
    the config fixes it) and, under MoE routing, the fusion tokens an example of each modality brings."""
    if run.model.language_model:  # a language model's reply counts its wins: at most one per sample drawn
        f = run.feedback
        max_examples = f.prompts_per_round * (f.grpo_group if run.train.objective == "grpo" else 1)
    else:
        max_examples = run.train.local_steps * run.train.batch_size if run.train.local_steps else None
    tokens = None
    if _has_experts(run):
        bank = module_bank(run)
        tokens = {m: bank.tokens_per_example(m) for m in sorted({m for s in bank.specs.values() for m in s.modalities})}
    return ReplyLimits(max_examples, tokens)


def _has_experts(run: RunConfig) -> bool:
    """Whether the model has experts (in the fusion block or a MoE encoder): replies then hold subsets."""
    return any(is_expert(c) for c in trainable_layouts(server_model(run)))


# The defences that replace the mean by a rule per component (trust scoring wraps a strategy instead).
ROBUST_RULES = tuple(d for d in DEFENSES if d not in ("none", "trust", "oracle"))


def build_strategy(run: RunConfig, registry: NodeRegistry, limits: ReplyLimits | None = None) -> Strategy:
    """The training strategy named by `strategy.name`, behind the defence `defense.name` and the DP
    wrapper `dp.name`, checking replies against `limits` (default: reply_limits(run)); a ConfigError
    if they cannot serve this run. `composition(run)` says the order they apply in."""
    limits = limits or reply_limits(run)
    s, defense = run.strategy, run.defense.name
    common = dict(fraction_train=s.fraction_train, min_train_nodes=s.min_train_nodes,
                  fraction_evaluate=s.fraction_evaluate, limits=limits)
    if s.lora_aggregation == "flora" and (defense != "none" or s.mode != "sync"):
        raise ConfigError(f"config key 'strategy.lora_aggregation'='flora' merges each round's sum into the base "
                          f"weights, which fedmm does for synchronous rounds with no defence, not with "
                          f"defense.name={defense!r} and strategy.mode={s.mode!r}")
    if defense == "oracle":  # the simulator's truth, as the adversary reads it: a bound, not a defence
        if s.name != "fedmm":
            raise ConfigError(f"config key 'defense.name'='oracle' is a bound measured with strategy.name=fedmm, "
                              f"not with {s.name!r}")
        return OracleExclusion(registry, malicious_clients(run), **common, lora_aggregation=s.lora_aggregation,
                               layouts=trainable_layouts(server_model(run)))
    if s.name == "fedmm" and s.args:
        raise ConfigError(f"config key 'strategy.args.{next(iter(s.args))}': strategy.name=fedmm takes no "
                          "arguments; name a Flower strategy class to pass it some")
    robust = defense in ROBUST_RULES
    if s.lora_aggregation != "factors" and (s.name != "fedmm" or robust or run.dp.name != "none"):
        raise ConfigError(f"config key 'strategy.lora_aggregation'={s.lora_aggregation!r} is a rule of fedmm's "
                          f"per-component FedAvg (strategy.name=fedmm, alone or under defense.name=trust, no dp), "
                          f"not of strategy.name={s.name!r} with defense.name={defense!r} and dp.name={run.dp.name!r}")
    if s.name == "fedmm" and run.dp.name == "none":  # the fast paths
        lora = dict(lora_aggregation=s.lora_aggregation, layouts=trainable_layouts(server_model(run)),
                    lora_scaling=lora_scaling(run.model))
        base = (robust_strategy(run.defense, registry, run.seed, **common) if robust
                else ComponentFedAvg(registry, **common, **lora))
    else:
        base = _per_component(run, registry, robust, common)
    if defense == "trust":
        finetune = ((lambda vectors, server_round: root_update(run, vectors, server_round, run.defense.root_finetune_steps))
                    if run.defense.root_finetune_steps else None)
        return TrustScoring(base, registry, run.defense, trainable_layouts(server_model(run)), limits,
                            behaviour=lambda: behaviour_check(run), finetune=finetune)
    return base


def _per_component(run: RunConfig, registry: NodeRegistry, robust: bool, common: dict) -> PerComponentStrategy:
    """One Flower strategy per component: the inner strategy, behind the robust rule, behind DP."""
    s = run.strategy
    if s.name == "fedmm":
        cls, kwargs = FedAvg, {}
    else:
        cls = _import_strategy(s.name)
        kwargs = strategy_arguments(cls, s.args)

    def make() -> Strategy:
        strategy = cls(**kwargs)
        if robust:
            strategy = DefendedStrategy(strategy)
        if run.dp.name != "none":
            strategy = differential_privacy.wrap(run.dp, strategy, run.clients.num)
        return strategy

    try:  # one instance up front: the class's own checks of its arguments, then the DP wrapper's
        probe = cls(**kwargs)
    except Exception as err:
        raise ConfigError(f"config key 'strategy.name'={s.name!r}: cannot build it with {kwargs}: {err}") from None
    ledger = None
    if run.dp.name != "none":
        try:
            differential_privacy.wrap(run.dp, probe, run.clients.num)
        except ValueError as err:
            raise ConfigError(f"config keys 'dp.*' (dp.name={run.dp.name!r}): {err}") from None
        why_not = differential_privacy.unaccountable(probe, robust or run.defense.name == "trust")
        ledger = differential_privacy.PrivacyLedger(run.dp, run.clients.num, why_not)
    rule_for = round_rules(run.defense, run, run.seed) if robust else None
    return PerComponentStrategy(registry, make, cls.__name__, rule_for=rule_for, dp=run.dp, ledger=ledger, **common)


def composition(run: RunConfig) -> str:
    """The order the stages apply to a round's replies, e.g. `DP clip (server, fixed) -> krum ->
    FedAdam -> DP noise`, for the log and the summary."""
    stages = []
    dp = run.dp.name
    if run.defense.name == "trust":
        stages.append("trust scoring")
    if dp != "none":
        stages.append(f"DP clip ({dp.replace('-', ', ')}, per component)")
    if run.defense.name in ROBUST_RULES + ("oracle",):
        stages.append(run.defense.name)
    inner = "FedAvg" if run.strategy.name == "fedmm" and dp != "none" else run.strategy.name.rsplit(".", 1)[-1]
    stages.append(f"{inner} per component" if inner != "fedmm" else "fedmm per-component mean")
    if dp != "none":
        stages.append(f"DP noise ({differential_privacy.wrapper_name(run.dp)})")
    return " -> ".join(stages)


def check_strategy(run: RunConfig) -> None:
    """Fail on a bad `strategy.name` before any work starts."""
    build_strategy(run, NodeRegistry(run))


def _timeout(run: RunConfig) -> float | None:
    return run.strategy.reply_timeout or None


def _parameters(arrays: ArrayRecord, layouts) -> dict[str, np.ndarray]:
    """Component vectors -> tensors keyed by parameter name (what checkpoints hold)."""
    out: dict[str, np.ndarray] = {}
    for component, layout in layouts.items():
        out.update(unflatten(layout, protocol.decode_array(arrays[component], component, (layout.size,))))
    return out


def _evaluate(grid: Grid, evaluator: ComponentFedAvg, arrays: ArrayRecord, server_round: int,
              run: RunConfig) -> EvaluationResult:
    messages = list(evaluator.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
    replies = send_in_batches(grid, messages, _timeout(run))
    result = evaluator.pool_evaluation(server_round, replies)
    result.record["evaluate.clients-missing"] = len(messages) - len(replies)  # no reply within the timeout
    return result


def distill_stage(grid: Grid, registry: NodeRegistry, arrays: ArrayRecord, run: RunConfig) -> int:
    """After the last round: every client builds its final personal model (`train.distill`), in batches.

    Returns how many clients failed to.
    """
    nodes = registry.online()
    batch = run.personal.distill_batch or len(nodes)
    failed = 0
    for start in range(0, len(nodes), batch):
        messages = node_messages(nodes[start : start + batch], arrays, {protocol.SERVER_ROUND: run.rounds},
                                 protocol.DISTILL)
        for reply in send_in_batches(grid, messages, _timeout(run)):
            if reply.has_error():
                failed += 1
                log(WARNING, "distillation failed on node %d: %s", reply.metadata.src_node_id, reply.error.reason)
    return failed


def _restore_arrays(results: RunResults, layouts, server_round: int) -> dict[str, np.ndarray]:
    stored = load_file(str(checkpoint_path(results.out, server_round)))
    return {c: flatten(layout, stored) for c, layout in layouts.items()}


def _stateful(strategy: Strategy) -> list[tuple[TrustScoring | PerComponentStrategy, Callable[[Path, int], Path]]]:
    """The parts of the strategy that carry state from round to round, each with where it is saved."""
    parts: list = []
    if isinstance(strategy, TrustScoring):
        parts.append((strategy, trust_state_path))
        strategy = strategy.inner
    if isinstance(strategy, PerComponentStrategy):
        parts.append((strategy, strategy_state_path))
    return parts


def _restore(results: RunResults, layouts, strategy: Strategy) -> ArrayRecord:
    """The global model after the results folder's last complete round, and the strategy's state then."""
    if results.last_round > 0:
        for part, path in _stateful(strategy):
            part.load_state(path(results.out, results.last_round))
    return protocol.to_array_record(_restore_arrays(results, layouts, results.last_round))


def run_federation(grid: Grid, run: RunConfig) -> dict[str, Any]:
    """Run every round and write the results folder; returns the summary. With `run.resume`, carry on
    from the folder's last complete round: every random choice is seeded by seed and round, so the
    rest of the run is the one an uninterrupted run would have made."""
    registry = NodeRegistry(run)
    limits = reply_limits(run)  # computed once: it may run an encoder to count tokens
    strategy = build_strategy(run, registry, limits)
    # Evaluation is fedmm's measurement, the same whichever strategy trains.
    inner = strategy.inner if isinstance(strategy, TrustScoring) else strategy
    evaluator = inner if isinstance(inner, ComponentFedAvg) else ComponentFedAvg(
        registry, fraction_evaluate=run.strategy.fraction_evaluate)
    model = server_model(run)
    arrays = protocol.to_array_record(initial_global_vectors(run))
    layouts = trainable_layouts(model)
    full_bytes = parameter_bytes(model)
    trainable_bytes = sum(len(a.data) for a in arrays.values())
    rounds = ({"simulated": AsyncRounds, "real": RealTimeRounds}[run.strategy.async_clock](run, registry)
              if run.strategy.mode == "async" else None)
    attack = resolve_attack(run.attack)
    if rounds is not None and attack is not None and attack.model is not None:
        raise ConfigError(f"config key 'attack.name'={run.attack.name!r} forges updates from one round's global "
                          "model; strategy.mode=async does not support model-poisoning attacks yet")
    state_paths = tuple(path for _, path in _stateful(strategy)) + ((async_state_path,) if rounds else ())
    results = RunResults(run.out, run, state_paths=state_paths)
    if run.resume:
        arrays = _restore(results, layouts, strategy)
        log(INFO, "resuming %s after round %d", run.out, results.last_round)
        if run.personal.method != "fedavg":
            log(WARNING, "personal.method=%s keeps client state on disk: a round cut short may have "
                "updated it once already, so the resumed run can differ from an uninterrupted one",
                run.personal.method)
    started = time.monotonic()
    registry.discover(grid)
    discover_s = time.monotonic() - started
    strategy.summary()
    log(INFO, "aggregation, in order: %s", composition(run))
    ledger = next((part.ledger for part, _ in _stateful(strategy) if getattr(part, "ledger", None)), None)
    if rounds is not None:
        resumed = run.resume and results.last_round > 0
        rounds.begin(arrays, results.last_round, grid, strategy,
                     async_state_path(results.out, results.last_round) if resumed else None,
                     lambda v: protocol.to_array_record(_restore_arrays(results, layouts, v)))
    malicious = malicious_clients(run)
    malicious_nodes = {n.node_id for n in registry.nodes() if n.partition_id in malicious}
    last_update: dict[str, np.ndarray] | None = None
    if run.resume and attack is not None and attack.model is not None:
        # The colluders' last view: the last round that changed the global model, as they saw it.
        after = _restore_arrays(results, layouts, results.last_round)
        for r in range(results.last_round, 0, -1):
            before = _restore_arrays(results, layouts, r - 1)
            if any(not np.array_equal(after[k], before[k]) for k in after):
                last_update = {k: after[k] - before[k] for k in after}
                break
            after = before
    console = Console(stderr=True)
    columns = [TextColumn("[bold]round {task.completed}/{task.total}"), BarColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}")]
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("evaluating the initial model", total=run.rounds, completed=results.last_round)
        if not run.resume:
            record = {"round": 0, "time.discover_s": discover_s, "nodes.refused": len(registry.refused),
                      **_evaluate(grid, evaluator, arrays, 0, run).record}
            results.log_round(record)
            results.checkpoint(0, _parameters(arrays, layouts))
        simulated = next((r["time.simulated_s"] for r in reversed(results.history) if "time.simulated_s" in r), 0.0)
        for server_round in range(results.last_round + 1, run.rounds + 1):
            start = time.monotonic()
            random.seed(f"{run.seed}:{server_round}")  # Flower's own strategies sample with `random`
            np.random.seed((run.seed * 100_003 + server_round) % 2**32)  # ... and draw DP noise with np.random
            progress.update(bar, description=f"training round {server_round}")
            if rounds is not None:  # its replies come counted, widened and rebased
                replies, sampled = rounds.replies(server_round, strategy, arrays, grid, _timeout(run))
                uplink = rounds.uplink
            else:
                messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
                replies, sampled = send_in_batches(grid, messages, _timeout(run)), len(messages)
                partition_of = {m.metadata.dst_node_id: registry.info(m.metadata.dst_node_id).partition_id
                                for m in messages}
                if len(replies) < sampled:  # said at once: an operator (or deploy/run-hosts.sh) acts on it
                    missing = sorted(partition_of.keys() - {r.metadata.src_node_id for r in replies})
                    log(WARNING, "round %d: %d of %d training replies arrived; missing partitions %s",
                        server_round, len(replies), sampled, sorted(partition_of[n] for n in missing))
                simulated += sync_round_time(run, server_round, list(partition_of.values()))
                # Every reply that arrived used the uplink, accepted or not.
                uplink = [uplink_bytes(r) for r in replies if not r.has_error()]
                replies = widen_low_rank(replies, run)
            forging = attack is not None and attack.model is not None
            if forging:
                sent = protocol.decode_record(arrays)
                replies = forge_replies(replies, malicious_nodes, attack.model, run.attack, sent, last_update,
                                        seed=run.seed * 100_003 + server_round)
            new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
            changed = _changed_components(arrays, new_arrays)
            if new_arrays is not None:
                arrays = new_arrays
                if forging:  # colluders see consecutive global models
                    last_update = {k: v - sent[k] for k, v in protocol.decode_record(arrays).items()}
            else:
                log(WARNING, "round %d: no usable reply; global model unchanged", server_round)
            if rounds is not None:
                rounds.advance(server_round, arrays)
            record = {"round": server_round, "train.clients-sampled": sampled,
                      "train.components-changed": changed, "nodes.refused": len(registry.refused),
                      "uplink.bytes": sum(uplink), "uplink.replies": len(uplink)}
            record.update({f"train.{k}": v for k, v in (train_metrics or {}).items()})
            record.update(rounds.last if rounds is not None else {"time.simulated_s": simulated})
            if ledger is not None:
                record["dp.epsilon"] = ledger.report()["epsilon"]
            if isinstance(strategy, TrustScoring):
                record["trust"] = {str(p): entry for p, entry in sorted(strategy.last_report.items())}
            for part, path in _stateful(strategy):
                part.save_state(path(results.out, server_round))
            if rounds is not None:
                rounds.save_state(async_state_path(results.out, server_round))
            record.update(_evaluate(grid, evaluator, arrays, server_round, run).record)
            record["time.round_s"] = time.monotonic() - start
            record["server.peak_rss_mb"] = peak_rss_mb()
            results.checkpoint(server_round, _parameters(arrays, layouts))
            results.log_round(record)  # last: a round is complete once its record is written
            accs = "  ".join(f"{k.split('.')[1]} {v:.3f}" for k, v in record.items()
                             if k.startswith("global.") and k.endswith(".accuracy"))
            if rounds is not None:
                accs += f"  staleness {record['async.staleness_mean']:.1f} (max {record['async.staleness_max']:.0f})"
            progress.update(bar, completed=server_round, description=accs)
            log(INFO, "round %d: %s", server_round, accs)
        # The final measurement: every client, after the personalization stage (if the method has one).
        progress.update(bar, description="personalization stage")
        failed = distill_stage(grid, registry, arrays, run) if run.personal.method in ("fedavg_ft", "tap") else 0
        final = _evaluate(grid, ComponentFedAvg(registry, fraction_evaluate=run.strategy.fraction_final), arrays,
                          run.rounds + 1, run)
        results.log_round({"round": run.rounds, "stage": "final", "personal.clients-failed": failed, **final.record})
    summary = summary_dict(run, results.history, full_bytes, trainable_bytes)
    summary["final.per_client"] = {str(k): v for k, v in sorted(final.per_client.items())}
    summary["strategy.composition"] = composition(run)
    if ledger is not None:
        summary["dp"] = ledger.report()
    if attack is not None:
        summary["attack.malicious_clients"] = sorted(malicious)
    if isinstance(strategy, TrustScoring):
        summary.update(detection_scores(results.history, malicious))
        results.plot_trust(run.clients.num, set(malicious))
    summary["nodes.refused"] = {str(node): why for node, why in sorted(registry.refused.items())}
    never_changed = _never_changed(_restore_arrays(results, layouts, 0), protocol.decode_record(arrays))
    problems = run_problems(results.history, run.strategy.min_train_nodes, never_changed)
    summary["status"] = "failed" if problems and not run.strategy.allow_degraded else "completed"
    summary["problems"] = problems
    results.write_summary(summary)
    results.plot()
    results.plot_experts()
    results.plot_feedback()
    print_table(summary, console)
    if summary["status"] == "failed":
        raise RunFailed("the run did not do what it was asked (strategy.allow_degraded=true accepts it): "
                        + "; ".join(problems))
    return summary


def _changed_components(old: ArrayRecord, new: ArrayRecord | None) -> int:
    """How many components a round's aggregation moved."""
    if new is None:
        return 0
    before, after = protocol.decode_record(old), protocol.decode_record(new)  # zero-copy views
    return sum(not np.array_equal(before[k], after[k]) for k in before)


def _never_changed(initial: dict[str, np.ndarray], final: dict[str, np.ndarray]) -> list[str]:
    """Components the run left at their initial value; experts are exempt, since one that no client
    routed tokens to keeps its value by design."""
    return [c for c in sorted(initial) if not is_expert(c) and np.array_equal(initial[c], final[c])]
