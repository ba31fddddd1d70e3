"""Two-stage robust aggregation with trust scores: the maths, as plain functions over the updates.

Stage 1 scores every client's update of one component with indicators chosen by the component's kind
(LoRA factors, task heads, dense layers), each computed for all holders at once. The updates
Δ = trained - sent are read once, straight from the received buffers (no (N, P) copy): each one's
exact norm and a fresh random sample of its coordinates, which the indicators and stage 2 read.
Indicators are judged against the round's cohort (robust z-scores),
not against fixed constants, so they carry over between models and learning rates. Stage 2 inspects
suspicious clients layer by layer against the trusted ones. Reputation accumulates across rounds.

Nothing here looks at what a client says about itself, nor at the trigger or target of an attack.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedmm.core.components import ComponentLayout, tensor_slices
from fedmm.core.lora_ranks import LoraPair, lora_pairs

_EPS = 1e-12
TOP_SHARE = 0.01  # spikiness: energy share of the top 1% coordinates (the reference's choice)

# Weights of the indicators in a component's score, by component kind. The first three follow the
# reference's image-model weights (direction 0.12, norm 0.44, spikiness 0.44).
BASE_WEIGHTS = {"direction": 0.12, "norm": 0.44, "spikiness": 0.44, "sign": 0.15}
KIND_WEIGHTS = {
    "lora": {**BASE_WEIGHTS, "lora_concentration": 0.3},
    "head": {**BASE_WEIGHTS, "head_jump": 0.3},
    "embedding": {**BASE_WEIGHTS, "embedding_rows": 0.3},
    "dense": BASE_WEIGHTS,
}


def component_kind(component: str, layout: ComponentLayout) -> str:
    """Which indicator set judges a component: lora, head, embedding or dense."""
    if component.startswith("head."):
        return "head"
    if lora_pairs(layout):
        return "lora"
    if any("embeddings" in n and len(s) == 2 for n, s in zip(layout.names, layout.shapes)):
        return "embedding"
    return "dense"


# --- the judgement of an indicator against its cohort ---------------------------------------------


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD), with a floor on the scale so a tight cohort is not over-read."""
    med = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - med))
    scale = max(mad, 0.05 * abs(float(med)), _EPS)
    return (values - med) / scale


def outlier_score(values: np.ndarray, side: str = "both") -> np.ndarray:
    """1 inside 2 robust standard deviations of the cohort, falling as 1 / (1 + excess²) beyond.

    `side` is the direction that is suspicious: high, low or both.
    """
    z = robust_z(np.asarray(values, dtype=np.float64))
    excess = {"high": z, "low": -z, "both": np.abs(z)}[side]
    return 1.0 / (1.0 + np.maximum(0.0, excess - 2.0) ** 2)


# --- stage 1: indicators ----------------------------------------------------------------------------


def clip_factors(norms: np.ndarray) -> np.ndarray:
    """min(1, median norm / norm) per update: the factors that clip each update to the median norm."""
    return np.minimum(1.0, float(np.median(norms)) / np.maximum(norms, _EPS))


def robust_reference(deltas: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Mean of the updates after clipping each to the median norm: no single client can dominate it."""
    return (clip_factors(norms) / len(norms)).astype(deltas.dtype) @ deltas


def spikiness(deltas: np.ndarray) -> np.ndarray:
    """Share of each update's energy in its top 1% coordinates by magnitude."""
    k = max(1, math.ceil(TOP_SHARE * deltas.shape[1]))
    energy = np.square(deltas)
    total = energy.sum(axis=1, dtype=np.float64)
    energy.partition(energy.shape[1] - k, axis=1)
    return energy[:, energy.shape[1] - k :].sum(axis=1, dtype=np.float64) / np.maximum(total, _EPS)


def sign_agreement(deltas: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Magnitude-weighted share of coordinates whose sign agrees with the reference's.

    Σ|Δ_j|·[sign Δ_j = sign r_j] / Σ|Δ_j| = (Δ·sign(r) + ||Δ||₁) / (2 ||Δ||₁), over r_j ≠ 0.
    """
    signs = np.sign(reference).astype(deltas.dtype)
    l1 = np.abs(deltas) @ np.abs(signs)
    return (deltas @ signs + l1) / np.maximum(2 * l1, _EPS)


# Stage 1 reads the exact norms, and estimates direction, sign agreement and spikiness on a fresh
# random sample of coordinates each round: blocks of BLOCK contiguous coordinates, SAMPLE in all.
# This keeps the cost near one pass over the updates at any size (see benchmarks/trust_cost.py);
# the estimates' error (about 1/sqrt(SAMPLE) on a cosine) is far below the gaps the ranking needs.
SAMPLE = 4096
BLOCK = 32


def coordinate_sample(size: int, rng: np.random.Generator, count: int = SAMPLE, block: int = BLOCK) -> np.ndarray:
    """Sorted indices of `count` coordinates in random blocks of `block` (all of them if size <= count)."""
    if size <= count:
        return np.arange(size)
    starts = np.sort(rng.choice(size // block, count // block, replace=False)) * block
    return (starts[:, None] + np.arange(block)).ravel()


def row_norms(deltas: np.ndarray) -> np.ndarray:
    """Exact L2 norm of each row (multi-threaded, one pass, no temporary)."""
    import torch

    norms = torch.linalg.vector_norm(torch.from_numpy(deltas), dim=1).numpy().astype(np.float64)
    for i in np.flatnonzero(~np.isfinite(norms)):  # float32 overflow (or a NaN): redo that row in float64
        norms[i] = np.linalg.norm(deltas[i].astype(np.float64))
    return norms


def factor_grams(d_b: np.ndarray, b0: np.ndarray, d_a: np.ndarray, a0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G_u, G_v), each (N, 2r, 2r) float64: the Grams whose product G_u G_v has the nonzero
    eigenvalues of ΔWᵀΔW, where ΔW = B'A' - BA (new minus sent) is built from each client's factor
    updates d_b (N, out, r), d_a (N, r, in) and the sent factors b0 (out, r), a0 (r, in).

    ΔW = dB A' + B dA = U V with U = [dB, B] (out x 2r) and V = [A'; dA] (2r x in), G_u = UᵀU and
    G_v = V Vᵀ: the large terms of B'A' - BA do not cancel, so float32 Grams hold. Cost 2r
    multiply-adds per factor value; no out x in matrix, no loop over clients.

    Given a sample of B's rows and of A's columns instead (the same for every client), the Grams are
    sums over the sample: scaled by out / rows and in / columns they estimate the whole ones.
    """
    n, r = len(d_b), d_b.shape[2]
    bb = (d_b.transpose(0, 2, 1) @ d_b).astype(np.float64)  # dBᵀ dB
    b0b = (b0.T @ d_b).astype(np.float64)  # B0ᵀ dB
    aa = (d_a @ d_a.transpose(0, 2, 1)).astype(np.float64)  # dA dAᵀ
    a0a = (d_a @ a0.T).astype(np.float64)  # dA A0ᵀ
    g_u = np.empty((n, 2 * r, 2 * r))
    g_u[:, :r, :r], g_u[:, r:, :r] = bb, b0b
    g_u[:, :r, r:], g_u[:, r:, r:] = b0b.transpose(0, 2, 1), (b0.T.astype(np.float64) @ b0)
    g_v = np.empty_like(g_u)
    cross = a0a.transpose(0, 2, 1)  # A0 dAᵀ
    g_v[:, :r, :r] = a0.astype(np.float64) @ a0.T + cross + a0a + aa  # A'A'ᵀ
    g_v[:, :r, r:] = cross + aa  # A' dAᵀ
    g_v[:, r:, :r] = g_v[:, :r, r:].transpose(0, 2, 1)
    g_v[:, r:, r:] = aa
    return g_u, g_v


def factor_spectra(d_b: np.ndarray, b0: np.ndarray, d_a: np.ndarray, a0: np.ndarray) -> np.ndarray:
    """(N, 2r) squared singular values of each client's ΔW, descending (see factor_grams): the
    eigenvalues of Lᵀ G_v L with L Lᵀ = G_u, batched over the clients. Only an update that mostly
    re-parametrises the factors (B' = B S, A' = S⁻¹ A) cancels between ΔW's two terms and reads a
    few percent off."""
    g_u, g_v = factor_grams(d_b, b0, d_a, a0)
    return np.maximum(np.linalg.eigvalsh(_congruence(g_u, g_v))[:, ::-1], 0.0)


SQUARINGS = 6  # power steps 2^6 = 64


def energy_and_top(g_u: np.ndarray, g_v: np.ndarray, squarings: int = SQUARINGS) -> tuple[np.ndarray, np.ndarray]:
    """(||ΔW||²_F, its largest squared singular value) per client from the Grams, with no
    eigensolve (24,000 batched 16 x 16 eigensolves cost more than reading the updates): the energy
    is tr(G_u G_v); the top value is the Rayleigh quotient of M = G_u G_v (self-adjoint in the G_v
    inner product) at the top column of M^(2^squarings). Where the top two values lie within a
    few percent of each other, it reads between them."""
    energy = np.maximum(np.einsum("nij,nji->n", g_u, g_v), 0.0)
    power = g_u @ g_v
    for _ in range(squarings):
        power = power @ power
        power /= np.maximum(np.abs(power).max(axis=(1, 2), keepdims=True), 1e-300)
    # M^(2^k) is close to rank one: its largest column lies along the top eigenvector.
    column = np.square(power).sum(axis=1).argmax(axis=1)
    x = np.take_along_axis(power, column[:, None, None], axis=2)  # (N, 2r, 1)
    z = g_v @ x
    top = (z.transpose(0, 2, 1) @ g_u @ z)[:, 0, 0] / np.maximum((x.transpose(0, 2, 1) @ z)[:, 0, 0], 1e-300)
    return energy, np.clip(top, 0.0, energy)


def lora_delta_spectra(deltas: np.ndarray, sent: np.ndarray, pair: LoraPair) -> np.ndarray:
    """(N, 2r) exact squared singular values of each client's ΔW, from whole component rows (N, P)."""
    n = len(deltas)
    return factor_spectra(deltas[:, pair.b].reshape(n, *pair.b_shape), sent[pair.b].reshape(pair.b_shape),
                          deltas[:, pair.a].reshape(n, *pair.a_shape), sent[pair.a].reshape(pair.a_shape))


LORA_SAMPLE = 128  # rows of each B factor and columns of each A factor the LoRA indicators read


@dataclass(frozen=True)
class LoraPick:
    """The factor values of one LoRA pair that the sampled spectra read: rows of B, columns of A."""

    pair: LoraPair
    b_rows: np.ndarray
    a_cols: np.ndarray

    def columns(self) -> np.ndarray:
        """Their indices in the component vector: B's picked rows (row-major), then A's picked columns."""
        r, width = self.pair.a_shape
        b = self.pair.b.start + (self.b_rows[:, None] * r + np.arange(r)).ravel()
        a = self.pair.a.start + (np.arange(r)[:, None] * width + self.a_cols).ravel()
        return np.concatenate([b, a])

    def grams(self, part: np.ndarray, sent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Estimated Grams (factor_grams) from `part` (N, len(columns())): exact when nothing was
        left out."""
        (out, r), (_, width) = self.pair.b_shape, self.pair.a_shape
        rows, cols = len(self.b_rows), len(self.a_cols)
        n = len(part)
        b0 = sent[self.pair.b].reshape(out, r)[self.b_rows]
        a0 = sent[self.pair.a].reshape(r, width)[:, self.a_cols]
        g_u, g_v = factor_grams(part[:, : rows * r].reshape(n, rows, r), b0, part[:, rows * r :].reshape(n, r, cols), a0)
        return g_u * (out / rows), g_v * (width / cols)


def lora_picks(layout: ComponentLayout, rng: np.random.Generator, count: int = LORA_SAMPLE) -> list[LoraPick]:
    """A fresh random pick of `count` B rows and `count` A columns per LoRA pair (all where fewer)."""
    def draw(size: int) -> np.ndarray:
        return np.arange(size) if size <= count else np.sort(rng.choice(size, count, replace=False))

    return [LoraPick(p, draw(p.b_shape[0]), draw(p.a_shape[1])) for p in lora_pairs(layout)]


# Relative ridge on G_u's diagonal: above float32 rounding of the Grams, so the Cholesky is defined
# (U is rank-deficient when B = 0 before the first round or a factor was left unchanged); it moves
# the spectrum by about this share.
GRAM_RIDGE = 1e-5


def _congruence(g_u: np.ndarray, g_v: np.ndarray) -> np.ndarray:
    """Lᵀ G_v L with L Lᵀ = G_u (ridged), batched; L = Q Λ^½ from G_u's eigenvectors where Cholesky fails."""
    diag = np.einsum("nii->ni", g_u)
    # The absolute floor only keeps an all-zero row (an unchanged factor) defined; it must stay far
    # below ‖dB‖², which can be 1e-12 of ‖B‖².
    ridge = GRAM_RIDGE * diag + 1e-30 * np.maximum(diag.max(axis=1, keepdims=True), _EPS)
    ridged = g_u + ridge[:, :, None] * np.eye(g_u.shape[1])
    try:
        low = np.linalg.cholesky(ridged)
    except np.linalg.LinAlgError:
        lam, q = np.linalg.eigh(g_u)
        low = q * np.sqrt(np.maximum(lam, 0.0))[:, None, :]  # L Lᵀ = G_u with L = Q Λ^½
    return low.transpose(0, 2, 1) @ g_v @ low


def lora_indicators(part: np.ndarray, sent: np.ndarray, layout: ComponentLayout,
                    picks: Sequence[LoraPick] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(||ΔW||_F over the component's adapted layers, share of ΔW energy in each layer's top singular
    direction averaged over layers) per client: a backdoor tends to live in one direction.

    `part` holds the component's whole rows (exact), or with `picks` the picked columns of each pair
    one after the other (estimates from a sample of the factors' rows)."""
    if picks is None:  # whole rows: each factor a view, no copy
        n = len(part)
        grams = (factor_grams(part[:, p.b].reshape(n, *p.b_shape), sent[p.b].reshape(p.b_shape),
                              part[:, p.a].reshape(n, *p.a_shape), sent[p.a].reshape(p.a_shape))
                 for p in lora_pairs(layout))
        count = len(lora_pairs(layout))
    else:
        bounds = np.cumsum([0, *(len(pick.b_rows) * pick.pair.b_shape[1] + pick.pair.a_shape[0] * len(pick.a_cols)
                                 for pick in picks)])
        grams = (pick.grams(part[:, a:b], sent) for pick, a, b in zip(picks, bounds[:-1], bounds[1:]))
        count = len(picks)
    sq = np.zeros(len(part))
    concentration = np.zeros(len(part))
    for g_u, g_v in grams:
        energy, top = energy_and_top(g_u, g_v)
        sq += energy
        concentration += top / np.maximum(energy, _EPS) / count
    return np.sqrt(sq), concentration


def head_weight(layout: ComponentLayout) -> tuple[slice, tuple[int, ...]]:
    """A task head's weight matrix (classes x features): its slice and shape."""
    return next((sl, shape) for sl, shape in tensor_slices(layout).values() if len(shape) == 2)


def head_jump(weight: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """How far the most-changed class row of a head's weight (updates `weight`, N x classes*features)
    stands above the mean row change, relative to that mean; a push towards one (unknown) target
    class shows here."""
    rows = np.linalg.norm(weight.reshape(len(weight), *shape), axis=2)
    mean = rows.mean(axis=1)
    return (rows.max(axis=1) - mean) / np.maximum(mean, _EPS)


def embedding_rows(u: ComponentUpdates, rows: Sequence[int], layout: ComponentLayout) -> np.ndarray:
    """Share of the embedding update's row-norm mass in its top 0.1% rows (at least 10): a trigger
    token's row moves alone. Reads each update whole, one client at a time."""
    tables = [(sl, shape) for name, (sl, shape) in tensor_slices(layout).items() if "embeddings" in name and len(shape) == 2]
    shares = np.zeros(len(rows))
    for j, i in enumerate(rows):
        delta = u.delta(i)
        for sl, shape in tables:
            norms = np.linalg.norm(delta[sl].reshape(shape), axis=1)
            k = min(shape[0], max(10, int(0.001 * shape[0])))
            top = np.partition(norms, shape[0] - k)[shape[0] - k :].sum()
            shares[j] = max(shares[j], top / max(float(norms.sum()), _EPS))
    return shares


# --- reading the updates --------------------------------------------------------------------------


@dataclass
class ComponentUpdates:
    """The updates of one component's holders, row i client_ids[i]'s: either `rows` are the updates
    themselves ((N, P) array, `sent` None), or they are the trained vectors as received and each
    update is row - sent, read where needed. No (N, P) copy is ever made of received vectors."""

    client_ids: list[int]
    rows: np.ndarray | Sequence[np.ndarray]
    sent: np.ndarray | None = None

    def delta(self, i: int) -> np.ndarray:
        """Row i's whole update (a view of `rows` when they are the updates)."""
        return self.rows[i] if self.sent is None else self.rows[i] - self.sent

    def read(self, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One pass over every update: (exact L2 norms (N,), the given columns (N, len(columns)))."""
        if self.sent is None:
            return row_norms(np.asarray(self.rows)), np.asarray(self.rows)[:, columns]
        from scipy.linalg.blas import sdot

        n = len(self.client_ids)
        norms, part = np.empty(n), np.empty((n, len(columns)), dtype=np.float32)
        scratch = np.empty(self.sent.shape, dtype=np.float32)
        for i, row in enumerate(self.rows):  # each row passes through the cache once
            np.subtract(row, self.sent, out=scratch)
            norms[i] = sdot(scratch, scratch)
            np.take(scratch, columns, out=part[i], mode="clip")  # columns are in range: no check
        with np.errstate(over="ignore", invalid="ignore"):
            norms = np.sqrt(norms)
        for i in np.flatnonzero(~np.isfinite(norms)):  # float32 overflow (or a NaN): redo that row in float64
            norms[i] = np.linalg.norm(self.delta(i).astype(np.float64))
        return norms, part


PROBE = 256  # coordinates the duplicate screen compares


@dataclass
class ComponentReading:
    """What one pass over a component's updates gives the screen and stage 1: exact norms, the
    sampled indicators' coordinates, the duplicate probe, the picked LoRA factor values and the
    head's weight, rows in the updates' order."""

    norms: np.ndarray
    sample: np.ndarray
    probe: np.ndarray
    lora: np.ndarray  # (N, 0) unless the component is LoRA-adapted
    picks: list[LoraPick]
    head: np.ndarray  # (N, 0) unless the component is a task head
    layers: list[np.ndarray]  # stage 2's sample of each layer (tensor), (N, <= LAYER_SAMPLE) each
    layer_scales: list[float]  # each layer's size over its sample's

    def take(self, rows: Sequence[int]) -> "ComponentReading":
        rows = list(rows)
        return ComponentReading(self.norms[rows], self.sample[rows], self.probe[rows], self.lora[rows],
                                self.picks, self.head[rows], [x[rows] for x in self.layers], self.layer_scales)


def read_component(name: str, u: ComponentUpdates, layout: ComponentLayout, rng: np.random.Generator) -> ComponentReading:
    """Draw this round's coordinates of a component and read them, with the exact norms, in one pass
    (stage 2's too: who it inspects is known only after stage 1, and a second pass over the
    received buffers costs more than reading these for everyone while each row is in cache)."""
    size = layout.size
    kind = component_kind(name, layout)
    picks = lora_picks(layout, rng) if kind == "lora" else []
    head = np.arange(0)
    if kind == "head":
        weight = head_weight(layout)[0]
        head = np.arange(weight.start, weight.stop)
    slices = layer_slices(layout)
    layers = [sl.start + coordinate_sample(sl.stop - sl.start, rng, count=LAYER_SAMPLE, block=16) for sl in slices]
    parts = [coordinate_sample(size, rng), coordinate_sample(size, rng, count=PROBE, block=1),
             np.concatenate([p.columns() for p in picks]) if picks else np.arange(0), head, *layers]
    norms, gathered = u.read(np.concatenate(parts).astype(np.intp))
    bounds = np.cumsum([0, *map(len, parts)])
    sample, probe, lora, head_part, *layer_parts = (gathered[:, a:b] for a, b in zip(bounds[:-1], bounds[1:]))
    scales = [(sl.stop - sl.start) / len(picked) for sl, picked in zip(slices, layers)]
    return ComponentReading(norms, sample, probe, lora, picks, head_part, layer_parts, scales)


@dataclass
class ComponentTrust:
    """Stage-1 result for one component over its holders (rows in `client_ids` order)."""

    client_ids: list[int]
    indicators: dict[str, np.ndarray]  # raw values
    scores: dict[str, np.ndarray]  # each indicator judged against the cohort, in [0, 1]
    trust: np.ndarray  # weighted mean of the scores


def score_component(component: str, layout: ComponentLayout, reading: ComponentReading, sent: np.ndarray,
                    client_ids: Sequence[int], u: ComponentUpdates | None = None,
                    rows: Sequence[int] = ()) -> ComponentTrust:
    """Stage 1 for one component: indicators for every holder, judged against the cohort.

    `reading` holds the holders' exact norms and sampled coordinates; `u` and `rows` (the holders'
    rows in it) are read again only for an embedding component's row shares.
    """
    kind = component_kind(component, layout)
    part = reading.sample
    # Each sampled row divided by its largest magnitude: float32 cannot overflow on any finite update,
    # and direction, spikiness and sign agreement do not depend on a row's scale.
    peak = np.abs(part).max(axis=1).astype(np.float64)
    unit = part / np.maximum(peak, _EPS).astype(np.float32)[:, None]
    unit_norms = np.linalg.norm(unit, axis=1).astype(np.float64)
    # The robust reference (the updates clipped to the median norm, then averaged), up to its scale.
    coef = clip_factors(unit_norms * peak) * peak
    reference = (coef / max(float(coef.max()), _EPS)).astype(np.float32) @ unit
    cosine = (unit @ reference) / np.maximum(unit_norms * float(np.linalg.norm(reference)), _EPS)
    raw: dict[str, np.ndarray] = {"direction": cosine, "spikiness": spikiness(unit),
                                  "sign": sign_agreement(unit, reference)}
    judged = {"direction": outlier_score(cosine, "low"), "spikiness": outlier_score(raw["spikiness"], "high"),
              "sign": outlier_score(raw["sign"], "low")}
    update_norm = reading.norms
    if kind == "lora":
        update_norm, raw["lora_concentration"] = lora_indicators(reading.lora, sent, layout, reading.picks)
        judged["lora_concentration"] = outlier_score(raw["lora_concentration"], "high")
    elif kind == "head":
        raw["head_jump"] = head_jump(reading.head, head_weight(layout)[1])
        judged["head_jump"] = outlier_score(raw["head_jump"], "high")
    elif kind == "embedding":
        if u is None:
            raise ValueError(f"{component}: an embedding component's row shares need its updates (u)")
        raw["embedding_rows"] = embedding_rows(u, rows, layout)
        judged["embedding_rows"] = outlier_score(raw["embedding_rows"], "high")
    raw["norm"] = update_norm
    judged["norm"] = outlier_score(np.log(np.maximum(update_norm, _EPS)), "both")
    weights = KIND_WEIGHTS[kind]
    trust = sum(weights[k] * judged[k] for k in weights) / sum(weights.values())
    # An indicator that cannot be computed is no evidence of honesty: the worst score.
    trust = np.where(np.isfinite(trust), trust, 0.0)
    raw = {k: np.where(np.isfinite(v), v, 0.0) for k, v in raw.items()}  # reports are strict JSON
    return ComponentTrust(list(client_ids), raw, judged, trust)


# --- one score per client -------------------------------------------------------------------------

def client_consensus(scored: Mapping[str, ComponentTrust]) -> dict[int, float]:
    """Each client's mean direction (cosine to the robust reference) over its components other than
    task heads: non-IID clients rightly pull their heads against the cohort (a head alone counts
    when the client holds nothing else)."""
    shared: dict[int, list[float]] = {}
    heads: dict[int, list[float]] = {}
    for name, result in scored.items():
        into = heads if name.startswith("head.") else shared
        for c, cosine in zip(result.client_ids, result.indicators["direction"].tolist()):
            into.setdefault(c, []).append(cosine)
    return {c: float(np.mean(shared.get(c) or heads[c])) for c in {*shared, *heads}}


def client_trust(component_scores: Mapping[int, Sequence[float]], consensus: Mapping[int, float],
                 weight: float) -> dict[int, float]:
    """Mean of a client's component scores, blended (`weight`) with its consensus relative to the
    cohort's median consensus (1 at or above it, 0 at or below zero). A cohort without a common
    direction (median <= 0) gives the consensus no say.

    A sign or label flip turns every component a little against the cohort, each within the 2-SD band
    one component's direction is judged by; averaged over the client's components it stands out
    (sign flipping on the --small robustness grid: detection AUC 0.55 -> 0.91 at weight 0.3)."""
    median = float(np.median(list(consensus.values()))) if consensus else 0.0
    out = {}
    for c, scores in component_scores.items():
        agreement = min(1.0, max(0.0, consensus[c] / median)) if median > 0 else 1.0
        out[c] = (1 - weight) * float(np.mean(scores)) + weight * agreement
    return out


# --- the split -------------------------------------------------------------------------------------

TRUSTED, SUSPICIOUS, REJECTED = "trusted", "suspicious", "rejected"


def split_by_rank(scores: Mapping[int, float], trusted_fraction: float, rejected_fraction: float) -> dict[int, str]:
    """Top `trusted_fraction` trusted, bottom `rejected_fraction` rejected, the middle suspicious.

    Ranks ties by client id, so a round is reproducible; a NaN score ranks last. With few clients at
    least one is trusted.
    """
    order = sorted(scores, key=lambda c: (-scores[c] if math.isfinite(scores[c]) else math.inf, c))
    n = len(order)
    n_trusted = max(1, round(trusted_fraction * n))
    n_rejected = min(n - n_trusted, round(rejected_fraction * n))
    return {c: TRUSTED if i < n_trusted else REJECTED if i >= n - n_rejected else SUSPICIOUS
            for i, c in enumerate(order)}


# --- stage 2: layer-wise inspection ---------------------------------------------------------------


def layer_features(updates: np.ndarray, reference: np.ndarray, norms: np.ndarray | None = None,
                   scale: float = 1.0) -> np.ndarray:
    """The reference's nine features per client for one layer (rows of `updates`): shares of +, -
    and 0 coordinates, kurtosis, skewness, distance to the others, L1 deviation from the reference,
    L2 norm and angle to the reference. `reference` is one vector, or one per row.

    `updates` may be a sample of the layer's coordinates: `norms` are then the exact norms and
    `scale` (layer size / sample size) scales the L1 deviation. The distance to the others is the
    root-mean-square one, exact in O(n p) (the mean distance needs all pairs).
    """
    x = np.asarray(updates, dtype=np.float32)
    mean = x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    centred = (x - mean) / np.maximum(std, _EPS)
    squared = centred * centred  # products, not **: float32 powers take a slow path
    kurtosis = (squared * squared).mean(axis=1) - 3.0
    skewness = (squared * centred).mean(axis=1)
    spread = ((x - x.mean(axis=0)) ** 2).sum(axis=1)
    n = len(x)
    rms_distance = np.sqrt(np.maximum(n * spread + spread.sum(), 0.0) / max(n - 1, 1) * scale)
    sample_norms = np.linalg.norm(x, axis=1)
    ref = np.broadcast_to(reference, x.shape).astype(np.float32)
    cos = (x * ref).sum(axis=1) / np.maximum(sample_norms * np.linalg.norm(ref, axis=1), _EPS)
    return np.column_stack([
        (x > 0).mean(axis=1), (x < 0).mean(axis=1), (x == 0).mean(axis=1), kurtosis, skewness, rms_distance,
        np.abs(x - ref).sum(axis=1) * scale, sample_norms * math.sqrt(scale) if norms is None else norms,
        np.arccos(np.clip(cos, -1, 1)),
    ])


MIN_SILHOUETTE = 0.45  # a random cloud splits at under 0.35 (99th percentile, 6-40 points in 9-D): nobody stands apart


def silhouette(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of a two-cluster split, from the square distance matrix (a point alone in its
    cluster scores 0, as in Rousseeuw's definition)."""
    members = np.stack([labels == 0, labels == 1], axis=1).astype(np.float64)
    sizes = members.sum(axis=0)
    mean_to = distances @ members  # (n, 2) summed distance to each cluster
    own = labels.astype(int)
    a = mean_to[np.arange(len(labels)), own] / np.maximum(sizes[own] - 1, 1)
    b = mean_to[np.arange(len(labels)), 1 - own] / sizes[1 - own]
    s = np.where(sizes[own] > 1, (b - a) / np.maximum(np.maximum(a, b), _EPS), 0.0)
    return float(s.mean())


def honest_members(features: np.ndarray, trusted: np.ndarray) -> np.ndarray:
    """Which rows fall in the honest one of two average-linkage clusters: the cluster holding most
    of the trusted rows. Features are standardised (robustly) so no single one dominates. A split
    whose silhouette stays under MIN_SILHOUETTE finds no group apart, and every row is honest."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist, squareform

    if len(features) < 3:
        return np.ones(len(features), dtype=bool)
    med = np.median(features, axis=0)
    scale = 1.4826 * np.median(np.abs(features - med), axis=0)
    scale = np.where(scale > _EPS, scale, np.maximum(features.std(axis=0), _EPS))
    distances = pdist((features - med) / scale)
    labels = fcluster(linkage(distances, method="average"), 2, criterion="maxclust") - 1
    if len(set(labels)) < 2 or silhouette(squareform(distances), labels) < MIN_SILHOUETTE:
        return np.ones(len(features), dtype=bool)
    honest = np.bincount(labels[trusted], minlength=2).argmax()
    return labels == honest


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The weighted median: np.median under equal weights, else the smallest value with at least half
    the total weight at or below it."""
    if np.all(weights == weights[0]):
        return float(np.median(values))
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def inspect_layer(updates: np.ndarray, trusted: np.ndarray, suspicious: np.ndarray,
                  norms: np.ndarray | None = None, scale: float = 1.0, anchor_weight: float = 1.0) -> np.ndarray:
    """Verdicts (True = honest) for the suspicious rows of one layer's (N, p) updates.

    Suspicious rows whose norm lies more than two robust standard deviations from the median of the
    trusted and suspicious rows fail outright (the reference gates on the suspicious rows alone, where
    colluders can be the majority); the others are clustered together with the trusted rows (the
    reference's nine features, two average-linkage clusters) and pass when they join the cluster
    that holds most trusted rows. The reference is the trusted rows' mean (leave-one-out for them).
    `updates` may hold a sample of the layer's coordinates (`scale` = layer size / sample size);
    norms are then estimated from it unless given. When the trusted rows are a sample of the trusted
    clients, each stands for `anchor_weight` of them in the gate's median and spread, so the
    suspects (attackers can be most of them) weigh what they weigh in the whole cohort.
    """
    norms = np.linalg.norm(updates, axis=1) * math.sqrt(scale) if norms is None else norms
    rows = np.flatnonzero(suspicious)
    cohort = trusted | suspicious
    weights = np.where(trusted, anchor_weight, 1.0)[cohort]
    med = weighted_median(norms[cohort], weights)
    spread = 2 * 1.4826 * weighted_median(np.abs(norms[cohort] - med), weights)
    gate = np.abs(norms[rows] - med) <= max(spread, 0.1 * med, _EPS)
    trusted_rows = np.flatnonzero(trusted)
    group = np.concatenate([trusted_rows, rows[gate]])
    # Each trusted row is compared with the mean of the other trusted rows: measured against a mean it
    # is part of, it would look closer than any suspect could.
    total = updates[trusted_rows].sum(axis=0)
    t = len(trusted_rows)
    references = np.vstack([(total - updates[trusted_rows]) / max(t - 1, 1) if t > 1 else updates[trusted_rows],
                            np.broadcast_to(total / t, (int(gate.sum()), updates.shape[1]))])
    features = layer_features(updates[group], references, norms[group], scale)
    members = honest_members(features, np.arange(len(group)) < t)
    verdict = np.zeros(len(rows), dtype=bool)
    verdict[gate] = members[t:]
    return verdict


LAYER_SAMPLE = 512  # coordinates of a layer the inspection features read
MAX_ANCHORS = 32  # trusted rows clustered with the suspects, per layer
MIN_ANCHORS = 3  # fewer trusted rows cannot anchor the honest cluster (one or two form their own)


def layer_slices(layout: ComponentLayout) -> list[slice]:
    """Each tensor of a component is one layer of the inspection."""
    return [sl for sl, _ in tensor_slices(layout).values()]


# --- reputation ----------------------------------------------------------------------------------


@dataclass
class Reputation:
    """Per client id: integer reputation points (one per round the two stages judged it honest:
    trusted, or suspicious and passing inspection) and rounds taken part in, in total and over the
    last WINDOW participations. Clients are compared by their recent points per participation: a
    client sampled rarely is not mistaken for a bad one, and an honest client held out for a bad
    stretch recovers within a window. (The reference gives +1 for passing inspection and +1 for being
    aggregated; a passing suspect then outranks a trusted client.)

    The behaviour check's catches are kept apart (`caught`, over the last WINDOW participations):
    direct evidence of a backdoor, so a few of them hold a client out at once, with no warm-up and
    whatever its points; they age out of the window like points do. A round in which the client is
    held out for its catches is no judgement of it: it enters the catches' window (so they age out)
    but not the points' (measured on the robustness grid: honest clients caught twice early came
    back with an emptied points window and were held out for about six more rounds by their rate)."""

    points: dict[int, int] = field(default_factory=dict)
    participations: dict[int, int] = field(default_factory=dict)
    recent: dict[int, list[int]] = field(default_factory=dict)  # points earned in each recent judged round
    caught: dict[int, list[int]] = field(default_factory=dict)  # 1 where the behaviour check caught it

    WINDOW = 10

    def participate(self, client: int, earned: int | None, caught: bool = False) -> None:
        """Record one round of `client`, in which it earned `earned` points (None: it was not judged)
        and was caught by the behaviour check or not."""
        self.participations[client] = self.participations.get(client, 0) + 1
        if earned is not None:
            self.points[client] = self.points.get(client, 0) + earned
            self.recent[client] = [*self.recent.get(client, []), earned][-self.WINDOW :]
        self.caught[client] = [*self.caught.get(client, []), int(caught)][-self.WINDOW :]

    def times_caught(self, client: int) -> int:
        """Behaviour catches over the client's recent window."""
        return sum(self.caught.get(client, []))

    def rate(self, client: int) -> float | None:
        """Points per judged round over the recent window; None for a client never judged."""
        recent = self.recent.get(client)
        return sum(recent) / len(recent) if recent else None

    def threshold(self) -> float:
        """The rate below which a client is held out after warm-up: two robust standard deviations
        (2 x 1.4826 MAD) under the median of the known clients' recent rates, and never above 0.5.
        Stage 1 rejects its bottom share every round, so an honest client misses points now and
        then; only one judged honest in under half of its recent rounds, and an outlier, is held out.
        (The reference's median - MAD holds out about a quarter of any honest cohort by construction.)"""
        rates = np.array([self.rate(c) for c in self.recent if self.recent[c]])
        if not len(rates):
            return -math.inf
        med = float(np.median(rates))
        return min(med - 2 * 1.4826 * float(np.median(np.abs(rates - med))), 0.5)

    def to_json(self) -> dict:
        return {"points": {str(k): v for k, v in sorted(self.points.items())},
                "participations": {str(k): v for k, v in sorted(self.participations.items())},
                "recent": {str(k): v for k, v in sorted(self.recent.items())},
                "caught": {str(k): v for k, v in sorted(self.caught.items())}}

    @classmethod
    def from_json(cls, data: Mapping) -> "Reputation":
        def count(k: object, v: object) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"reputation of client {k!r} must hold non-negative integers, got {v!r}")
            return v

        def lists(d: Mapping, what: str) -> dict[int, list[int]]:
            out = {}
            for k, v in d.items():
                if not isinstance(v, list) or len(v) > cls.WINDOW:
                    raise ValueError(f"{what} of client {k!r} must be a list of at most {cls.WINDOW}")
                out[int(k)] = [count(k, x) for x in v]
            return out

        return cls({int(k): count(k, v) for k, v in data.get("points", {}).items()},
                   {int(k): count(k, v) for k, v in data.get("participations", {}).items()},
                   lists(data.get("recent", {}), "recent reputation"),
                   lists(data.get("caught", {}), "behaviour catches (caught)"))


# --- one round ------------------------------------------------------------------------------------


@dataclass
class RoundDecision:
    """What the defence decided about each client of a round, and why."""

    aggregated: list[int]
    category: dict[int, str]  # stage-1 split (clients that passed the input checks)
    trust: dict[int, float]  # the client's score: its component scores and its consensus (client_trust)
    inspection: dict[int, float | None]  # suspicious client -> share of its layers judged honest
    dropped: dict[int, str]  # client -> reason it is not aggregated
    components: dict[str, ComponentTrust]
    consensus: dict[int, float] = field(default_factory=dict)  # mean direction over shared components
    norms: dict[str, np.ndarray] = field(default_factory=dict)  # component -> exact update norms, rows as its updates


# The first word of the input screen's reasons: updates no honest client sends (logged as warnings).
SCREEN_REASONS = ("non-finite", "zero-update", "absurd-norm", "duplicate", "near-duplicate")


def screen_updates(components: Mapping[str, ComponentUpdates], sent: Mapping[str, np.ndarray],
                   max_relative_norm: float, readings: Mapping[str, ComponentReading]) -> dict[int, str]:
    """Clients whose updates cannot be scored, with the reason (non-finite values, no change at all,
    an absurd norm, an exact or near copy of another's update), from each component's reading (its
    exact norms and duplicate probe, `read_component`)."""
    bad: dict[int, str] = {}
    moved: dict[int, bool] = {}
    for c, u in components.items():
        totals = readings[c].norms
        for i in np.flatnonzero(~np.isfinite(totals)):
            if not np.isfinite(u.delta(i)).all():
                bad.setdefault(u.client_ids[i], "non-finite: NaN or Inf values")
        for client, norm in zip(u.client_ids, totals.tolist()):
            moved[client] = moved.get(client, False) or norm > 0
    for client, any_change in moved.items():
        if not any_change:
            bad.setdefault(client, "zero-update: the update changes nothing")
    unscorable = set(bad)
    for c, u in components.items():
        norms = readings[c].norms
        ok = [i for i, client in enumerate(u.client_ids) if client not in bad]
        if not ok:
            continue
        # The yardstick: the lower median of the holders' norms (a client cannot raise it alone, even
        # one of two) and the norm of the component itself; an update 100x either is no training step.
        lower_median = float(np.sort(norms[ok])[(len(ok) - 1) // 2])
        weights_norm = float(np.linalg.norm(sent[c].astype(np.float64)))
        limit = max_relative_norm * min(x for x in (lower_median, weights_norm, math.inf) if x > 0)
        for i in [i for i in ok if not norms[i] <= limit]:  # only the flagged few loop in Python
            if not np.isfinite(norms[i]):
                bad.setdefault(u.client_ids[i], f"absurd-norm: {c} norm overflows float32")
            elif lower_median > 0 and norms[i] > max_relative_norm * lower_median:
                bad.setdefault(u.client_ids[i], f"absurd-norm: {c} norm {norms[i]:.3g} is "
                                                f"{norms[i] / lower_median:.0f}x the median")
            elif weights_norm > 0 and norms[i] > max_relative_norm * weights_norm:
                bad.setdefault(u.client_ids[i], f"absurd-norm: {c} norm {norms[i]:.3g} is "
                                                f"{norms[i] / weights_norm:.0f}x the component's own norm")
        # Exact copies: honest clients with their own data and seeds never send bit-identical updates.
        # Every client not screened out as non-finite or unmoved is a peer here, even one another
        # component already caught: a colluder caught on its first component must still expose the
        # one that holds only this one.
        peers = [i for i, client in enumerate(u.client_ids) if client not in unscorable]
        probed = readings[c].probe[peers]
        seen: dict[bytes, int] = {}
        for j, i in enumerate(peers):
            key = norms[i].tobytes() + probed[j].tobytes()
            first = seen.setdefault(key, i)
            if first != i and np.array_equal(u.delta(first), u.delta(i)):
                a, b = u.client_ids[first], u.client_ids[i]
                bad.setdefault(b, f"duplicate: {c} identical to client {a}'s")
                bad.setdefault(a, f"duplicate: {c} identical to client {b}'s")
        for i, (j, closeness) in near_duplicates(probed).items():
            bad.setdefault(u.client_ids[peers[i]], f"near-duplicate: {c} at {closeness:.0%} of the cohort's typical "
                                                   f"distance from client {u.client_ids[peers[j]]}'s")
    return bad


# Honest clients train on their own data: no two updates are much closer to each other than the
# cohort's typical pair. Colluders sending one forged update each with a little noise (ALIE's) are.
NEAR_DUPLICATE = 0.25
MIN_NEAR_DUPLICATE_HOLDERS = 4  # fewer holders give no typical distance to compare with


def near_duplicates(sample: np.ndarray) -> dict[int, tuple[int, float]]:
    """Rows whose nearest other row lies within NEAR_DUPLICATE of the median pairwise distance, with
    that neighbour and the ratio. Distances are relative (over the larger of the two norms), so two
    small updates (clients with little data) are not close just for being small; `sample` holds the
    same coordinates of every row."""
    n = len(sample)
    if n < MIN_NEAR_DUPLICATE_HOLDERS:
        return {}
    # float32 (rows scaled to a largest magnitude of 1): the cancellation in |x|² + |y|² - 2xy costs
    # about 1e-3 of the larger norm, far under the NEAR_DUPLICATE share of a typical distance.
    x = (sample / np.maximum(np.abs(sample).max(), _EPS)).astype(np.float32)
    sq = np.einsum("ij,ij->i", x, x)
    relative = np.maximum(sq[:, None] + sq[None, :] - 2 * (x @ x.T), 0.0)
    relative /= np.maximum(np.maximum(sq[:, None], sq[None, :]), _EPS)
    np.sqrt(relative, out=relative)
    typical = float(np.median(relative[~np.eye(n, dtype=bool)]))  # every pair twice: the same median
    np.fill_diagonal(relative, np.inf)
    nearest = relative.argmin(axis=1)
    ratio = relative[np.arange(n), nearest] / max(typical, _EPS)
    return {i: (int(nearest[i]), float(ratio[i])) for i in np.flatnonzero((ratio < NEAR_DUPLICATE) & (typical > 0))}


def behaviour_sample(clients: Sequence[int], reputation: Reputation, limit: int, strikes: int,
                     rng: np.random.Generator) -> list[int]:
    """The clients the behaviour check reads this round: all of them, or with `limit` > 0 a uniform
    draw of at most that many among those not already held out by their strikes. Uniform, so that
    the cohort median the outliers are judged against is a random honest-majority one (reading the
    caught first would fill the sample with attackers and lift the median to theirs); each client
    is read about limit / N of its rounds."""
    if not limit:
        return list(clients)
    open_ = [c for c in clients if reputation.times_caught(c) < strikes]
    if len(open_) <= limit:
        return open_
    return sorted(open_[i] for i in rng.choice(len(open_), size=limit, replace=False))


def _rows(u: ComponentUpdates, keep: set[int]) -> list[int]:
    return [i for i, c in enumerate(u.client_ids) if c in keep]


def decide_round(components: Mapping[str, ComponentUpdates], sent: Mapping[str, np.ndarray],
                 layouts: Mapping[str, ComponentLayout], reputation: Reputation, server_round: int,
                 rng: np.random.Generator, *, trusted_fraction: float = 0.5, rejected_fraction: float = 0.2,
                 pass_early: float = 0.4, pass_late: float = 0.6, late_round: int = 5, warmup_rounds: int = 3,
                 max_relative_norm: float = 100.0, consensus_weight: float = 0.3,
                 behaviour: Callable[[list[int]], Mapping[int, str]] | None = None,
                 strikes: int = 2) -> RoundDecision:
    """Both stages and the reputation update for one round; `reputation` is updated in place.
    `rng` draws the coordinates the sampled indicators read (fresh each round). `behaviour` judges
    the clients that pass the input screen and returns those it catches, with the reason; they are
    dropped, earn nothing, and a client caught `strikes` times in its recent window is held out until
    the catches age out."""
    # One pass over every update: exact norms and this round's sampled coordinates (fresh each round).
    readings = {name: read_component(name, u, layouts[name], rng) for name, u in sorted(components.items())}
    dropped = screen_updates(components, sent, max_relative_norm, readings)
    clients = sorted({c for u in components.values() for c in u.client_ids} - set(dropped))
    behaviour = dict(behaviour(clients)) if behaviour is not None and clients else {}
    # A client the behaviour check catches, or holds out for its strikes, is decided: it takes no
    # part in the statistics either, where it would shift the robust reference and, ranked trusted,
    # anchor the honest cluster of the inspection (measured: scaling attackers ranked trusted made
    # the inspection fail honest clients 24 times in 144 client-rounds).
    held = dict(behaviour)
    for c in clients:
        if c not in held and reputation.times_caught(c) >= strikes:
            held[c] = (f"reputation: caught by the behaviour check {reputation.times_caught(c)} times "
                       f"in its last {Reputation.WINDOW} rounds")
    clients = [c for c in clients if c not in held]
    scored: dict[str, ComponentTrust] = {}
    per_client: dict[int, list[float]] = {c: [] for c in clients}
    for name in sorted(components):
        u = components[name]
        rows = _rows(u, set(clients))
        if not rows:
            continue
        reading = readings[name].take(rows) if len(rows) < len(u.client_ids) else readings[name]
        holders = [u.client_ids[i] for i in rows]
        result = score_component(name, layouts[name], reading, sent[name], holders, u, rows)
        scored[name] = result
        for c, t in zip(holders, result.trust):
            per_client[c].append(float(t))
    consensus = client_consensus(scored)
    trust = client_trust(per_client, consensus, consensus_weight)
    category = split_by_rank(trust, trusted_fraction, rejected_fraction) if trust else {}
    inspection = _inspect(components, readings, category, rng)
    need = pass_early if server_round <= late_round else pass_late
    # A suspect no layer could judge (too few trusted clients hold its tensors) is given the benefit
    # of the doubt: stage 1 did not put it at the bottom.
    passed = [c for c, share in inspection.items() if share is None or share >= need]
    for c, share in inspection.items():
        if c not in passed:
            dropped[c] = f"inspection: honest on {share:.0%} of layers, {need:.0%} needed"
    for c, cat in category.items():
        if cat == REJECTED:
            dropped[c] = f"rejected: trust {trust[c]:.3f} in the bottom {rejected_fraction:.0%}"
    honest = [c for c in clients if category[c] == TRUSTED or c in passed]
    dropped.update(held)
    candidates = [c for c in honest if c not in dropped]
    if server_round > warmup_rounds:
        floor = reputation.threshold()  # over completed participations: this round does not count yet
        for c in list(candidates):
            rate = reputation.rate(c)
            if rate is not None and rate < floor:
                candidates.remove(c)
                dropped[c] = f"reputation: {rate:.2f} per round, below {floor:.2f}"
    if not candidates:  # never leave a round without an aggregate while trusted clients exist
        candidates = [c for c in clients if category[c] == TRUSTED]
        for c in candidates:
            dropped.pop(c, None)
    # One point per round judged honest by the two stages, aggregated or held out by its past (so
    # an honest client recovers); never two, so passing inspection does not outrank being trusted.
    for c in clients:
        reputation.participate(c, earned=int(c in honest))
    for c in held:  # caught now: judged, and earns nothing; held for earlier catches: not judged
        reputation.participate(c, earned=0 if c in behaviour else None, caught=c in behaviour)
    return RoundDecision(candidates, category, trust, inspection, dropped, scored, consensus,
                         {name: r.norms for name, r in readings.items()})


def _inspect(components: Mapping[str, ComponentUpdates], readings: Mapping[str, ComponentReading],
             category: Mapping[int, str], rng: np.random.Generator) -> dict[int, float]:
    """Stage 2: each suspicious client's share of layers judged honest, over the layers it holds that
    at least MIN_ANCHORS trusted clients also hold (None when there is no such layer)."""
    suspects = [c for c, cat in category.items() if cat == SUSPICIOUS]
    honest = dict.fromkeys(suspects, 0)
    judged = dict.fromkeys(suspects, 0)
    for name, u in components.items():
        rows = [i for i, c in enumerate(u.client_ids) if category.get(c) in (TRUSTED, SUSPICIOUS)]
        holders = [u.client_ids[i] for i in rows]
        trusted = np.array([category[c] == TRUSTED for c in holders], dtype=bool)
        suspicious = ~trusted
        if trusted.sum() < MIN_ANCHORS or not suspicious.any():
            continue
        # The trusted rows only anchor the honest cluster: a random MAX_ANCHORS of them are enough
        # (each then stands for its share of the trusted rows in the norm gate).
        anchors = np.flatnonzero(trusted)
        anchor_weight = max(len(anchors) / MAX_ANCHORS, 1.0)
        if len(anchors) > MAX_ANCHORS:
            anchors = np.sort(rng.choice(anchors, MAX_ANCHORS, replace=False))
        keep = np.concatenate([anchors, np.flatnonzero(suspicious)])
        trusted, suspicious = trusted[keep], suspicious[keep]
        suspect_ids = [c for c, s in zip([holders[i] for i in keep], suspicious) if s]
        picked_rows = [rows[i] for i in keep]
        reading = readings[name]
        for layer, scale in zip(reading.layers, reading.layer_scales):
            verdict = inspect_layer(layer[picked_rows], trusted, suspicious, scale=scale, anchor_weight=anchor_weight)
            for c, ok in zip(suspect_ids, verdict):
                honest[c] += int(ok)
                judged[c] += 1
    return {c: honest[c] / judged[c] if judged[c] else None for c in suspects}
