"""Which node holds which components: a small registry filled by one `query` message per node.

Nodes answer with their partition id and profile; the server keeps only these few fields per node.
Sampling orders nodes by partition id, so a seeded run samples the same clients whatever node ids
the transport assigned.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedmm.core import protocol
from fedmm.training.client import assigned_profile
from fedmm.core.schema import RunConfig
from fedmm.models.model import client_components


# Messages in flight at once. Flower checks every pending message id each time it polls for replies,
# so one send of 10,000 messages costs quadratic time (minutes); batches keep each poll small.
MESSAGE_BATCH = 256


@dataclass(frozen=True)
class NodeInfo:
    node_id: int
    partition_id: int
    profile: str
    tasks: tuple[str, ...]
    components: tuple[str, ...]


class NodeRegistry:
    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self._nodes: dict[int, NodeInfo] = {}
        self._partitions: dict[int, int] = {}  # partition id -> node id
        self._online: set[int] = set()  # node ids the grid listed at the last discovery or refresh
        self.refused: dict[int, str] = {}  # node id -> why its profile reply was refused (until one is accepted)

    def __len__(self) -> int:
        return len(self._nodes)

    def info(self, node_id: int) -> NodeInfo:
        return self._nodes[node_id]

    def nodes(self) -> list[NodeInfo]:
        return sorted(self._nodes.values(), key=lambda n: (n.partition_id, n.node_id))

    def order(self) -> dict[int, int]:
        """node id -> partition id, the order replies are combined in."""
        return {n.node_id: n.partition_id for n in self._nodes.values()}

    def discover(self, grid: Grid, timeout: float = 300.0) -> None:
        """Wait for `clients.num` nodes, then learn each unknown node's partition and profile."""
        expected, start = self.run.clients.num, time.monotonic()
        while len(node_ids := list(grid.get_node_ids())) < expected:
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"only {len(node_ids)} of clients.num={expected} nodes connected in {timeout:.0f} s")
            time.sleep(1.0)
        self._online = set(node_ids)
        self._ask(grid, sorted(n for n in node_ids if n not in self._nodes), timeout)
        log(INFO, "registry: %d nodes, profiles %s", len(self._nodes),
            {p: sum(n.profile == p for n in self._nodes.values()) for p in self.run.clients.profiles})

    def refresh(self, grid: Grid, timeout: float = 300.0) -> None:
        """Before a round: the nodes the SuperLink lists as online now (a dead node drops out once its
        heartbeats stop, instead of costing every round a reply timeout), and the profiles of
        newcomers, such as a restarted SuperNode taking its partition back."""
        if not self._nodes:
            self.discover(grid, timeout)
            return
        self._online = set(grid.get_node_ids())
        self._ask(grid, sorted(self._online - self._nodes.keys()), timeout)

    def online(self) -> list[NodeInfo]:
        """Registered nodes that were online at the last discovery or refresh, by partition id."""
        return [n for n in self.nodes() if n.node_id in self._online]

    def _ask(self, grid: Grid, node_ids: list[int], timeout: float) -> None:
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        for reply in sorted(send_in_batches(grid, messages, timeout), key=lambda r: r.metadata.src_node_id):
            node_id = reply.metadata.src_node_id
            try:
                self._register(reply)
                self.refused.pop(node_id, None)
            except (ValueError, KeyError, TypeError) as err:
                self.refused[node_id] = str(err)
                log(WARNING, "node %s left out: bad profile reply (%s)", node_id, err)

    def _register(self, reply: Message) -> None:
        if reply.has_error():
            raise ValueError(reply.error.reason)
        record = reply.content[protocol.PROFILE]
        profile = str(record[protocol.PROFILE])
        partition_id = record[protocol.PARTITION_ID]
        if isinstance(partition_id, bool) or not isinstance(partition_id, int):
            raise ValueError(f"partition id {partition_id!r} is not an integer")
        if not 0 <= partition_id < self.run.clients.num:
            raise ValueError(f"partition id {partition_id} outside 0..{self.run.clients.num - 1}")
        holder = self._partitions.get(partition_id)
        if holder is not None and holder in self._online:
            raise ValueError(f"partition id {partition_id} is already taken by another node")
        if profile != assigned_profile(self.run, partition_id):
            raise ValueError(f"profile {profile!r} is not the one partition {partition_id} has")
        tasks = tuple(self.run.clients.profiles[profile])
        if str(record[protocol.TASKS]) != ",".join(tasks):
            raise ValueError(f"tasks {record[protocol.TASKS]!r} disagree with profile {profile!r}")
        node_id = reply.metadata.src_node_id
        if holder is not None:  # the partition's earlier node went offline: this one replaces it
            del self._nodes[holder]
            log(INFO, "node %d takes partition %d over from offline node %d", node_id, partition_id, holder)
        self._nodes[node_id] = NodeInfo(node_id, partition_id, profile, tasks, client_components(tasks, self.run))
        self._partitions[partition_id] = node_id

    def sample(self, fraction: float, min_nodes: int, server_round: int, salt: int = 0) -> list[NodeInfo]:
        """A seeded sample of the online nodes: the same clients whatever ids the transport gave them."""
        nodes = self.online()
        size = min(len(nodes), max(int(round(fraction * len(nodes))), min_nodes))
        if size >= len(nodes):
            return nodes
        rng = np.random.default_rng([self.run.seed, server_round, salt])
        picked = sorted(rng.choice(len(nodes), size=size, replace=False))
        return [nodes[i] for i in picked]


def send_in_batches(grid: Grid, messages: Sequence[Message], timeout: float | None) -> list[Message]:
    """`grid.send_and_receive` over `messages`, MESSAGE_BATCH at a time; `timeout` applies per batch."""
    replies: list[Message] = []
    for first in range(0, len(messages), MESSAGE_BATCH):
        replies.extend(grid.send_and_receive(messages[first : first + MESSAGE_BATCH], timeout=timeout))
        if len(messages) > MESSAGE_BATCH:  # a long send (discovery at thousands of nodes) shows progress
            log(INFO, "%d of %d messages answered or timed out", min(first + MESSAGE_BATCH, len(messages)),
                len(messages))
    return replies


def node_messages(nodes: Iterable[NodeInfo], arrays: ArrayRecord, config: Mapping[str, int | float | str],
                  message_type: str) -> list[Message]:
    """One message per node carrying only the vectors of that node's components.

    The `Array` objects are shared between records, so each vector is serialized once per round.
    """
    messages = []
    for node in nodes:
        record = ArrayRecord({c: arrays[c] for c in node.components})
        content = RecordDict({protocol.ARRAYS: record, protocol.CONFIG: ConfigRecord(dict(config))})
        messages.append(Message(content, dst_node_id=node.node_id, message_type=message_type))
    return messages


def array_shapes(arrays: ArrayRecord) -> dict[str, tuple[int, ...]]:
    return {k: tuple(arrays[k].shape) for k in arrays.keys()}
