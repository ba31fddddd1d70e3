"""Does the text trigger search's gradient shortlist find what trying every unused token finds?

For each text base (the shipped `fedmm:scenes` BERT, whose clean texts leave ~140 tokens unused, and a
from-config BERT behind the 8,192-id hashing tokenizer), one `txt_color` client is trained from the same
start on clean data and one with the prefix-word backdoor in half its data. On each model the search
runs over every unused token and over the shortlist (`behaviour.prefix_shortlist`, `--per-class` tokens
per class, and the check's own PREFIX_CANDIDATES / K): best flip rate per class, whether the trigger
word is in the shortlist, and the seconds each takes. Prints JSON.

    python benchmarks/behaviour_shortlist.py [--steps 60] [--per-class 4]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fedmm.core.config import load_config
from fedmm.data.scenes import make_synthetic_task
from fedmm.models.model import component_vectors, load_component_vectors, module_bank
from fedmm.robustness import behaviour
from fedmm.robustness.attacks import columns_of, poison_training_split
from fedmm.training.local import encode_split, train_local

BASES = {"shipped": [], "hashing": ["model.image_encoder=", "model.text_encoder=", "model.hidden_size=32",
                                   "model.intermediate_size=64", "model.fusion_dim=16"]}


def text_clients(overrides: list[str], steps: int) -> tuple[behaviour.BehaviourCheck, dict, dict, int]:
    """A `txt_color` client's model trained `steps` steps from the same start on clean data ("clean")
    and with the prefix-word backdoor in half its data ("backdoor"): (the check on a root set of 32,
    the start's component vectors, each model's, the trigger word's token id)."""
    run = load_config(overrides=["clients.profiles.t=txt_color", f"train.local_steps={steps}", "attack.name=backdoor",
                                 "attack.fraction=0.5", *overrides])
    bank = module_bank(run)
    model, spec = bank.model(["txt_color"]), bank.specs["txt_color"]
    start = component_vectors(model)

    def encode(columns):
        return encode_split(columns, spec.modalities, bank.tokenizer(), 0)

    columns = columns_of(make_synthetic_task("txt_color", 1200, 11, run.model.image_size))
    poisoned = poison_training_split(dict(columns), "backdoor", run.attack, spec.modalities, spec.num_classes, 5)
    models = {}
    for name, train in (("clean", columns), ("backdoor", poisoned)):
        load_component_vectors(model, start, list(start))
        train_local(model, {"txt_color": encode(train)}, run.train, run.train.lr, seed=1, device=torch.device("cpu"))
        models[name] = component_vectors(model)
    load_component_vectors(model, start, list(start))
    root = {"txt_color": encode(columns_of(make_synthetic_task("txt_color", 48, 99, run.model.image_size)))}
    trigger = int(bank.tokenizer()([run.attack.trigger_token])["input_ids"][0, 1])
    return behaviour.BehaviourCheck(model, root, examples=32), start, models, trigger


def measure(base: str, steps: int, per_class: int) -> dict:
    check, start, models, trigger = text_clients(BASES[base], steps)
    model, data, unseen = check.model, check.root["txt_color"], check.unseen
    k = model.specs["txt_color"].num_classes
    out = {"base": base, "unused_tokens": len(unseen), "local_steps": steps, "models": {}}
    for name, arrays in models.items():
        load_component_vectors(model, {**start, **arrays}, list(start))
        started = time.perf_counter()
        every = behaviour.search_prefix(model, "txt_color", data, unseen)[1]
        row = {"every_token": {"flip_rate_per_class": np.round(every, 3).tolist(),
                               "seconds": round(time.perf_counter() - started, 2)}}
        for pc in sorted({per_class, behaviour.PREFIX_CANDIDATES // k}):
            started = time.perf_counter()
            shortlist = behaviour.prefix_shortlist(model, "txt_color", data, unseen, pc)
            ranked = time.perf_counter() - started
            flips = behaviour.search_prefix(model, "txt_color", data, shortlist)[1]
            row[f"shortlist_{pc}_per_class"] = {
                "tokens": len(shortlist), "flip_rate_per_class": np.round(flips, 3).tolist(),
                "best_equals_every_token": bool(flips.max() == every.max()), "holds_trigger": trigger in shortlist.tolist(),
                "rank_seconds": round(ranked, 3), "seconds": round(time.perf_counter() - started, 2)}
        out["models"][name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--per-class", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(json.dumps({"benchmark": "behaviour_shortlist",
                      "results": [measure(base, args.steps, args.per_class) for base in BASES]}, indent=1))


if __name__ == "__main__":
    main()
