"""Asynchronous rounds (`strategy.mode=async`): the server keeps `strategy.concurrency` clients busy and
makes a new global version whenever `strategy.buffer_size` replies have arrived (FedBuff).

Arrivals follow the simulated clock of `fedmm.core.asynchrony` (client speeds spread by
`clients.speed_spread`), so a seed fixes their order and a resumed run repeats it. A job runs when
its arrival is processed, on the global version it was sent: that version's arrays are kept while
some job still holds it (and reloaded from its checkpoint on resume). Each reply is rebased onto the
current global model with its staleness discount and handed to the strategy as an ordinary round's
reply, so validation, trust scoring, the inner strategy and checkpoints work unchanged; a reply
staler than `strategy.max_staleness` is dropped (counted).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmm.core import protocol
from fedmm.core.asynchrony import Job, VirtualClock, duration, rebase, staleness_weight
from fedmm.core.schema import RunConfig
from strategies.nodes import NodeRegistry, send_in_batches


def buffer_size(run: RunConfig) -> int:
    """Replies per aggregation: `strategy.buffer_size`, or a third of the clients in flight."""
    return run.strategy.buffer_size or max(run.strategy.min_train_nodes, round(concurrency(run) / 3))


def concurrency(run: RunConfig) -> int:
    return run.strategy.concurrency or run.clients.num


class AsyncRounds:
    """The clock, the jobs in flight and the versions they were sent."""

    def __init__(self, run: RunConfig, registry: NodeRegistry) -> None:
        self.run, self.registry = run, registry
        self.clock = VirtualClock(run.seed, run.clients.speed_spread)
        self.versions: dict[int, ArrayRecord] = {}
        self.last: dict[str, float] = {}
        self._pending: list[int] = []

    def start(self, arrays: ArrayRecord) -> None:
        """Dispatch the first `concurrency` clients (by partition id) on the initial model."""
        self.versions[0] = arrays
        for node in self.registry.nodes()[: concurrency(self.run)]:
            self.clock.dispatch(node.partition_id, version=0)

    def replies(self, server_round: int, strategy: Strategy, arrays: ArrayRecord, grid: Grid,
                timeout: float | None) -> tuple[list[Message], int]:
        """The next `buffer_size` arrivals, trained on the versions they were sent and rebased onto
        `arrays` (version server_round - 1) with their staleness discount; the strategy is left
        configured for this round's aggregation. Returns the replies and the jobs run."""
        current = server_round - 1
        jobs = self.clock.arrivals(buffer_size(self.run))
        node_of = {n.partition_id: n.node_id for n in self.registry.nodes()}
        replies: list[Message] = []
        staleness, dropped = [], 0
        for version in sorted({j.version for j in jobs}):
            mine = {node_of[j.partition]: j for j in jobs if j.version == version and j.partition in node_of}
            messages = [m for m in strategy.configure_train(version + 1, self.versions[version], ConfigRecord(), grid)
                        if m.metadata.dst_node_id in mine]
            sent = protocol.decode_record(self.versions[version])
            now = protocol.decode_record(arrays)
            for reply in send_in_batches(grid, messages, timeout):
                tau = current - version
                if tau > self.run.strategy.max_staleness:
                    dropped += 1
                    continue
                staleness.append(tau)
                if not reply.has_error() and protocol.ARRAYS in reply.content:
                    replies.append(_rebased(reply, sent, now, staleness_weight(tau, self.run.strategy.staleness_exponent)))
                else:
                    replies.append(reply)  # the strategy counts and reports it
        strategy.configure_train(server_round, arrays, ConfigRecord(), grid)  # what it aggregates against
        self._pending = [j.partition for j in jobs]
        self.last = {"async.staleness_mean": float(np.mean(staleness)) if staleness else 0.0,
                     "async.staleness_max": float(max(staleness, default=0)), "async.dropped_stale": dropped,
                     "async.in_flight": len(self.clock.jobs) + len(jobs), "time.simulated_s": self.clock.now}
        return replies, len(jobs)

    def advance(self, server_round: int, arrays: ArrayRecord) -> None:
        """The new global version `server_round`: the clients that just replied get their next job on it."""
        self.versions[server_round] = arrays
        for partition in self._pending:
            self.clock.dispatch(partition, version=server_round)
        held = {j.version for j in self.clock.jobs}
        self.versions = {v: a for v, a in self.versions.items() if v in held or v == server_round}

    def save_state(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.clock.to_json()))

    def load_state(self, path: str | Path, load_version: Callable[[int], ArrayRecord]) -> None:
        self.clock = VirtualClock.from_json(self.run.seed, self.run.clients.speed_spread,
                                            json.loads(Path(path).read_text()))
        self.versions = {v: load_version(v) for v in sorted({j.version for j in self.clock.jobs})}
        log(INFO, "async: %d jobs in flight at simulated time %.1f s", len(self.clock.jobs), self.clock.now)


def _rebased(reply: Message, sent: dict[str, np.ndarray], now: dict[str, np.ndarray], weight: float) -> Message:
    record = reply.content[protocol.ARRAYS]
    try:
        trained = {k: protocol.decode_array(record[k], k, sent[k].shape) for k in record.keys()}
    except (protocol.ReplyError, KeyError):
        return reply  # malformed: left for the strategy's validation to reject with its reason
    reply.content[protocol.ARRAYS] = ArrayRecord(protocol.encode_arrays(rebase(trained, sent, now, weight)))
    return reply


def sync_round_time(run: RunConfig, server_round: int, partitions: list[int]) -> float:
    """Simulated seconds of a synchronous round: it waits for its slowest sampled client."""
    return max((duration(run.seed, p, server_round - 1, run.clients.speed_spread) for p in partitions), default=0.0)


__all__ = ["AsyncRounds", "Job", "buffer_size", "concurrency", "sync_round_time"]
