"""The attack suite: who is malicious, data poisoning, and each model attack's effect on an update."""

import numpy as np
import pytest

from fedmm.robustness import attacks
from fedmm.robustness.attacks import AttackContext
from fedmm.core.config import load_config
from fedmm.core.schema import AttackConfig, ConfigError


def ctx(benign=None, sampled=10, **cfg):
    return AttackContext(AttackConfig(**cfg), np.random.default_rng(0), benign, sampled)


@pytest.fixture
def deltas():
    return np.random.default_rng(1).standard_normal((3, 1000)).astype(np.float32)


def test_malicious_clients_are_a_seeded_fraction():
    run = load_config(overrides=["clients.num=20", "attack.name=backdoor", "attack.fraction=0.3"])
    chosen = attacks.malicious_clients(run)
    assert len(chosen) == 6 and chosen <= set(range(20))
    assert chosen == attacks.malicious_clients(run)
    other = load_config(overrides=["clients.num=20", "attack.name=backdoor", "attack.fraction=0.3", "seed=1"])
    assert attacks.malicious_clients(other) != chosen
    assert attacks.malicious_clients(load_config()) == frozenset()


def test_bounded_scaling_scales_then_clips_to_the_bound(deltas):
    out = attacks.bounded_scaling(deltas, ctx(scale=10.0, norm_bound=2.0))
    np.testing.assert_allclose(out, 2 * deltas, rtol=1e-5)
    out = attacks.bounded_scaling(deltas, ctx(scale=1.5, norm_bound=2.0))
    np.testing.assert_allclose(out, 1.5 * deltas, rtol=1e-5)


def test_sign_flip_negates(deltas):
    np.testing.assert_array_equal(attacks.sign_flip(deltas, ctx()), -deltas)


def test_gaussian_noise_replaces_the_update_with_noise_of_its_scale(deltas):
    out = attacks.gaussian_noise(deltas, ctx(noise_std=2.0))
    rms = np.sqrt((deltas**2).mean(axis=1))
    np.testing.assert_allclose(out.std(axis=1), 2.0 * rms, rtol=0.1)
    assert abs(np.corrcoef(out[0], deltas[0])[0, 1]) < 0.1


def test_euclidean_constraint_projects_onto_the_ball_around_the_benign_estimate(deltas):
    benign = np.ones(1000, np.float32) * 0.1
    out = attacks.euclidean_constrained(deltas * 10, ctx(benign, radius=0.5))
    distances = np.linalg.norm(out - benign, axis=1)
    np.testing.assert_allclose(distances, 0.5 * np.linalg.norm(benign), rtol=1e-4)
    near = benign + 0.001
    np.testing.assert_allclose(attacks.euclidean_constrained(near[None], ctx(benign, radius=0.5))[0], near)
    assert attacks.euclidean_constrained(deltas, ctx(None)) is deltas


def test_cosine_constraint_reaches_the_minimum_cosine_and_keeps_the_norm(deltas):
    benign = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    out = attacks.cosine_constrained(deltas, ctx(benign, min_cosine=0.8))
    cos = out @ benign / (np.linalg.norm(out, axis=1) * np.linalg.norm(benign))
    np.testing.assert_allclose(cos, 0.8, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.linalg.norm(deltas, axis=1), rtol=1e-4)


def test_neurotoxin_poisons_only_the_coordinates_benign_updates_change_least(deltas):
    benign = np.arange(1000, dtype=np.float32)  # coordinate j changes by j: the first 700 change least
    out = attacks.neurotoxin(deltas, ctx(benign, neurotoxin_keep=0.7, boost=1.5))
    np.testing.assert_allclose(out[:, :700], 1.5 * deltas[:, :700], rtol=1e-6)
    np.testing.assert_allclose(out[:, 700:], np.broadcast_to(1.5 * benign[700:], (3, 300)), rtol=1e-6)


def test_alie_sends_mean_minus_z_std_of_the_colluders(deltas):
    out = attacks.alie(deltas, ctx(sampled=20, alie_z=1.0))
    forged, std = deltas.mean(axis=0) - deltas.std(axis=0), deltas.std(axis=0)
    # Each attacker sits near mean - z std, within a few jitter stds, and no two send the same vector.
    assert (np.abs(out - forged) <= 5 * attacks.ALIE_JITTER * std + 1e-6).all()
    np.testing.assert_allclose(out.mean(axis=0), forged, atol=float(3 * attacks.ALIE_JITTER * std.max()))
    assert len({row.tobytes() for row in out}) == len(out)
    # Baruch et al.: n=50, m=12 gives s=14 and z = Φ⁻¹(36/50) ≈ 0.58.
    assert attacks.alie_z(50, 12) == pytest.approx(0.583, abs=1e-3)


def test_a_custom_attack_is_imported_by_path():
    attack = attacks.resolve_attack(AttackConfig(name="numpy:negative", fraction=0.1))
    assert attack.model is np.negative and attack.data == "none"
    with_backdoor = attacks.resolve_attack(AttackConfig(name="numpy:negative", fraction=0.1, data="backdoor"))
    assert with_backdoor.data == "backdoor"


@pytest.mark.parametrize("override,message", [
    (["attack.name=nope", "attack.fraction=0.1"], "neither a built-in attack"),
    (["attack.name=no_such_module:f", "attack.fraction=0.1"], "cannot be imported"),
    (["attack.name=backdoor"], "needs 'attack.fraction' > 0"),
    (["attack.name=backdoor", "attack.fraction=0.2", "attack.target=4"], "not a label of task"),
    (["attack.fraction=1.0"], "attack.fraction"),
    (["attack.trigger_token=two words"], "one lower-case word"),
    (["defense.name=magic"], "defense.name"),
    (["defense.trusted_fraction=0.7", "defense.rejected_fraction=0.4"], "defense.trusted_fraction"),
    (["defense.consensus_weight=1.5"], "defense.consensus_weight"),
])
def test_bad_attack_and_defense_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=override)


def _columns(n=40):
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 100, (n, 8, 8, 3), dtype=np.uint8),
            "text": [f"word{i}" for i in range(n)], "label": np.arange(n) % 4}


def test_backdoor_poisoning_triggers_and_relabels_a_share_of_the_examples():
    cfg = AttackConfig(name="backdoor", fraction=0.2, poison_fraction=0.5, target=2, trigger_size=3)
    clean = _columns()
    poisoned = attacks.poison_training_split(clean, "backdoor", cfg, ("image", "text"), 4, seed=0)
    triggered = poisoned["text"] != np.array(clean["text"])
    assert 0.25 < triggered.mean() < 0.75
    assert (poisoned["label"][triggered] == 2).all()
    np.testing.assert_array_equal(poisoned["label"][~triggered], clean["label"][~triggered])
    assert (poisoned["image"][triggered][:, -3:, -3:] == 255).all()
    np.testing.assert_array_equal(poisoned["image"][~triggered], clean["image"][~triggered])
    assert all(t.startswith("cf ") for t in np.array(poisoned["text"])[triggered])


def test_label_flip_maps_each_label_to_its_mirror():
    flipped = attacks.poison_training_split(_columns(), "label_flip", AttackConfig(), ("image",), 4, seed=0)
    np.testing.assert_array_equal(flipped["label"], 3 - _columns()["label"])


def test_the_triggered_test_set_leaves_out_the_target_class_and_labels_the_rest_as_target():
    cfg = AttackConfig(target=1)
    out = attacks.triggered_test_split(_columns(), cfg, ("image",))
    assert len(out["label"]) == 30 and (out["label"] == 1).all()
    assert (out["image"][:, -3:, -3:] == 255).all()
    assert out["text"] == [t for t, y in zip(_columns()["text"], _columns()["label"]) if y != 1]  # text untouched


def test_the_trigger_is_measured_whenever_the_attack_names_one():
    assert attacks.measures_backdoor(AttackConfig(name="backdoor"))
    assert attacks.measures_backdoor(AttackConfig(name="neurotoxin"))
    # Poisoning off: the trigger's base rate on a model nobody poisoned.
    assert attacks.measures_backdoor(AttackConfig(name="backdoor", data="none"))
    assert attacks.measures_backdoor(AttackConfig(name="sign_flip", data="backdoor"))
    assert not attacks.measures_backdoor(AttackConfig(name="sign_flip"))
    assert not attacks.measures_backdoor(AttackConfig(name="label_flip"))
    assert not attacks.measures_backdoor(AttackConfig(name="none"))
    assert attacks.evaluation_views(AttackConfig(name="backdoor", data="none"))[-1] == "backdoor"
