"""fedmm's single-pass message poller in Flower's real Simulation Engine (real Ray)."""

import json
import subprocess
import sys

import pytest

# Every node gets one query, node 0 a second; each reply names the node's partition. The poller is
# wrapped to count how many messages each sweep took.
SCRIPT = r"""
import json, sys, time
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from flwr.server.superlink.fleet.vce import vce_api
from fedmm.engine import simulation_engine

sweeps = []
take = simulation_engine.take_pending
def counted(state, nodes):
    taken = take(state, nodes)
    sweeps.append(len(taken))
    return taken
simulation_engine.take_pending = counted
simulation_engine.use_single_pass_poller()
assert vce_api.add_messages_to_queue is simulation_engine.deliver_pending

client = ClientApp()

@client.query()
def query(message, context):
    answer = {"partition": int(context.node_config["partition-id"]), "k": int(message.content["c"]["k"])}
    return Message(RecordDict({"r": ConfigRecord(answer)}), reply_to=message)

server = ServerApp()
result = {}

@server.main()
def main(grid, context):
    while len(nodes := sorted(grid.get_node_ids())) < int(sys.argv[1]):  # the engine registers them
        time.sleep(0.5)
    messages = [Message(RecordDict({"c": ConfigRecord({"k": i})}), dst_node_id=n, message_type=MessageType.QUERY)
                for i, n in enumerate(nodes)]
    messages.append(Message(RecordDict({"c": ConfigRecord({"k": -1})}), dst_node_id=nodes[0],
                            message_type=MessageType.QUERY))
    replies = grid.send_and_receive(messages, timeout=120)
    result["replies"] = sorted([r.content["r"]["k"], r.content["r"]["partition"]] for r in replies)

run_simulation(server, client, num_supernodes=int(sys.argv[1]),
               backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}})
print(json.dumps({**result, "sweeps": [s for s in sweeps if s]}))
"""


@pytest.mark.slow
def test_every_message_is_delivered_once_and_a_node_gets_one_at_a_time():
    nodes = 40
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(nodes)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    replies = {k: p for k, p in out["replies"]}
    assert sorted(replies) == list(range(-1, nodes))  # every message answered exactly once
    assert sorted(p for k, p in out["replies"] if k >= 0) == list(range(nodes))
    assert replies[-1] == replies[0]  # the second message went to the same node as the first
    assert sum(out["sweeps"]) == nodes + 1
    # One pass takes every node's pending message (not one node per call, as Flower's poller asks),
    # but never two for one node: node 0's second message waits for a later sweep.
    assert out["sweeps"][0] == nodes
