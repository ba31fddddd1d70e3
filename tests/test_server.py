"""The server loop and strategies on an in-process grid: bad replies, plain Flower strategies, sampling."""

import json

import numpy as np
import pytest
from flwr.app import Array, Error, Message, Metadata
from local_grid import LocalGrid, as_reply, with_nan as _nan
from safetensors.numpy import load_file

import fedmm.core.components
import fedmm.models.model
import server_app.runner
from client_apps.app import make_client_app
from fedmm.core import protocol
from fedmm.core.config import load_config
from fedmm.cli import main as cli_main
from fedmm.core.results import RunFailed
from fedmm.core.schema import ConfigError
from server_app.runner import build_strategy, run_federation
from strategies import ComponentFedAvg, NodeRegistry

FAST = ["clients.num=3", "data.examples_per_task=240", "model.image_encoder=", "model.text_encoder=", "model.hidden_size=32", "model.intermediate_size=64",
        "model.fusion_dim=16", "rounds=2", "train.local_steps=3", "train.batch_size=8"]


def fast_run(tmp_path, *extra):
    return load_config(overrides=[*FAST, f"out={tmp_path / 'out'}", *extra])


def records(out, final: bool = False):
    """Per-round records of metrics.jsonl (or, with final=True, only the final-stage record)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if ("stage" in r) == final]


def _wrong_shape(reply: Message) -> Message:
    record = reply.content[protocol.ARRAYS]
    key = next(iter(record.keys()))
    record[key] = Array(np.zeros(3, np.float32))
    return reply


def _extra_key(reply: Message) -> Message:
    reply.content[protocol.ARRAYS]["encoder.audio"] = Array(np.zeros(3, np.float32))
    return reply


def _zero_examples(reply: Message) -> Message:
    reply.content[protocol.METRICS][protocol.NUM_EXAMPLES] = 0
    return reply


def _error(reply: Message) -> Message:
    return Message(metadata=reply.metadata, error=Error(code=1, reason="out of memory"))


def _superlink_error(reply: Message) -> Message:
    """What the SuperLink sends back for a message whose node went away (its own node id, 1)."""
    m = reply.metadata
    metadata = Metadata(run_id=m.run_id, message_id=m.message_id, src_node_id=1, dst_node_id=m.dst_node_id,
                        reply_to_message_id=m.reply_to_message_id, group_id=m.group_id, created_at=m.created_at,
                        ttl=m.ttl, message_type=m.message_type)
    return Message(metadata=metadata, error=Error(code=3, reason="node unavailable"))


def _float64(reply: Message) -> Message:
    record = reply.content[protocol.ARRAYS]
    for key in list(record.keys()):
        record[key] = Array(record[key].numpy().astype(np.float64))
    return as_reply(reply, reply.content)


@pytest.mark.parametrize("tamper, kind", [(_nan, "non-finite"), (_wrong_shape, "bad-shape"),
                                          (_extra_key, "unexpected-key"), (_zero_examples, "bad-count"),
                                          (_error, "client-error"), (_float64, "bad-dtype"),
                                          (_superlink_error, "node-unavailable")])
def test_a_bad_reply_is_dropped_counted_and_the_round_goes_on(tmp_path, tamper, kind):
    run = fast_run(tmp_path)
    grid = LocalGrid(make_client_app(run), 3, tamper={2: tamper})  # partition 2: the multimodal client
    with pytest.raises(RunFailed, match="never changed: head.vqa"):  # its only holder never got through
        run_federation(grid, run)
    rounds = records(tmp_path / "out")
    for record in rounds[1:]:
        assert record["train.clients-accepted"] == 2
        assert record["train.clients-rejected"] == 1
        assert record[f"train.rejected.{kind}"] == 1
    last = load_file(str(tmp_path / "out" / "checkpoints" / "round-0002.safetensors"))
    first = load_file(str(tmp_path / "out" / "checkpoints" / "round-0000.safetensors"))
    assert all(np.isfinite(v).all() for v in last.values())
    # The image and text clients still moved their components; only the bad client's own
    # exclusive component (the vqa head) stayed where it was.
    assert not np.array_equal(first["heads.img_shape.weight"], last["heads.img_shape.weight"])
    assert np.array_equal(first["heads.vqa.weight"], last["heads.vqa.weight"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["clients_rejected_total"] == 2
    assert summary["status"] == "failed"
    assert summary["problems"] == ["components the run never changed: head.vqa"]


def test_a_run_whose_every_reply_is_rejected_fails_with_its_reason(tmp_path):
    run = fast_run(tmp_path)
    grid = LocalGrid(make_client_app(run), 3, tamper={p: _nan for p in range(3)})
    with pytest.raises(RunFailed):
        run_federation(grid, run)
    for record in records(tmp_path / "out")[1:]:
        assert (record["train.clients-usable"], record["train.rejected.non-finite"]) == (0, 3)
        assert record["train.components-changed"] == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["problems"][:2] == [
        f"round {r}: 0 usable replies, fewer than strategy.min_train_nodes=2 (3 sampled, 3 rejected: "
        "non-finite 3, 0 missing)" for r in (1, 2)]
    assert summary["problems"][2].startswith("components the run never changed: encoder.image, encoder.text")
    assert (tmp_path / "out" / "checkpoints" / "round-0002.safetensors").is_file()  # everything still written


def test_allow_degraded_records_the_problems_and_completes(tmp_path):
    run = fast_run(tmp_path, "strategy.allow_degraded=true")
    summary = run_federation(LocalGrid(make_client_app(run), 3, tamper={p: _nan for p in range(3)}), run)
    assert summary["status"] == "completed"
    assert len(summary["problems"]) == 3


def test_a_robust_rule_that_declines_a_component_every_round_fails_the_run(tmp_path):
    # Every client flips its update's sign, so FLTrust's ReLU(cos) with the server's own update is
    # zero for whole components, and the rule keeps them as they were.
    run = fast_run(tmp_path, "attack.name=sign_flip", "attack.fraction=0.9", "defense.name=fltrust",
                   "defense.root_examples=40")
    with pytest.raises(RunFailed):
        run_federation(LocalGrid(make_client_app(run), 3), run)
    declined = [r["train.components-declined"] for r in records(tmp_path / "out")[1:]]
    assert all(d >= 1 for d in declined)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["problems"] == [f"components the run never changed: head.img_shape; the robust rule declined "
                                   f"{sum(declined)} component-rounds"]


def test_fedmm_simulate_exits_non_zero_when_the_run_fails(tmp_path, monkeypatch, capsys):
    def simulate_in_process(run, ray_address=""):
        run_federation(LocalGrid(make_client_app(run), 3, tamper={p: _nan for p in range(3)}), run)

    monkeypatch.setattr("fedmm.cli.simulate", simulate_in_process)
    assert cli_main(["simulate", "--out", str(tmp_path / "out"), *FAST]) == 3
    assert "0 usable replies" in capsys.readouterr().err


def test_clients_receive_only_their_components(tmp_path):
    run = fast_run(tmp_path, "rounds=1")
    grid = LocalGrid(make_client_app(run), 3)
    run_federation(grid, run)
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    held = {grid.partition_of[m.metadata.dst_node_id]: set(m.content[protocol.ARRAYS].keys()) for m in train}
    assert held == {
        0: {"encoder.image", "fusion.shared", "head.img_shape"},
        1: {"encoder.text", "fusion.shared", "head.txt_color"},
        2: {"encoder.image", "encoder.text", "fusion.shared", "head.vqa", "head.img_shape", "head.txt_color"},
    }


def test_the_base_model_loads_once_per_process(tmp_path, monkeypatch):
    calls = []
    real = fedmm.models.model.load_base_encoder

    def counting(modality, cfg, seed):
        calls.append(modality)
        return real(modality, cfg, seed)

    monkeypatch.setattr(fedmm.models.model, "load_base_encoder", counting)
    run = fast_run(tmp_path, "seed=11", "rounds=3")  # a seed no other test used: a fresh bank
    run_federation(LocalGrid(make_client_app(run), 3), run)
    # Server and clients share this process here: 3 rounds x 3 clients x (train + evaluate) messages.
    assert sorted(calls) == ["image", "text"]


def test_sampling_is_seeded_by_partition_not_node_id(tmp_path):
    run = fast_run(tmp_path, "clients.num=10", "strategy.fraction_train=0.3", "strategy.min_train_nodes=2")
    grid = LocalGrid(make_client_app(run), 10)
    registry = NodeRegistry(run)
    registry.discover(grid)
    picks = [tuple(n.partition_id for n in registry.sample(0.3, 2, r)) for r in (1, 1, 2)]
    assert picks[0] == picks[1] and len(picks[0]) == 3
    assert picks[0] != picks[2]
    strategy = build_strategy(run, registry)
    assert isinstance(strategy, ComponentFedAvg)


def test_a_node_claiming_a_taken_partition_is_left_out(tmp_path):
    run = fast_run(tmp_path)
    grid = LocalGrid(make_client_app(run), 3)
    twin = next(n for n, p in grid.partition_of.items() if p == 1)
    grid.partition_of[twin + 1] = 1  # a second node started with partition-id 1
    grid.contexts[twin + 1] = grid.contexts[twin]
    registry = NodeRegistry(run)
    registry.discover(grid)
    assert sorted(n.partition_id for n in registry.nodes()) == [0, 1, 2]
    assert list(registry.refused.values()) == ["partition id 1 is already taken by another node"]


def _record_batches(grid: LocalGrid) -> list[int]:
    """The sizes of the grid's sends, as they happen."""
    batches, send = [], grid.send_and_receive

    def recording(messages, *, timeout=None):
        messages = list(messages)
        batches.append(len(messages))
        return send(messages, timeout=timeout)

    grid.send_and_receive = recording
    return batches


def test_discovery_asks_in_batches_and_registers_every_node(tmp_path, monkeypatch):
    monkeypatch.setattr("strategies.nodes.MESSAGE_BATCH", 3)
    run = fast_run(tmp_path, "clients.num=7", "data.examples_per_client=20")
    grid = LocalGrid(make_client_app(run), 7)
    twin = max(grid.partition_of) + 1  # a late node claiming partition 0, in the last batch
    grid.partition_of[twin], grid.contexts[twin] = 0, grid.contexts[min(grid.partition_of)]
    batches = _record_batches(grid)
    registry = NodeRegistry(run)
    registry.discover(grid)
    assert batches == [3, 3, 2]  # every node asked once
    assert sorted(n.partition_id for n in registry.nodes()) == list(range(7))
    assert twin not in registry.order()
    # Nodes with the same profile share one components tuple: the registry holds ids and small metadata.
    by_profile = {}
    for node in registry.nodes():
        assert by_profile.setdefault(node.profile, node.components) is node.components


def test_every_send_goes_in_batches_and_the_run_is_the_same(tmp_path, monkeypatch):
    whole = run_federation(LocalGrid(make_client_app(fast_run(tmp_path / "a")), 3), fast_run(tmp_path / "a"))
    monkeypatch.setattr("strategies.nodes.MESSAGE_BATCH", 2)
    run = fast_run(tmp_path / "b")
    grid = LocalGrid(make_client_app(run), 3)
    batches = _record_batches(grid)
    batched = run_federation(grid, run)
    assert max(batches) == 2 and len(grid.sent) == sum(batches)
    accuracies = [k for k in whole if k.endswith(".accuracy")]
    assert accuracies and all(whole[k] == batched[k] for k in accuracies)


def test_an_offline_node_is_not_sampled_and_a_restarted_one_takes_its_partition_back(tmp_path):
    run = fast_run(tmp_path, "clients.num=4", "data.examples_per_client=20")
    grid = LocalGrid(make_client_app(run), 4)
    registry = NodeRegistry(run)
    registry.refresh(grid)  # the first refresh waits for the nodes and asks them all
    dead = next(n for n, p in grid.partition_of.items() if p == 2)
    context = grid.contexts[dead]
    del grid.partition_of[dead]  # its heartbeats lapsed: the SuperLink no longer lists it
    registry.refresh(grid)
    assert [n.partition_id for n in registry.sample(1.0, 1, server_round=1)] == [0, 1, 3]
    grid.partition_of[dead + 1], grid.contexts[dead + 1] = 2, context  # restarted, with a new node id
    registry.refresh(grid)
    assert [n.partition_id for n in registry.sample(1.0, 1, server_round=2)] == [0, 1, 2, 3]
    assert registry.info(dead + 1).partition_id == 2 and dead not in registry.order()


def _lying_evaluation(reply: Message) -> Message:
    metrics = reply.content[protocol.METRICS]
    task = next(k for k in metrics.keys() if k.startswith("count.")).split(".", 1)[1]
    metrics[f"count.{task}"] = 10**12
    metrics[f"correct.{task}"] = 10**12
    return reply


def test_bad_evaluation_replies_are_dropped(tmp_path):
    run = fast_run(tmp_path, "rounds=1")
    grid = LocalGrid(make_client_app(run), 3)
    grid.tamper_evaluate = {0: _lying_evaluation}
    run_federation(grid, run)
    rounds = records(tmp_path / "out")
    assert all(r["evaluate.clients-dropped"] == 1 for r in rounds)
    assert all(r["global.img_shape.accuracy"] < 0.9 for r in rounds)


def test_a_rerun_into_the_same_folder_never_keeps_old_results(tmp_path):
    run = fast_run(tmp_path, "rounds=1")
    run_federation(LocalGrid(make_client_app(run), 3), run)
    assert (tmp_path / "out" / "summary.json").exists()
    bad = fast_run(tmp_path, "rounds=1", "strategy.name=flwr.serverapp.strategy.FedAdam", "strategy.args.eta=fast")
    with pytest.raises(ConfigError):
        run_federation(LocalGrid(make_client_app(bad), 3), bad)
    assert (tmp_path / "out" / "summary.json").exists()  # refused before touching the folder
    again = fast_run(tmp_path, "rounds=1", "seed=5")
    from fedmm.core.results import RunResults

    RunResults(again.out, again)
    assert not (tmp_path / "out" / "summary.json").exists()
    assert not list((tmp_path / "out" / "checkpoints").glob("*.safetensors"))


# Expert-wise aggregation, by hand: partition -> {expert: (value every entry is set to, image / text tokens)}.
_EXPERT_REPLIES = {
    0: {0: (1.0, {"image": 10}), 1: (11.0, {"image": 30})},
    1: {1: (12.0, {"text": 20})},
    2: {0: (3.0, {"image": 5, "text": 5}), 1: (13.0, {"text": 40}), 2: (23.0, {"image": 7})},
}


def _set_experts(partition):
    def tamper(reply: Message) -> Message:
        record, metrics = reply.content[protocol.ARRAYS], reply.content[protocol.METRICS]
        for key in [k for k in record.keys() if k.startswith("fusion.expert.")]:
            size = record[key].numpy().size
            del record[key]
            expert = int(key.rsplit(".", 1)[1])
            if expert in _EXPERT_REPLIES[partition]:
                record[key] = Array(np.full(size, _EXPERT_REPLIES[partition][expert][0], np.float32))
        for key in [k for k in metrics.keys() if k.startswith(protocol.ROUTED_PREFIX)]:
            del metrics[key]
        for expert, (_, tokens) in _EXPERT_REPLIES[partition].items():
            for modality, n in tokens.items():
                metrics[protocol.routed_key(modality, f"fusion.expert.0.{expert}")] = n
        return reply
    return tamper


def test_each_expert_is_averaged_over_its_users_by_routed_tokens(tmp_path):
    run = fast_run(tmp_path, "rounds=1", "moe.fusion_ffn=experts", "moe.num_experts=4")
    grid = LocalGrid(make_client_app(run), 3, tamper={p: _set_experts(p) for p in range(3)})
    run_federation(grid, run)
    before = load_file(str(tmp_path / "out" / "checkpoints" / "round-0000.safetensors"))
    after = load_file(str(tmp_path / "out" / "checkpoints" / "round-0001.safetensors"))
    expected = {0: (10 * 1.0 + 10 * 3.0) / 20, 1: (30 * 11.0 + 20 * 12.0 + 40 * 13.0) / 90, 2: 23.0}
    names = [k for k in after if ".experts." in k]
    assert names
    for name in names:
        expert = int(name.split(".experts.")[1].split(".")[0])
        if expert == 3:  # no client used it: it keeps its value
            np.testing.assert_array_equal(after[name], before[name])
        else:
            np.testing.assert_allclose(after[name], expected[expert], rtol=1e-6)
    record = records(tmp_path / "out")[1]
    assert record["train.moe.experts-sent-fraction"] == pytest.approx((2 / 4 + 1 / 4 + 3 / 4) / 3)
    assert record["train.moe.utilisation.image.fusion.expert.0.0"] == pytest.approx(15 / (15 + 30 + 7))
    assert record["train.moe.routed.text.fusion.expert.0.1"] == 60
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["moe.experts_sent_fraction"] == pytest.approx(0.5)
    assert (tmp_path / "out" / "experts.png").is_file()


def test_a_client_sends_only_the_experts_it_routed_tokens_to(tmp_path, monkeypatch):
    run = fast_run(tmp_path, "rounds=1", "moe.fusion_ffn=experts", "moe.num_experts=4")
    real = server_app.runner.initial_global_vectors

    def router_never_picks_expert_3(run):
        vectors = real(run)
        layout = fedmm.models.model.trainable_layouts(fedmm.models.model.server_model(run))["fusion.router.0"]
        router = fedmm.core.components.unflatten(layout, vectors["fusion.router.0"].copy())
        next(v for k, v in router.items() if k.endswith("modality_bias"))[:, 3] = -1e4
        vectors["fusion.router.0"] = fedmm.core.components.flatten(layout, router)
        return vectors

    monkeypatch.setattr(server_app.runner, "initial_global_vectors", router_never_picks_expert_3)
    replies = {}

    def keep(partition):
        def tamper(reply):
            replies[partition] = reply
            return reply
        return tamper

    grid = LocalGrid(make_client_app(run), 3, tamper={p: keep(p) for p in range(3)})
    run_federation(grid, run)
    assert len(replies) == 3
    for reply in replies.values():
        sent = {k for k in reply.content[protocol.ARRAYS].keys() if k.startswith("fusion.expert.")}
        routed = {k.split(".", 2)[2] for k in reply.content[protocol.METRICS].keys() if k.startswith("routed.")}
        assert sent == routed and sent and "fusion.expert.0.3" not in sent
    assert records(tmp_path / "out")[1]["train.clients-accepted"] == 3


class KilledGrid(LocalGrid):
    """A grid whose server dies when it starts training round `kill_at` (nothing of that round is saved)."""

    def __init__(self, *args, kill_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kill_at = kill_at

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == "train"
               and int(m.content[protocol.CONFIG][protocol.SERVER_ROUND]) == self.kill_at for m in messages):
            raise KeyboardInterrupt("server killed")
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("extra", [[], pytest.param(["defense.name=trust", "attack.name=neurotoxin", "attack.fraction=0.34",
                                   "defense.behaviour_examples=8"], marks=pytest.mark.slow)])  # the check runs and resumes; 8 keep it quicker
def test_a_killed_server_resumes_to_the_same_final_model(tmp_path, extra):
    whole = fast_run(tmp_path / "whole", "rounds=4", *extra)
    run_federation(LocalGrid(make_client_app(whole), 3), whole)
    cut = fast_run(tmp_path / "cut", "rounds=4", *extra)
    with pytest.raises(KeyboardInterrupt):
        run_federation(KilledGrid(make_client_app(cut), 3, kill_at=3), cut)
    assert len(records(tmp_path / "cut" / "out")) == 3  # rounds 0 to 2
    resumed = fast_run(tmp_path / "cut", "rounds=4", "resume=true", *extra)
    run_federation(LocalGrid(make_client_app(resumed), 3), resumed)
    final_whole = load_file(str(tmp_path / "whole" / "out" / "checkpoints" / "round-0004.safetensors"))
    final_resumed = load_file(str(tmp_path / "cut" / "out" / "checkpoints" / "round-0004.safetensors"))
    assert final_whole.keys() == final_resumed.keys()
    for key in final_whole:
        np.testing.assert_array_equal(final_whole[key], final_resumed[key])
    assert [r["round"] for r in records(tmp_path / "cut" / "out")] == [0, 1, 2, 3, 4]
    s_whole = json.loads((tmp_path / "whole" / "out" / "summary.json").read_text())
    s_resumed = json.loads((tmp_path / "cut" / "out" / "summary.json").read_text())
    assert s_resumed["bytes.uplink_client_rounds"] == s_whole["bytes.uplink_client_rounds"] == 12


def test_resume_refuses_a_different_config(tmp_path):
    run = fast_run(tmp_path, "rounds=1")
    run_federation(LocalGrid(make_client_app(run), 3), run)
    changed = fast_run(tmp_path, "rounds=1", "resume=true", "train.lr=0.1")
    with pytest.raises(ConfigError, match="train.lr"):
        run_federation(LocalGrid(make_client_app(changed), 3), changed)
    assert (tmp_path / "out" / "checkpoints" / "round-0001.safetensors").is_file()  # nothing lost
