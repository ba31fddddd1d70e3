"""LoRA factors of different ranks across clients: their exact weighted sum, kept factored, and each
client's share of it at the client's own rank, without ever forming a d_out x d_in matrix.

Client k sends B_k (d_out x r_k) and A_k (r_k x d_in); its update is ΔW_k = B_k A_k. The weighted sum
is exactly a product of stacked factors (FLoRA's form, rank R = Σ r_k):

    ΔW = Σ w_k B_k A_k = [w_1 B_1 ... w_K B_K] [A_1; ...; A_K]

Its best rank-r approximation (Eckart-Young) comes from QR of both stacked factors and an SVD of the
small R x R core: ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ and R_B R_Aᵀ = U S Vᵀ. The best approximations are nested
(rank r is the first r terms of rank r' > r), so one decomposition serves every client's rank.
FlexLoRA (the exact reference) forms ΔW and runs a dense SVD instead; HetLoRA zero-pads the factors
to the largest rank, averages A and B separately and gives each client the first r_k of them (not
the sum of the products: the cross terms B_j A_k of different clients leak in).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.lapack

from fedmm.core.components import ComponentLayout, tensor_slices

Factors = tuple[np.ndarray, np.ndarray]  # (B: d_out x r, A: r x d_in)


@dataclass(frozen=True)
class LoraPair:
    """Offsets of one adapted layer's factors inside a component vector: ΔW = B @ A."""

    a: slice
    a_shape: tuple[int, int]  # (r, in)
    b: slice
    b_shape: tuple[int, int]  # (out, r)
    base: slice | None = None  # the frozen weight W (out x in) it adapts, where the component carries it (flora)


def lora_pairs(layout: ComponentLayout) -> list[LoraPair]:
    """The (A, B) factor pairs of a component, matched by name (peft's `lora_A` / `lora_B`, and the
    layer's `base_layer.weight` where the component carries it)."""
    segments = tensor_slices(layout)
    pairs = []
    for name, (sl, shape) in segments.items():
        if ".lora_A." in name:
            b_name = name.replace(".lora_A.", ".lora_B.")
            if b_name in segments:
                b_sl, b_shape = segments[b_name]
                base = segments.get(name.split(".lora_A.")[0] + ".base_layer.weight")
                pairs.append(LoraPair(sl, shape, b_sl, b_shape, base[0] if base else None))  # type: ignore[arg-type]
    return pairs


def _check(factors: Sequence[Factors], weights: Sequence[float]) -> np.ndarray:
    if not factors:
        raise ValueError("no LoRA factors to combine")
    if len(weights) != len(factors):
        raise ValueError(f"{len(weights)} weights for {len(factors)} factor pairs")
    d_out, d_in = factors[0][0].shape[0], factors[0][1].shape[1]
    for k, (b, a) in enumerate(factors):
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0] or b.shape[0] != d_out or a.shape[1] != d_in:
            raise ValueError(f"factor pair {k}: B {b.shape} and A {a.shape} do not make a "
                             f"{d_out} x {d_in} update of one rank")
    w = np.asarray(weights, dtype=np.float64)
    if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w / w.sum()


def stack_factors(factors: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """The exact weighted sum Σ w_k B_k A_k as one factor pair of rank Σ r_k (weights normalised)."""
    w = _check(factors, weights)
    b = np.concatenate([wk * bk.astype(np.float64) for wk, (bk, _) in zip(w, factors)], axis=1)
    a = np.concatenate([ak.astype(np.float64) for _, ak in factors], axis=0)
    return b, a


def truncate(b: np.ndarray, a: np.ndarray, rank: int) -> Factors:
    """The best rank-`rank` approximation of B·A as factors (B_r = U_r S_r, A_r = V_rᵀ): QR of B and Aᵀ,
    SVD of the small R x R core. A zero singular value keeps its direction in A (B's column is zero),
    so the rank still trains."""
    b, a = _finite(b), _finite(a)
    q_b, r_b = _qr(b)
    q_a, r_a = _qr(a.T)
    u, s, vt = scipy.linalg.svd(r_b @ r_a.T, full_matrices=False, lapack_driver="gesdd")
    return _split(q_b(u[:, :rank]), s[:rank], q_a(vt[:rank].T).T, rank)


# Cholesky-QR loses orthogonality like eps * cond(x)^2: past this condition number the Householder
# QR (twice the work) takes over.
CHOLESKY_MAX_CONDITION = 1e5


def _qr(x: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]:
    """R of a tall d x R matrix, and a function applying its economic Q to an R x r block. Tried first
    by Cholesky of the Gram xᵀx (one d x R^2 product: a fifth of Householder's time at d = 4096,
    R = 750), then, for an ill-conditioned or rank-deficient x, by Householder reflections (Q is
    never formed: only r of its combinations are needed)."""
    if x.shape[0] >= x.shape[1]:
        try:
            lower = scipy.linalg.cholesky(x.T @ x, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            lower = None
        if lower is not None:
            trcon, = scipy.linalg.lapack.get_lapack_funcs(("trcon",), (lower,))
            rcond, info = trcon(lower, norm="1", uplo="L", diag="N")
            if info == 0 and rcond * CHOLESKY_MAX_CONDITION > 1:
                return (lambda block: x @ scipy.linalg.solve_triangular(lower, block, trans="T", lower=True,
                                                                        check_finite=False)), lower.T
    owned = np.array(x, dtype=np.float64, order="F")  # LAPACK's layout, and ours to overwrite
    (packed, tau), _ = scipy.linalg.qr(owned, mode="raw", overwrite_a=True, check_finite=False)
    reflectors = packed[:, : len(tau)]  # a wide x keeps its extra columns in R alone
    ormqr, = scipy.linalg.lapack.get_lapack_funcs(("ormqr",), (reflectors,))

    def apply(block: np.ndarray) -> np.ndarray:
        padded = np.zeros((x.shape[0], block.shape[1]), order="F")
        padded[: block.shape[0]] = block
        out, _, info = ormqr("L", "N", reflectors, tau, padded, lwork=max(1, 64 * block.shape[1]))
        if info != 0:
            raise np.linalg.LinAlgError(f"LAPACK ormqr failed (info {info})")
        return out
    return apply, np.triu(packed[: len(tau)])


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("LoRA factors hold NaN or Inf values")
    return x


def truncate_dense(b: np.ndarray, a: np.ndarray, rank: int) -> Factors:
    """FlexLoRA's redistribution, the reference: form ΔW = B·A (d_out x d_in) and take its dense SVD."""
    u, s, vt = scipy.linalg.svd(np.asarray(b, np.float64) @ np.asarray(a, np.float64), full_matrices=False,
                                lapack_driver="gesdd")
    return _split(u[:, :rank], s[:rank], vt[:rank], rank)


def _split(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int) -> Factors:
    """B = U S and A = Vᵀ (orthonormal rows, the scale of a freshly initialised A, so B learns at its
    usual pace whatever the size of ΔW), zero-padded to `rank` when ΔW has fewer terms."""
    b = np.zeros((u.shape[0], rank))
    a = np.zeros((rank, vt.shape[1]))
    b[:, : len(s)] = u * s
    a[: len(s)] = vt
    return b, a


def padded_mean(factors: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """HetLoRA: each pair zero-padded to the largest rank, then B and A averaged separately."""
    w = _check(factors, weights)
    rank = max(b.shape[1] for b, _ in factors)
    d_out, d_in = factors[0][0].shape[0], factors[0][1].shape[1]
    b_mean, a_mean = np.zeros((d_out, rank)), np.zeros((rank, d_in))
    for wk, (b, a) in zip(w, factors):
        r = b.shape[1]
        b_mean[:, :r] += wk * b
        a_mean[:r] += wk * a
    return b_mean, a_mean


def leading(b: np.ndarray, a: np.ndarray, rank: int) -> Factors:
    """HetLoRA's truncation: the first `rank` columns of B and rows of A (zero-padded if fewer)."""
    b_r, a_r = np.zeros((b.shape[0], rank)), np.zeros((rank, a.shape[1]))
    r = min(rank, b.shape[1])
    b_r[:, :r], a_r[:r] = b[:, :r], a[:r]
    return b_r, a_r


def product_norm(b: np.ndarray, a: np.ndarray) -> float:
    """‖B·A‖ (Frobenius) without the d_out x d_in product: ‖R_B R_Aᵀ‖ from the two QRs (no cancellation,
    unlike the trace of the Grams)."""
    return float(np.linalg.norm(np.linalg.qr(_finite(b), mode="r") @ np.linalg.qr(_finite(a).T, mode="r").T))


def relative_error(b: np.ndarray, a: np.ndarray, reference_b: np.ndarray, reference_a: np.ndarray) -> float:
    """‖B·A − B'·A'‖ / ‖B'·A'‖: the difference is itself a product of stacked factors [B, −B'][A; A']."""
    difference = product_norm(np.concatenate([b, -reference_b], axis=1), np.concatenate([a, reference_a], axis=0))
    reference = product_norm(reference_b, reference_a)
    return difference / reference if reference > 0 else difference


# the mean of A and B; the exact sum of B·A, by QR or dense SVD; the exact sum merged into the base (FLoRA)
LORA_AGGREGATIONS = ("factors", "qr", "dense_svd", "flora")


def combine_lora_pairs(layout: ComponentLayout, vectors: Sequence[np.ndarray], weights: Sequence[float],
                       mean: np.ndarray, method: str = "qr") -> np.ndarray:
    """`mean` (the weighted mean of the clients' component vectors) with each LoRA pair replaced by the
    best rank-R approximation of the weighted sum of the clients' products B_k A_k (R: the pair's rank
    in `layout`). Zero-padded terms of lower-rank clients drop out of the stack; ranks past the sum's
    own keep the mean's A rows (with zero B columns: ΔW is unchanged and the rank still trains)."""
    if method not in ("qr", "dense_svd"):
        raise ValueError(f"LoRA aggregation {method!r} is not one of ('qr', 'dense_svd')")
    reduce = truncate if method == "qr" else truncate_dense
    out = np.array(mean, dtype=np.float32, copy=True)
    for pair in lora_pairs(layout):
        rank = pair.a_shape[0]
        factors = [(np.asarray(v[pair.b]).reshape(pair.b_shape), np.asarray(v[pair.a]).reshape(pair.a_shape))
                   for v in vectors]
        b, a = stack_factors(factors, weights)
        live = np.any(b != 0, axis=0) & np.any(a != 0, axis=1)
        if not live.any():
            continue  # every client's B·A is zero: the mean is as good as any
        b_r, a_r = reduce(b[:, live], a[live], rank)
        dead = ~np.any(a_r != 0, axis=1)
        a_r[dead] = out[pair.a].reshape(pair.a_shape)[dead]
        out[pair.b] = b_r.reshape(-1)
        out[pair.a] = a_r.reshape(-1)
    return out


def merge_lora_pairs(layout: ComponentLayout, vectors: Sequence[np.ndarray], weights: Sequence[float],
                     mean: np.ndarray, sent: np.ndarray, scaling: float) -> np.ndarray:
    """FLoRA: `mean` with each LoRA pair's exact weighted sum of the clients' updates merged into the
    frozen weight it adapts, W + scaling · Σ w_k B_k A_k (`sent`'s W, never a client's copy), and the
    adapter restarted as sent (A as sent, B = 0): every client begins the next round from the merged
    base with a fresh adapter of its own rank. Needs the component to carry each pair's base weight."""
    out = np.array(mean, dtype=np.float32, copy=True)
    for pair in lora_pairs(layout):
        if pair.base is None:
            raise ValueError("flora merges the LoRA sum into the base weight, which this component does not "
                             f"carry (a pair of shape {pair.b_shape[0]} x {pair.a_shape[1]} has none)")
        factors = [(np.asarray(v[pair.b]).reshape(pair.b_shape), np.asarray(v[pair.a]).reshape(pair.a_shape))
                   for v in vectors]
        b, a = stack_factors(factors, weights)
        base = np.asarray(sent[pair.base], np.float64).reshape(pair.b_shape[0], pair.a_shape[1])
        out[pair.base] = (base + scaling * (b @ a)).reshape(-1)
        out[pair.a] = sent[pair.a]
        out[pair.b] = 0.0
    return out


# --- a client's rank-r view of the rank-R global adapter -------------------------------------------
# peft scales B·A by alpha / r, so a rank-r client holding the leading r terms of the global factors,
# each multiplied by sqrt(r / R), applies exactly (alpha / R) B_r A_r: the best rank-r part of the
# global update when the factors are in SVD order (`truncate`).


def _resize(vector: np.ndarray, source: ComponentLayout, target: ComponentLayout) -> np.ndarray:
    if source.names != target.names:
        raise ValueError(f"component layouts differ in their tensors: {source.names[:3]}... vs {target.names[:3]}...")
    out = np.zeros(target.size, dtype=np.float32)
    for name, s_shape, s_off, t_shape, t_off in zip(source.names, source.shapes, source.offsets,
                                                   target.shapes, target.offsets):
        value = vector[s_off: s_off + math.prod(s_shape)].reshape(s_shape)
        if s_shape == t_shape:
            resized = value
        elif ".lora_A." in name and s_shape[1:] == t_shape[1:]:
            resized = np.zeros(t_shape, np.float32)
            r = min(s_shape[0], t_shape[0])
            resized[:r] = value[:r] * np.sqrt(t_shape[0] / s_shape[0])
        elif ".lora_B." in name and s_shape[:1] == t_shape[:1]:
            resized = np.zeros(t_shape, np.float32)
            r = min(s_shape[1], t_shape[1])
            resized[:, :r] = value[:, :r] * np.sqrt(t_shape[1] / s_shape[1])
        else:
            raise ValueError(f"{name}: shape {s_shape} cannot become {t_shape} (only LoRA ranks change)")
        out[t_off: t_off + resized.size] = resized.reshape(-1)
    return out


def to_rank(vector: np.ndarray, full: ComponentLayout, low: ComponentLayout) -> np.ndarray:
    """A component vector of the rank-R global adapter as a rank-r client's vector (leading r terms)."""
    return _resize(vector, full, low)


def from_rank(vector: np.ndarray, low: ComponentLayout, full: ComponentLayout) -> np.ndarray:
    """A rank-r client's component vector in the global rank-R layout, zero-padded: the same ΔW."""
    return _resize(vector, low, full)
