"""A model attack written as a user would write one (numpy only, nothing from fedmm), plugged in with
`attack.name=benchmarks.user_attack:backdoor_mimicry attack.data=backdoor`.

The malicious clients train on backdoored data, then dress each poisoned update in the statistics of
a benign one: every coordinate keeps the poisoned update's sign and rank by magnitude, but takes its
magnitude from the benign estimate's sorted magnitudes. Norm, spikiness (any statistic of the
magnitudes) and sparsity then equal the benign estimate's exactly; only the direction carries the
backdoor. Before the colluders have seen a global update, they send the poisoned update unchanged.
"""

from __future__ import annotations

import numpy as np


def backdoor_mimicry(deltas: np.ndarray, context) -> np.ndarray:
    benign = context.benign_estimate
    if benign is None:
        return deltas
    magnitudes = np.sort(np.abs(benign))  # ascending
    out = np.empty_like(deltas)
    for i, delta in enumerate(deltas):
        ranks = np.empty(delta.size, dtype=np.int64)
        ranks[np.argsort(np.abs(delta), kind="stable")] = np.arange(delta.size)
        out[i] = np.sign(delta) * magnitudes[ranks]
    return out.astype(np.float32)
