"""Robust-aggregation baselines per component: Flower's rules, FLAME, FLTrust."""

import json

import numpy as np
import pytest
from local_grid import LocalGrid
from scipy.stats import trim_mean

from client_apps.app import make_client_app
from fedmm.core.config import load_config
from fedmm.core.schema import DefenseConfig
from fedmm.core.results import RunFailed
from server_app.runner import run_federation
from strategies import NodeRegistry
from strategies.robust_baselines import assumed_attackers, flame_rule, flower_rule, fltrust_weights

RNG = np.random.default_rng(0)


def holders(n=9, p=20):
    return [RNG.standard_normal(p).astype(np.float32) * 0.1 + 1.0 for _ in range(n)]


def test_assumed_attackers_keep_the_rules_defined():
    assert assumed_attackers(20, 0) == 6
    assert assumed_attackers(4, 0) == 0 and assumed_attackers(9, 5) == 3
    assert assumed_attackers(20, 0, per_attacker=4) == 4


def test_flower_median_and_trimmed_mean_match_numpy_and_scipy():
    vectors = holders()
    weights = [1.0] * len(vectors)
    sent = np.zeros(20, np.float32)
    median = flower_rule("median", DefenseConfig())(1, "c", vectors, weights, sent)
    np.testing.assert_allclose(median, np.median(np.stack(vectors), axis=0), rtol=1e-6)
    trimmed = flower_rule("trimmed_mean", DefenseConfig(trim_fraction=0.2))(1, "c", vectors, weights, sent)
    np.testing.assert_allclose(trimmed, trim_mean(np.stack(vectors), 0.2, axis=0), rtol=1e-5)


def test_flower_krum_never_picks_the_far_away_update():
    vectors = holders()
    vectors[0] = vectors[0] + 100
    out = flower_rule("krum", DefenseConfig())(1, "c", vectors, [1.0] * 9, np.zeros(20, np.float32))
    assert any(np.allclose(out, v) for v in vectors[1:])


def test_bulyan_assumes_as_many_attackers_as_the_holders_allow_and_resists_one():
    vectors = holders(7)
    vectors[3] = vectors[3] + 100  # 7 holders allow f = 1 (n >= 4f + 3)
    out = flower_rule("bulyan", DefenseConfig(num_malicious=2))(1, "c", vectors, [1.0] * 7, np.zeros(20, np.float32))
    assert np.abs(out - 1.0).max() < 0.5


def test_flame_drops_the_opposite_direction_and_clips_norms():
    sent = np.zeros(50, np.float32)
    direction = RNG.standard_normal(50).astype(np.float32)
    honest = [direction + RNG.standard_normal(50).astype(np.float32) * 0.1 for _ in range(7)]
    attackers = [-5 * direction for _ in range(3)]
    out = flame_rule(noise_factor=0.0)(1, "c", honest + attackers, [1.0] * 10, sent)
    assert np.dot(out, direction) > 0
    assert np.linalg.norm(out) <= np.median([np.linalg.norm(v) for v in honest + attackers]) + 1e-5


def test_fltrust_weights_by_relu_cosine_and_rescales_to_the_server_norm():
    server = np.array([1.0, 0.0, 0.0])
    deltas = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    trust, rescaled = fltrust_weights(deltas, server)
    np.testing.assert_allclose(trust, [1.0, 0.0, 0.0, np.sqrt(0.5)])
    np.testing.assert_allclose(np.linalg.norm(rescaled, axis=1), 1.0)


FAST = ["clients.num=5", "data.examples_per_task=400", "model.image_encoder=", "model.text_encoder=", "model.hidden_size=32", "model.intermediate_size=64",
        "model.fusion_dim=16", "rounds=1", "train.local_steps=3", "train.batch_size=8",
        "defense.root_examples=16"]


@pytest.mark.parametrize("defense", ["krum", "multikrum", "median", "trimmed_mean", "flame", "fltrust"])
def test_every_baseline_moves_every_component_of_a_heterogeneous_federation(tmp_path, defense):
    run = load_config(overrides=[*FAST, f"defense.name={defense}", f"out={tmp_path}"])
    summary = run_federation(LocalGrid(make_client_app(run), 5), run)
    assert summary["status"] == "completed"
    record = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    # 5 clients: encoders, fusion and all three heads, each moved by the rule (vqa by its one holder).
    assert (record["train.components-changed"], record["train.components-declined"]) == (6, 0)
    assert record["train.clients-accepted"] == 5


@pytest.mark.slow
def test_bulyan_declines_a_component_it_cannot_aggregate_and_the_run_says_so(tmp_path):
    # Bulyan needs at least 3 holders (n >= 4f + 3); the vqa head has one, the multimodal client 2.
    run = load_config(overrides=[*FAST, "defense.name=bulyan", f"out={tmp_path}"])
    with pytest.raises(RunFailed, match="never changed: head.vqa; the robust rule declined 1 component-rounds"):
        run_federation(LocalGrid(make_client_app(run), 5), run)
    run = load_config(overrides=[*FAST, "defense.name=bulyan", "strategy.allow_degraded=true", f"out={tmp_path}"])
    assert run_federation(LocalGrid(make_client_app(run), 5), run)["status"] == "completed"


def test_a_baseline_stands_in_front_of_a_flower_strategy_and_the_oracle_refuses_one(tmp_path):
    from flwr.serverapp.strategy import FedAvgM

    from fedmm.core.schema import ConfigError
    from server_app.runner import build_strategy, check_strategy
    from strategies.defended import DefendedStrategy

    flower = [*FAST, "clients.profiles.all=img_shape", "strategy.name=flwr.serverapp.strategy.FedAvgM", f"out={tmp_path}"]
    run = load_config(overrides=[*flower, "defense.name=krum"])
    instance = build_strategy(run, NodeRegistry(run)).make()
    assert isinstance(instance, DefendedStrategy) and isinstance(instance.strategy, FedAvgM)
    oracle = load_config(overrides=[*flower, "defense.name=oracle", "attack.name=backdoor", "attack.fraction=0.2"])
    with pytest.raises(ConfigError, match="oracle"):
        check_strategy(oracle)

