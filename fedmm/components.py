"""Which named component each trainable parameter belongs to: the one place that decides it.

Model parameter names start with `encoders.<modality>.`, `fusion.` or `heads.<task>.`; components are
`encoder.<modality>`, `fusion.shared` and `head.<task>`. Aggregation, validation and byte accounting
all ask `component_of`.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedmm.tasks import TaskSpec, profile_modalities

FUSION = "fusion.shared"


class UnknownParameterError(KeyError):
    pass


def component_of(param_name: str) -> str:
    parts = param_name.split(".")
    if len(parts) >= 3 and parts[0] == "encoders":
        return f"encoder.{parts[1]}"
    if len(parts) >= 2 and parts[0] == "fusion":
        return FUSION
    if len(parts) >= 3 and parts[0] == "heads":
        return f"head.{parts[1]}"
    raise UnknownParameterError(f"parameter {param_name!r} belongs to no component")


def components_for_tasks(tasks: Iterable[str], specs: dict[str, TaskSpec]) -> list[str]:
    """Components a client holding `tasks` trains: its encoders, the fusion block, its heads."""
    tasks = list(tasks)
    encoders = [f"encoder.{m}" for m in profile_modalities(tasks, specs)]
    return encoders + [FUSION] + [f"head.{t}" for t in tasks]


def components_on_path(task: str, specs: dict[str, TaskSpec]) -> list[str]:
    """Components on one task's forward path."""
    return components_for_tasks([task], specs)


def group_by_component(names: Iterable[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(component_of(name), []).append(name)
    return groups
