"""Per-component weighted averaging over the clients that hold each component.

The mean streams over the holders' tensors (zero-copy views of the received buffers) with BLAS
`saxpy`, touching each received value once; no (N, P) copy is made. Non-finite inputs surface as
non-finite means (weights are positive), so the exact per-client finiteness check runs only when
something is wrong. `stack_component` builds the (N, P) matrix for code that needs all updates side
by side (trust scoring).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.linalg.blas import saxpy

from fedmm.components import ComponentLayout, unflatten


def stack_component(layout: ComponentLayout, client_arrays: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    """(N, P) float32 matrix: row i is client i's tensors of this component, flattened in layout order."""
    stacked = np.empty((len(client_arrays), layout.size), dtype=np.float32)
    for row, arrays in zip(stacked, client_arrays):
        for name, offset in zip(layout.names, layout.offsets):
            flat = arrays[name].reshape(-1)
            row[offset : offset + flat.size] = flat
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
    """New tensors of one component, and the ids of holders dropped for non-finite values."""
    weights = np.asarray(inputs.weights, dtype=np.float64)
    mean = streaming_weighted_mean(layout, inputs.arrays, weights)
    dropped: list[int] = []
    if not np.isfinite(mean).all():
        stacked = stack_component(layout, inputs.arrays)
        bad = nonfinite_rows(stacked)
        dropped = [inputs.client_ids[i] for i in bad]
        keep = np.setdiff1d(np.arange(len(weights)), bad)
        if keep.size == 0:
            return {}, dropped
        # With normalised weights each partial sum is bounded by the largest |value|, so finite
        # inputs cannot overflow: the mean of the remaining rows is finite.
        mean = weighted_mean(stacked[keep], weights[keep])
    return unflatten(layout, mean), dropped
