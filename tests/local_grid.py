"""An in-process Flower Grid: delivers each message straight to a ClientApp, so the server loop can be
tested in seconds, with chosen nodes tampering with their replies."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Tamper = Callable[[Message], Message]


class LocalGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, tamper: dict[int, Tamper] | None = None) -> None:
        self.client_app = client_app
        # Node ids deliberately unrelated to partition ids, as in a real run.
        self.partition_of = {1000 + 37 * p: p for p in range(num_nodes)}
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"partition-id": p, "num-partitions": num_nodes},
                       state=RecordDict(), run_config={})
            for n, p in self.partition_of.items()
        }
        self.tamper = tamper or {}  # partition id -> function applied to that node's train replies
        self.tamper_evaluate: dict[int, Tamper] = {}  # the same for evaluate replies
        self.sent: list[Message] = []
        self.pending: dict[str, Message] = {}  # pushed, not yet pulled: message id -> reply
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0

    def set_run(self, run) -> None:  # pragma: no cover - not used in process
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.partition_of)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each message is handled at once; its reply waits to be pulled."""
        ids = []
        for message in messages:
            (reply,) = self.send_and_receive([message])
            self.pending[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.pending.pop(m) for m in list(message_ids) if m in self.pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            # What the SuperLink would stamp on a pushed message (read-only fields in Flower's API).
            message.metadata.__dict__.update(_message_id=uuid.uuid4().hex, _src_node_id=0, _run_id=1)
            message.metadata.created_at = time.time()
            self.sent.append(message)
            reply = self.client_app(message, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node
            partition = self.partition_of[node]
            if partition in self.tamper and message.metadata.message_type == "train":
                reply = self.tamper[partition](reply)
            if partition in self.tamper_evaluate and message.metadata.message_type == "evaluate":
                reply = self.tamper_evaluate[partition](reply)
            replies.append(reply)
        return replies


def as_reply(template: Message, content: RecordDict) -> Message:
    metadata = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=template.metadata.src_node_id,
                        dst_node_id=0, reply_to_message_id=template.metadata.reply_to_message_id,
                        group_id="", created_at=time.time(), ttl=60.0,
                        message_type=template.metadata.message_type)
    return Message(metadata=metadata, content=content)


def with_nan(reply: Message) -> Message:
    """A train reply whose first array starts with NaN."""
    from flwr.app import Array

    from fedmm.core import protocol

    record = reply.content[protocol.ARRAYS]
    key = next(iter(record.keys()))
    bad = record[key].numpy().copy()
    bad[0] = float("nan")
    record[key] = Array(bad)
    return reply
