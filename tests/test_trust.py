"""Trust-scoring maths: each indicator, the split, layer-wise inspection, reputation, bad inputs."""

import numpy as np
import pytest

from fedmm.robustness import trust
from fedmm.core.components import ComponentLayout

RNG = np.random.default_rng(0)


def layout(**tensors):
    names, shapes, offsets, offset = [], [], [], 0
    for name, shape in tensors.items():
        names.append(name.replace("__", "."))
        shapes.append(shape)
        offsets.append(offset)
        offset += int(np.prod(shape))
    return ComponentLayout(names=names, shapes=shapes, offsets=offsets, size=offset)


def test_outlier_score_is_one_inside_the_cohort_and_falls_outside():
    values = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 5.0])
    scores = trust.outlier_score(values, "high")
    assert (scores[:5] == 1).all() and scores[5] < 0.05
    assert trust.outlier_score(values, "low")[5] == 1
    assert trust.outlier_score(-values, "low")[5] < 0.05


def test_the_robust_reference_is_not_dragged_by_one_huge_update():
    honest = RNG.standard_normal((9, 50)) * 0.1 + 1.0
    huge = -1000 * np.ones((1, 50))
    deltas = np.vstack([honest, huge]).astype(np.float32)
    ref = trust.robust_reference(deltas, np.linalg.norm(deltas, axis=1))
    assert np.corrcoef(ref, honest.mean(axis=0))[0, 1] > 0 and ref.mean() > 0.7


def test_spikiness_is_the_top_one_percent_energy_share():
    flat = np.ones((1, 1000), np.float32)
    spiky = np.zeros((1, 1000), np.float32)
    spiky[0, :5] = 10
    spiky[0, 5:] = 0.1
    out = trust.spikiness(np.vstack([flat, spiky]))
    assert out[0] == pytest.approx(0.01)
    expected = (5 * 100 + 5 * 0.01) / (5 * 100 + 995 * 0.01)  # top 10 coordinates
    assert out[1] == pytest.approx(expected, rel=1e-5)


def test_sign_agreement_matches_a_hand_computation():
    deltas = np.array([[1.0, -2.0, 3.0, 4.0]], np.float32)
    reference = np.array([1.0, 1.0, -1.0, 0.0], np.float32)
    # Coordinates with a nonzero reference: |1| agrees, |-2| and |3| disagree -> 1 / 6.
    assert trust.sign_agreement(deltas, reference)[0] == pytest.approx(1 / 6)


def readings(updates, layouts):
    rng = np.random.default_rng(0)
    return {name: trust.read_component(name, u, layouts[name], rng) for name, u in updates.items()}


def lora_layout(out=12, inp=10, r=3):
    return layout(**{"l__lora_A__w": (r, inp), "l__lora_B__w": (out, r)})


def test_lora_spectra_are_the_squared_singular_values_of_the_dense_update():
    lay = lora_layout()
    sent = RNG.standard_normal(lay.size).astype(np.float32)
    deltas = RNG.standard_normal((3, lay.size)).astype(np.float32)
    deltas[2] = 0.0  # no change: every singular value zero
    pair = trust.lora_pairs(lay)[0]
    a0, b0 = sent[pair.a].reshape(pair.a_shape), sent[pair.b].reshape(pair.b_shape)
    spectra = trust.lora_delta_spectra(deltas, sent, pair)
    assert spectra.shape == (3, 6)
    for row, s in zip(deltas, spectra):
        a1, b1 = a0 + row[pair.a].reshape(pair.a_shape), b0 + row[pair.b].reshape(pair.b_shape)
        dense = np.linalg.svd(b1.astype(np.float64) @ a1 - b0.astype(np.float64) @ a0, compute_uv=False) ** 2
        scale = dense[0] if dense.size and dense[0] > 0 else 1.0
        assert np.all(dense[6:] < 1e-9 * scale)  # rank(ΔW) <= 2r
        np.testing.assert_allclose(s, dense[:6], rtol=1e-4, atol=1e-6 * scale)  # GRAM_RIDGE moves it 1e-5


@pytest.mark.parametrize("size", [1e-6, 1e-4, 1e-2])
def test_lora_spectra_stay_accurate_for_small_updates(size):
    # Updates far smaller than the weights: no cancellation between the large terms.
    lay = lora_layout(out=40, inp=30, r=4)
    pair = trust.lora_pairs(lay)[0]
    sent = RNG.standard_normal(lay.size).astype(np.float32)
    deltas = (size * RNG.standard_normal((4, lay.size))).astype(np.float32)
    a0, b0 = sent[pair.a].reshape(pair.a_shape).astype(np.float64), sent[pair.b].reshape(pair.b_shape).astype(np.float64)
    for row, s in zip(deltas, trust.lora_delta_spectra(deltas, sent, pair)):
        a1, b1 = a0 + row[pair.a].reshape(pair.a_shape), b0 + row[pair.b].reshape(pair.b_shape)
        dense = np.linalg.svd(b1 @ a1 - b0 @ a0, compute_uv=False) ** 2
        assert s.sum() == pytest.approx(dense.sum(), rel=1e-4)
        assert s[0] == pytest.approx(dense[0], rel=1e-4)


def test_lora_spectra_of_a_zero_b_factor():
    # Before the first round B = 0: ΔW = dB A' only, still exact.
    lay = lora_layout()
    pair = trust.lora_pairs(lay)[0]
    sent = RNG.standard_normal(lay.size).astype(np.float32)
    sent[pair.b] = 0.0
    deltas = np.zeros((1, lay.size), np.float32)
    deltas[0, pair.b] = RNG.standard_normal(pair.b.stop - pair.b.start)
    a0 = sent[pair.a].reshape(pair.a_shape).astype(np.float64)
    dense = np.linalg.svd(deltas[0, pair.b].reshape(pair.b_shape) @ a0, compute_uv=False) ** 2
    s = trust.lora_delta_spectra(deltas, sent, pair)[0]
    np.testing.assert_allclose(s[:3], dense[:3], rtol=1e-4)
    assert np.all(s[3:] <= 1e-8 * s[0])  # rank(dB A) <= r


def test_an_unchanged_lora_pair_has_no_spectrum():
    lay = lora_layout()
    pair = trust.lora_pairs(lay)[0]
    sent = RNG.standard_normal(lay.size).astype(np.float32)
    assert np.all(trust.lora_delta_spectra(np.zeros((2, lay.size), np.float32), sent, pair) <= 1e-20)


def test_lora_indicators_see_delta_w_not_the_factors():
    # B R and R^-1 A give the same ΔW: factor-wise comparison would call them different updates.
    lay = lora_layout()
    pair = trust.lora_pairs(lay)[0]
    sent = np.zeros(lay.size, np.float32)
    a = RNG.standard_normal(pair.a_shape)
    b = RNG.standard_normal(pair.b_shape)
    rot = np.linalg.qr(RNG.standard_normal((3, 3)))[0] * 2.0
    rows = np.zeros((2, lay.size), np.float32)
    rows[0, pair.a], rows[0, pair.b] = a.ravel(), b.ravel()
    rows[1, pair.a], rows[1, pair.b] = (np.linalg.inv(rot) @ a).ravel(), (b @ rot).ravel()
    norms, concentration = trust.lora_indicators(rows, sent, lay)
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    assert norms[0] == pytest.approx(np.linalg.norm(b @ a), rel=1e-4)
    assert concentration[0] == pytest.approx(concentration[1], rel=1e-4)
    assert np.linalg.norm(rows[0]) != pytest.approx(np.linalg.norm(rows[1]), rel=1e-2)


def test_picked_lora_indicators_are_exact_when_nothing_is_left_out():
    lay = lora_layout()
    pair = trust.lora_pairs(lay)[0]
    sent = RNG.standard_normal(lay.size).astype(np.float32)
    deltas = RNG.standard_normal((3, lay.size)).astype(np.float32)
    picks = trust.lora_picks(lay, np.random.default_rng(1), count=12)  # 12 >= out and in: everything
    norms, concentration = trust.lora_indicators(deltas[:, picks[0].columns()], sent, lay, picks)
    exact = trust.lora_delta_spectra(deltas, sent, pair)
    np.testing.assert_allclose(norms, np.sqrt(exact.sum(axis=1)), rtol=1e-5)
    np.testing.assert_allclose(concentration, exact[:, 0] / exact.sum(axis=1), rtol=1e-3)


def test_picked_lora_indicators_estimate_the_whole_from_a_sample_of_rows():
    # LORA_SAMPLE of 768 rows of B and columns of A: ||ΔW|| within 10% on every draw and unbiased
    # over draws. The top direction's share reads high on a flat spectrum (a 16 x 16 Gram from 128
    # rows spreads its eigenvalues: the same for every client of the round, whose cohort judges it),
    # and exact on a rank-one update; the order of the clients holds.
    lay = lora_layout(out=768, inp=768, r=8)
    pair = trust.lora_pairs(lay)[0]
    rng = np.random.default_rng(2)
    sent = (0.05 * rng.standard_normal(lay.size)).astype(np.float32)
    deltas = (0.01 * rng.standard_normal((4, lay.size))).astype(np.float32)
    deltas[1, pair.b] *= np.tile(np.linspace(0.2, 3, 8, dtype=np.float32), 768)  # unequal columns of dB
    deltas[2, pair.a] = 0.0  # only B moved
    deltas[3] = 0.0  # a rank-one ΔW = u vᵀ A0
    deltas[3, pair.b] = 0.01 * np.outer(rng.standard_normal(768), rng.standard_normal(8)).ravel()
    norms, concentration = trust.lora_indicators(deltas, sent, lay)  # whole rows: exact
    exact = trust.lora_delta_spectra(deltas, sent, pair)
    np.testing.assert_allclose(norms, np.sqrt(exact.sum(axis=1)), rtol=1e-4)
    np.testing.assert_allclose(concentration, exact[:, 0] / exact.sum(axis=1), rtol=1e-2)
    assert concentration[3] > 0.99
    estimates = []
    for seed in range(8):
        picks = trust.lora_picks(lay, np.random.default_rng(seed))
        assert len(picks[0].b_rows) == len(picks[0].a_cols) == trust.LORA_SAMPLE
        est_norms, est_concentration = trust.lora_indicators(deltas[:, picks[0].columns()], sent, lay, picks)
        np.testing.assert_allclose(est_norms, norms, rtol=0.1)
        assert list(np.argsort(est_concentration)) == list(np.argsort(concentration))
        assert est_concentration[3] > 0.99 and np.all(est_concentration[:3] < 2 * concentration[:3])
        estimates.append(est_norms)
    np.testing.assert_allclose(np.mean(estimates, axis=0), norms, rtol=0.03)


def test_reading_received_vectors_equals_reading_their_stack():
    # The defence reads trained - sent straight from the reply buffers; what it reads must be what
    # the stacked updates give, norms exact (a float32 overflow redone in float64).
    lay = lora_layout(out=40, inp=30, r=4)
    sent = RNG.standard_normal(lay.size).astype(np.float32)
    deltas = RNG.standard_normal((5, lay.size)).astype(np.float32)
    deltas[3, :2] = 3e38  # the row's squared norm overflows float32
    trained = [sent + d for d in deltas]
    received = trust.ComponentUpdates(list(range(5)), trained, sent)
    stacked = trust.ComponentUpdates(list(range(5)), np.stack([t - sent for t in trained]))
    a = trust.read_component("encoder.x", received, lay, np.random.default_rng(4))
    b = trust.read_component("encoder.x", stacked, lay, np.random.default_rng(4))
    assert np.isfinite(a.norms).all() and a.norms[3] > 3e38
    np.testing.assert_allclose(a.norms, b.norms, rtol=1e-6)
    for field in ("sample", "probe", "lora"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.lora.shape == (5, sum(len(p.columns()) for p in a.picks)) and a.lora.shape[1] > 0
    for x, y in zip(a.layers, b.layers):
        np.testing.assert_array_equal(x, y)


def test_head_jump_sees_one_class_row_pushed():
    lay = layout(**{"head__bias": (4,), "head__weight": (4, 8)})
    deltas = np.full((2, lay.size), 0.1, np.float32)
    deltas[1, 4 + 2 * 8 : 4 + 3 * 8] = 1.0  # row of class 2
    sl, shape = trust.head_weight(lay)
    jumps = trust.head_jump(deltas[:, sl], shape)
    assert jumps[0] == pytest.approx(0.0, abs=1e-6) and jumps[1] > 2


def test_embedding_rows_see_one_token_row_moving_alone():
    lay = layout(**{"emb__word_embeddings__weight": (100, 4)})
    deltas = np.full((2, lay.size), 0.01, np.float32)
    deltas[1] = 0.0
    deltas[1, 40:44] = 1.0
    shares = trust.embedding_rows(trust.ComponentUpdates([0, 1], deltas), [0, 1], lay)
    assert shares[0] == pytest.approx(0.1) and shares[1] == pytest.approx(1.0)
    assert trust.component_kind("encoder.text", lay) == "embedding"


def test_component_kinds():
    assert trust.component_kind("encoder.image", lora_layout()) == "lora"
    assert trust.component_kind("head.vqa", layout(w=(2, 2))) == "head"
    assert trust.component_kind("fusion.shared", layout(w=(2, 2))) == "dense"


def test_split_by_rank_uses_the_reference_fractions():
    scores = {c: 1 - c / 100 for c in range(20)}
    split = trust.split_by_rank(scores, 0.5, 0.2)
    assert [split[c] for c in range(20)] == ["trusted"] * 10 + ["suspicious"] * 6 + ["rejected"] * 4
    assert list(trust.split_by_rank({7: 0.5}, 0.5, 0.2).values()) == ["trusted"]


def test_inspection_fails_a_suspect_that_stands_apart_and_passes_one_that_does_not():
    honest = RNG.standard_normal((8, 200)).astype(np.float32) * 0.1
    planted = np.linspace(1, 0, 200, dtype=np.float32) * 0.1 + RNG.standard_normal(200).astype(np.float32) * 0.01
    updates = np.vstack([honest, planted[None], planted[None] * 1.02, RNG.standard_normal((1, 200)) * 0.1])
    trusted = np.array([True] * 8 + [False] * 3)
    verdict = trust.inspect_layer(updates.astype(np.float32), trusted, ~trusted)
    assert list(verdict) == [False, False, True]


def test_clustering_finds_no_group_in_one_cloud():
    features = RNG.standard_normal((12, 9))
    assert trust.honest_members(features, np.arange(12) < 6).all()


def test_reputation_threshold_and_round_trip():
    rep = trust.Reputation()
    for _ in range(12):
        for c in (1, 2, 3, 4):
            rep.participate(c, earned=int(c != 4))
    assert rep.rate(4) < rep.threshold() <= rep.rate(2)
    assert rep.points[1] == 12 and rep.participations[4] == 12 and len(rep.recent[1]) == rep.WINDOW
    assert rep.rate(99) is None
    assert trust.Reputation.from_json(rep.to_json()) == rep
    with pytest.raises(ValueError, match="client '1'"):
        trust.Reputation.from_json({"points": {"1": -3}})
    with pytest.raises(ValueError, match="at most"):
        trust.Reputation.from_json({"recent": {"1": [1] * 20}})


def _updates(n=10, p=64, rng=RNG):
    deltas = (rng.standard_normal((n, p)) * 0.01).astype(np.float32)
    return {"fusion.shared": trust.ComponentUpdates(list(range(n)), deltas)}


LAYOUTS = {"fusion.shared": layout(**{"a": (32,), "b": (32,)})}
SENT = {"fusion.shared": np.ones(64, np.float32)}


@pytest.mark.parametrize("spoil,reason", [
    (lambda v: np.where(np.arange(v.size) == 0, np.nan, v), "non-finite"),
    (lambda v: np.zeros_like(v), "zero-update"),
    (lambda v: v * 1e6, "absurd-norm"),
])
def test_bad_updates_are_screened_out_with_their_reason(spoil, reason):
    updates = _updates()
    rows = updates["fusion.shared"].rows
    rows[3] = spoil(rows[3])
    bad = trust.screen_updates(updates, SENT, 100.0, readings(updates, LAYOUTS))
    assert list(bad) == [3] and bad[3].startswith(reason) and bad[3].split(":")[0] in trust.SCREEN_REASONS


def test_exact_copies_are_screened_out_together():
    updates = _updates()
    rows = updates["fusion.shared"].rows
    rows[5] = rows[2]
    bad = trust.screen_updates(updates, SENT, 100.0, readings(updates, LAYOUTS))
    assert sorted(bad) == [2, 5] and {r.split(":")[0] for r in bad.values()} <= set(trust.SCREEN_REASONS)


def test_row_norms_are_exact_even_where_float32_squares_overflow():
    d = RNG.standard_normal((3, 100)).astype(np.float32)
    d[2] = 1e30
    np.testing.assert_allclose(trust.row_norms(d), np.linalg.norm(d.astype(np.float64), axis=1), rtol=1e-5)


def test_the_coordinate_sample_is_blocks_fresh_each_draw_and_everything_when_small():
    rng = np.random.default_rng(0)
    a, b = trust.coordinate_sample(10**6, rng), trust.coordinate_sample(10**6, rng)
    assert len(a) == trust.SAMPLE and len(set(a)) == len(a) and (np.diff(a[:trust.BLOCK]) == 1).all()
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(trust.coordinate_sample(100, rng), np.arange(100))


def test_sampled_indicators_agree_with_exact_ones_on_large_updates():
    deltas = RNG.standard_normal((6, 200_000)).astype(np.float32)
    deltas[5, :2000] *= 20  # a spiky update
    sample = trust.coordinate_sample(deltas.shape[1], np.random.default_rng(1))
    exact, sampled = trust.spikiness(deltas), trust.spikiness(deltas[:, sample])
    np.testing.assert_allclose(sampled, exact, rtol=0.25)
    assert sampled[5] > 3 * sampled[:5].max()


def test_a_round_leaves_out_scaled_updates_and_reputation_drops_a_persistent_attacker():
    sent = {"fusion.shared": np.zeros(64, np.float32)}
    rep = trust.Reputation()
    for server_round in range(1, 8):
        updates = _updates()
        updates["fusion.shared"].rows[:2] *= 8  # clients 0 and 1
        decision = trust.decide_round(updates, sent, LAYOUTS, rep, server_round, np.random.default_rng(server_round),
                                      warmup_rounds=3)
        assert 0 not in decision.aggregated and 1 not in decision.aggregated
        assert len(decision.aggregated) >= 5
    assert rep.rate(0) < rep.threshold() and rep.rate(9) > rep.threshold()


def test_an_honest_client_held_out_by_its_past_recovers_once_trusted_again():
    sent = {"fusion.shared": np.zeros(64, np.float32)}
    rep = trust.Reputation()
    for _ in range(10):
        for c in range(10):
            rep.participate(c, earned=int(c != 3))  # client 3 has a bad past
    fate, below = [], []  # client 3's category and what became of it; its rate below the bar before the round
    rng = np.random.default_rng(11)  # its own draws: the outcome does not hang on which tests ran before
    for server_round in range(11, 40):
        below.append(rep.rate(3) < rep.threshold())
        decision = trust.decide_round(_updates(rng=rng), sent, LAYOUTS, rep, server_round,
                                      np.random.default_rng(server_round), warmup_rounds=3)
        fate.append((decision.category[3], decision.dropped.get(3, "aggregated" if 3 in decision.aggregated else "")))
    by_reputation = [why.startswith("reputation") for _, why in fate]
    # Reputation holds it out exactly while its rate is below the bar (a rejection by score outranks it) ...
    assert all(held <= low for held, low in zip(by_reputation, below)) and any(by_reputation)
    assert all(held for held, low, (category, _) in zip(by_reputation, below, fate) if low and category == "trusted")
    # ... its honest rounds lift the rate back within ten rounds, and from then on it is aggregated
    # every round it is trusted.
    recovered = below.index(False)
    assert recovered <= 10 and not any(below[recovered:])
    assert all(why == "aggregated" for category, why in fate[recovered:] if category == "trusted")


def test_a_huge_finite_update_of_one_of_two_holders_is_screened_and_nothing_turns_nan():
    import json

    deltas = (RNG.standard_normal((2, 64)) * 0.01).astype(np.float32)
    deltas[1] = 1e18  # finite in float32; its square overflows
    updates = {"fusion.shared": trust.ComponentUpdates([0, 1], deltas)}
    decision = trust.decide_round(updates, SENT, LAYOUTS, trust.Reputation(), 1, np.random.default_rng(0))
    assert decision.dropped[1].startswith("absurd-norm") and decision.aggregated == [0]
    json.dumps({c: float(t) for c, t in decision.trust.items()}, allow_nan=False)


def test_nan_scores_rank_last():
    split = trust.split_by_rank({1: float("nan"), 2: 0.5, 3: 0.9, 4: 0.7, 5: 0.6}, 0.4, 0.2)
    assert split[1] == "rejected" and split[3] == "trusted"


def test_a_layer_with_too_few_trusted_holders_judges_nobody():
    deltas = (RNG.standard_normal((4, 64)) * 0.01).astype(np.float32)
    updates = {"fusion.shared": trust.ComponentUpdates([0, 1, 2, 3], deltas)}
    category = {0: "trusted", 1: "trusted", 2: "suspicious", 3: "suspicious"}
    shares = trust._inspect(updates, readings(updates, LAYOUTS), category, np.random.default_rng(0))
    assert shares == {2: None, 3: None}


def test_an_all_honest_federation_keeps_its_trusted_clients_after_warm_up():
    sent = {"fusion.shared": np.zeros(64, np.float32)}
    rep = trust.Reputation()
    rng = np.random.default_rng(0)
    held_out = 0
    for server_round in range(1, 21):
        sampled = sorted(rng.choice(40, 12, replace=False).tolist())
        deltas = (RNG.standard_normal((12, 64)) * 0.01).astype(np.float32)
        updates = {"fusion.shared": trust.ComponentUpdates(sampled, deltas)}
        decision = trust.decide_round(updates, sent, LAYOUTS, rep, server_round, np.random.default_rng(server_round))
        held_out += sum(decision.category[c] == "trusted" and r.startswith("reputation")
                        for c, r in decision.dropped.items())
    assert held_out <= 10  # of about 100 trusted client-rounds after warm-up


def test_consensus_averages_the_direction_over_shared_components_and_ignores_heads():
    def result(ids, cosines):
        return trust.ComponentTrust(ids, {"direction": np.array(cosines)}, {}, np.ones(len(ids)))

    scored = {"encoder.image": result([0, 1], [0.4, -0.2]), "fusion.shared": result([0, 1, 2], [0.2, 0.0, 0.3]),
              "head.a": result([0, 1], [-0.9, 0.9]), "head.b": result([3], [0.5])}
    consensus = trust.client_consensus(scored)
    assert consensus == pytest.approx({0: 0.3, 1: -0.1, 2: 0.3, 3: 0.5})  # client 3 holds only a head
    w = 0.3
    scores = trust.client_trust({c: [1.0] for c in consensus}, consensus, w)
    assert scores == pytest.approx({0: 1.0, 1: 1 - w, 2: 1.0, 3: 1.0})  # median 0.3: client 1 gets 0
    # No common direction in the cohort: the consensus ranks nobody below anybody.
    even = (1 - w) * 0.5 + w
    assert trust.client_trust({0: [0.5], 1: [0.5]}, {0: -0.1, 1: 0.0}, w) == pytest.approx({0: even, 1: even})


def test_a_client_that_flips_every_component_is_rejected():
    # Wide non-IID spread, and three honest clients with outlying norms: the flipped client's cosine
    # stays near its cohort on each component, and only its mean over the components gives it away.
    rng = np.random.default_rng(3)
    n, p = 12, 4096
    common = rng.standard_normal(p).astype(np.float32)
    updates, layouts = {}, {}
    for name in ("encoder.image", "encoder.text", "fusion.shared"):
        weight = np.linspace(0.0, 0.6, n, dtype=np.float32)[rng.permutation(n), None]
        weight[0] = 0.1
        deltas = weight * common + 0.7 * rng.standard_normal((n, p)).astype(np.float32)
        deltas[0] *= -1  # a small honest step, flipped
        deltas[1:4] *= 3
        updates[name] = trust.ComponentUpdates(list(range(n)), deltas)
        layouts[name] = layout(w=(p,))
    sent = {name: np.zeros(p, np.float32) for name in updates}
    decision = trust.decide_round(updates, sent, layouts, trust.Reputation(), 1, np.random.default_rng(0))
    assert min(decision.components[name].scores["direction"][0] for name in updates) > 0.85
    assert decision.consensus[0] < min(v for c, v in decision.consensus.items() if c)
    assert decision.category[0] == trust.REJECTED
    # The component scores alone (consensus_weight 0, the previous rule): the norms rank lower.
    alone = trust.decide_round(updates, sent, layouts, trust.Reputation(), 1, np.random.default_rng(0),
                               consensus_weight=0.0)
    assert alone.category[0] != trust.REJECTED and alone.trust[0] > max(alone.trust[c] for c in (1, 2, 3))


def test_behaviour_sample_reads_every_client_or_a_uniform_draw_of_those_not_held_out():
    rep = trust.Reputation()
    for _ in range(2):
        rep.participate(7, earned=0, caught=True)  # two strikes: held out, not worth a slot
    rep.participate(3, earned=0, caught=True)  # one catch: drawn like anyone else
    clients = list(range(10))
    assert trust.behaviour_sample(clients, rep, 0, 2, np.random.default_rng(0)) == clients
    assert trust.behaviour_sample(clients, rep, 9, 2, np.random.default_rng(0)) == [c for c in clients if c != 7]
    picked = trust.behaviour_sample(clients, rep, 5, 2, np.random.default_rng(0))
    assert len(picked) == 5 and 7 not in picked and set(picked) <= set(clients)
    assert picked == trust.behaviour_sample(clients, rep, 5, 2, np.random.default_rng(0))  # seeded
    counts = np.zeros(10)
    for s in range(2000):
        counts[trust.behaviour_sample(clients, rep, 5, 2, np.random.default_rng(s))] += 1
    assert counts[7] == 0
    # Uniform over the nine open clients (5/9 of the rounds each), the caught client 3 included: a
    # sample that favoured past catches would lift the cohort median to the attackers'.
    np.testing.assert_allclose(np.delete(counts, 7) / 2000, 5 / 9, atol=0.04)


def test_a_sampled_norm_gate_weighs_each_anchor_for_the_trusted_rows_it_stands_for():
    # 4 trusted anchors standing for 40 trusted clients (norm 1), and 13 suspects: 4 honest (norm 1),
    # 9 attackers (norm 4). Unweighted, the attackers are most of the rows and set the gate's median,
    # so the honest suspects fail it; weighted, the attackers fail it and the honest ones do not.
    rng = np.random.default_rng(0)
    norms = np.array([1.0] * 8 + [4.0] * 9)
    updates = rng.standard_normal((17, 64)).astype(np.float32)
    updates *= (norms / np.linalg.norm(updates, axis=1))[:, None].astype(np.float32)
    trusted = np.arange(17) < 4
    unweighted = trust.inspect_layer(updates, trusted, ~trusted, norms)
    assert not unweighted[:4].any()  # honest suspects gated out by the attackers' median
    weighed = trust.inspect_layer(updates, trusted, ~trusted, norms, anchor_weight=10.0)
    assert not weighed[4:].any()  # the attackers gated out
    assert weighed[:4].all()  # the honest suspects, with the same statistics as the anchors, pass


def test_stage_two_weighs_sampled_anchors_for_every_trusted_client():
    # 100 trusted clients (norm 1; only MAX_ANCHORS of them are read), 10 honest suspects (norm 1) and
    # 50 attackers (norm 4) as suspects: weighted, the gate's median is the honest norm.
    rng = np.random.default_rng(1)
    lay = layout(**{"a": (64,), "b": (64,)})
    norms = np.array([1.0] * 110 + [4.0] * 50)
    deltas = rng.standard_normal((160, 128)).astype(np.float32)
    deltas *= (norms / np.linalg.norm(deltas, axis=1))[:, None].astype(np.float32)
    category = {c: trust.TRUSTED if c < 100 else trust.SUSPICIOUS for c in range(160)}
    updates = {"c": trust.ComponentUpdates(list(range(160)), deltas)}
    shares = trust._inspect(updates, readings(updates, {"c": lay}), category, np.random.default_rng(0))
    assert all(shares[c] == 0 for c in range(110, 160))  # every attacker fails every layer's gate
    assert np.mean([shares[c] for c in range(100, 110)]) > 0.5  # honest suspects mostly pass


def test_alie_colluders_are_near_duplicates_and_skewed_honest_clients_are_not():
    from fedmm.core.schema import AttackConfig
    from fedmm.robustness.attacks import AttackContext, alie

    rng = np.random.default_rng(5)
    p = 2000
    common = rng.standard_normal(p)
    # Honest: a shared direction plus each client's own, at norms from 0.2x to 3x (little or much data).
    honest = np.stack([(0.5 * common + rng.standard_normal(p)) * s for s in np.linspace(0.2, 3.0, 8)])
    colluders = np.stack([0.5 * common + rng.standard_normal(p) for _ in range(4)])
    ctx = AttackContext(AttackConfig(), np.random.default_rng(0), None, num_sampled=12)
    forged = alie(colluders.astype(np.float32), ctx)
    assert trust.near_duplicates(honest.astype(np.float32)) == {}
    flagged = trust.near_duplicates(np.vstack([honest, forged]).astype(np.float32))
    assert set(flagged) == {8, 9, 10, 11}
    assert all(8 <= j <= 11 and ratio < trust.NEAR_DUPLICATE for j, ratio in flagged.values())
    assert trust.near_duplicates(forged[:3]) == {}  # too few holders to know a typical distance


def test_the_screen_names_near_duplicates():
    rng = np.random.default_rng(6)
    deltas = rng.standard_normal((8, 64)).astype(np.float32)
    deltas[5] = deltas[4] + 0.01 * rng.standard_normal(64).astype(np.float32)
    updates = {"fusion.shared": trust.ComponentUpdates(list(range(8)), deltas)}
    bad = trust.screen_updates(updates, SENT, 100.0, readings(updates, LAYOUTS))
    assert set(bad) == {4, 5} and bad[4].startswith("near-duplicate: fusion.shared") and "client 5" in bad[4]
    assert {r.split(":")[0] for r in bad.values()} <= set(trust.SCREEN_REASONS)  # logged as warnings


def test_a_colluder_caught_on_one_component_still_exposes_its_partner_on_another():
    """ALIE on seed 0: the attacker holding only the text encoder went unseen while its one partner
    there had already been caught on the image encoder and left the comparison."""
    rng = np.random.default_rng(7)
    image = rng.standard_normal((8, 64)).astype(np.float32)
    image[5] = image[4] + 0.01 * rng.standard_normal(64).astype(np.float32)
    text = rng.standard_normal((8, 64)).astype(np.float32)
    text[1] = text[0] + 0.01 * rng.standard_normal(64).astype(np.float32)  # rows 0, 1: clients 4 and 8
    updates = {"encoder.image": trust.ComponentUpdates(list(range(8)), image),
               "encoder.text": trust.ComponentUpdates([4, *range(8, 15)], text)}
    sent = {c: np.zeros(64, np.float32) for c in updates}
    bad = trust.screen_updates(updates, sent, 100.0, readings(updates, dict.fromkeys(updates, layout(w=(64,)))))
    assert set(bad) == {4, 5, 8} and bad[8].startswith("near-duplicate: encoder.text") and "client 4" in bad[8]


def test_clients_the_behaviour_check_catches_take_no_part_in_the_statistics():
    """A caught client is dropped for its behaviour and neither ranked nor used as an anchor; a client
    at its strikes is held out the same way, and neither earns reputation."""
    sent = {"fusion.shared": np.zeros(64, np.float32)}
    rep = trust.Reputation()
    for _ in range(2):
        rep.participate(1, earned=0, caught=True)
    updates = _updates()
    updates["fusion.shared"].rows[0] *= 3  # caught by behaviour this round, a confident-looking update
    decision = trust.decide_round(updates, sent, LAYOUTS, rep, 1, np.random.default_rng(0),
                                  behaviour=lambda clients: {0: "behaviour: planted"}, strikes=2)
    assert decision.dropped[0] == "behaviour: planted" and decision.dropped[1].startswith("reputation: caught")
    assert 0 not in decision.category and 1 not in decision.category and 0 not in decision.trust
    assert decision.components["fusion.shared"].client_ids == list(range(2, 10))
    assert rep.points.get(0, 0) == 0 and rep.points.get(1, 0) == 0 and rep.times_caught(0) == 1
    # Client 1 was held, not judged: its catches' window moves on (so they age out), its points' does not.
    assert rep.recent[1] == [0, 0] and rep.caught[1] == [1, 1, 0] and rep.recent[0] == [0]
    assert set(decision.aggregated) <= set(range(2, 10)) and len(decision.aggregated) >= 5
