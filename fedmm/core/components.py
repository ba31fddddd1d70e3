"""Which named component each trainable parameter belongs to: the one place that decides it.

Model parameter names start with `encoders.<modality>.`, `fusion.` or `heads.<task>.`; components are
`encoder.<modality>`, `fusion.shared` and `head.<task>`. In a mixture-of-experts block each expert and
each router is a component of its own: `fusion.expert.<layer>.<expert>` and `fusion.router.<layer>`; the
experts of a Hugging Face MoE encoder are `encoder.<modality>.expert.<layer>.<expert>`. A causal
language model's parameters start with `lm.`: the adapters of its transformer block i are the
component `lm.block.<i>`, anything outside the blocks is `lm.shared`.
Aggregation, validation and byte accounting all ask `component_of`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np


FUSION = "fusion.shared"
LM_SHARED = "lm.shared"


class UnknownParameterError(KeyError):
    pass


def layer_index(parts: list[str], before: int) -> str:
    """The block index a MoE parameter or module sits in: the last number in its dotted name before
    position `before` ("0" when there is none)."""
    numbers = [p for p in parts[:before] if p.isdigit()]
    return numbers[-1] if numbers else "0"


def component_of(param_name: str) -> str:
    base, packed, expert = param_name.partition("@")  # `<name>@<e>`: expert e's view of a packed factor
    parts = base.split(".")
    if len(parts) >= 3 and parts[0] == "heads":
        return f"head.{parts[1]}"
    if len(parts) >= 2 and parts[0] == "lm":
        block = next((p for p in parts if p.isdigit()), None)
        return LM_SHARED if block is None else f"lm.block.{block}"
    if len(parts) >= 2 and parts[0] == "fusion":
        scope = "fusion"
    elif len(parts) >= 3 and parts[0] == "encoders":
        scope = f"encoder.{parts[1]}"
    else:
        raise UnknownParameterError(f"parameter {param_name!r} belongs to no component")
    if packed and "experts" in parts:
        return expert_component(layer_index(parts, parts.index("experts")), expert, scope)
    if scope == "fusion":
        if "experts" in parts and parts.index("experts") + 1 < len(parts):
            i = parts.index("experts")
            return expert_component(layer_index(parts, i), parts[i + 1], scope)
        if "router" in parts:
            return router_component(layer_index(parts, parts.index("router")))
        return FUSION
    return scope


def expert_component(layer: int | str, expert: int | str, scope: str = "fusion") -> str:
    """`<scope>.expert.<layer>.<expert>`; scope is `fusion` or `encoder.<modality>` (a MoE backbone)."""
    return f"{scope}.expert.{layer}.{expert}"


def router_component(layer: int | str) -> str:
    return f"fusion.router.{layer}"


def is_expert(component: str) -> bool:
    """Experts travel only when a client routed tokens to them, weighted by those token counts."""
    return ".expert." in component


def component_order(component: str) -> tuple:
    """Encoders, then the fusion block, then heads; experts in numeric order within each."""
    rank = {"encoder": 0, "lm": 0, "fusion": 1, "head": 2}.get(component.split(".")[0], 3)
    return rank, [(0, int(p)) if p.isdigit() else (1, p) for p in component.split(".")]


def group_by_component(names: Iterable[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(component_of(name), []).append(name)
    return groups


@dataclass(frozen=True)
class ComponentLayout:
    """Where each parameter of a component sits in the component's flat vector (sorted by name).

    On the wire a component is one flat float32 vector; both sides derive the same layout from the
    model definition, so only the vector travels.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int


def component_layouts(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, ComponentLayout]:
    layouts = {}
    for component, names in group_by_component(sorted(shapes)).items():
        sizes = [math.prod(shapes[n]) for n in names]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        layouts[component] = ComponentLayout(tuple(names), tuple(tuple(shapes[n]) for n in names),
                                             tuple(offsets), sum(sizes))
    return layouts


def flat_layouts(sizes: Mapping[str, int]) -> dict[str, ComponentLayout]:
    """Layouts of arrays that already are one flat vector per component (the wire format)."""
    return {c: ComponentLayout((c,), ((n,),), (0,), n) for c, n in sizes.items()}


def flatten(layout: ComponentLayout, arrays: Mapping[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    flat = np.empty(layout.size, dtype=np.float32) if out is None else out
    for name, offset in zip(layout.names, layout.offsets):
        value = arrays[name].reshape(-1)
        flat[offset : offset + value.size] = value
    return flat


def unflatten(layout: ComponentLayout, flat: np.ndarray) -> dict[str, np.ndarray]:
    return {
        name: flat[offset : offset + math.prod(shape)].reshape(shape)
        for name, shape, offset in zip(layout.names, layout.shapes, layout.offsets)
    }


def tensor_slices(layout: ComponentLayout) -> dict[str, tuple[slice, tuple[int, ...]]]:
    """Each tensor's slice of the component's flat vector, and its shape."""
    return {n: (slice(o, o + math.prod(s)), tuple(s)) for n, o, s in zip(layout.names, layout.offsets, layout.shapes)}
