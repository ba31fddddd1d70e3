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
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmm.core import protocol
from fedmm.core.asynchrony import VirtualClock, duration, rebase, staleness_weight
from fedmm.core.schema import RunConfig
from server_app.replies import uplink_bytes, widen_low_rank
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
        self.uplink: list[int] = []
        self._pending: list[int] = []

    def begin(self, arrays: ArrayRecord, version: int, grid: Grid, strategy: Strategy,
              state: Path | None = None, load_version: Callable[[int], ArrayRecord] | None = None) -> None:
        """Dispatch the first `concurrency` clients (by partition id) on the initial model, or, resuming
        after round `version`, restore the clock and the jobs in flight from `state`."""
        if state is not None and load_version is not None:
            self.load_state(state, load_version)
            return
        self.versions[version] = arrays
        for node in self.registry.nodes()[: concurrency(self.run)]:
            self.clock.dispatch(node.partition_id, version=version)

    def replies(self, server_round: int, strategy: Strategy, arrays: ArrayRecord, grid: Grid,
                timeout: float | None) -> tuple[list[Message], int]:
        """The next `buffer_size` arrivals, trained on the versions they were sent and rebased onto
        `arrays` (version server_round - 1) with their staleness discount; the strategy is left
        configured for this round's aggregation. Returns the replies and the jobs run."""
        jobs = self.clock.arrivals(buffer_size(self.run))
        node_of = {n.partition_id: n.node_id for n in self.registry.nodes()}
        arrived: list[tuple[Message, int]] = []
        for version in sorted({j.version for j in jobs}):
            mine = {node_of[j.partition] for j in jobs if j.version == version and j.partition in node_of}
            messages = [m for m in strategy.configure_train(version + 1, self.versions[version], ConfigRecord(), grid)
                        if m.metadata.dst_node_id in mine]
            arrived += [(reply, version) for reply in send_in_batches(grid, messages, timeout)]
        self.uplink = [uplink_bytes(r) for r, _ in arrived if not r.has_error()]
        replies, self.last = discounted(self.run, arrived, self.versions, server_round, arrays)
        strategy.configure_train(server_round, arrays, ConfigRecord(), grid)  # what it aggregates against
        self._pending = [j.partition for j in jobs]
        self.last.update({"async.in_flight": len(self.clock.jobs) + len(jobs), "time.simulated_s": self.clock.now})
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


class RealTimeRounds:
    """`strategy.async_clock=real`: jobs start when sent and replies are taken in the order they arrive
    (Flower's push / pull), for a deployment's real speeds. Arrivals are not reproducible, and a
    resumed run starts fresh jobs on the restored version (those in flight when the server died are
    lost). A node without a job (back online, or its reply was late) gets one when a version is made."""

    def __init__(self, run: RunConfig, registry: NodeRegistry) -> None:
        self.run, self.registry = run, registry
        self.versions: dict[int, ArrayRecord] = {}
        self.in_flight: dict[str, tuple[int, int]] = {}  # message id -> (node id, version)
        self.backlog: list[tuple[Message, int]] = []  # arrived, not yet aggregated
        self.last: dict[str, float] = {}
        self.uplink: list[int] = []
        self.started = time.monotonic()
        self._grid: Grid | None = None
        self._strategy: Strategy | None = None
        self._replied: list[int] = []

    def begin(self, arrays: ArrayRecord, version: int, grid: Grid, strategy: Strategy,
              state: Path | None = None, load_version: Callable[[int], ArrayRecord] | None = None) -> None:
        if state is not None:
            log(INFO, "async (real clock): resuming after version %d with fresh jobs; those in flight "
                "when the server stopped are lost", version)
        self._grid, self._strategy = grid, strategy
        self.started = time.monotonic()  # after discovery: the clock of the training itself
        self.versions[version] = arrays
        self._dispatch([n.node_id for n in self.registry.online()[: concurrency(self.run)]], version)

    def _dispatch(self, node_ids: list[int], version: int) -> None:
        assert self._grid is not None and self._strategy is not None
        wanted = set(node_ids)
        messages = [m for m in self._strategy.configure_train(version + 1, self.versions[version], ConfigRecord(),
                                                              self._grid) if m.metadata.dst_node_id in wanted]
        for message_id, message in zip(self._grid.push_messages(messages), messages):
            self.in_flight[message_id] = (message.metadata.dst_node_id, version)

    def replies(self, server_round: int, strategy: Strategy, arrays: ArrayRecord, grid: Grid,
                timeout: float | None) -> tuple[list[Message], int]:
        """The next `buffer_size` replies to arrive (fewer if `timeout` passes first), rebased and
        discounted as on the simulated clock."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self.backlog) < buffer_size(self.run) and self.in_flight:
            for reply in grid.pull_messages(list(self.in_flight)):
                node, version = self.in_flight.pop(reply.metadata.reply_to_message_id, (None, None))
                if version is not None:
                    self.backlog.append((reply, version))
            if len(self.backlog) >= buffer_size(self.run) or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(0.05)
        arrived = self.backlog[: buffer_size(self.run)]
        self.backlog = self.backlog[len(arrived):]
        self.uplink = [uplink_bytes(r) for r, _ in arrived if not r.has_error()]
        replies, self.last = discounted(self.run, arrived, self.versions, server_round, arrays)
        strategy.configure_train(server_round, arrays, ConfigRecord(), grid)  # what it aggregates against
        self._replied = [reply.metadata.src_node_id for reply, _ in arrived]
        self.last.update({"async.in_flight": len(self.in_flight) + len(self.backlog) + len(arrived),
                          "time.elapsed_s": time.monotonic() - self.started})
        return replies, len(arrived)

    def advance(self, server_round: int, arrays: ArrayRecord) -> None:
        """Version `server_round` made: idle online nodes (those that just replied first) get a job on it,
        up to `concurrency` in flight."""
        self.versions[server_round] = arrays
        busy = {node for node, _ in self.in_flight.values()} | {r.metadata.src_node_id for r, _ in self.backlog}
        online = [n.node_id for n in self.registry.online()]
        idle = [n for n in dict.fromkeys([*self._replied, *online]) if n in online and n not in busy]
        self._dispatch(idle[: max(concurrency(self.run) - len(busy), 0)], server_round)
        held = {v for _, v in self.in_flight.values()} | {v for _, v in self.backlog}
        self.versions = {v: a for v, a in self.versions.items() if v in held or v == server_round}

    def save_state(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"clock": "real"}))


def discounted(run: RunConfig, arrived: list[tuple[Message, int]], versions: dict[int, ArrayRecord],
               server_round: int, arrays: ArrayRecord) -> tuple[list[Message], dict[str, float]]:
    """Replies (each with the version it trained on) rebased onto `arrays` (version server_round - 1),
    each update discounted by its staleness; those past the bound dropped. Returns them and the figures."""
    current, now = server_round - 1, protocol.decode_record(arrays)
    widen_low_rank([reply for reply, _ in arrived], run)  # rebasing reads the global layout
    replies, staleness, dropped = [], [], 0
    for reply, version in arrived:
        tau = current - version
        if tau > run.strategy.max_staleness:
            dropped += 1
            continue
        staleness.append(tau)
        if not reply.has_error() and protocol.ARRAYS in reply.content:
            weight = staleness_weight(tau, run.strategy.staleness_exponent)
            reply = _rebased(reply, protocol.decode_record(versions[version]), now, weight)
        replies.append(reply)  # an error reply goes through: the strategy counts and reports it
    return replies, {"async.staleness_mean": float(np.mean(staleness)) if staleness else 0.0,
                     "async.staleness_max": float(max(staleness, default=0)), "async.dropped_stale": dropped}


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
