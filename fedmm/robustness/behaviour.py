"""Behaviour of a candidate model on the server's clean root set: what update statistics cannot see.

A data-poisoning backdoor looks like an honest non-IID update in every statistic of its numbers, but
as a model it carries a shortcut: one small input change, the same for every input, sends nearly
all of them to one class. The server searches each candidate model for such a universal trigger
without knowing it (Neural-Cleanse-style): for images, a patch of `pixels` pixels (where and what
colour, by gradient descent, for every class at once); for text, a token put in front of the text
(every token the clean root texts never use is tried: a word the task itself uses is meaning, and
honest models follow it; of a vocabulary larger than PREFIX_CANDIDATES, the tokens a first-order
estimate ranks best, HotFlip-style). A model whose best trigger flips far more root inputs to one class than
the cohort's median model does carries a shortcut the others lack.

Measured first (benchmarks/behaviour_scores.py, docs/benchmarks.md): AGSD's readings of per-input
PGD examples (a_std, conf), the share of predictions collapsing onto one class, per-input PGD against
each client's model and the per-class prediction shift on clean inputs ranked attackers at ROC AUC
0.39-0.81; the universal trigger at 0.94-1.0 per modality.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmm.models.model import MultiModalModel, load_component_vectors
from fedmm.training.local import TaskTensors

PATCH_PIXELS = 16
PATCH_STEPS = 20
# Prefix tokens the text search tries exactly. A larger vocabulary (a pretrained tokenizer's 30,000
# words; the hashing tokenizer's 8,192 ids) is first cut to this many by one gradient step: trying each
# token costs a forward pass over the root set per token.
PREFIX_CANDIDATES = 256


@contextlib.contextmanager
def inputs_only(model: MultiModalModel) -> Iterator[None]:
    """Gradients flow to the inputs only while searching (the weights keep their flags after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# --- universal trigger search -----------------------------------------------------------------


def _repeat(inputs: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    return {name: v.repeat(k, *([1] * (v.dim() - 1))) for name, v in inputs.items()}


@dataclass
class Trigger:
    """One universal trigger per class, on one modality: a patch (mask, colour) or a prefix token."""

    modality: str
    classes: torch.Tensor  # (K,) the class each row targets
    mask: torch.Tensor | None = None  # (K, 1, H, W) 0/1
    pattern: torch.Tensor | None = None  # (K, 3, H, W) in [-1, 1]
    tokens: torch.Tensor | None = None  # (K,) token ids

    def apply(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every row's trigger on every input: (K * N) inputs, trigger-major."""
        k = len(self.classes)
        n = next(iter(inputs.values())).shape[0]
        out = _repeat(inputs, k)
        if self.modality == "image":
            x = inputs["pixel_values"]
            out["pixel_values"] = ((1 - self.mask)[:, None] * x[None]
                                   + (self.mask * self.pattern)[:, None]).reshape(k * n, *x.shape[1:])
        else:
            out = _with_prefix(out, self.tokens.repeat_interleave(n))
        return out


def _with_prefix(inputs: dict[str, torch.Tensor], token: torch.Tensor) -> dict[str, torch.Tensor]:
    """Insert one token per row right after [CLS] (the last position drops off)."""
    ids, att = inputs["input_ids"], inputs["attention_mask"]
    ids = torch.cat([ids[:, :1], token[:, None], ids[:, 1:-1]], 1)
    att = torch.cat([att[:, :1], torch.ones_like(att[:, :1]), att[:, 1:-1]], 1)
    return {**inputs, "input_ids": ids, "attention_mask": att}


def flip_rates(predicted: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor,
               clean: torch.Tensor) -> torch.Tensor:
    """Per row of `predicted` (R, N), whose trigger targets classes[row]: of the inputs that are not of
    that class and that the model does not already send there unprompted (`clean`, its predictions
    with no trigger), the share the trigger sends there. A model skewed towards a class already sends
    many inputs there; what a backdoor adds is moving the rest."""
    target = classes[:, None]
    movable = (labels[None] != target) & (clean[None] != target)
    moved = (predicted == target) & movable
    return moved.sum(1) / movable.sum(1).clamp_min(1)


@torch.no_grad()
def predict(model: MultiModalModel, task: str, inputs: dict[str, torch.Tensor], chunk: int = 2048) -> torch.Tensor:
    """Predicted classes of `model` on `inputs`, in chunks."""
    model.eval()
    total = next(iter(inputs.values())).shape[0]
    return torch.cat([model(task, {k: v[s:s + chunk] for k, v in inputs.items()}).argmax(-1)
                      for s in range(0, total, chunk)])


def trigger_flips(model: MultiModalModel, task: str, data: TaskTensors, trigger: Trigger) -> np.ndarray:
    """Per trigger row: its flip rate (see `flip_rates`) on `data` through `model`."""
    predicted = predict(model, task, trigger.apply(data.inputs)).reshape(len(trigger.classes), len(data))
    return flip_rates(predicted, trigger.classes, data.labels, predict(model, task, data.inputs)).numpy()


def search_patch(model: MultiModalModel, task: str, data: TaskTensors, pixels: int = PATCH_PIXELS,
                 steps: int = PATCH_STEPS, lr: float = 0.1) -> Trigger:
    """For every class at once, the `pixels`-pixel patch (where and what colour) that sends most root
    inputs to it: a soft mask and pattern by gradient descent, then the mask's top pixels kept.
    Deterministic: the search starts from the same point for every model."""
    model.eval()
    x = data.inputs["pixel_values"]
    n, _, h, w = x.shape
    k = model.specs[task].num_classes
    classes = torch.arange(k)
    targets = classes.repeat_interleave(n)
    mask_logit = torch.full((k, 1, h, w), -3.0, requires_grad=True)
    pattern_logit = torch.zeros((k, 3, h, w), requires_grad=True)
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=lr)
    with inputs_only(model), torch.enable_grad():
        for _ in range(steps):
            soft = Trigger("image", classes, torch.sigmoid(mask_logit), torch.tanh(pattern_logit))
            logits = model(task, soft.apply(data.inputs))
            # The mask term keeps the soft patch near its budget, so its top pixels carry the effect.
            loss = nn.functional.cross_entropy(logits, targets) + 0.1 * soft.mask.sum((1, 2, 3)).div(pixels).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        flat = mask_logit.reshape(k, -1)
        hard = torch.zeros_like(flat).scatter_(1, flat.topk(pixels, dim=1).indices, 1.0).reshape(k, 1, h, w)
        return Trigger("image", classes, hard, torch.tanh(pattern_logit).detach())


def unseen_tokens(model: MultiModalModel, texts: list[TaskTensors]) -> torch.Tensor:
    """Token ids the clean texts never use: where a planted trigger word hides (a word the task's own
    text uses is a meaning, and every honest model follows it)."""
    vocab = model.encoders["text"].backbone.get_input_embeddings().weight.shape[0]
    seen = torch.zeros(vocab, dtype=torch.bool)
    for data in texts:
        seen[data.inputs["input_ids"].unique()] = True
    return torch.nonzero(~seen).flatten()


@torch.no_grad()
def search_prefix(model: MultiModalModel, task: str, data: TaskTensors,
                  candidates: torch.Tensor) -> tuple[Trigger, np.ndarray]:
    """For every class, the token of `candidates` that, put in front of the text, flips most root
    inputs to it (each one tried), and that flip rate; no candidates flip nothing."""
    vocab = len(candidates)
    k = model.specs[task].num_classes
    if not vocab:  # the clean texts use the whole vocabulary: no token can hide a trigger
        return Trigger("text", torch.arange(k), tokens=torch.zeros(k, dtype=torch.long)), np.zeros(k)
    every = Trigger("text", torch.zeros(vocab, dtype=torch.long), tokens=candidates)
    predicted = predict(model, task, every.apply(data.inputs), chunk=4096).reshape(vocab, len(data))
    clean = predict(model, task, data.inputs)
    # Every token against every class: row (token, class) of a (vocab * k, N) comparison.
    rates = flip_rates(predicted.repeat_interleave(k, 0), torch.arange(k).repeat(vocab), data.labels, clean)
    best = rates.reshape(vocab, k).max(0)
    return Trigger("text", torch.arange(k), tokens=candidates[best.indices]), best.values.numpy()


def prefix_shortlist(model: MultiModalModel, task: str, data: TaskTensors, candidates: torch.Tensor,
                     per_class: int) -> torch.Tensor:
    """Of `candidates`, the `per_class` tokens per class that a first-order estimate says move the root
    inputs to that class most, put in front of the text (HotFlip): one forward and backward pass with
    the prefix position holding the candidates' mean embedding, each token scored by its embedding's
    dot product with the loss gradient there. Sorted, without repeats; every candidate where the text
    encoder's forward pass does not read the embedding table its `get_input_embeddings` names."""
    k, n = model.specs[task].num_classes, len(data)
    embedding = model.encoders["text"].backbone.get_input_embeddings()
    table = embedding.weight.detach()[candidates]
    held: list[torch.Tensor] = []

    def mean_prefix(module, args, output):
        out = output.detach().clone()
        out[:, 1] = table.mean(0)
        held.append(out.requires_grad_(True))
        return out

    classes = torch.arange(k)
    inputs = Trigger("text", classes, tokens=candidates[:1].repeat(k)).apply(data.inputs)
    targets = classes.repeat_interleave(n)
    movable = (data.labels.repeat(k) != targets).float()  # inputs already of a class say nothing of its trigger
    handle = embedding.register_forward_hook(mean_prefix)
    try:
        model.eval()
        with inputs_only(model), torch.enable_grad():
            losses = nn.functional.cross_entropy(model(task, inputs), targets, reduction="none")
            if held and losses.requires_grad:
                (losses * movable).sum().backward()
    finally:
        handle.remove()
    if not held or held[0].grad is None:
        return candidates
    gradient = held[0].grad[:, 1].reshape(k, n, -1).sum(1)  # (K, H): d loss / d prefix embedding, per class
    estimate = table @ gradient.T  # (V, K): first-order loss change of each token as each class's trigger
    picks = estimate.topk(min(per_class, len(candidates)), dim=0, largest=False).indices
    return candidates[picks.flatten().unique()]


def search_tasks(tasks: Sequence[str], specs: Mapping) -> dict[str, str]:
    """Per modality, the task of `tasks` the search reads it through: the one reading the fewest
    modalities, then with the fewest classes (the cheapest search, and the trigger seen alone)."""
    out: dict[str, str] = {}
    for task in sorted(tasks, key=lambda t: (len(specs[t].modalities), specs[t].num_classes, t)):
        for modality in specs[task].modalities:
            out.setdefault(modality, task)
    return out


def trigger_strength(model: MultiModalModel, tasks: Sequence[str], root: Mapping[str, TaskTensors],
                     unseen: torch.Tensor) -> dict[str, float]:
    """Per input modality of `tasks`: the flip rate (see `flip_rates`) of the best universal trigger
    found on `model`, for its best class."""
    strength = {}
    for modality, task in search_tasks(tasks, model.specs).items():
        data = root[task]
        if modality == "image":
            flips = trigger_flips(model, task, data, search_patch(model, task, data))
        else:
            tried = unseen
            if len(unseen) > PREFIX_CANDIDATES:
                per_class = max(1, PREFIX_CANDIDATES // model.specs[task].num_classes)  # a task of many classes: one each
                tried = prefix_shortlist(model, task, data, unseen, per_class)
            flips = search_prefix(model, task, data, tried)[1]
        strength[modality] = float(flips.max())
    return strength


# A trigger that moves fewer than half of the inputs to its class is no backdoor worth the name.
BACKDOOR_FLOOR = 0.5


def behaviour_outliers(strength: Mapping[int, Mapping[str, float]], margin: float) -> dict[int, str]:
    """Clients whose trigger flip rate on some modality stands out from the cohort's: more than `margin`
    above the median of the clients reading that modality (attackers are a minority, so the median is
    an honest model's), and at least BACKDOOR_FLOOR. The reason names the modality and the numbers.
    (A bound in robust standard deviations fails here: with a third of the holders planted, the
    spread is the attackers' own.)"""
    flagged: dict[int, str] = {}
    modalities = sorted({m for s in strength.values() for m in s})
    for modality in modalities:
        values = {c: s[modality] for c, s in strength.items() if modality in s}
        median = float(np.median(list(values.values())))
        bound = max(median + margin, BACKDOOR_FLOOR)
        for c, value in values.items():
            if value > bound and c not in flagged:
                flagged[c] = (f"behaviour: a universal {modality} trigger moves {value:.0%} of the root inputs "
                              f"to one class (cohort median {median:.0%}, bound {bound:.0%})")
    return flagged


def tasks_of(components: Sequence[str]) -> list[str]:
    """The tasks a client's update covers: one per head it sends."""
    return sorted(c.split(".", 1)[1] for c in components if c.startswith("head."))


class BehaviourCheck:
    """The server's side of the check: its model, its root set (the first `examples` of each task)
    and the tokens those texts never use; `strengths` scores a round's candidate models."""

    def __init__(self, model: MultiModalModel, root: Mapping[str, TaskTensors], examples: int) -> None:
        self.model = model
        self.root = {t: TaskTensors({k: v[:examples] for k, v in d.inputs.items()}, d.labels[:examples])
                     for t, d in root.items()}
        texts = [d for d in root.values() if "input_ids" in d.inputs]
        self.unseen = unseen_tokens(model, texts) if texts else torch.zeros(0, dtype=torch.long)

    def strengths(self, sent: Mapping[str, np.ndarray],
                  clients: Mapping[int, Mapping[str, np.ndarray]]) -> dict[int, dict[str, float]]:
        """Per client: its model (the sent global model with the client's components in place) and the
        strength of the best universal trigger on each modality it reads."""
        components = list(sent)
        out = {}
        for client, arrays in sorted(clients.items()):
            tasks = [t for t in tasks_of(list(arrays)) if t in self.root]
            if not tasks:
                continue
            load_component_vectors(self.model, {**sent, **arrays}, components)
            out[client] = trigger_strength(self.model, tasks, self.root, self.unseen)
        load_component_vectors(self.model, dict(sent), components)
        return out
