"""Server cost against federation size: N = 100, 1,000 and 10,000 virtual clients, 20 sampled a round.

Each N is one `fedmm simulate` run on this machine's Ray (Flower's Simulation Engine), with the same
model, the same 20 clients trained and 20 evaluated per round, and each client's data generated from
its id when it is first sampled (`data.examples_per_client`), so only the server's share of the cost
can grow with N. Per N it reports the median round time over rounds 2..R (round 1 also warms the
workers), the server process's peak resident memory (the process that runs the ServerApp and, in
simulation, Flower's engine with its per-node state) and the one-off node discovery (one query
message per node). Prints one JSON line per N, then the ratios as the last line.

    python benchmarks/scale.py [--sizes 100 1000 10000] [--rounds 4] [--out /tmp/fedmm-scale] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SAMPLED = 20
SETTING = ["data.examples_per_client=40", "train.local_steps=5", "train.batch_size=8",
           f"strategy.min_train_nodes={SAMPLED}"]


def run_size(n: int, rounds: int, out: Path, extra: list[str]) -> dict:
    folder = out / f"n{n}"
    fraction = SAMPLED / n
    overrides = [*SETTING, f"clients.num={n}", f"rounds={rounds}", f"strategy.fraction_train={fraction}",
                 f"strategy.fraction_evaluate={fraction}", f"strategy.fraction_final={fraction}", *extra]
    cmd = [sys.executable, "-m", "fedmm.cli", "simulate", "--out", str(folder), *overrides]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"N={n} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rounds_ = [r for r in records if r.get("round", 0) >= 1 and "time.round_s" in r]
    sampled = {r["train.clients-sampled"] for r in rounds_}
    if sampled != {SAMPLED}:
        raise RuntimeError(f"N={n}: {sampled} clients sampled per round, expected {SAMPLED}")
    return {
        "clients": n,
        "round_time_s": statistics.median(r["time.round_s"] for r in rounds_[1:]),
        "round_times_s": [round(r["time.round_s"], 3) for r in rounds_],
        "server_peak_rss_mb": rounds_[-1]["server.peak_rss_mb"],
        "discover_s": records[0]["time.discover_s"],
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedmm-scale"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 warms the workers and is left out of the median)")
    results = {}
    for n in args.sizes:
        results[n] = run_size(n, args.rounds, args.out, args.overrides)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results[n].items()}),
              flush=True)
    small, large = min(results), max(results)
    summary = {
        f"round_time_ratio_{large}_vs_{small}": round(results[large]["round_time_s"] / results[small]["round_time_s"], 3),
        f"server_rss_ratio_{large}_vs_{small}": round(results[large]["server_peak_rss_mb"]
                                                      / results[small]["server_peak_rss_mb"], 3),
        **{f"round_time_s_{n}": round(r["round_time_s"], 3) for n, r in results.items()},
        **{f"server_peak_rss_mb_{n}": round(r["server_peak_rss_mb"], 1) for n, r in results.items()},
        **{f"discover_s_{n}": round(r["discover_s"], 1) for n, r in results.items()},
        "sampled_per_round": SAMPLED, "rounds": args.rounds, "setting": [*SETTING, *args.overrides],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
