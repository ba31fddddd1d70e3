"""Per-component weighted averaging over the clients that hold each component.

The mean streams over the holders' tensors (zero-copy views of the received buffers) with BLAS
`saxpy`, touching each received value once; no (N, P) copy is made. Non-finite inputs surface as
non-finite means (weights are positive), so the exact per-client finiteness check runs only when
something is wrong. `stack_component` builds the (N, P) matrix when all updates must sit side by side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.linalg.blas import saxpy

from fedmm.core.components import ComponentLayout, flatten, unflatten


def stack_component(layout: ComponentLayout, client_arrays: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    """(N, P) float32 matrix: row i is client i's tensors of this component, flattened in layout order."""
    stacked = np.empty((len(client_arrays), layout.size), dtype=np.float32)
    for row, arrays in zip(stacked, client_arrays):
        flatten(layout, arrays, out=row)
    return stacked


def weighted_mean(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of the rows of `stacked`; weights need not be normalised."""
    w = np.asarray(weights, dtype=np.float64)
    return (w / w.sum()).astype(np.float32) @ stacked


def streaming_weighted_mean(layout: ComponentLayout, client_arrays: Sequence[Mapping[str, np.ndarray]],
                            weights: np.ndarray) -> np.ndarray:
    """Same result as `weighted_mean(stack_component(...), weights)` without building the stack."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out = np.zeros(layout.size, dtype=np.float32)
    segments = [out[o : o + math.prod(s)] for o, s in zip(layout.offsets, layout.shapes)]
    for arrays, wi in zip(client_arrays, w.tolist()):
        for name, segment in zip(layout.names, segments):
            saxpy(arrays[name].reshape(-1), segment, a=wi)  # segment += wi * x, in place
    return out


def nonfinite_rows(stacked: np.ndarray) -> np.ndarray:
    """Indices of rows with a NaN or Inf (slow path, run only when a mean came out non-finite)."""
    return np.flatnonzero(~np.isfinite(stacked).all(axis=1))


@dataclass
class ComponentInputs:
    """Holders of one component: their arrays and weights (e.g. examples that trained it)."""

    client_ids: list[int]
    arrays: list[Mapping[str, np.ndarray]]
    weights: list[float]


def aggregate_component(layout: ComponentLayout, inputs: ComponentInputs) -> tuple[dict[str, np.ndarray], list[int]]:
    """New tensors of one component, or ({}, ids of holders with non-finite values) if there are any.

    With positive weights a non-finite input always yields a non-finite mean, and with normalised
    weights finite inputs cannot overflow, so the exact per-row check runs only on that signal.
    """
    weights = np.asarray(inputs.weights, dtype=np.float64)
    mean = streaming_weighted_mean(layout, inputs.arrays, weights)
    if np.isfinite(mean).all():
        return unflatten(layout, mean), []
    bad = nonfinite_rows(stack_component(layout, inputs.arrays))
    return {}, [inputs.client_ids[i] for i in bad]
