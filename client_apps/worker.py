"""The model worker: one long-lived process per node that keeps the model and the node's data loaded.

Flower 1.42's SuperNode starts a fresh `flwr-clientapp` process for every message, in both isolation
modes, so a ClientApp that trains in that process re-imports torch, rebuilds the model and re-encodes
its data each time. With node config `model-worker=PATH`, fedmm's ClientApp only forwards the message
(client_apps.forwarding) to `fedmm worker --socket PATH`; the worker runs the same ClientApp in one
process, whose caches (module bank, encoded splits) then live across messages and runs.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import threading
import time
from logging import ERROR, INFO
from multiprocessing.connection import Connection, Listener

from flwr.common.logger import log
from flwr.common.serde import context_from_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from client_apps.forwarding import WORKER_KEY

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
    # Import torch and the training code while the SuperNode connects and the run starts: the first
    # message would otherwise wait for it (10-30 s on a busy machine). Python's import lock makes an
    # early message wait for this import rather than start a second one.
    threading.Thread(target=importlib.import_module, args=("fedmm.training.client",), daemon=True).start()
    served = 0
    with listener:
        while True:
            with listener.accept() as conn:
                started = time.monotonic()
                _handle(conn, app)
                served += 1
                log(INFO, "model worker: message %d answered in %.2f s", served, time.monotonic() - started)
                sys.stderr.flush()
