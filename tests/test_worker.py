"""The model worker: a node's ClientApp messages answered by one long-lived process."""

import os
import stat
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from local_grid import LocalGrid
from safetensors.numpy import load_file

from client_apps.app import make_client_app
from client_apps.forwarding import WORKER_KEY, WorkerUnavailable, request
from fedmm.core.config import load_config, to_flat
from server_app.runner import run_federation

FAST = ["clients.num=3", "data.examples_per_task=240", "model.image_encoder=", "model.text_encoder=", "model.hidden_size=32", "model.intermediate_size=64",
        "model.fusion_dim=16", "rounds=2", "train.local_steps=3", "train.batch_size=8"]


@pytest.fixture
def worker(tmp_path):
    path = str(tmp_path / "node" / "worker.sock")
    log = open(tmp_path / "worker.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "fedmm.cli", "worker", "--socket", path], stderr=log, stdout=log)
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
        time.sleep(0.2)
    yield path, tmp_path / "worker.log"
    proc.kill()
    proc.wait()
    log.close()


def _as_deployed(grid: LocalGrid, run, worker_path: str = "") -> LocalGrid:
    """Contexts as a SuperNode gives them: the run config flat, the worker in the node config."""
    for context in grid.contexts.values():
        context.run_config = to_flat(run)
        if worker_path:
            context.node_config = {**context.node_config, WORKER_KEY: worker_path}
    return grid


@pytest.mark.slow
def test_a_federation_through_the_worker_ends_where_one_without_it_does(tmp_path, worker):
    path, log = worker
    here = load_config(overrides=[*FAST, f"out={tmp_path / 'here'}"])
    there = load_config(overrides=[*FAST, f"out={tmp_path / 'there'}"])
    run_federation(_as_deployed(LocalGrid(make_client_app(), 3), here), here)
    grid = _as_deployed(LocalGrid(make_client_app(), 3), there, path)
    run_federation(grid, there)
    a = load_file(str(tmp_path / "here" / "checkpoints" / "round-0002.safetensors"))
    b = load_file(str(tmp_path / "there" / "checkpoints" / "round-0002.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    answered = log.read_text().count("answered in")
    assert answered == len(grid.sent) > 0  # every message, query to final evaluation, went to the worker
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_worker_error_comes_back_named(tmp_path, worker):
    path, _ = worker
    run = load_config(overrides=[*FAST, f"out={tmp_path / 'out'}"])
    grid = _as_deployed(LocalGrid(make_client_app(), 3), run, path)
    node = next(iter(grid.contexts))
    grid.contexts[node].node_config[("partition-id")] = 7  # outside clients.num
    with pytest.raises(RuntimeError, match="partition-id 7 is outside"):
        list(grid.send_and_receive([Message(RecordDict(), dst_node_id=node, message_type="query")]))


def test_a_worker_that_dies_mid_message_is_named(tmp_path):
    path = str(tmp_path / "dying.sock")
    listener = Listener(path, family="AF_UNIX")

    def accept_then_die():
        conn = listener.accept()
        conn.recv_bytes()
        conn.close()

    thread = threading.Thread(target=accept_then_die)
    thread.start()
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    message = Message(RecordDict(), dst_node_id=5, message_type="query")
    message.metadata.__dict__.update(_message_id="m1", _src_node_id=0, _run_id=1)
    with pytest.raises(WorkerUnavailable, match="closed the connection before replying"):
        request(path, message, context)
    thread.join()
    listener.close()


def test_no_worker_at_the_path_names_the_node_config_key(tmp_path):
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(WorkerUnavailable, match=f"node config {WORKER_KEY}="):
        request(str(tmp_path / "none.sock"), Message(RecordDict(), dst_node_id=5, message_type="query"), context)
