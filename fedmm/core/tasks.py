"""Tasks: which modalities a task reads and how many classes it predicts.

The synthetic tasks are fixed here; a Hugging Face dataset adds one task named by the config; the
arithmetic prompts of a language-model run are the one task `arithmetic`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedmm.core.schema import RunConfig

MODALITIES = ("image", "text")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    modalities: tuple[str, ...]
    num_classes: int


SYNTHETIC_TASKS: dict[str, TaskSpec] = {
    "img_shape": TaskSpec("img_shape", ("image",), 4),
    "txt_color": TaskSpec("txt_color", ("text",), 4),
    "vqa": TaskSpec("vqa", ("image", "text"), 12),
}


# The prompts a causal LM answers (data.source=arithmetic): generated text in, generated text out.
ARITHMETIC_TASK = TaskSpec("arithmetic", ("text",), 0)


def hf_task_spec(run: "RunConfig") -> TaskSpec:
    modalities = tuple(
        m for m, col in (("image", run.data.hf_image_column), ("text", run.data.hf_text_column)) if col
    )
    return TaskSpec(run.data.hf_task, modalities, run.data.hf_num_classes)


def task_specs(run: "RunConfig") -> dict[str, TaskSpec]:
    """Every task the run's data source offers."""
    if run.data.source == "synthetic":
        return dict(SYNTHETIC_TASKS)
    if run.data.source == "arithmetic":
        return {ARITHMETIC_TASK.name: ARITHMETIC_TASK}
    spec = hf_task_spec(run)
    return {spec.name: spec}


def profile_modalities(tasks: list[str] | tuple[str, ...], specs: dict[str, TaskSpec]) -> tuple[str, ...]:
    needed = {m for t in tasks for m in specs[t].modalities}
    return tuple(m for m in MODALITIES if m in needed)
