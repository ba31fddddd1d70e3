"""What a ClientApp message costs on a SuperNode, where Flower 1.42 starts a fresh process per message.

Three ways, measured side by side on one client (partition 2, the multimodal profile: both encoders,
three tasks), each a training message of `train.local_steps` steps:

- cold: a fresh process that imports fedmm, builds the model, encodes the client's data and trains
  (the SuperNode without a model worker);
- worker: a fresh process that imports only Flower and fedmm's ClientApp and forwards the message to
  a model worker that already served one (`deploy/supernode.sh`'s default); its wall time includes
  the interpreter start, the imports, the transfer both ways and the training;
- warm: the second message inside one process (what `fedmm simulate`'s Ray actors do).

Prints one JSON line with the times and `cold_vs_worker_ratio`.

    python benchmarks/client_start.py [--repeats 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTITION = 2

COLD = r"""
import json, sys, time
start = time.perf_counter()
from fedmm.training import client
from fedmm.core.config import load_config
from fedmm.models.model import initial_global_vectors
imported = time.perf_counter()
run = load_config(overrides=sys.argv[2:])
me = client.identify(run, {"partition-id": int(sys.argv[1])})
times = []
for server_round in (1, 2):
    t = time.perf_counter()
    client.train(run, me, initial_global_vectors(run), server_round)
    times.append(time.perf_counter() - t)
print(json.dumps({"import_s": imported - start, "first_message_s": times[0], "warm_message_s": times[1]}))
"""

FORWARD = r"""
import json, sys, time
start = time.perf_counter()
from flwr.app import ConfigRecord, Context, Message, RecordDict
from safetensors.numpy import load_file
from client_apps.app import make_client_app
from flwr.supercore.task_identity import TaskIdentity
from fedmm.core import protocol
imported = time.perf_counter()
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # what a SuperNode's process has
arrays, flat, socket, partition = load_file(sys.argv[1]), json.loads(open(sys.argv[2]).read()), sys.argv[3], int(sys.argv[4])
content = RecordDict({protocol.ARRAYS: protocol.to_array_record(arrays),
                      protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 1})})
message = Message(content, dst_node_id=7, message_type="train")
message.metadata.__dict__.update(_message_id="m1", _src_node_id=0, _run_id=1)  # what the SuperLink stamps
context = Context(run_id=1, node_id=7, node_config={"partition-id": partition, "model-worker": socket},
                  state=RecordDict(), run_config=flat)
reply = make_client_app()(message, context)
assert not reply.has_error() and protocol.ARRAYS in reply.content
print(json.dumps({"import_s": imported - start, "torch_imported": "torch" in sys.modules}))
"""


def _child(code: str, *args: str) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per way; the fastest counts")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    overrides = [*args.overrides, "out=/tmp/fedmm-client-start"]

    from safetensors.numpy import save_file

    from fedmm.core.config import load_config, to_flat
    from fedmm.models.model import initial_global_vectors

    run = load_config(overrides=overrides)
    tmp = Path(tempfile.mkdtemp(prefix="fedmm-client-start-"))
    save_file(initial_global_vectors(run), str(tmp / "arrays.safetensors"))
    (tmp / "run.json").write_text(json.dumps(to_flat(run)))
    socket = str(tmp / "worker.sock")
    worker = subprocess.Popen([sys.executable, "-m", "fedmm.cli", "worker", "--socket", socket], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "worker.log", "w"))
    try:
        while not os.path.exists(socket):
            if worker.poll() is not None:
                raise SystemExit((tmp / "worker.log").read_text()[-3000:])
            time.sleep(0.2)
        forward = (FORWARD, str(tmp / "arrays.safetensors"), str(tmp / "run.json"), socket, str(PARTITION))
        worker_first, _ = _child(*forward)  # the worker builds the model and encodes the data once
        worker_runs = [_child(*forward) for _ in range(args.repeats)]
        cold_runs = [_child(COLD, str(PARTITION), *overrides) for _ in range(args.repeats)]
    finally:
        worker.kill()
        worker.wait()
    worker_s, worker_child = min(worker_runs, key=lambda r: r[0])
    cold_wall, cold_child = min(cold_runs, key=lambda r: r[0])
    cold_s = cold_wall - cold_child["warm_message_s"]  # interpreter start + imports + first message
    result = {
        "cold_process_message_s": round(cold_s, 3),
        "cold_import_s": round(cold_child["import_s"], 3),
        "cold_first_message_s": round(cold_child["first_message_s"], 3),
        "worker_process_message_s": round(worker_s, 3),
        "worker_process_import_s": round(worker_child["import_s"], 3),
        "worker_process_imports_torch": worker_child["torch_imported"],
        "worker_first_message_s": round(worker_first, 3),
        "warm_message_s": round(cold_child["warm_message_s"], 3),
        "cold_vs_worker_ratio": round(cold_s / worker_s, 2),
        "repeats": args.repeats,
        "overrides": args.overrides,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
