"""The model worker: one long-lived process per node that keeps the model and the node's data loaded.

Flower 1.42's SuperNode starts a fresh `flwr-clientapp` process for every message, in both isolation
modes, so a ClientApp that trains in that process re-imports torch, rebuilds the model and re-encodes
its data each time. With node config `model-worker=PATH`, fedmm's ClientApp (`forward_to_worker`, a
Flower mod) only forwards the message to `fedmm worker --socket PATH` and returns its reply; the
worker runs the same ClientApp in one process, whose caches (module bank, encoded splits) then live
across messages and runs.

Wire: over a Unix socket readable by its owner only, two length-framed frames each way, Flower's own
protobuf encodings of the Message and Context (never pickle): request = message, context; reply =
JSON status, then the reply message when the status is ok.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from logging import ERROR, INFO
from multiprocessing.connection import Client, Connection, Listener

from flwr.app import Context, Message
from flwr.common.logger import log
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
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


def _handle(conn: Connection, app) -> None:
    try:
        message = message_from_proto(ProtoMessage.FromString(conn.recv_bytes()))
        context = context_from_proto(ProtoContext.FromString(conn.recv_bytes()))
        # This process is the worker: it must answer, not forward again.
        context.node_config = {k: v for k, v in context.node_config.items() if k != WORKER_KEY}
        reply = app(message, context)
        if reply.has_error():
            raise RuntimeError(reply.error.reason)
    except Exception as err:  # the ClientApp process turns it into Flower's error reply
        log(ERROR, "model worker: %s: %s", type(err).__name__, err)
        conn.send_bytes(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"}).encode())
        return
    conn.send_bytes(json.dumps({"ok": True}).encode())
    conn.send_bytes(message_to_proto(reply).SerializeToString())


def _clear_stale_socket(path: str) -> None:
    """A socket file left by a killed worker blocks the address; one that still answers is in use."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise SystemExit(f"fedmm worker: another worker already listens on {path}")


def _exit_with_parent(parent: int) -> None:
    """Stop when the process that started us (the SuperNode's launcher) is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def serve(path: str, exit_with_parent: bool = False) -> None:
    """Answer messages forwarded by this node's ClientApp processes, one at a time, until killed."""
    from client_apps.app import make_client_app

    app = make_client_app()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _clear_stale_socket(path)
    old = os.umask(0o177)  # the socket is the node's model: its owner only
    try:
        listener = Listener(path, family="AF_UNIX")
    finally:
        os.umask(old)
    if exit_with_parent:
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    log(INFO, "model worker listening on %s (pid %d)", path, os.getpid())
    served = 0
    with listener:
        while True:
            with listener.accept() as conn:
                started = time.monotonic()
                _handle(conn, app)
                served += 1
                log(INFO, "model worker: message %d answered in %.2f s", served, time.monotonic() - started)
                sys.stderr.flush()
