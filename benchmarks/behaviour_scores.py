"""How well the behaviour check separates backdoored client models from honest non-IID ones.

Replays the default federation round by round without Flower (the same client training, the same
poisoning), and after each round reads every client's model (global + its update) with the trust
defence's behaviour check (fedmm.robustness.behaviour: the flip rate of the best universal trigger,
per modality). Prints, per round, the ROC AUC of malicious against honest clients (1.0: every
attacker ranks above every honest client) and whom the check catches, and a JSON summary last:

    python benchmarks/behaviour_scores.py --seeds 0 7 --poison 0.5 0.2 --rounds 4

`--aggregate none` averages every update into the next global model (the backdoor grows in it, as in
an undefended run); `oracle` averages the honest ones only (what a working defence leaves).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedmm.core.config import load_config  # noqa: E402
from fedmm.core.aggregation import weighted_mean  # noqa: E402
from fedmm.models.model import client_components, initial_global_vectors, server_model, server_tasks  # noqa: E402
from fedmm.robustness.behaviour import BehaviourCheck, behaviour_outliers  # noqa: E402
from fedmm.robustness.attacks import malicious_clients  # noqa: E402
from fedmm.robustness.root_update import root_data  # noqa: E402
from fedmm.training.client import ClientIdentity, assigned_profile, train  # noqa: E402


def client_models(run, global_vectors, server_round):
    """Each client's trained component vectors after one round from `global_vectors`."""
    out = {}
    for p in range(run.clients.num):
        profile = assigned_profile(run, p)
        me = ClientIdentity(p, profile, tuple(run.clients.profiles[profile]))
        sent = {c: global_vectors[c] for c in client_components(list(me.tasks), run)}
        vectors, _, counts, _ = train(run, me, sent, server_round)
        out[p] = (me.tasks, vectors, counts)
    return out


def mean_update(global_vectors, clients, members):
    """Each component's weighted mean over the members holding it (the product's FedAvg maths)."""
    new = dict(global_vectors)
    for c in global_vectors:
        rows = [(clients[p][1][c], clients[p][2][c]) for p in members if c in clients[p][1]]
        if rows:
            new[c] = weighted_mean(np.stack([v for v, _ in rows]), np.array([n for _, n in rows], dtype=np.float64))
    return new


def scores_for_round(check, global_vectors, clients):
    """Per client: the product's behaviour reading (trigger flip rate per modality), and the largest."""
    strength = check.strengths(global_vectors, {p: vectors for p, (_, vectors, _) in clients.items()})
    return {p: {**{f"flips.{m}": v for m, v in s.items()}, "flips.max": max(s.values())} for p, s in strength.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 7])
    parser.add_argument("--poison", type=float, nargs="+", default=[0.5, 0.2])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--aggregate", choices=["none", "oracle"], default="oracle")
    parser.add_argument("--attack", default="backdoor")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    summary = {}
    for poison in args.poison:
        for seed in args.seeds:
            run = load_config(overrides=[f"attack.name={args.attack}", "attack.fraction=0.3",
                                         f"attack.poison_fraction={poison}", f"seed={seed}", *args.overrides])
            bad = malicious_clients(run)
            check = BehaviourCheck(server_model(run), root_data(run, server_tasks(run)), run.defense.behaviour_examples)
            global_vectors = initial_global_vectors(run)
            for r in range(1, args.rounds + 1):
                t0 = time.perf_counter()
                clients = client_models(run, global_vectors, r)
                t1 = time.perf_counter()
                scores = scores_for_round(check, global_vectors, clients)
                caught = behaviour_outliers({p: {k[6:]: v for k, v in s.items() if k != "flips.max"}
                                             for p, s in scores.items()}, run.defense.behaviour_margin)
                t2 = time.perf_counter()
                aucs = {}
                for name in sorted({k for v in scores.values() for k in v}):
                    ids = [p for p in sorted(scores) if name in scores[p]]
                    y = [int(p in bad) for p in ids]
                    if 0 < sum(y) < len(y):
                        aucs[name] = round(float(roc_auc_score(y, [scores[p][name] for p in ids])), 3)
                key = f"poison{poison}-seed{seed}-round{r}"
                summary[key] = aucs
                print(json.dumps({"run": key, "auc": aucs, "train_s": round(t1 - t0, 1), "score_s": round(t2 - t1, 1),
                                  "malicious": sorted(bad),
                                  "caught": sorted(caught),
                                  "scores": {p: {k: round(v, 2) for k, v in scores[p].items()} for p in sorted(scores)}}),
                      flush=True)
                members = list(clients) if args.aggregate == "none" else [p for p in clients if p not in bad]
                global_vectors = mean_update(global_vectors, clients, members)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
