"""Any Flower strategy on a mismatched federation: one instance per component over its holders, its
arguments from config, its state across rounds and across a resume."""

import json
import shutil

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdam, FedAvgM
from local_grid import LocalGrid, with_nan
from safetensors.numpy import load_file

from client_apps.app import make_client_app
from fedmm.core.config import load_config
from fedmm.core.results import RunFailed
from fedmm.core.schema import ConfigError
from server_app.runner import build_strategy, run_federation
from strategies import NodeRegistry
from strategies.per_component import PerComponentStrategy, strategy_arguments

# The default mismatched profiles: an image client, a text client, a multimodal client.
FAST = ["clients.num=3", "data.examples_per_task=240", "model.image_encoder=", "model.text_encoder=",
        "model.hidden_size=32", "model.intermediate_size=64", "model.fusion_dim=16", "rounds=2",
        "train.local_steps=3", "train.batch_size=8"]
FLWR = "flwr.serverapp.strategy."


def run_in(tmp_path, name, *extra, tamper=None):
    run = load_config(overrides=[*FAST, f"out={tmp_path / name}", *extra])
    summary = run_federation(LocalGrid(make_client_app(run), 3, tamper=tamper), run)
    return run, summary


def checkpoint(tmp_path, name, server_round):
    return load_file(str(tmp_path / name / "checkpoints" / f"round-{server_round:04d}.safetensors"))


def test_flowers_fedavg_per_component_is_fedmms_weighted_mean(tmp_path):
    run_in(tmp_path, "fedmm")
    run, _ = run_in(tmp_path, "flower", f"strategy.name={FLWR}FedAvg")
    assert isinstance(build_strategy(run, NodeRegistry(run)), PerComponentStrategy)
    # Round 1 saw identical replies (later rounds train from float32 means summed in another order).
    ours, flower = checkpoint(tmp_path, "fedmm", 1), checkpoint(tmp_path, "flower", 1)
    for key in ours:  # every component, each over its own holders
        np.testing.assert_allclose(flower[key], ours[key], rtol=1e-5, atol=1e-7, err_msg=key)
        assert flower[key].dtype == np.float32


def test_a_bad_reply_never_reaches_the_flower_strategy(tmp_path):
    _, summary = run_in(tmp_path, "flower", f"strategy.name={FLWR}FedAvg", tamper={1: with_nan})
    assert summary["clients_rejected_total"] == 2 and summary["status"] == "completed"  # the rest moved on
    assert all(np.isfinite(v).all() for v in checkpoint(tmp_path, "flower", 2).values())


def test_fedadam_keeps_its_moments_per_component_and_a_resume_is_exact(tmp_path):
    args = [f"strategy.name={FLWR}FedAdam", "strategy.args.eta=0.05", "strategy.args.tau=1e-3", "rounds=3"]
    run, _ = run_in(tmp_path, "full", *args)
    strategy = build_strategy(run, NodeRegistry(run))
    strategy.load_state(tmp_path / "full" / "checkpoints" / "round-0003.strategy.safetensors")
    assert set(strategy.instances) == {"encoder.image", "encoder.text", "fusion.shared", "head.img_shape",
                                       "head.txt_color", "head.vqa"}
    fusion = strategy.instances["fusion.shared"]
    assert isinstance(fusion, FedAdam) and fusion.eta == 0.05 and fusion.tau == 1e-3
    assert fusion.m_t["v"].shape == fusion.v_t["v"].shape and np.abs(fusion.v_t["v"]).sum() > 0
    # What a server killed during round 3 leaves; the resumed run must end where the full one did.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for stale in cut.glob("checkpoints/round-0003.*"):
        stale.unlink()
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # rounds 0, 1, 2
    (cut / "summary.json").unlink()
    resumed = load_config(overrides=[*FAST, f"out={cut}", *args, "resume=true"])
    run_federation(LocalGrid(make_client_app(resumed), 3), resumed)
    full, again = checkpoint(tmp_path, "full", 3), load_file(str(cut / "checkpoints" / "round-0003.safetensors"))
    assert all(np.array_equal(full[k], again[k]) for k in full)
    rounds = [line for line in (cut / "metrics.jsonl").read_text().splitlines() if '"stage"' not in line]
    assert len(rounds) == 4  # rounds 0-2 kept, round 3 run once: the moments came from round 2's state file


def test_a_users_own_strategy_runs_by_import_path_with_its_argument_from_config(tmp_path):
    run_in(tmp_path, "fedmm", "rounds=1")
    run, summary = run_in(tmp_path, "user", "rounds=1", "strategy.name=user_strategy.ServerStepFedAvg",
                          "strategy.args.server_lr=0.5")
    assert summary["status"] == "completed"
    initial, mean, half = checkpoint(tmp_path, "fedmm", 0), checkpoint(tmp_path, "fedmm", 1), checkpoint(tmp_path, "user", 1)
    for key in initial:  # half way from the initial model to fedmm's per-component mean, every component
        np.testing.assert_allclose(half[key], initial[key] + 0.5 * (mean[key] - initial[key]), rtol=1e-5, atol=1e-6)


def test_fedavgm_momentum_per_component(tmp_path):
    run, summary = run_in(tmp_path, "m", f"strategy.name={FLWR}FedAvgM", "strategy.args.server_momentum=0.9")
    assert summary["status"] == "completed"
    strategy = build_strategy(run, NodeRegistry(run))
    strategy.load_state(tmp_path / "m" / "checkpoints" / "round-0002.strategy.safetensors")
    head = strategy.instances["head.vqa"]
    assert isinstance(head, FedAvgM) and head.server_momentum == 0.9 and len(head.momentum_vector) == 1


def test_a_flower_strategy_aggregates_experts_over_the_clients_that_used_them(tmp_path):
    _, summary = run_in(tmp_path, "experts", f"strategy.name={FLWR}FedMedian", "moe.fusion_ffn=experts")
    assert summary["status"] == "completed" and summary["moe.experts_sent_fraction"] <= 1


def test_arguments_are_converted_by_the_signature_and_bad_ones_name_the_key_and_class():
    assert strategy_arguments(FedAdam, {"eta": "0.1", "tau": "1e-3", "beta_1": "0.8"}) == {
        "eta": 0.1, "tau": 0.001, "beta_1": 0.8}
    with pytest.raises(ConfigError, match="'strategy.args.etaa': FedAdam has no argument 'etaa'"):
        strategy_arguments(FedAdam, {"etaa": "1"})
    with pytest.raises(ConfigError, match="'strategy.args.eta': FedAdam wants float, got 'fast'"):
        strategy_arguments(FedAdam, {"eta": "fast"})
    with pytest.raises(ConfigError, match="fedmm samples each round's clients itself"):
        strategy_arguments(FedAdam, {"fraction_train": "0.5"})


@pytest.mark.parametrize("extra, message", [
    ([f"strategy.name={FLWR}FedAdam", "strategy.args.eta=fast"], "FedAdam wants float"),
    (["strategy.args.eta=0.1"], "strategy.name=fedmm takes no arguments"),
    ([f"strategy.name={FLWR}NoSuchStrategy"], "cannot be imported"),
    (["strategy.name=collections.OrderedDict"], "not a Flower Strategy"),
    ([f"strategy.name={FLWR}FedTrimmedAvg", "strategy.args.beta=0.9"], "cannot build it"),
])
def test_bad_strategies_and_arguments_stop_before_any_work(tmp_path, extra, message):
    run = load_config(overrides=[*FAST, f"out={tmp_path}", *extra])
    with pytest.raises(ConfigError, match=message):
        build_strategy(run, NodeRegistry(run))


def test_the_flat_run_config_carries_the_arguments_as_one_string():
    from fedmm.core.config import config_from_flat, to_flat

    run = load_config(overrides=[f"strategy.name={FLWR}FedAdam", "strategy.args.eta=0.05", "strategy.args.tau=1e-3"])
    flat = to_flat(run)
    assert flat["strategy.args"] == "eta=0.05; tau=1e-3"
    assert config_from_flat(flat).strategy.args == {"eta": "0.05", "tau": "1e-3"}


def test_fedprox_sends_its_proximal_term_and_the_clients_train_with_it(tmp_path):
    run_in(tmp_path, "fedavg", "rounds=1", f"strategy.name={FLWR}FedAvg")
    run = load_config(overrides=[*FAST, f"out={tmp_path / 'prox'}", "rounds=1", f"strategy.name={FLWR}FedProx",
                                 "strategy.args.proximal_mu=5.0"])
    grid = LocalGrid(make_client_app(run), 3)
    run_federation(grid, run)
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert train and all(m.content["config"]["proximal-mu"] == 5.0 for m in train)
    initial, fedavg, prox = checkpoint(tmp_path, "fedavg", 0), checkpoint(tmp_path, "fedavg", 1), checkpoint(tmp_path, "prox", 1)
    moved = lambda new: sum(float(((new[k] - initial[k]) ** 2).sum()) for k in initial)  # noqa: E731
    assert moved(prox) < moved(fedavg)  # the same clients and data, held nearer to the global model


@pytest.mark.slow
def test_qfedavg_weighs_components_by_the_holders_training_loss(tmp_path):
    _, summary = run_in(tmp_path, "q", f"strategy.name={FLWR}QFedAvg", "strategy.args.client_learning_rate=0.006",
                        "strategy.args.q=0.5")
    assert summary["status"] == "completed" and summary["problems"] == []  # every component moved
    assert all(np.isfinite(v).all() for v in checkpoint(tmp_path, "q", 2).values())


def test_a_strategy_that_returns_non_finite_values_never_reaches_the_global_model(tmp_path):
    with pytest.raises(RunFailed, match="never changed"):
        run_in(tmp_path, "nan", "strategy.name=user_strategy.ServerStepFedAvg", "strategy.args.server_lr=nan")
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert all(np.isfinite(v).all() for v in checkpoint(tmp_path, "nan", 2).values())
    assert summary["problems"][0].startswith("components the run never changed: encoder.image, encoder.text")
