import numpy as np
import pytest

from fedmm.core import lora_ranks

RNG = np.random.default_rng(0)


def clients(ranks, d_out=40, d_in=30, rng=RNG):
    return [(rng.standard_normal((d_out, r)), rng.standard_normal((r, d_in))) for r in ranks]


def dense_sum(factors, weights):
    w = np.asarray(weights, float) / np.sum(weights)
    return sum(wk * b @ a for wk, (b, a) in zip(w, factors))


def test_stacked_factors_are_the_exact_weighted_sum_of_the_products():
    factors, weights = clients([2, 4, 8, 16]), [1.0, 2.0, 3.0, 4.0]
    b, a = lora_ranks.stack_factors(factors, weights)
    assert b.shape == (40, 30) and a.shape == (30, 30)
    np.testing.assert_allclose(b @ a, dense_sum(factors, weights), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 2, 4, 8, 16])
def test_qr_truncation_is_the_dense_svd_truncation(rank):
    b, a = lora_ranks.stack_factors(clients([2, 4, 8, 16, 3]), [5, 1, 1, 2, 3])
    fast, dense = lora_ranks.truncate(b, a, rank), lora_ranks.truncate_dense(b, a, rank)
    assert fast[0].shape == (40, rank) and fast[1].shape == (rank, 30)
    np.testing.assert_allclose(fast[0] @ fast[1], dense[0] @ dense[1], rtol=0, atol=1e-9)
    assert lora_ranks.relative_error(*fast, *dense) < 1e-10
    # Eckart-Young: the error left is the tail of the singular values
    s = np.linalg.svd(b @ a, compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(b @ a - fast[0] @ fast[1]), np.sqrt(np.sum(s[rank:] ** 2)), rtol=1e-9)


def test_lower_ranks_are_the_leading_terms_of_higher_ones():
    b, a = lora_ranks.stack_factors(clients([4, 8, 16]), [1, 1, 1])
    b16, a16 = lora_ranks.truncate(b, a, 16)
    b4, a4 = lora_ranks.truncate(b, a, 4)
    np.testing.assert_allclose(b4 @ a4, b16[:, :4] @ a16[:4], atol=1e-9)


def test_a_rank_deficient_sum_is_padded_with_zeros_not_noise():
    factors = clients([2, 2])
    factors[1] = (np.zeros_like(factors[1][0]), factors[1][1])  # a client whose B is still zero
    b, a = lora_ranks.stack_factors(factors, [1, 1])
    b8, a8 = lora_ranks.truncate(b, a, 8)
    assert b8.shape == (40, 8)
    np.testing.assert_allclose(b8 @ a8, dense_sum(factors, [1, 1]), atol=1e-9)
    assert np.abs(b8[:, 2:] @ a8[2:]).max() < 1e-9  # the sum has rank 2: the rest carries nothing


def test_hetlora_averages_factors_and_is_not_the_sum_of_the_products():
    factors, weights = clients([2, 4]), [1, 1]
    b, a = lora_ranks.padded_mean(factors, weights)
    assert b.shape == (40, 4) and a.shape == (4, 30)
    np.testing.assert_allclose(b[:, 2:], 0.5 * factors[1][0][:, 2:])
    np.testing.assert_allclose(a[:2], 0.5 * (factors[0][1] + factors[1][1][:2]))
    assert lora_ranks.relative_error(b, a, *lora_ranks.stack_factors(factors, weights)) > 0.1
    b2, a2 = lora_ranks.leading(b, a, 2)
    np.testing.assert_array_equal(b2, b[:, :2])
    assert lora_ranks.leading(b, a, 6)[0].shape == (40, 6)


def test_relative_error_from_factors_matches_the_dense_one():
    (b1, a1), (b2, a2) = clients([3, 5])
    dense = np.linalg.norm(b1 @ a1 - b2 @ a2) / np.linalg.norm(b2 @ a2)
    assert lora_ranks.relative_error(b1, a1, b2, a2) == pytest.approx(dense, rel=1e-9)


@pytest.mark.parametrize("factors,weights,match", [
    ([], [], "no LoRA factors"),
    (clients([2, 2]), [1.0], "2 factor pairs"),
    (clients([2, 2]), [1.0, -1.0], "non-negative"),
    (clients([2, 2]), [0.0, 0.0], "not all zero"),
    ([(np.ones((4, 2)), np.ones((3, 5)))], [1.0], "factor pair 0"),
    ([(np.ones((4, 2)), np.ones((2, 5))), (np.ones((5, 2)), np.ones((2, 5)))], [1, 1], "factor pair 1"),
])
def test_bad_factors_or_weights_are_refused_with_what_is_wrong(factors, weights, match):
    with pytest.raises(ValueError, match=match):
        lora_ranks.stack_factors(factors, weights)


def test_ill_conditioned_factors_take_the_householder_path_and_stay_exact(monkeypatch):
    (b1, a1), = clients([4])
    # clients whose B factors nearly coincide: the stacked B has a condition number near 1e9
    factors = [(b1, a1), (b1 + 1e-9 * RNG.standard_normal(b1.shape), RNG.standard_normal(a1.shape))]
    b, a = lora_ranks.stack_factors(factors, [1, 1])
    calls = []
    real_qr = lora_ranks.scipy.linalg.qr
    monkeypatch.setattr(lora_ranks.scipy.linalg, "qr", lambda *x, **k: calls.append(1) or real_qr(*x, **k))
    fast, dense = lora_ranks.truncate(b, a, 4), lora_ranks.truncate_dense(b, a, 4)
    assert len(calls) == 1  # B fell back to Householder; Aᵀ (well conditioned, tall) did not
    assert lora_ranks.relative_error(*fast, *dense) < 1e-6  # cond 1e9: the rank-4 tail is tiny, not zero


def test_non_finite_factors_are_refused():
    b, a = lora_ranks.stack_factors(clients([2]), [1])
    b[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        lora_ranks.truncate(b, a, 2)


from fedmm.core.components import component_layouts  # noqa: E402


def _layout(rank, d_out=12, d_in=10):
    return component_layouts({"encoders.x.l.query.lora_A.default.weight": (rank, d_in),
                              "encoders.x.l.query.lora_B.default.weight": (d_out, rank),
                              "encoders.x.proj.weight": (3, d_in)})["encoder.x"]


def _vector(layout, b, a, proj):
    from fedmm.core.components import flatten
    names = layout.names
    return flatten(layout, {names[0]: a, names[1]: b, names[2]: proj})


@pytest.mark.parametrize("method", ["qr", "dense_svd"])
def test_combined_pairs_hold_the_best_rank_r_of_the_sum_of_products_of_clients_of_any_rank(method):
    full = _layout(4)
    vectors, dense, weights = [], 0, [1.0, 3.0, 2.0]
    for r, w in zip([4, 2, 1], weights):
        b, a, proj = RNG.standard_normal((12, r)), RNG.standard_normal((r, 10)), RNG.standard_normal((3, 10))
        low = _layout(r)
        # what a rank-r client sends: its own factors, in the global rank-4 layout
        vectors.append(lora_ranks.from_rank(_vector(low, b, a, proj), low, full))
        dense = dense + w / 6 * (1 / r) * b @ a  # peft: ΔW = (alpha / r) B A, alpha = 1
    mean = np.average(np.stack(vectors), axis=0, weights=weights).astype(np.float32)
    out = lora_ranks.combine_lora_pairs(full, vectors, weights, mean, method)
    pair = lora_ranks.lora_pairs(full)[0]
    b, a = out[pair.b].reshape(12, 4), out[pair.a].reshape(4, 10)
    expected_b, expected_a = lora_ranks.truncate_dense(dense, np.eye(10), 4)
    np.testing.assert_allclose((1 / 4) * b @ a, expected_b @ expected_a, atol=1e-5)
    np.testing.assert_allclose(out[pair.b.stop:], mean[pair.b.stop:])  # the rest is the plain mean
    # a rank-2 client's view: the best rank-2 part of the same ΔW
    low = _layout(2)
    view = lora_ranks.to_rank(out, full, low)
    lp = lora_ranks.lora_pairs(low)[0]
    b2, a2 = view[lp.b].reshape(12, 2), view[lp.a].reshape(2, 10)
    best_b, best_a = lora_ranks.truncate_dense(dense, np.eye(10), 2)
    np.testing.assert_allclose((1 / 2) * b2 @ a2, best_b @ best_a, atol=1e-5)


def test_a_rank_round_trip_keeps_delta_w_and_pads_with_zeros():
    full, low = _layout(4), _layout(2)
    vector = _vector(low, RNG.standard_normal((12, 2)), RNG.standard_normal((2, 10)), RNG.standard_normal((3, 10)))
    padded = lora_ranks.from_rank(vector, low, full)
    np.testing.assert_allclose(lora_ranks.to_rank(padded, full, low), vector, rtol=1e-6)
    pair = lora_ranks.lora_pairs(full)[0]
    assert not padded[pair.a].reshape(4, 10)[2:].any() and not padded[pair.b].reshape(12, 4)[:, 2:].any()
    with pytest.raises(ValueError, match="only LoRA ranks change"):
        lora_ranks.to_rank(padded, full, component_layouts({n: (5, 5) for n in full.names})["encoder.x"])


def test_zero_updates_leave_the_mean_and_unknown_methods_are_refused():
    full = _layout(4)
    pair = lora_ranks.lora_pairs(full)[0]
    v = np.ones(full.size, np.float32)
    v[pair.b] = 0
    np.testing.assert_array_equal(lora_ranks.combine_lora_pairs(full, [v, v], [1, 1], v), v)
    with pytest.raises(ValueError, match="not one of"):
        lora_ranks.combine_lora_pairs(full, [v], [1], v, "svd")


def test_flora_merges_the_exact_sum_into_the_sent_base_and_restarts_the_adapter():
    names = {"a": "encoders.x.l.query.lora_A.default.weight", "b": "encoders.x.l.query.lora_B.default.weight",
             "w": "encoders.x.l.query.base_layer.weight"}
    layout = component_layouts({names["a"]: (4, 10), names["b"]: (12, 4), names["w"]: (12, 10)})["encoder.x"]
    from fedmm.core.components import flatten
    sent_w, sent_a = RNG.standard_normal((12, 10)), RNG.standard_normal((4, 10))
    sent = flatten(layout, {names["w"]: sent_w, names["a"]: sent_a, names["b"]: np.zeros((12, 4))})
    weights, vectors, dense = [1.0, 3.0], [], 0
    for w in weights:
        b, a = RNG.standard_normal((12, 4)), RNG.standard_normal((4, 10))
        # a client that also tampered with its copy of the base: the server must not read it
        vectors.append(flatten(layout, {names["w"]: sent_w + 5.0, names["a"]: a, names["b"]: b}))
        dense = dense + w / 4 * b @ a
    mean = np.average(np.stack(vectors), axis=0, weights=weights).astype(np.float32)
    out = lora_ranks.merge_lora_pairs(layout, vectors, weights, mean, sent, scaling=0.5)
    pair = lora_ranks.lora_pairs(layout)[0]
    np.testing.assert_allclose(out[pair.base].reshape(12, 10), sent_w + 0.5 * dense, atol=1e-5)
    np.testing.assert_array_equal(out[pair.a], sent[pair.a])
    assert not out[pair.b].any()
    with pytest.raises(ValueError, match="does not carry"):
        lora_ranks.merge_lora_pairs(_layout(4), [np.ones(_layout(4).size)], [1.0], np.ones(_layout(4).size),
                                    np.ones(_layout(4).size), 1.0)
