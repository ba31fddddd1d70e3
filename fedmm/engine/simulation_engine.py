"""A fix to Flower 1.42's Simulation Engine for federations of thousands of virtual clients.

Flower's engine finds work by asking the link state, every 0.1 s, for a message to each node in turn;
each ask scans every stored message under the state's lock. A sweep costs nodes x messages: at 10,000
nodes the poller alone holds the lock (and the GIL) for most of a round, and a query to every node
(fedmm's discovery) is quadratic. `deliver_pending` does the same job in one pass over the stored
messages: the same checks (expiry, federation) through Flower's own `_check_stored_messages`, the
same `delivered_at` mark, and at most one message per node per sweep, as Flower delivers.

It relies on `InMemoryLinkState` internals (the message store and its lock), so it applies only to
that state class and to the flwr version range fedmm pins; any other state gets Flower's own poller.
"""

from __future__ import annotations

import threading
from queue import Queue

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

_FLOWER_POLLER = vce_api.add_messages_to_queue


def take_pending(state: InMemoryLinkState, nodes: set[int] | dict[int, int]) -> list[Message]:
    """Undelivered messages to `nodes`, at most one per node (the oldest), marked delivered."""
    with state.lock:
        first: dict[int, str] = {}
        for message_id, message in state.message_ins_store.items():
            meta = message.metadata
            if meta.delivered_at == "" and meta.dst_node_id in nodes and meta.dst_node_id not in first:
                first[meta.dst_node_id] = message_id
        state._check_stored_messages(set(first.values()))  # drops expired and out-of-federation messages
        taken = [state.message_ins_store[m] for m in first.values() if m in state.message_ins_store]
        delivered_at = now().isoformat()
        for message in taken:
            message.metadata.delivered_at = delivered_at
    return taken


def deliver_pending(state, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Drop-in for `vce_api.add_messages_to_queue`: one pass over the stored messages per sweep."""
    if not isinstance(state, InMemoryLinkState):
        _FLOWER_POLLER(state, queue, nodes_mapping, f_stop)
        return
    while not f_stop.is_set():
        for message in take_pending(state, nodes_mapping):
            queue.put(message)
        f_stop.wait(0.1)


def use_single_pass_poller() -> None:
    """Make Flower's Simulation Engine find messages with `deliver_pending` (idempotent)."""
    vce_api.add_messages_to_queue = deliver_pending
