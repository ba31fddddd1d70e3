"""What a client does with a message, independent of Flower's message plumbing.

A client is a partition id with a modality-task profile. Its encoded data splits are cached per
process (a Ray actor serves many virtual clients), and its model is a view over the process's
module bank, so neither base weights nor data are rebuilt per message.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmm.core import protocol
from fedmm.robustness.attacks import (
    columns_of,
    malicious_clients,
    measures_backdoor,
    poison_training_split,
    resolve_attack,
    triggered_test_split,
)
from fedmm.core.components import is_expert
from fedmm.core.schema import RunConfig, TrainConfig
from fedmm.data.scenes import client_task_splits, generated_client_splits, local_task_splits
from fedmm.models.model import (
    RankViews,
    client_components,
    component_vectors,
    load_component_vectors,
    module_bank,
)
from fedmm.models.moe import mean_routing_entropy, routed_tokens
from fedmm.training import feedback
from fedmm.personalization.tap import parse_margins, replace_paths, tasks_to_replace
from fedmm.core.state_store import DEFAULT_FOLDER, ClientStateStore
from fedmm.training.local import (
    Distillation,
    TaskScore,
    TaskTensors,
    TrainResult,
    encode_split,
    evaluate,
    lr_at,
    predict_logits,
    resolve_device,
    train_local,
)


def assigned_profile(run: RunConfig, partition_id: int) -> str:
    """Client i gets the i-th profile, cycling through them in the order the config lists them."""
    names = list(run.clients.profiles)
    return names[partition_id % len(names)]


def assigned_rank(run: RunConfig, partition_id: int) -> int:
    """Client i's LoRA rank: clients.lora_ranks[i mod len], or the global adapter's rank."""
    ranks = run.clients.lora_ranks
    return ranks[partition_id % len(ranks)] if ranks else run.model.lora_r


def task_holders(run: RunConfig, task: str) -> list[int]:
    return [p for p in range(run.clients.num) if task in run.clients.profiles[assigned_profile(run, p)]]


@dataclass(frozen=True)
class ClientIdentity:
    partition_id: int
    profile: str
    tasks: tuple[str, ...]
    data_path: str = ""  # the node's own data (node config `data-path`) instead of a generated partition
    lora_rank: int = 0  # its adapters' rank (node config `lora-r`); 0 means the global adapter's


def identify(run: RunConfig, node_config: Mapping[str, object]) -> ClientIdentity:
    """This node's partition id and profile, from Flower's node config."""
    if "partition-id" not in node_config:
        raise ValueError("node config has no 'partition-id'; start the SuperNode with --node-config partition-id=N")
    partition_id = int(node_config["partition-id"])  # type: ignore[arg-type]
    if not 0 <= partition_id < run.clients.num:
        raise ValueError(f"partition-id {partition_id} is outside 0..{run.clients.num - 1} (clients.num)")
    profile = assigned_profile(run, partition_id)
    data_path = str(node_config.get("data-path", ""))
    rank = node_config.get("lora-r", assigned_rank(run, partition_id))
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= run.model.lora_r:
        raise ValueError(f"node config lora-r={rank!r} must be an integer in 1..{run.model.lora_r} (model.lora_r)")
    return ClientIdentity(partition_id, profile, tuple(run.clients.profiles[profile]), data_path, rank)


# Encoded splits of the clients this process served lately. Bounded: a process serving thousands of
# virtual clients must not keep every one it has seen.
_SPLITS: OrderedDict[tuple, dict[str, TaskTensors]] = OrderedDict()
SPLITS_CACHED = 256


def _split_columns(run: RunConfig, me: ClientIdentity, task: str, splits, split: str):
    """One split of one task, as the attack config (simulation only) makes it: a malicious client's
    training data is poisoned; `backdoor` is the triggered test set that measures the attack."""
    attack = resolve_attack(run.attack)
    spec = module_bank(run).specs[task]
    if split == BACKDOOR_SPLIT:
        return triggered_test_split(columns_of(splits.test), run.attack, spec.modalities)
    data = getattr(splits, split)
    if split == "train" and attack is not None and me.partition_id in malicious_clients(run):
        return poison_training_split(columns_of(data), attack.data, run.attack, spec.modalities,
                                     spec.num_classes, _seed(run, me, 0, f"poison.{task}"))
    return data


BACKDOOR_SPLIT = "backdoor"


def client_data(run: RunConfig, me: ClientIdentity, split: str) -> dict[str, TaskTensors]:
    """Encoded tensors of one split (train / val / test / backdoor) of each of this client's tasks."""
    lazy = run.data.examples_per_client > 0 or bool(me.data_path)  # no task-wide partition to share
    holders = {} if lazy else {task: tuple(task_holders(run, task)) for task in me.tasks}
    # The attack decides what a malicious client's training data and the backdoor split hold.
    key = (id(module_bank(run)), me.partition_id, me.tasks, me.data_path, tuple(holders.items()), split,
           dataclasses.astuple(run.attack))
    if key in _SPLITS:
        _SPLITS.move_to_end(key)
        return _SPLITS[key]
    bank = module_bank(run)
    data = {}
    for task in me.tasks:
        modalities = bank.specs[task].modalities
        if me.data_path:
            splits = local_task_splits(run, task, me.data_path, me.partition_id, modalities,
                                       bank.specs[task].num_classes)
        elif lazy:
            splits = generated_client_splits(run, task, me.partition_id)
        else:
            splits = client_task_splits(run, task, list(holders[task]), me.partition_id)
        image_size = bank.image_size() if "image" in modalities else 0
        tokenizer = bank.tokenizer() if "text" in modalities else None
        data[task] = encode_split(_split_columns(run, me, task, splits, split), modalities, tokenizer,
                                  image_size)
    _SPLITS[key] = data
    if len(_SPLITS) > SPLITS_CACHED:
        _SPLITS.popitem(last=False)
    return data


def _seed(run: RunConfig, me: ClientIdentity, server_round: int, stage: str = "global") -> int:
    return zlib.crc32(f"{run.seed}:{me.partition_id}:{server_round}:{stage}".encode())


def _steps(cfg: TrainConfig, steps: int) -> TrainConfig:
    return dataclasses.replace(cfg, local_steps=steps, local_epochs=0.0)


def state_store(run: RunConfig, me: ClientIdentity) -> ClientStateStore:
    """This client's store: `personal.state_dir` (or <out>/client_state), keyed by a stable client id."""
    root = run.personal.state_dir or str(Path(run.out) / DEFAULT_FOLDER)
    return ClientStateStore(root, f"client-{me.partition_id}")


def _losses(scores: Mapping[str, TaskScore]) -> dict[str, float]:
    return {t: s.loss for t, s in scores.items()}


def _improves(new: Mapping[str, float], old: Mapping[str, float]) -> bool:
    """No task's loss is worse and at least one is better: shared modules must not trade one task for another."""
    return all(new[t] <= old[t] for t in old) and any(new[t] < old[t] for t in old)


class _Session:
    """One message's view of this client: its model, components, data and device."""

    def __init__(self, run: RunConfig, me: ClientIdentity) -> None:
        self.run, self.me = run, me
        self.components = client_components(list(me.tasks), run)
        self.ranks = RankViews(run, me.tasks, me.lora_rank) if 0 < me.lora_rank < run.model.lora_r else None
        self.model = (self.ranks.model if self.ranks else module_bank(run).model(list(me.tasks)))
        self.device = resolve_device(run.train.device)

    def load(self, vectors: Mapping[str, np.ndarray]) -> None:
        """Load global-layout vectors (a lower-rank client takes the leading terms of each adapter)."""
        vectors = self.ranks.to_client(vectors) if self.ranks else dict(vectors)
        load_component_vectors(self.model, vectors, self.components)

    def vectors(self) -> dict[str, np.ndarray]:
        """The model's vectors in the global layout (a lower-rank client's adapters zero-padded)."""
        vectors = component_vectors(self.model, self.components)
        return self.ranks.to_global(vectors) if self.ranks else vectors

    def train(self, cfg: TrainConfig, lr: float, seed: int, distill: Distillation | None = None,
              proximal_mu: float = 0.0) -> TrainResult:
        grpo = self.run.moe if self.run.moe.routing == "grpo" else None
        return train_local(self.model, client_data(self.run, self.me, "train"), cfg, lr, seed, self.device,
                           distill, grpo, proximal_mu)

    def scores(self, split: str) -> dict[str, TaskScore]:
        return evaluate(self.model, client_data(self.run, self.me, split), 2 * self.run.train.batch_size,
                        self.device, self.run.train.precision)

    def criterion_losses(self, result: TrainResult) -> dict[str, float]:
        """Per-task loss the replacement rule compares: held-out validation loss, or training loss."""
        if self.run.personal.criterion == "train":
            return dict(result.loss)
        return _losses(self.scores("val"))


def train(run: RunConfig, me: ClientIdentity, arrays: Mapping[str, np.ndarray], server_round: int,
          proximal_mu: float = 0.0):
    """Load the received component vectors (strictly), train locally (with FedProx's proximal term
    when the strategy sends `proximal-mu` > 0); then update the personal model.

    Returns (component vectors, examples trained on, examples per component, metrics). Experts travel
    only when this client routed tokens to them; their weights are the `routed.*` token counts.
    """
    if run.model.language_model:
        if proximal_mu:
            raise ValueError(f"{protocol.PROXIMAL_MU}={proximal_mu}: a language-model client has no proximal term")
        return feedback.train_client(run, me.partition_id, me.tasks, arrays, server_round, _seed(run, me, server_round))
    s = _Session(run, me)
    s.load(arrays)
    lr = lr_at(server_round, run.rounds, run.train)
    result = s.train(run.train, lr, _seed(run, me, server_round), proximal_mu=proximal_mu)
    routed = routed_tokens(s.model)
    counts = {c: 0 for c in s.components if not is_expert(c)}
    for task, n in result.examples.items():
        for component in client_components([task], run):
            if component in counts:
                counts[component] += n
    # A component no step touched this round still went through; weight it by the smallest count.
    # An expert no token reached did not change and does not travel: its weight is its routed tokens.
    counts = {c: max(n, 1) for c, n in counts.items()}
    metrics = {f"{protocol.TRAIN_LOSS_PREFIX}{t}": v for t, v in result.loss.items()}
    metrics[protocol.TRAIN_STEPS] = float(result.steps)
    if run.clients.lora_ranks or me.lora_rank not in (0, run.model.lora_r):
        metrics[protocol.LORA_RANK] = float(me.lora_rank)
    for component, by_modality in routed.items():
        metrics.update({protocol.routed_key(m, component): float(n) for m, n in by_modality.items()})
    entropy = mean_routing_entropy(s.model)
    if entropy is not None:
        metrics[protocol.ROUTING_ENTROPY] = entropy
    trained = s.vectors()
    if run.personal.method in STATEFUL_METHODS:
        replaced = _update_personal(s, arrays, trained, s.criterion_losses(result), lr, server_round)
        metrics.update({f"{protocol.REPLACED_PREFIX}{t}": float(t in replaced) for t in me.tasks})
    sent = {c: v for c, v in trained.items() if not is_expert(c) or routed.get(c)}
    if s.ranks:  # a lower-rank client sends its own rank-r factors; the server pads them (lora-rank says r)
        sent = s.ranks.to_client(sent)
    return sent, sum(result.examples.values()), counts, metrics


STATEFUL_METHODS = ("local", "tap_no_distill", "tap")


def _update_personal(s: _Session, received: Mapping[str, np.ndarray], trained: dict[str, np.ndarray],
                     teacher_loss: dict[str, float], lr: float, server_round: int) -> list[str]:
    """TAP stage 1 (or local-only training): replace per task, train the personal model, store it."""
    run, me = s.run, s.me
    store = state_store(run, me)
    personal = store.load_tensors("personal")
    meta = store.load_meta()
    replaced: list[str] = []
    if personal is None:  # first participation: nothing to compare against, nothing replaced
        start = module_bank(run).initial_vectors(list(me.tasks)) if run.personal.method == "local" else received
        personal = {c: np.array(v, copy=True) for c, v in start.items()}
    elif run.personal.method != "local":
        margins = parse_margins(run.personal.task_margins, list(me.tasks), run.personal.margin)
        replaced = tasks_to_replace(teacher_loss, meta.get("personal_loss"), margins)
        paths = {t: client_components([t], run) for t in replaced}
        personal = replace_paths(personal, trained, replaced, paths)
    s.load(personal)
    steps = run.personal.steps or run.train.local_steps
    result = s.train(_steps(run.train, steps), lr, _seed(run, me, server_round, "personal"))
    store.save_tensors("personal", s.vectors())
    history = meta.get("replaced", {})
    history[str(server_round)] = replaced
    store.save_meta({"personal_loss": s.criterion_losses(result), "participations": meta.get("participations", 0) + 1,
                     "last_round": server_round, "replaced": history})
    return replaced


def personal_vectors(run: RunConfig, me: ClientIdentity, global_vectors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The client's personal model as the configured method defines it."""
    stored = state_store(run, me).load_tensors("personal") if run.personal.method != "fedavg" else None
    if stored is not None:
        return stored
    if run.personal.method == "local":  # a local-only client that never trained holds the initial model
        return module_bank(run).initial_vectors(list(me.tasks))
    return dict(global_vectors)


def distill(run: RunConfig, me: ClientIdentity, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The post-FL stage: fedavg_ft fine-tunes the final global model into the personal one; tap
    distills a briefly fine-tuned copy of it (the teacher) into the personal model.

    With `personal.distill_gate` the held-out validation split guards both ends: a task is distilled
    only when the teacher's validation loss beats the personal model's (the test the replacement rule
    applies), and the distilled student is kept only when its validation loss is no worse on any of
    the client's tasks and better on one; a weaker teacher, or distillation through modules shared
    with another task, would otherwise pull the personal model down.
    """
    method, p = run.personal.method, run.personal
    if method not in ("fedavg_ft", "tap"):
        return {}
    s = _Session(run, me)
    s.load(arrays)
    lr = lr_at(run.rounds, run.rounds, run.train)
    if p.teacher_steps:
        s.train(_steps(run.train, p.teacher_steps), lr, _seed(run, me, run.rounds + 1, "teacher"))
    store = state_store(run, me)
    if method == "fedavg_ft":
        store.save_tensors("personal", s.vectors())
        return {}
    data = client_data(run, me, "train")
    teacher = predict_logits(s.model, data, 2 * run.train.batch_size, s.device, run.train.precision)
    tasks = list(me.tasks)
    personal = personal_vectors(run, me, arrays)
    if p.distill_gate:
        teacher_loss = _losses(s.scores("val"))
        s.load(personal)
        personal_loss = _losses(s.scores("val"))
        tasks = [t for t in tasks if teacher_loss[t] < personal_loss[t]]
    else:
        s.load(personal)
    metrics = {f"distilled.{t}": float(t in tasks) for t in me.tasks}  # tried; `distill-kept` says if kept
    if not tasks:
        store.save_tensors("personal", personal)
        return metrics | {"distill-kept": 0.0}
    kd = Distillation({t: teacher[t] for t in tasks}, p.distill_temperature, p.distill_weight)
    result = train_local(s.model, {t: data[t] for t in tasks}, _steps(run.train, p.distill_steps), lr,
                         _seed(run, me, run.rounds + 1, "distill"), s.device, kd)
    kept = not p.distill_gate or _improves(_losses(s.scores("val")), personal_loss)
    store.save_tensors("personal", s.vectors() if kept else personal)
    return metrics | {"distill-kept": float(kept)} | {f"distill-loss.{t}": v for t, v in result.loss.items()}


def evaluate_model(run: RunConfig, me: ClientIdentity, arrays: Mapping[str, np.ndarray],
                   split: str = "test") -> dict[str, dict[str, TaskScore]]:
    """Per-task scores by view: `global` (the received model), `personal` (this client's personal
    model) and, under a backdoor attack, `backdoor` (the global model on the triggered test inputs,
    labelled as the target: its accuracy is the attack's success rate)."""
    if run.model.language_model:  # first-try accuracy on held-out prompts; no personal model
        scores = feedback.evaluate_client(run, me.partition_id, me.tasks, arrays)
        return {"global": scores, "personal": scores}
    s = _Session(run, me)
    s.load(arrays)
    views = {"global": s.scores(split)}
    if measures_backdoor(run.attack):
        views["backdoor"] = s.scores(BACKDOOR_SPLIT)
    if run.personal.method == "fedavg":
        views["personal"] = views["global"]
    else:
        s.load(personal_vectors(run, me, arrays))
        views["personal"] = s.scores(split)
    return views
