"""What a client does with a message, independent of Flower's message plumbing.

A client is a partition id with a modality-task profile. Its encoded data splits are cached per
process (a Ray actor serves many virtual clients), and its model is a view over the process's
module bank, so neither base weights nor data are rebuilt per message.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.data import client_task_splits
from fedmm.model import client_components, component_vectors, load_component_vectors, module_bank
from fedmm.training import TaskTensors, encode_split, evaluate, lr_at, resolve_device, train_local


def assigned_profile(run: RunConfig, partition_id: int) -> str:
    """Client i gets the i-th profile, cycling through them in the order the config lists them."""
    names = list(run.clients.profiles)
    return names[partition_id % len(names)]


def task_holders(run: RunConfig, task: str) -> list[int]:
    return [p for p in range(run.clients.num) if task in run.clients.profiles[assigned_profile(run, p)]]


@dataclass(frozen=True)
class ClientIdentity:
    partition_id: int
    profile: str
    tasks: tuple[str, ...]


def identify(run: RunConfig, node_config: Mapping[str, object]) -> ClientIdentity:
    """This node's partition id and profile, from Flower's node config."""
    if "partition-id" not in node_config:
        raise ValueError("node config has no 'partition-id'; start the SuperNode with --node-config partition-id=N")
    partition_id = int(node_config["partition-id"])  # type: ignore[arg-type]
    if not 0 <= partition_id < run.clients.num:
        raise ValueError(f"partition-id {partition_id} is outside 0..{run.clients.num - 1} (clients.num)")
    profile = assigned_profile(run, partition_id)
    return ClientIdentity(partition_id, profile, tuple(run.clients.profiles[profile]))


_SPLITS: dict[tuple, dict[str, TaskTensors]] = {}


def client_data(run: RunConfig, me: ClientIdentity, split: str) -> dict[str, TaskTensors]:
    """Encoded tensors of one split (train / val / test) of each of this client's tasks."""
    holders = {task: tuple(task_holders(run, task)) for task in me.tasks}
    key = (id(module_bank(run)), me.partition_id, tuple(holders.items()), split)
    if key not in _SPLITS:
        bank = module_bank(run)
        data = {}
        for task in me.tasks:
            splits = client_task_splits(run, task, list(holders[task]), me.partition_id)
            modalities = bank.specs[task].modalities
            image_size = bank.image_size() if "image" in modalities else 0
            tokenizer = bank.tokenizer() if "text" in modalities else None
            data[task] = encode_split(getattr(splits, split), modalities, tokenizer, image_size)
        _SPLITS[key] = data
    return _SPLITS[key]


def _seed(run: RunConfig, me: ClientIdentity, server_round: int) -> int:
    return zlib.crc32(f"{run.seed}:{me.partition_id}:{server_round}".encode())


def train(run: RunConfig, me: ClientIdentity, arrays: Mapping[str, np.ndarray], server_round: int):
    """Load the received component vectors (strictly), train locally.

    Returns (component vectors, examples trained on, examples per component, metrics).
    """
    components = client_components(list(me.tasks), run)
    model = module_bank(run).model(list(me.tasks))
    load_component_vectors(model, dict(arrays), components)
    device = resolve_device(run.train.device)
    result = train_local(model, client_data(run, me, "train"), run.train,
                         lr_at(server_round, run.rounds, run.train), _seed(run, me, server_round), device)
    counts = dict.fromkeys(components, 0)
    for task, n in result.examples.items():
        for component in client_components([task], run):
            counts[component] += n
    # A component no step touched this round still went through; weight it by the smallest count.
    counts = {c: max(n, 1) for c, n in counts.items()}
    metrics = {f"{protocol.TRAIN_LOSS_PREFIX}{t}": v for t, v in result.loss.items()}
    metrics[protocol.TRAIN_STEPS] = float(result.steps)
    return component_vectors(model, components), sum(result.examples.values()), counts, metrics


def evaluate_model(run: RunConfig, me: ClientIdentity, arrays: Mapping[str, np.ndarray], split: str = "test"):
    """Per-task scores of the received global tensors on this client's held-out data."""
    components = client_components(list(me.tasks), run)
    model = module_bank(run).model(list(me.tasks))
    load_component_vectors(model, dict(arrays), components)
    device = resolve_device(run.train.device)
    return evaluate(model, client_data(run, me, split), 2 * run.train.batch_size, device, run.train.precision)
