import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedmm.core import protocol
from fedmm.core.protocol import ReplyError, ReplyLimits, decode_array, validate_train_reply

SHAPES = {"encoders.image.proj.weight": (4, 3), "fusion.norm.bias": (3,)}
COMPONENTS = ["encoder.image", "fusion.shared"]


def reply(content: RecordDict | None = None, error: Error | None = None, node: int = 7) -> Message:
    metadata = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                        group_id="", created_at=0.0, ttl=60.0, message_type="train")
    if error is not None:
        return Message(metadata=metadata, error=error)
    return Message(metadata=metadata, content=content)


def good_arrays():
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def good_content(**changes):
    arrays = changes.pop("arrays", good_arrays())
    counts = changes.pop("counts", {"encoder.image": 5, "fusion.shared": 5})
    content = protocol.train_reply_content(arrays, changes.pop("num_examples", 5), counts, {"train-steps": 1.0})
    return content


def test_decode_matches_numpy_and_is_zero_copy():
    value = np.arange(12, dtype=np.float32).reshape(4, 3)
    array = Array(value)
    decoded = decode_array(array, "k", (4, 3))
    np.testing.assert_array_equal(decoded, array.numpy())
    assert not decoded.flags.owndata


def test_a_good_reply_validates():
    update = validate_train_reply(reply(good_content()), SHAPES, COMPONENTS)
    assert update.num_examples == 5 and update.node_id == 7
    assert update.component_weights == {"encoder.image": 5.0, "fusion.shared": 5.0}
    np.testing.assert_array_equal(update.arrays["fusion.norm.bias"], good_arrays()["fusion.norm.bias"])


def _with_array(key, array):
    content = good_content()
    content[protocol.ARRAYS][key] = array
    return content


def _without_array(key):
    content = good_content()
    del content[protocol.ARRAYS][key]
    return content


def _metric(key, value):
    content = good_content()
    if value is None:
        del content[protocol.METRICS][key]
    else:
        content[protocol.METRICS][key] = value
    return content


def _corrupt_header():
    array = Array(np.zeros((4, 3), dtype=np.float32))
    data = array.data.replace(b"'fortran_order': False", b"'fortran_order': True ")
    return _with_array("encoders.image.proj.weight", Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray", data=data))


def _short_payload():
    array = Array(np.zeros((4, 3), dtype=np.float32))
    return _with_array("encoders.image.proj.weight",
                       Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray", data=array.data[:-4]))


def _lying_metadata():
    array = Array(np.zeros((2, 6), dtype=np.float32))
    return _with_array("encoders.image.proj.weight",
                       Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray", data=array.data))


BAD = {
    "client-error": lambda: reply(error=Error(code=0, reason="boom")),
    "unexpected-key": lambda: reply(_with_array("heads.vqa.weight", Array(np.zeros(3, np.float32)))),
    "missing-key": lambda: reply(_without_array("fusion.norm.bias")),
    "bad-dtype": lambda: reply(_with_array("fusion.norm.bias", Array(np.zeros(3, np.float64)))),
    "bad-shape": lambda: reply(_with_array("fusion.norm.bias", Array(np.zeros(4, np.float32)))),
    "bad-encoding": lambda: reply(_corrupt_header()),
    "bad-encoding-size": lambda: reply(_short_payload()),
    "bad-encoding-header": lambda: reply(_lying_metadata()),
    "bad-count-zero": lambda: reply(good_content(num_examples=0)),
    "bad-count-negative": lambda: reply(_metric(protocol.NUM_EXAMPLES, -3)),
    "bad-count-fraction": lambda: reply(_metric(protocol.NUM_EXAMPLES, 2.5)),
    "bad-count-missing": lambda: reply(_metric(protocol.NUM_EXAMPLES, None)),
    "bad-count-component": lambda: reply(good_content(counts={"encoder.image": 5})),
    "bad-structure": lambda: reply(RecordDict({"other": ArrayRecord(), protocol.METRICS: MetricRecord()})),
    "bad-structure-config": lambda: reply(_extra_config()),
    "bad-count-huge": lambda: reply(_metric(protocol.NUM_EXAMPLES, 1e300)),
    "bad-count-component-above-total": lambda: reply(good_content(counts={"encoder.image": 6, "fusion.shared": 5})),
    "bad-metric-unknown": lambda: reply(_metric("accuracy.vqa", 0.5)),
    "bad-metric-nan": lambda: reply(_metric("train-loss.vqa", float("nan"))),
    "bad-metric-negative": lambda: reply(_metric("train-steps", -1.0)),
}


def _extra_config():
    content = good_content()
    content["cfg"] = ConfigRecord({"a": 1})
    return content


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_reply_kind_is_rejected_with_its_reason(case):
    with pytest.raises(ReplyError) as err:
        validate_train_reply(BAD[case](), SHAPES, COMPONENTS)
    assert err.value.kind == case.split("-")[0] + "-" + case.split("-")[1]


def test_counts_above_what_the_round_allows_are_rejected():
    with pytest.raises(ReplyError, match="exceeds 4"):
        validate_train_reply(reply(good_content()), SHAPES, COMPONENTS, ReplyLimits(max_examples=4))
    assert validate_train_reply(reply(good_content()), SHAPES, COMPONENTS, ReplyLimits(max_examples=5)).num_examples == 5


MOE_SHAPES = {"encoder.image": (4,), "fusion.shared": (3,), "fusion.router.0": (2,),
              "fusion.expert.0.0": (5,), "fusion.expert.0.1": (5,)}
MOE_COMPONENTS = list(MOE_SHAPES)
MOE_LIMITS = ReplyLimits(max_examples=8, tokens_per_example={"image": 10})


def moe_content(experts: dict[str, int], routed: dict[str, int] | None = None):
    """A reply sending `experts` (component -> image tokens routed to it); `routed` overrides the counts."""
    arrays = {c: np.ones(s, np.float32) for c, s in MOE_SHAPES.items() if not c.startswith("fusion.expert.")}
    arrays.update({c: np.ones(5, np.float32) for c in experts})
    metrics = {protocol.routed_key("image", c): float(n) for c, n in (experts if routed is None else routed).items()}
    counts = {c: 4 for c in MOE_COMPONENTS if not c.startswith("fusion.expert.")}
    return protocol.train_reply_content(arrays, 4, counts, metrics)


def test_experts_come_back_only_when_used_and_weigh_by_routed_tokens():
    update = validate_train_reply(reply(moe_content({"fusion.expert.0.1": 30})), MOE_SHAPES, MOE_COMPONENTS,
                                  MOE_LIMITS)
    assert update.component_weights["fusion.expert.0.1"] == 30.0
    assert "fusion.expert.0.0" not in update.component_weights
    assert update.component_weights["fusion.router.0"] == 4.0


@pytest.mark.parametrize("experts, routed, kind", [
    ({"fusion.expert.0.1": 30}, {"fusion.expert.0.1": 30, "fusion.expert.0.0": 5}, "missing-key"),
    ({"fusion.expert.0.1": 30}, {}, "bad-count"),  # an expert back with no tokens routed to it
    ({"fusion.expert.0.1": 41}, None, "bad-count"),  # 4 examples x 10 tokens at most
    ({"fusion.expert.0.1": 0}, None, "bad-count"),
])
def test_bad_expert_replies_are_refused(experts, routed, kind):
    with pytest.raises(ReplyError) as err:
        validate_train_reply(reply(moe_content(experts, routed)), MOE_SHAPES, MOE_COMPONENTS, MOE_LIMITS)
    assert err.value.kind == kind


def test_routed_tokens_of_a_modality_the_node_does_not_hold_are_unknown_metrics():
    content = moe_content({"fusion.expert.0.1": 3})
    content[protocol.METRICS][protocol.routed_key("text", "fusion.expert.0.1")] = 3
    with pytest.raises(ReplyError, match="unknown metric"):
        validate_train_reply(reply(content), MOE_SHAPES, MOE_COMPONENTS, MOE_LIMITS)


def test_a_missing_non_expert_component_is_still_an_error():
    content = moe_content({"fusion.expert.0.1": 3})
    del content[protocol.ARRAYS]["fusion.router.0"]
    with pytest.raises(ReplyError) as err:
        validate_train_reply(reply(content), MOE_SHAPES, MOE_COMPONENTS, MOE_LIMITS)
    assert err.value.kind == "missing-key"


def test_an_encoders_experts_take_only_their_own_modalitys_tokens_and_every_count_is_bounded():
    shapes = {"encoder.text": (4,), "encoder.text.expert.0.0": (5,), "fusion.shared": (3,)}
    components = list(shapes)
    limits = ReplyLimits(max_examples=8, tokens_per_example={"text": 16})

    def content(metric_key, n):
        arrays = {c: np.ones(s, np.float32) for c, s in shapes.items()}
        counts = {"encoder.text": 4, "fusion.shared": 4}
        return protocol.train_reply_content(arrays, 4, counts, {metric_key: n})

    ok = validate_train_reply(reply(content(protocol.routed_key("text", "encoder.text.expert.0.0"), 64)), shapes,
                              components, limits)
    assert ok.component_weights["encoder.text.expert.0.0"] == 64
    for key, n in [(protocol.routed_key("text", "encoder.text.expert.0.0"), 65),  # 4 examples x 16 tokens
                   (protocol.routed_key("image", "encoder.text.expert.0.0"), 5),  # another modality's tokens
                   (protocol.routed_key("text.expert.0.0", "encoder.text.expert.0.0"), 2**50)]:  # no such modality
        with pytest.raises(ReplyError):
            validate_train_reply(reply(content(key, n)), shapes, components, limits)
