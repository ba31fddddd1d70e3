"""TrustScoring around fedmm's and Flower's strategies, on an in-process grid: decisions, reports,
bad inputs, reputation across a restart, and a model attack forged by the simulated adversary."""

import json

import pytest
from flwr.app import Array, Message
from local_grid import LocalGrid, with_nan

from client_apps.app import make_client_app
from fedmm.core import protocol
from fedmm.core.config import load_config
from server_app.runner import build_strategy, run_federation
from strategies import NodeRegistry
from strategies.trust_scoring import TrustScoring

FAST = ["clients.num=6", "data.examples_per_task=480", "model.image_encoder=", "model.text_encoder=", "model.hidden_size=32", "model.intermediate_size=64",
        "model.fusion_dim=16", "rounds=2", "train.local_steps=3", "train.batch_size=8", "defense.name=trust",
        "defense.behaviour=false"]  # the statistical stages; the behaviour check: test_behaviour.py and below
ONE_PROFILE = ["clients.profiles.all=img_shape"]


def fast_run(tmp_path, *extra):
    return load_config(overrides=[*FAST, f"out={tmp_path / 'out'}", *extra])


def rounds(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "trust" in r]


def _scale(factor):
    def tamper(reply: Message) -> Message:
        record = reply.content[protocol.ARRAYS]
        for key in list(record.keys()):
            record[key] = Array(record[key].numpy() * factor)
        return reply
    return tamper


@pytest.mark.slow
def test_every_client_round_is_reported_and_a_blown_up_update_is_left_out(tmp_path):
    run = fast_run(tmp_path, "defense.behaviour=true", "defense.behaviour_examples=8")
    grid = LocalGrid(make_client_app(run), 6, tamper={4: _scale(1e4)})
    summary = run_federation(grid, run)
    for record in rounds(tmp_path / "out"):
        assert set(record["trust"]) == {str(p) for p in range(6)}
        entry = record["trust"]["4"]
        assert entry["decision"].startswith("absurd-norm")
        scored = record["trust"]["0"]
        assert scored["category"] in ("trusted", "suspicious", "rejected")
        assert 0 <= scored["trust"] <= 1 and scored["reputation"] >= 0
        assert any(k.endswith(".direction") for k in scored["indicators"])
        # the behaviour check read client 0's model (profile image: the image modality)
        assert set(scored["behaviour"]) == {"image"} and 0 <= scored["behaviour"]["image"] <= 1
        assert record["train.trust.behaviour_seconds_per_client"] > 0
    assert (tmp_path / "out" / "trust.png").is_file()
    assert summary["detection.client_rounds_flagged"] >= 2


def test_bad_inputs_never_stop_a_round(tmp_path):
    run = fast_run(tmp_path)
    grid = LocalGrid(make_client_app(run), 6)

    def unchanged(reply):  # send back exactly what was received: an all-zero update
        received = grid.sent[-1].content[protocol.ARRAYS]
        for k in reply.content[protocol.ARRAYS].keys():
            reply.content[protocol.ARRAYS][k] = Array(received[k].numpy().copy())
        return reply

    grid.tamper = {1: with_nan, 3: unchanged}
    run_federation(grid, run)
    for record in rounds(tmp_path / "out"):
        assert record["train.clients-accepted"] >= 1
        assert record["trust"]["1"]["decision"].startswith("non-finite")
        assert record["trust"]["3"]["decision"].startswith("zero-update")


def test_duplicate_updates_are_left_out(tmp_path):
    run = fast_run(tmp_path, *ONE_PROFILE)
    first: dict = {}

    def remember(reply):
        first["arrays"] = {k: reply.content[protocol.ARRAYS][k].numpy().copy()
                           for k in reply.content[protocol.ARRAYS].keys()}
        return reply

    def copy(reply):
        for k, v in first["arrays"].items():
            reply.content[protocol.ARRAYS][k] = Array(v)
        return reply

    run_federation(LocalGrid(make_client_app(run), 6, tamper={0: remember, 1: copy}), run)
    for record in rounds(tmp_path / "out"):
        assert record["trust"]["0"]["decision"].startswith("duplicate")
        assert record["trust"]["1"]["decision"].startswith("duplicate")


def test_trust_scoring_wraps_a_plain_flower_strategy(tmp_path):
    run = fast_run(tmp_path, "strategy.name=flwr.serverapp.strategy.FedAvg")  # on the mismatched profiles
    strategy = build_strategy(run, NodeRegistry(run))
    assert isinstance(strategy, TrustScoring) and strategy.inner.name == "FedAvg"
    summary = run_federation(LocalGrid(make_client_app(run), 6, tamper={2: _scale(1e4)}), run)
    assert summary["status"] == "completed"
    assert all(r["trust"]["2"]["decision"].startswith("absurd-norm") for r in rounds(tmp_path / "out"))


def test_reputation_survives_a_server_restart(tmp_path):
    run = fast_run(tmp_path)
    run_federation(LocalGrid(make_client_app(run), 6), run)
    saved = tmp_path / "out" / "checkpoints" / "round-0002.trust.json"
    restarted = build_strategy(run, NodeRegistry(run))
    restarted.load_state(saved)
    stored = json.loads(saved.read_text())["reputation"]
    assert restarted.reputation.to_json() == stored
    assert sum(restarted.reputation.participations.values()) == 12  # 6 clients x 2 rounds
    saved.write_text('{"reputation": {"points": {"1": "many"}}}')
    with pytest.raises(ValueError, match="round-0002.trust.json"):
        restarted.load_state(saved)


def test_a_backdoor_run_reports_its_success_rate_and_detection(tmp_path):
    run = fast_run(tmp_path, "attack.name=backdoor", "attack.fraction=0.34")
    summary = run_federation(LocalGrid(make_client_app(run), 6), run)
    per_task = [summary[f"final.backdoor.{task}.success_rate"] for task in ("img_shape", "txt_color", "vqa")]
    assert min(per_task) <= summary["final.attack.success_rate"] <= max(per_task)  # pooled over the tasks
    # Detection is scored from the per-round decisions the trust report holds, against the drawn attackers.
    malicious = set(summary["attack.malicious_clients"])
    decisions = [(int(c), e["decision"] != "aggregated") for r in rounds(tmp_path / "out") for c, e in r["trust"].items()]
    flagged = [c for c, dropped in decisions if dropped]
    assert summary["detection.client_rounds_malicious"] == 4 == sum(c in malicious for c, _ in decisions)
    assert summary["detection.client_rounds_flagged"] == len(flagged)
    hits = sum(c in malicious for c in flagged)
    assert summary["detection.recall"] == hits / 4
    assert summary["detection.precision"] == (hits / len(flagged) if flagged else None)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])  # seed 1 measured too: 0.004 / 0.665
def test_on_the_shipped_base_a_backdoor_sends_triggered_inputs_to_the_target_and_clean_training_does_not(
        tmp_path, seed):
    # The shipped pretrained base (no encoder override), 6 clients, 2 of them poisoning every example.
    base = ["clients.num=6", "data.examples_per_task=480", "rounds=2", "train.local_steps=20",
            "attack.name=backdoor", "attack.fraction=0.34", "attack.poison_fraction=1.0", f"seed={seed}"]
    rates = {}
    for data in ("none", "auto"):  # none: nobody poisons, the trigger is still measured (its base rate)
        run = load_config(overrides=[*base, f"attack.data={data}", f"out={tmp_path / data}"])
        rates[data] = run_federation(LocalGrid(make_client_app(run), 6), run)["final.attack.success_rate"]
    # Measured: base rate 0.041 / 0.004, poisoned 0.701 / 0.665 (seeds 0 / 1).
    assert rates["none"] <= 0.1 and rates["auto"] >= 0.5, rates


def test_clip_to_median_scales_the_kept_updates_above_the_median_norm():
    import time

    import numpy as np
    from flwr.app import Metadata

    from fedmm.robustness.trust import ComponentUpdates, RoundDecision
    from strategies.trust_scoring import clip_to_median

    sent = {"c": np.ones(4, np.float32)}
    deltas = [np.full(4, s, np.float32) for s in (1.0, 2.0, 3.0, 10.0)]
    replies = []
    for node, delta in enumerate(deltas, start=1):
        content = protocol.train_reply_content({"c": sent["c"] + delta}, 10, {"c": 10}, {})
        metadata = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="m",
                            group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
        replies.append(Message(metadata=metadata, content=content))
    trained = [sent["c"] + d for d in deltas]
    components = {"c": ComponentUpdates([0, 1, 2, 3], trained, sent["c"])}
    decision = RoundDecision([1, 2, 3], {}, {}, {}, {}, {}, norms={"c": np.linalg.norm(np.stack(deltas), axis=1)})
    kept = replies[1:]  # client 0 was dropped: the median is over the kept clients 1-3 (norm of 3.0)
    assert clip_to_median(kept, components, decision, {p: p + 1 for p in range(4)}, sent) == 1
    received = [r.content[protocol.ARRAYS]["c"].numpy() - sent["c"] for r in replies]
    np.testing.assert_allclose(received[3], deltas[2])  # 10 -> 3
    for i in range(3):
        np.testing.assert_allclose(received[i], deltas[i])  # at or below the median, or dropped: untouched


@pytest.mark.slow
def test_a_large_cohort_is_sampled_by_the_behaviour_check_and_kept_updates_clipped(tmp_path):
    run = fast_run(tmp_path, "defense.behaviour=true", "defense.behaviour_examples=8",
                   "defense.behaviour_max_clients=5", "defense.clip_to_median=true")
    summary = run_federation(LocalGrid(make_client_app(run), 6), run)
    assert summary["status"] == "completed"
    for record in rounds(tmp_path / "out"):
        read = [p for p, e in record["trust"].items() if e.get("behaviour") is not None]
        assert len(read) == 5  # of the 6 clients (none held out by strikes: the six are honest)
        assert record["train.trust.clipped"] >= 1  # some kept update is above the kept median


def test_the_defence_reads_updates_from_the_reply_buffers_without_a_copy():
    import numpy as np

    from fedmm.core.protocol import ClientUpdate
    from strategies.trust_scoring import reply_updates

    sent = {"c": np.ones(3, np.float32), "d": np.zeros(2, np.float32)}
    updates = {p: ClientUpdate(p + 1, {"c": np.full(3, p, np.float32)}, 1, {"c": 1.0}) for p in (2, 0, 1)}
    updates[1].arrays["d"] = np.ones(2, np.float32)
    components = reply_updates(updates, sent)
    assert components["c"].client_ids == [0, 1, 2] and components["d"].client_ids == [1]
    for i, p in enumerate([0, 1, 2]):
        assert np.shares_memory(components["c"].rows[i], updates[p].arrays["c"])
        np.testing.assert_array_equal(components["c"].delta(i), np.full(3, p - 1.0))


def test_root_finetune_moves_the_aggregate_by_the_servers_root_update(tmp_path):
    import numpy as np
    from flwr.app import ArrayRecord

    run = fast_run(tmp_path, "defense.root_finetune_steps=3")
    strategy = build_strategy(run, NodeRegistry(run))
    assert strategy.finetune is not None
    # The step itself, with a stand-in root update: +1 on one component, the others as aggregated.
    seen = {}

    def plus_one(vectors, server_round):
        seen.update(vectors)
        return {"fusion.shared": np.ones_like(vectors["fusion.shared"])}

    strategy.finetune = plus_one
    strategy._vectors = {"fusion.shared": np.zeros(3, np.float32), "head.vqa": np.zeros(2, np.float32)}
    aggregated = protocol.to_array_record({"fusion.shared": np.full(3, 2.0, np.float32),
                                           "head.vqa": np.full(2, 5.0, np.float32)})
    out = strategy._finetuned(aggregated, 1)
    assert isinstance(out, ArrayRecord)
    np.testing.assert_array_equal(out["fusion.shared"].numpy(), np.full(3, 3.0))  # aggregate + update
    np.testing.assert_array_equal(out["head.vqa"].numpy(), np.full(2, 5.0))
    np.testing.assert_array_equal(seen["fusion.shared"], np.full(3, 2.0))  # it trains the aggregate, not the sent
    # And the real one, inside a run.
    summary = run_federation(LocalGrid(make_client_app(run), 6), run)
    assert summary["status"] == "completed"
