"""Forwarding a node's messages to its model worker (`fedmm worker`, see client_apps.worker).

With node config `model-worker=PATH`, fedmm's ClientApp (`forward_to_worker`, a Flower mod) only sends
the message to the worker listening on PATH and returns its reply.

Wire: over a Unix socket readable by its owner only, two length-framed frames each way, Flower's own
protobuf encodings of the Message and Context (never pickle): request = message, context; reply =
JSON status, then the reply message when the status is ok.
"""

from __future__ import annotations

import json
from multiprocessing.connection import Client

from flwr.app import Context, Message
from flwr.common.serde import context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

WORKER_KEY = "model-worker"  # node config key: the worker's socket path


class WorkerUnavailable(RuntimeError):
    pass


def forward_to_worker(message: Message, context: Context, call_next) -> Message:
    """Flower mod: with node config `model-worker`, the node's worker answers; otherwise this process."""
    path = str(context.node_config.get(WORKER_KEY, ""))
    if not path:
        return call_next(message, context)
    return request(path, message, context)


def request(path: str, message: Message, context: Context) -> Message:
    """Send one message (and the node's context) to the worker at `path`; its reply, as a reply to it."""
    try:
        conn = Client(path, family="AF_UNIX")
    except OSError as err:
        raise WorkerUnavailable(f"node config {WORKER_KEY}={path!r}: no model worker answers there ({err}); "
                                f"start it with `fedmm worker --socket {path}` or drop the key") from None
    with conn:
        try:
            conn.send_bytes(message_to_proto(message).SerializeToString())
            conn.send_bytes(context_to_proto(context).SerializeToString())
            status = json.loads(conn.recv_bytes())
            if not status.get("ok"):
                raise RuntimeError(f"model worker at {path!r} failed: {status.get('error', 'no reason given')}")
            reply = message_from_proto(ProtoMessage.FromString(conn.recv_bytes()))
        except (EOFError, ConnectionError) as err:
            raise WorkerUnavailable(f"model worker at {path!r} closed the connection before replying "
                                    f"({type(err).__name__}); did it crash? see its log") from None
    return Message(reply.content, reply_to=message)
