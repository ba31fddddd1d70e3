"""Local training and evaluation of a client's model on its own tasks."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedmm.core.schema import MoEConfig, TrainConfig
from fedmm.models.encoders import pixel_values
from fedmm.models.grpo import grpo_loss
from fedmm.models.model import MultiModalModel
from fedmm.models.moe import auxiliary_loss, reset_routing_stats, routed_layers
from fedmm.personalization.tap import kd_loss


@dataclass
class TaskTensors:
    """One split of one task, encoded once: model inputs and labels."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {k: v[index].to(device) for k, v in self.inputs.items()}, self.labels[index].to(device)


def encode_split(ds, modalities: tuple[str, ...], tokenizer, image_size: int) -> TaskTensors:
    """Turn a `datasets.Dataset` split (or a dict of its columns) into model-ready tensors (pixels
    normalised, text tokenised)."""
    ds = ds.with_format("numpy") if hasattr(ds, "with_format") else ds
    inputs: dict[str, torch.Tensor] = {}
    if "image" in modalities:
        inputs["pixel_values"] = pixel_values(torch.from_numpy(np.asarray(ds["image"])), image_size)
    if "text" in modalities:
        inputs.update(tokenizer([str(t) for t in ds["text"]]))
    return TaskTensors(inputs, torch.from_numpy(np.asarray(ds["label"], dtype=np.int64)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU that supports it (precision auto) or when asked; fp32 otherwise."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(server_round: int, total_rounds: int, cfg: TrainConfig) -> float:
    """Learning rate for a server round: constant, or cosine from lr down to lr * min_lr_fraction."""
    if cfg.lr_schedule == "constant" or total_rounds <= 1:
        return cfg.lr
    progress = min(max(server_round - 1, 0) / (total_rounds - 1), 1.0)
    floor = cfg.lr * cfg.min_lr_fraction
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    steps: int
    examples: dict[str, int] = field(default_factory=dict)  # per task
    loss: dict[str, float] = field(default_factory=dict)  # mean training loss per task


def _schedule(sizes: dict[str, int], cfg: TrainConfig, generator: torch.Generator) -> list[str]:
    """Which task each optimizer step trains: steps shared in proportion to the tasks' training data,
    every task at least once when there are enough steps, in a seeded random order."""
    total = sum(sizes.values())
    steps = cfg.local_steps or max(1, math.ceil(cfg.local_epochs * total / cfg.batch_size))
    tasks = list(sizes)
    floor = 1 if steps >= len(tasks) else 0
    counts = {t: max(floor, int(steps * sizes[t] / total)) for t in tasks}
    by_remainder = sorted(tasks, key=lambda t: steps * sizes[t] / total - int(steps * sizes[t] / total), reverse=True)
    for t in by_remainder * steps:  # hand out what rounding left, largest remainders first
        if sum(counts.values()) >= steps:
            break
        counts[t] += 1
    while sum(counts.values()) > steps:  # the floor of one step per task overshot
        counts[max(counts, key=counts.get)] -= 1
    order = [t for t in tasks for _ in range(counts[t])]
    return [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]


@dataclass
class Distillation:
    """Teacher logits for every training example, and the KD loss's temperature and weight."""

    teacher_logits: dict[str, torch.Tensor]
    temperature: float
    weight: float


def train_local(model: MultiModalModel, data: dict[str, TaskTensors], cfg: TrainConfig, lr: float,
                seed: int, device: torch.device, distill: Distillation | None = None,
                grpo: MoEConfig | None = None, proximal_mu: float = 0.0) -> TrainResult:
    """AdamW with gradient clipping over the model's trainable tensors; deterministic for a seed.

    With `distill`, the loss is fedmm.personalization.tap.kd_loss against the teacher's logits. MoE layers
    add their routing losses, and with `grpo` the routers also learn as a policy (fedmm.models.grpo). Routing
    counts restart here, so after the call they cover this training run only. `proximal_mu` > 0 adds
    FedProx's proximal term mu/2 * ||w - w_start||^2 over the trainable tensors (w_start: as received).
    """
    sizes = {t: len(d) for t, d in data.items() if len(d) > 0}
    if not sizes:
        raise ValueError("client has no training examples for any of its tasks")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    orders = {t: torch.randperm(n, generator=generator) for t, n in sizes.items()}
    cursors = dict.fromkeys(sizes, 0)
    result = TrainResult(steps=0, examples=dict.fromkeys(sizes, 0))
    loss_sums = dict.fromkeys(sizes, 0.0)
    loss_counts = dict.fromkeys(sizes, 0)
    reset_routing_stats(model)
    for layer in routed_layers(model):
        layer.keep_reference()
    routing_generator = torch.Generator().manual_seed(seed + 1)
    for task in _schedule(sizes, cfg, generator):
        n, start = sizes[task], cursors[task]
        if start + min(cfg.batch_size, n) > n:  # full batches only: reshuffle instead of a short tail
            orders[task], start = torch.randperm(n, generator=generator), 0
        index = orders[task][start : start + cfg.batch_size]
        cursors[task] = start + len(index)
        inputs, labels = data[task].batch(index, device)
        with autocast_for(device, cfg.precision):
            parts = model.encode(task, inputs)
            logits = model.heads[task](model.fusion(parts))
        if distill is None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        else:
            teacher = distill.teacher_logits[task][index].to(device)
            loss = kd_loss(logits.float(), teacher, labels, distill.temperature, distill.weight)
        total = loss
        aux = auxiliary_loss(model)
        if aux is not None:
            total = total + aux
        if grpo is not None:
            with autocast_for(device, cfg.precision):
                total = total + grpo_loss(model, task, parts, labels, grpo, routing_generator)
        if anchors:
            total = total + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        result.steps += 1
        result.examples[task] += len(index)
        loss_sums[task] += float(loss.detach()) * len(index)
        loss_counts[task] += len(index)
    result.loss = {t: loss_sums[t] / loss_counts[t] for t in sizes if loss_counts[t]}
    model.eval()
    return result


@dataclass
class TaskScore:
    correct: int
    count: int
    loss_sum: float

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")


@torch.no_grad()
def predict_logits(model: MultiModalModel, data: dict[str, TaskTensors], batch_size: int, device: torch.device,
                   precision: str = "auto") -> dict[str, torch.Tensor]:
    """Logits for every example of every task, in order (the teacher's view for distillation)."""
    model.to(device).eval()
    out = {}
    for task, split in data.items():
        chunks = []
        for start in range(0, len(split), batch_size):
            inputs, _ = split.batch(torch.arange(start, min(start + batch_size, len(split))), device)
            with autocast_for(device, precision):
                chunks.append(model(task, inputs).float().cpu())
        out[task] = torch.cat(chunks) if chunks else torch.zeros(0)
    return out


@torch.no_grad()
def evaluate(model: MultiModalModel, data: dict[str, TaskTensors], batch_size: int, device: torch.device,
             precision: str = "auto") -> dict[str, TaskScore]:
    model.to(device).eval()
    scores: dict[str, TaskScore] = {}
    for task, split in data.items():
        correct, loss_sum = 0, 0.0
        for start in range(0, len(split), batch_size):
            index = torch.arange(start, min(start + batch_size, len(split)))
            inputs, labels = split.batch(index, device)
            with autocast_for(device, precision):
                logits = model(task, inputs).float()
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
        scores[task] = TaskScore(correct, len(split), loss_sum)
    return scores
