"""The server's small clean root set, and what defences do with it: FLTrust's server update (the global
model trained briefly on it) and the trust defence's behaviour check.

The root set of a generated task is fresh data from the task's generator (a seed no client uses);
for a Hugging Face task it is a seeded random sample of `defense.root_examples` rows, which clients
may also hold, in their training or test splits: a stored dataset has no rows the federation lacks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, replace

import numpy as np

from fedmm.core.schema import RunConfig
from fedmm.data.scenes import make_synthetic_task, task_dataset
from fedmm.models.model import (client_components, component_vectors, load_component_vectors, module_bank,
                                server_model, server_tasks)
from fedmm.robustness.behaviour import BehaviourCheck
from fedmm.training.local import TaskTensors, encode_split, lr_at, resolve_device, train_local

_ROOT_SEED_OFFSET = 1_000_003
_ROOT: dict[tuple, dict[str, TaskTensors]] = {}


def root_data(run: RunConfig, tasks: list[str]) -> dict[str, TaskTensors]:
    key = (json.dumps([asdict(run.data), asdict(run.model), run.seed, run.defense.root_examples], sort_keys=True),
           tuple(tasks))
    if key not in _ROOT:
        bank = module_bank(run)
        data = {}
        for task in tasks:
            if run.data.source == "synthetic":
                ds = make_synthetic_task(task, run.defense.root_examples, run.seed + _ROOT_SEED_OFFSET,
                                         run.model.image_size)
            else:
                full = task_dataset(run, task)
                rng = np.random.default_rng([run.seed, _ROOT_SEED_OFFSET])
                ds = full.select(np.sort(rng.choice(len(full), min(run.defense.root_examples, len(full)),
                                                    replace=False)))
            modalities = bank.specs[task].modalities
            data[task] = encode_split(ds, modalities, bank.tokenizer() if "text" in modalities else None,
                                      bank.image_size() if "image" in modalities else 0)
        _ROOT[key] = data
    return _ROOT[key]


def root_update(run: RunConfig, vectors: Mapping[str, np.ndarray], server_round: int,
                steps: int | None = None) -> dict[str, np.ndarray]:
    """Per component, the server's update (trained - sent) after `steps` (default `train.local_steps`)
    on the root set."""
    tasks = server_tasks(run)
    components = client_components(tasks, run)
    model = module_bank(run).model(tasks)
    load_component_vectors(model, {c: vectors[c] for c in components}, components)
    train = run.train if steps is None else replace(run.train, local_steps=steps)
    train_local(model, root_data(run, tasks), train, lr_at(server_round, run.rounds, run.train),
                seed=run.seed * 7919 + server_round, device=resolve_device(run.train.device))
    trained = component_vectors(model, components)
    return {c: trained[c] - vectors[c] for c in components}


def behaviour_check(run: RunConfig) -> BehaviourCheck:
    """The trust defence's behaviour check on this run's server model and root set."""
    tasks = server_tasks(run)
    return BehaviourCheck(server_model(run), root_data(run, tasks), run.defense.behaviour_examples)
