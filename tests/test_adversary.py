"""The simulated adversary forges exactly the malicious clients' replies."""

from types import SimpleNamespace

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from local_grid import as_reply

from fedmm.robustness import attacks

from fedmm.core import protocol
from fedmm.core.schema import AttackConfig
from server_app.adversary import forge_replies


def reply(node: int, arrays: dict) -> Message:
    template = SimpleNamespace(metadata=SimpleNamespace(src_node_id=node, reply_to_message_id="m",
                                                        message_type="train"))
    content = RecordDict({protocol.ARRAYS: protocol.to_array_record(arrays),
                          protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 4})})
    return as_reply(template, content)


def test_only_malicious_replies_are_forged_and_each_component_separately():
    rng = np.random.default_rng(0)
    sent = {"a": rng.standard_normal(5).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    trained = {n: {k: v + rng.standard_normal(v.size).astype(np.float32) for k, v in sent.items()} for n in (1, 2, 3)}
    trained[3].pop("b")
    replies = [reply(n, trained[n]) for n in (1, 2, 3)]
    out = forge_replies(replies, {2, 3}, attacks.sign_flip, AttackConfig(), sent, None, seed=0)

    def arrays(message):
        record = message.content[protocol.ARRAYS]
        return {k: record[k].numpy() for k in record.keys()}

    got = {m.metadata.src_node_id: arrays(m) for m in out}
    np.testing.assert_array_equal(got[1]["a"], trained[1]["a"])
    for n in (2, 3):
        np.testing.assert_allclose(got[n]["a"], sent["a"] - (trained[n]["a"] - sent["a"]), rtol=1e-6)
    np.testing.assert_allclose(got[2]["b"], sent["b"] - (trained[2]["b"] - sent["b"]), rtol=1e-6)
    assert set(got[3]) == {"a"}


def test_colluders_see_how_many_clients_hold_the_component():
    seen = {}

    def spy(deltas, ctx):
        seen["sampled"], seen["rows"] = ctx.num_sampled, len(deltas)
        return deltas

    sent = {"a": np.zeros(4, np.float32)}
    replies = [reply(n, {"a": np.full(4, n, np.float32)}) for n in range(5)]
    forge_replies(replies, {0, 1}, spy, AttackConfig(), sent, {"a": np.ones(4, np.float32)}, seed=0)
    assert seen == {"sampled": 5, "rows": 2}
