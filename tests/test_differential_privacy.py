"""Central DP per component: Flower's wrappers around each component's strategy, clipping that bounds
every update, the node's clipping mod, the run's epsilon, composition with defences, and a resume."""

import json
import shutil

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
)
from local_grid import LocalGrid
from safetensors.numpy import load_file

from client_apps.app import make_client_app
from fedmm.core.components import flatten
from fedmm.core.config import load_config
from fedmm.models.model import server_model, trainable_layouts
from fedmm.core.schema import ConfigError
from server_app.runner import build_strategy, run_federation
from strategies import NodeRegistry
from strategies.defended import DefendedStrategy
from strategies.differential_privacy import ServerSideAdaptiveClipping
from strategies.per_component import VECTOR, _prime, component_replies
from test_per_component import FAST, FLWR, checkpoint, run_in


def test_server_side_fixed_clipping_bounds_each_components_change_and_reports_epsilon(tmp_path):
    # No noise: the new global component is the mean of clipped updates, so its change is within C.
    run, summary = run_in(tmp_path, "dp", "dp.name=server-fixed", "dp.clipping_norm=0.05", "dp.noise_multiplier=0")
    strategy = build_strategy(run, NodeRegistry(run))
    assert isinstance(strategy.make(), DifferentialPrivacyServerSideFixedClipping)
    layouts = trainable_layouts(server_model(run))
    vectors = [{c: flatten(layout, checkpoint(tmp_path, "dp", r)) for c, layout in layouts.items()} for r in (0, 1, 2)]
    moved = 0
    for before, after in zip(vectors, vectors[1:]):
        for component in layouts:
            change = float(np.linalg.norm(after[component] - before[component]))
            assert change <= 0.05 * (1 + 1e-4), (component, change)
            moved += change > 0
    assert moved > 0
    assert summary["dp"]["epsilon"] is None and "noise" in summary["dp"]["reason"]
    assert "DP clip (server, fixed" in summary["strategy.composition"]

    _, noisy = run_in(tmp_path, "noisy", "dp.name=server-fixed", "dp.noise_multiplier=1.0")
    assert noisy["dp"]["epsilon"] > 0 and noisy["dp"]["releases"] > 0 and noisy["status"] == "completed"


def test_client_side_adaptive_clipping_the_node_clips_and_the_server_checks(tmp_path):
    # No noise, so the norm bits count exactly: every update exceeds 0.01, so each norm grows.
    run, summary = run_in(tmp_path, "client", "dp.name=client-adaptive", "dp.clipping_norm=0.01",
                          "dp.noise_multiplier=0")
    assert summary["status"] == "completed" and summary["clients_rejected_total"] == 0
    assert summary["dp"]["epsilon"] is None  # no noise, no guarantee
    strategy = build_strategy(run, NodeRegistry(run))
    strategy.load_state(tmp_path / "client" / "checkpoints" / "round-0002.strategy.safetensors")
    norms = {c: s.clipping_norm for c, s in strategy.instances.items()}
    # Exact counts: each round moves a norm by exp(+0.1) (all its holders clipped) or exp(-0.1) (none).
    steps = {c: round(float(np.log(n / 0.01) / 0.1), 6) for c, n in norms.items()}
    assert len(norms) == 6 and set(steps.values()) <= {-2.0, 0.0, 2.0}, steps
    assert steps["encoder.image"] == steps["fusion.shared"] == 2.0  # LoRA and fusion updates beyond 0.01


def _unclipped(reply):
    """What a node that skips clipping sends: its update, far beyond any small clipping norm."""
    record = reply.content["arrays"]
    reply.content["arrays"] = ArrayRecord({k: Array(record[k].numpy() + np.float32(0.5)) for k in record.keys()})
    return reply


def test_a_node_that_does_not_clip_is_dropped(tmp_path):
    _, summary = run_in(tmp_path, "x", "dp.name=client-fixed", "dp.clipping_norm=0.01", "dp.noise_multiplier=0.5",
                        tamper={0: _unclipped})
    assert summary["clients_rejected_total"] == 2  # partition 0, in rounds 1 and 2
    log = [json.loads(line) for line in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    assert log[1]["train.rejected.unclipped"] == 1 and log[1]["train.clients-usable"] == 2


def test_flowers_adaptive_clipping_moves_the_norm_the_wrong_way_and_ours_tracks_the_quantile():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    norms = {}
    for cls in (DifferentialPrivacyServerSideAdaptiveClipping, ServerSideAdaptiveClipping):
        wrapper = cls(FedAvg(), noise_multiplier=0.0, num_sampled_clients=10, initial_clipping_norm=0.1)
        current = np.zeros(4, np.float32)
        for server_round in range(1, 21):
            _prime(wrapper, server_round, ArrayRecord({VECTOR: Array(current)}), 10)
            updates = [current + np.float32(s) * np.array([1, 0, 0, 0], np.float32) for s in np.linspace(0.5, 1.5, 10)]
            wrapper.aggregate_train(server_round, component_replies(updates, [1] * 10))
        norms[cls] = wrapper.clipping_norm
    # The update norms' median is 1.0: Flower's rule drives the norm away from it, ours towards it.
    assert norms[DifferentialPrivacyServerSideAdaptiveClipping] < 0.05
    assert 0.5 < norms[ServerSideAdaptiveClipping] <= 1.5


def test_a_defence_composes_with_any_strategy_and_dp_wraps_both(tmp_path):
    run, summary = run_in(tmp_path, "composed", f"strategy.name={FLWR}FedAdam", "strategy.args.eta=0.05",
                          "defense.name=median", "dp.name=server-fixed", "dp.noise_multiplier=0.1")
    instance = build_strategy(run, NodeRegistry(run)).make()
    assert isinstance(instance, DifferentialPrivacyServerSideFixedClipping)
    assert isinstance(instance.strategy, DefendedStrategy) and isinstance(instance.strategy.strategy, FedAdam)
    assert summary["strategy.composition"] == ("DP clip (server, fixed, per component) -> median -> "
                                               "FedAdam per component -> DP noise (DifferentialPrivacyServerSideFixedClipping)")
    assert summary["status"] == "completed"
    assert summary["dp"]["epsilon"] is None and "robust rule" in summary["dp"]["reason"]
    # A defence in front of a server optimiser, without DP.
    _, plain = run_in(tmp_path, "krum-adam", f"strategy.name={FLWR}FedAdam", "defense.name=krum")
    assert plain["strategy.composition"] == "krum -> FedAdam per component" and plain["status"] == "completed"


def test_a_dp_run_resumed_after_a_cut_ends_where_the_full_run_does(tmp_path):
    args = ["dp.name=server-adaptive", "dp.noise_multiplier=0.3", "dp.clipped_count_stddev=1.0", "rounds=3"]
    _, full_summary = run_in(tmp_path, "full", *args)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for stale in cut.glob("checkpoints/round-0003.*"):
        stale.unlink()
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (cut / "summary.json").unlink()
    resumed = load_config(overrides=[*FAST, f"out={cut}", *args, "resume=true"])
    summary = run_federation(LocalGrid(make_client_app(resumed), 3), resumed)
    full, again = checkpoint(tmp_path, "full", 3), load_file(str(cut / "checkpoints" / "round-0003.safetensors"))
    assert all(np.array_equal(full[k], again[k]) for k in full)  # same noise, same clipping norms
    assert summary["dp"]["epsilon"] == pytest.approx(full_summary["dp"]["epsilon"])


@pytest.mark.parametrize("extra, message", [
    (["dp.name=laplace"], "dp.name"),
    (["dp.name=server-fixed", "dp.clipping_norm=0"], "dp.clipping_norm"),
    (["dp.name=server-adaptive", "dp.noise_multiplier=5"], "clipped_count_stddev"),
    (["dp.delta=1"], "dp.delta"),
])
def test_bad_dp_settings_stop_before_any_work(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        run = load_config(overrides=[*FAST, f"out={tmp_path / 'x'}", *extra])
        build_strategy(run, NodeRegistry(run))


@pytest.mark.parametrize("bit,kept", [(0.0, True), (1.0, True), (None, False), (0.5, False), (2.0, False)])
def test_adaptive_clipping_needs_a_0_1_norm_bit_per_component(bit, kept):
    from fedmm.core import protocol
    from fedmm.core.protocol import ClientUpdate
    from strategies.per_component import check_client_clipping

    sent = {"c": np.zeros(4, np.float32)}
    metrics = {} if bit is None else {f"{protocol.NORM_BIT_PREFIX}c": bit}
    update = ClientUpdate(1, {"c": np.full(4, 0.1, np.float32)}, 10, {"c": 10.0}, metrics)  # norm 0.2, within 1.0
    ok, rejected = check_client_clipping([update], sent, {"c": 1.0}, need_norm_bits=True)
    assert (ok == [update]) is kept
    if not kept:
        assert rejected[0][1] == "unclipped" and "norm-bit.c" in rejected[0][2]
    # Fixed clipping needs no bit.
    assert check_client_clipping([update], sent, {"c": 1.0}, need_norm_bits=False)[0] == [update]
