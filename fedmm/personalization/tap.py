"""TAP's two stages as plain functions: the replacement rule and the distillation loss.

Replacement (stage 1): after local training of the global copy, for each task, when
`teacher_loss + margin < personal_loss_at_last_participation` every component on that task's forward
path is copied from the global copy into the personal model, all or nothing. Never on a client's
first participation (its personal model then starts as the received global model).

Distillation (stage 2): loss = CE(student, y) + w * T^2 * KL(softmax(z_T / T) || softmax(z_S / T)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn



def tasks_to_replace(teacher_loss: Mapping[str, float], personal_loss: Mapping[str, float] | None,
                     margins: Mapping[str, float]) -> list[str]:
    """Tasks whose forward path the personal model takes from the global copy this round."""
    if personal_loss is None:  # first participation
        return []
    return [t for t, loss in teacher_loss.items()
            if t in personal_loss and loss + margins[t] < personal_loss[t]]


def replace_paths(personal: dict[str, np.ndarray], global_copy: Mapping[str, np.ndarray], tasks: list[str],
                  paths: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """The personal component vectors with every component on `tasks`' forward paths (`paths`: task ->
    its components, fedmm.models.model.client_components of that task alone) replaced."""
    out = dict(personal)
    for task in tasks:
        for component in paths[task]:
            out[component] = np.array(global_copy[component], copy=True)
    return out


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, weight: float) -> torch.Tensor:
    """Task loss plus temperature-scaled KL from the teacher's softened distribution to the student's."""
    ce = nn.functional.cross_entropy(student_logits, labels)
    log_student = nn.functional.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = nn.functional.log_softmax(teacher_logits / temperature, dim=-1)
    kl = nn.functional.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return ce + weight * temperature**2 * kl


def parse_margins(text: str, tasks: list[str], default: float) -> dict[str, float]:
    """`"vqa=0.02,txt_color=0.005"` -> a margin per task, `default` for the rest."""
    margins = dict.fromkeys(tasks, default)
    for item in filter(None, (s.strip() for s in text.split(","))):
        task, sep, value = item.partition("=")
        if not sep or task not in margins:
            raise ValueError(f"config key 'personal.task_margins': bad item {item!r} (tasks: {tasks})")
        margins[task] = float(value)
        if not math.isfinite(margins[task]) or margins[task] < 0:
            raise ValueError(f"config key 'personal.task_margins': margin for {task!r} must be >= 0")
    return margins
