"""What a ClientApp message costs cold (a fresh process, as Flower 1.42's SuperNodes run every message)
against warm (a process that already served one, as `fedmm simulate`'s Ray actors do).

A child process imports fedmm, then handles two training messages of the same client in a row; it
reports the import time and the wall time of each message. The first message pays for building the
model and encoding the client's data; the second reuses both. Prints one JSON line.

    python benchmarks/client_start.py [key=value ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
start = time.perf_counter()
from fedmm import client
from fedmm.config import load_config
from fedmm.model import initial_global_vectors
imported = time.perf_counter()
run = load_config(overrides=sys.argv[1:])
me = client.identify(run, {"partition-id": 2})  # the multimodal client: both encoders, three tasks
times = []
for server_round in (1, 2):
    t = time.perf_counter()
    arrays = initial_global_vectors(run)
    client.train(run, me, arrays, server_round)
    times.append(time.perf_counter() - t)
print(json.dumps({"import_s": imported - start, "first_message_s": times[0], "warm_message_s": times[1]}))
"""


def main() -> None:
    overrides = [*sys.argv[1:], "out=/tmp/fedmm-client-start"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *overrides], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    cold = wall - child["warm_message_s"]  # interpreter start + imports + first message
    result = {**{k: round(v, 3) for k, v in child.items()}, "cold_process_message_s": round(cold, 3),
              "cold_vs_warm_ratio": round(cold / child["warm_message_s"], 2), "overrides": sys.argv[1:]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
