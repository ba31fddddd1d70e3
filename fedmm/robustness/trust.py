"""Two-stage robust aggregation with trust scores: the maths, as plain functions over stacked updates.

Stage 1 scores every client's update of one component with indicators chosen by the component's kind
(LoRA factors, task heads, dense layers), each computed for all holders at once on the (N, P) matrix
of updates Δ = trained - sent. Indicators are judged against the round's cohort (robust z-scores),
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


def _pair_grams(d: np.ndarray, fixed: np.ndarray, transpose: bool) -> tuple[np.ndarray, np.ndarray]:
    """(dᵀd, fixedᵀd) per client for B-side factors (n, out, r), or (d dᵀ, d fixedᵀ) for A-side
    factors (n, r, in) when `transpose`: the r x r blocks the Grams are built from."""
    if transpose:
        return d @ d.transpose(0, 2, 1), d @ fixed.T
    return d.transpose(0, 2, 1) @ d, fixed.T @ d


def lora_delta_spectra(deltas: np.ndarray, sent: np.ndarray, pair: LoraPair) -> np.ndarray:
    """(N, 2r) squared singular values of each client's ΔW = B'A' - BA (new minus sent), descending.

    ΔW = dB A' + B dA = U V with U = [dB, B] (out x 2r) and V = [A'; dA] (2r x in): the large terms
    of B'A' - BA do not cancel, so float32 Grams hold (relative error about GRAM_RIDGE); only an
    update that mostly re-parametrises the factors (B' = B S, A' = S⁻¹ A) cancels between its two
    terms and reads a few percent off. ΔWᵀΔW shares its nonzero eigenvalues with
    Lᵀ G_v L, where G_u = UᵀU = L Lᵀ and G_v = V Vᵀ are 2r x 2r, batched over the clients. Cost
    2r multiply-adds per factor value; no out x in matrix, no loop over clients.
    """
    n, r = len(deltas), pair.a_shape[0]
    a0 = sent[pair.a].reshape(pair.a_shape)
    b0 = sent[pair.b].reshape(pair.b_shape)
    d_b = deltas[:, pair.b].reshape(n, *pair.b_shape)
    d_a = deltas[:, pair.a].reshape(n, *pair.a_shape)
    bb, b0b = (x.astype(np.float64) for x in _pair_grams(d_b, b0, transpose=False))
    aa, a0a = (x.astype(np.float64) for x in _pair_grams(d_a, a0, transpose=True))  # dA dAᵀ, dA A0ᵀ
    g_u = np.empty((n, 2 * r, 2 * r))
    g_u[:, :r, :r], g_u[:, r:, :r] = bb, b0b
    g_u[:, :r, r:], g_u[:, r:, r:] = b0b.transpose(0, 2, 1), (b0.T.astype(np.float64) @ b0)
    g_v = np.empty_like(g_u)
    cross = a0a.transpose(0, 2, 1)  # A0 dAᵀ
    g_v[:, :r, :r] = a0.astype(np.float64) @ a0.T + cross + a0a + aa  # A'A'ᵀ
    g_v[:, :r, r:] = cross + aa  # A' dAᵀ
    g_v[:, r:, :r] = g_v[:, :r, r:].transpose(0, 2, 1)
    g_v[:, r:, r:] = aa
    return np.maximum(np.linalg.eigvalsh(_congruence(g_u, g_v))[:, ::-1], 0.0)


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


def lora_indicators(deltas: np.ndarray, sent: np.ndarray, layout: ComponentLayout) -> tuple[np.ndarray, np.ndarray]:
    """(||ΔW||_F over the component's adapted layers, share of ΔW energy in each layer's top singular
    direction averaged over layers) per client: a backdoor tends to live in one direction."""
    pairs = lora_pairs(layout)
    sq = np.zeros(deltas.shape[0])
    concentration = np.zeros(deltas.shape[0])
    for pair in pairs:
        s = lora_delta_spectra(deltas, sent, pair)
        total = s.sum(axis=1)
        sq += total
        concentration += s[:, 0] / np.maximum(total, _EPS) / len(pairs)
    return np.sqrt(sq), concentration


def head_jump(deltas: np.ndarray, layout: ComponentLayout) -> np.ndarray:
    """How far the most-changed class row of a head's weight stands above the mean row change,
    relative to that mean; a push towards one (unknown) target class shows here."""
    segments = tensor_slices(layout)
    name = next(n for n, (_, s) in segments.items() if len(s) == 2)
    sl, shape = segments[name]
    rows = np.linalg.norm(deltas[:, sl].reshape(len(deltas), *shape), axis=2)
    mean = rows.mean(axis=1)
    return (rows.max(axis=1) - mean) / np.maximum(mean, _EPS)


def embedding_rows(deltas: np.ndarray, layout: ComponentLayout) -> np.ndarray:
    """Share of the embedding update's row-norm mass in its top 0.1% rows (at least 10): a trigger
    token's row moves alone."""
    segments = tensor_slices(layout)
    shares = np.zeros(len(deltas))
    for name, (sl, shape) in segments.items():
        if "embeddings" in name and len(shape) == 2:
            rows = np.linalg.norm(deltas[:, sl].reshape(len(deltas), *shape), axis=2)
            k = min(shape[0], max(10, int(0.001 * shape[0])))
            top = np.partition(rows, shape[0] - k, axis=1)[:, shape[0] - k :].sum(axis=1)
            shares = np.maximum(shares, top / np.maximum(rows.sum(axis=1), _EPS))
    return shares


@dataclass
class ComponentTrust:
    """Stage-1 result for one component over its holders (rows in `client_ids` order)."""

    client_ids: list[int]
    indicators: dict[str, np.ndarray]  # raw values
    scores: dict[str, np.ndarray]  # each indicator judged against the cohort, in [0, 1]
    trust: np.ndarray  # weighted mean of the scores


def score_component(component: str, layout: ComponentLayout, deltas: np.ndarray, sent: np.ndarray,
                    client_ids: Sequence[int], norms: np.ndarray, sample: np.ndarray) -> ComponentTrust:
    """Stage 1 for one component: indicators for every holder, judged against the cohort.

    `deltas` (N, P) are the holders' updates, `norms` their exact L2 norms, `sample` the coordinates
    the sampled indicators read.
    """
    kind = component_kind(component, layout)
    part = deltas[:, sample]
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
    update_norm = norms
    if kind == "lora":
        update_norm, raw["lora_concentration"] = lora_indicators(deltas, sent, layout)
        judged["lora_concentration"] = outlier_score(raw["lora_concentration"], "high")
    elif kind == "head":
        raw["head_jump"] = head_jump(deltas, layout)
        judged["head_jump"] = outlier_score(raw["head_jump"], "high")
    elif kind == "embedding":
        raw["embedding_rows"] = embedding_rows(deltas, layout)
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
class ComponentUpdates:
    """The updates (trained - sent) of one component's holders, stacked: row i is client_ids[i]'s."""

    client_ids: list[int]
    deltas: np.ndarray  # (N, P) float32


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


# The first word of the input screen's reasons: updates no honest client sends (logged as warnings).
SCREEN_REASONS = ("non-finite", "zero-update", "absurd-norm", "duplicate", "near-duplicate")


def screen_updates(components: Mapping[str, ComponentUpdates], sent: Mapping[str, np.ndarray],
                   max_relative_norm: float, rng: np.random.Generator) -> tuple[dict[int, str], dict[str, np.ndarray]]:
    """Clients whose updates cannot be scored, with the reason (non-finite values, no change at all,
    an absurd norm, an exact or near copy of another's update), and each component's exact update
    norms, from one pass over the updates."""
    bad: dict[int, str] = {}
    all_norms = {c: row_norms(u.deltas) for c, u in components.items()}
    moved: dict[int, bool] = {}
    for c, u in components.items():
        totals = all_norms[c]
        for i in np.flatnonzero(~np.isfinite(totals)):
            if not np.isfinite(u.deltas[i]).all():
                bad.setdefault(u.client_ids[i], "non-finite: NaN or Inf values")
        for client, norm in zip(u.client_ids, totals.tolist()):
            moved[client] = moved.get(client, False) or norm > 0
    for client, any_change in moved.items():
        if not any_change:
            bad.setdefault(client, "zero-update: the update changes nothing")
    unscorable = set(bad)
    for c, u in components.items():
        norms = all_norms[c]
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
        probe = coordinate_sample(u.deltas.shape[1], rng, count=256, block=1)
        probed = u.deltas[np.ix_(peers, probe)]
        seen: dict[bytes, int] = {}
        for j, i in enumerate(peers):
            key = norms[i].tobytes() + probed[j].tobytes()
            first = seen.setdefault(key, i)
            if first != i and np.array_equal(u.deltas[first], u.deltas[i]):
                a, b = u.client_ids[first], u.client_ids[i]
                bad.setdefault(b, f"duplicate: {c} identical to client {a}'s")
                bad.setdefault(a, f"duplicate: {c} identical to client {b}'s")
        for i, (j, closeness) in near_duplicates(probed).items():
            bad.setdefault(u.client_ids[peers[i]], f"near-duplicate: {c} at {closeness:.0%} of the cohort's typical "
                                                   f"distance from client {u.client_ids[peers[j]]}'s")
    return bad, all_norms


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
    x = sample.astype(np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    distance = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))
    relative = distance / np.maximum(np.sqrt(np.maximum(sq[:, None], sq[None, :])), _EPS)
    typical = float(np.median(relative[np.triu_indices(n, 1)]))
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
    dropped, all_norms = screen_updates(components, sent, max_relative_norm, rng)
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
        deltas = u.deltas[rows] if len(rows) < len(u.client_ids) else u.deltas
        norms = all_norms[name][rows]
        holders = [u.client_ids[i] for i in rows]
        result = score_component(name, layouts[name], deltas, sent[name], holders, norms,
                                 coordinate_sample(deltas.shape[1], rng))
        scored[name] = result
        for c, t in zip(holders, result.trust):
            per_client[c].append(float(t))
    consensus = client_consensus(scored)
    trust = client_trust(per_client, consensus, consensus_weight)
    category = split_by_rank(trust, trusted_fraction, rejected_fraction) if trust else {}
    inspection = _inspect(components, layouts, category, rng)
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
    return RoundDecision(candidates, category, trust, inspection, dropped, scored, consensus)


def _inspect(components: Mapping[str, ComponentUpdates], layouts: Mapping[str, ComponentLayout], category: Mapping[int, str],
             rng: np.random.Generator) -> dict[int, float]:
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
        for sl in layer_slices(layouts[name]):
            size = sl.stop - sl.start
            picked = sl.start + coordinate_sample(size, rng, count=LAYER_SAMPLE, block=16)
            verdict = inspect_layer(u.deltas[np.ix_([rows[i] for i in keep], picked)], trusted, suspicious,
                                    scale=size / len(picked), anchor_weight=anchor_weight)
            for c, ok in zip(suspect_ids, verdict):
                honest[c] += int(ok)
                judged[c] += 1
    return {c: honest[c] / judged[c] if judged[c] else None for c in suspects}
