"""Clients of different LoRA ranks in one federation: real rank-r adapters on the client, the exact
sum of their products on the server (fedmm.core.lora_ranks)."""

import json
import math

import numpy as np
import pytest
from local_grid import LocalGrid
from safetensors.numpy import load_file

from client_apps.app import make_client_app
from fedmm.core import protocol
from fedmm.core.config import load_config
from fedmm.core.lora_ranks import lora_pairs
from fedmm.core.schema import ConfigError
from fedmm.models.model import rank_layouts, server_model, trainable_layouts
from fedmm.training.client import ClientIdentity, _Session, identify
from server_app.replies import widen_low_rank
from server_app.runner import build_strategy, run_federation
from strategies import NodeRegistry

FAST = ["clients.num=3", "data.examples_per_task=240", "model.image_encoder=", "model.text_encoder=",
        "model.hidden_size=32", "model.intermediate_size=64", "model.fusion_dim=16", "rounds=2",
        "train.local_steps=3", "train.batch_size=8", "clients.lora_ranks=2,4"]


def fast_run(tmp_path, *extra):
    return load_config(overrides=[*FAST, f"out={tmp_path / 'out'}", *extra])


def test_each_client_builds_adapters_of_its_own_rank(tmp_path):
    run = fast_run(tmp_path)
    assert [identify(run, {"partition-id": p}).lora_rank for p in range(3)] == [2, 4, 2]
    assert identify(run, {"partition-id": 1, "lora-r": 8}).lora_rank == 8  # node config wins (deployment)
    with pytest.raises(ValueError, match="lora-r=16"):
        identify(run, {"partition-id": 1, "lora-r": 16})
    session = _Session(run, ClientIdentity(0, "image", ("img_shape",), "", 2))
    shapes = {n: tuple(p.shape) for n, p in session.model.named_parameters() if "lora_" in n}
    assert shapes and all(2 in s for s in shapes.values())


@pytest.mark.parametrize("method", ["qr", "dense_svd"])
def test_the_global_adapter_is_the_exact_sum_of_the_clients_products(tmp_path, method):
    run = fast_run(tmp_path, f"strategy.lora_aggregation={method}")
    replies = {}

    sizes = []

    def spy(partition):
        def keep(reply):
            replies.setdefault(partition, []).append(reply)
            sizes.append((partition, reply.content[protocol.ARRAYS]["encoder.image"].numpy().size
                          if "encoder.image" in reply.content[protocol.ARRAYS] else None))
            return reply
        return keep

    run_federation(LocalGrid(make_client_app(run), 3, tamper={p: spy(p) for p in range(3)}), run)
    layout = trainable_layouts(server_model(run))["encoder.image"]
    low = rank_layouts(run, 2)["encoder.image"]
    assert low.size < layout.size and {n for p, n in sizes if p in (0, 2)} == {low.size}  # rank-2 factors travel
    pair = lora_pairs(layout)[0]
    name_at = dict(zip(layout.offsets, layout.names))
    a_name, b_name = name_at[pair.a.start], name_at[pair.b.start]
    total, weight_sum = 0.0, 0.0
    for partition, rank in [(0, 2), (2, 2)]:  # the image encoder's holders, both of rank 2
        reply = replies[partition][-1]  # round 2, as the server widened it
        update = protocol.validate_train_reply(reply, {c: (lay.size,) for c, lay in trainable_layouts(
            server_model(run)).items() if c in reply.content[protocol.ARRAYS]}, list(reply.content[protocol.ARRAYS].keys()))
        v = update.arrays["encoder.image"]
        a, b = v[pair.a].reshape(pair.a_shape), v[pair.b].reshape(pair.b_shape)
        assert not a[rank:].any() and not b[:, rank:].any() and b[:, :rank].any()  # rank 2, zero-padded
        w = update.component_weights["encoder.image"]
        total, weight_sum = total + w * b @ a, weight_sum + w
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train.clients-accepted" in r]
    assert trained and all(r["train.rank.2.clients"] == 2 and r["train.rank.4.clients"] == 1 for r in trained)
    assert all(np.isfinite(r["train.rank.4.train-loss"]) for r in trained)
    final = load_file(str(tmp_path / "out" / "checkpoints" / "round-0002.safetensors"))
    assert final[a_name].shape == pair.a_shape and math.prod(pair.a_shape) > 0
    np.testing.assert_allclose(final[b_name] @ final[a_name], total / weight_sum, atol=1e-6)


def test_lora_aggregation_is_refused_where_it_would_be_ignored(tmp_path):
    run = fast_run(tmp_path, "strategy.lora_aggregation=qr", "defense.name=median")
    with pytest.raises(ConfigError, match="strategy.lora_aggregation"):
        build_strategy(run, NodeRegistry(run))


def test_a_client_that_changes_rank_between_rounds_takes_the_leading_terms_of_the_same_global(tmp_path):
    """Partition 0 trains at rank 2 in round 1, then its node restarts with lora-r=4 (deployment)."""
    run = fast_run(tmp_path, "strategy.lora_aggregation=qr")
    grid = None
    arrays = []

    def restart_at_rank_4(reply):
        widen_low_rank([reply], run)
        arrays.append(protocol.decode_record(reply.content[protocol.ARRAYS])["encoder.image"].copy())
        node = next(n for n, p in grid.partition_of.items() if p == 0)
        grid.contexts[node].node_config["lora-r"] = 4
        return reply

    grid = LocalGrid(make_client_app(run), 3, tamper={0: restart_at_rank_4})
    run_federation(grid, run)
    pair = lora_pairs(trainable_layouts(server_model(run))["encoder.image"])[0]
    first, second = (v[pair.b].reshape(pair.b_shape) for v in arrays)
    assert first[:, :2].any() and not first[:, 2:].any()
    assert second[:, 2:4].any() and not second[:, 4:].any()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train.clients-accepted" in r]
    assert [r.get("train.rank.4.clients") for r in trained] == [1, 2]


def test_a_low_rank_reply_is_widened_and_a_misfit_one_left_for_validation_to_reject(tmp_path):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # what a grid sets
    run = fast_run(tmp_path)
    low, full = rank_layouts(run, 2)["encoder.image"], rank_layouts(run, 8)["encoder.image"]
    vector = np.random.default_rng(0).standard_normal(low.size).astype(np.float32)

    def reply(size, rank):
        content = RecordDict({protocol.ARRAYS: ArrayRecord({"encoder.image": Array(vector[:size].copy())}),
                              protocol.METRICS: MetricRecord({protocol.LORA_RANK: rank})})
        return Message(content, dst_node_id=1, message_type="train")

    good, short, bogus = reply(low.size, 2.0), reply(low.size - 1, 2.0), reply(low.size, 2.5)
    widen_low_rank([good, short, bogus], run)
    widened = good.content[protocol.ARRAYS]["encoder.image"].numpy()
    assert widened.size == full.size
    pair_low, pair_full = lora_pairs(low)[0], lora_pairs(full)[0]
    delta = lambda v, p: v[p.b].reshape(p.b_shape) @ v[p.a].reshape(p.a_shape)  # noqa: E731
    np.testing.assert_allclose(delta(widened, pair_full) / 8, delta(vector, pair_low) / 2, rtol=1e-5, atol=1e-7)
    assert short.content[protocol.ARRAYS]["encoder.image"].numpy().size == low.size - 1  # untouched
    assert bogus.content[protocol.ARRAYS]["encoder.image"].numpy().size == low.size


def test_flora_merges_each_rounds_exact_sum_into_the_base_that_clients_then_train_on(tmp_path):
    run = fast_run(tmp_path, "strategy.lora_aggregation=flora")
    replies = []
    run_federation(LocalGrid(make_client_app(run), 3, tamper={p: (lambda r: replies.append(r) or r)
                                                              for p in range(3)}), run)
    layout = trainable_layouts(server_model(run))["encoder.image"]
    pair = lora_pairs(layout)[0]
    name_at = dict(zip(layout.offsets, layout.names))
    a_name, b_name, w_name = (name_at[s.start] for s in (pair.a, pair.b, pair.base))
    assert w_name.endswith("query.base_layer.weight") or w_name.endswith("q_proj.base_layer.weight")
    first, final = (load_file(str(tmp_path / "out" / "checkpoints" / f"round-000{r}.safetensors")) for r in (1, 2))
    total, weight_sum = 0.0, 0.0
    shapes = {c: (lay.size,) for c, lay in trainable_layouts(server_model(run)).items()}
    assert len(replies) == 6  # three training replies per round, in round order
    for reply in replies[3:]:
        if "encoder.image" not in reply.content[protocol.ARRAYS]:
            continue
        widen_low_rank([reply], run)
        update = protocol.validate_train_reply(reply, {c: s for c, s in shapes.items()
                                                       if c in reply.content[protocol.ARRAYS]},
                                               list(reply.content[protocol.ARRAYS].keys()))
        v = update.arrays["encoder.image"]
        # the client trained on the round-1 merge: it sends back the base it received
        np.testing.assert_array_equal(v[pair.base].reshape(final[w_name].shape), first[w_name])
        w = update.component_weights["encoder.image"]
        total = total + w * v[pair.b].reshape(pair.b_shape) @ v[pair.a].reshape(pair.a_shape)
        weight_sum += w
    scaling = run.model.lora_alpha / run.model.lora_r
    np.testing.assert_allclose(final[w_name], first[w_name] + scaling * total / weight_sum, atol=1e-5)
    assert not final[b_name].any() and not np.array_equal(final[w_name], first[w_name])
    np.testing.assert_array_equal(final[a_name], first[a_name])  # a fresh adapter each round, same start


def test_flora_is_refused_with_a_defence_or_async_rounds(tmp_path):
    for extra in ("defense.name=trust", "strategy.mode=async"):
        run = fast_run(tmp_path, "strategy.lora_aggregation=flora", extra)
        with pytest.raises(ConfigError, match="flora"):
            build_strategy(run, NodeRegistry(run))
