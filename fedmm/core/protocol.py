"""What travels in Flower messages: record keys, array encoding, and validation of every reply.

The server decodes client arrays without `np.load`: it checks each `.npy` header against the shape
and dtype it expects for that key and takes a zero-copy view of the payload. Nothing is unpickled or
evaluated.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedmm.core.components import is_expert

# Record keys (Flower's defaults where Flower has one, so Flower strategies read our replies).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
PROFILE = "profile"
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"  # FedProx's train config key: the client adds mu/2 * ||w - w_received||^2
PARTITION_ID = "partition-id"
TASKS = "tasks"
EXAMPLES_PREFIX = "examples."  # examples.<component>: examples that trained that component
TRAIN_LOSS_PREFIX = "train-loss."  # train-loss.<task>
CORRECT_PREFIX = "correct."  # correct.<task>, count.<task>, loss-sum.<task> in evaluate replies
COUNT_PREFIX = "count."
LOSS_SUM_PREFIX = "loss-sum."
PERSONAL_PREFIX = "personal."  # personal.correct.<task> etc.: the same scores for the personal model
BACKDOOR_PREFIX = "backdoor."  # backdoor.correct.<task> etc.: the global model on triggered test inputs
VIEW_PREFIXES = {"global": "", "personal": PERSONAL_PREFIX, "backdoor": BACKDOOR_PREFIX}  # evaluate views
ROUTED_PREFIX = "routed."  # routed.<modality>.<expert component>: tokens routed to that expert in training
ROUTING_ENTROPY = "routing-entropy"  # mean entropy of the routers' distributions over routed tokens
REPLACED_PREFIX = "replaced."  # replaced.<task>: 1 when TAP copied that task's path this round
CLIPPING_NORM_PREFIX = "clipping-norm."  # clipping-norm.<component>: the bound a client clips that update to (client-side DP)
NORM_BIT_PREFIX = "norm-bit."  # norm-bit.<component>: 1 when the client's clipping cut that update (adaptive DP)
FEEDBACK_PREFIX = "feedback."  # feedback.<count or loss>: a language-model client's round (fedmm.training.feedback)
# Counts summed over a round's clients, and losses averaged over those that trained.
FEEDBACK_COUNTS = ("prompts", "first-correct", "wrong", "revised-correct", "wins", "loses", "empty", "over-long",
                   "unencodable", "nonfinite-steps")
FEEDBACK_LOSSES = ("mle-loss", "ul-loss", "grpo-kl")  # metrics are >= 0: GRPO reports its KL, not its signed loss
DISTILL = "train.distill"  # the post-FL distillation message type

DTYPE = np.dtype("<f4")
_NPY_MAGIC = b"\x93NUMPY"
_HEADER = re.compile(
    r"^\{'descr': '(?P<descr>[^']+)', 'fortran_order': (?P<fortran>True|False), "
    r"'shape': \((?P<shape>[0-9, ]*)\), \}\s*$"
)


# shape -> exact .npy prefix (magic, version, header) seen and validated for that shape
_KNOWN_PREFIXES: dict[tuple[int, ...], bytes] = {}


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, Array]:
    """Encode once; the same `Array` objects can go into many per-node records."""
    return {k: Array(np.ascontiguousarray(v, dtype=DTYPE)) for k, v in arrays.items()}


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(encode_arrays(arrays))


class ReplyError(ValueError):
    """A reply that cannot be used; `kind` is a short label for counting."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def decode_array(array: Array, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-copy float32 view of a serialized array, after checking it is exactly what `key` needs."""
    if array.stype != "numpy.ndarray":
        raise ReplyError("bad-encoding", f"{key}: serialization {array.stype!r}")
    if array.dtype != "float32":
        raise ReplyError("bad-dtype", f"{key}: dtype {array.dtype!r}, expected float32")
    if tuple(array.shape) != shape:
        raise ReplyError("bad-shape", f"{key}: shape {tuple(array.shape)}, expected {shape}")
    data = array.data
    count = math.prod(shape)
    prefix = _KNOWN_PREFIXES.get(shape)
    if prefix is not None and data.startswith(prefix):
        # Byte-identical to a prefix already parsed and checked for this shape.
        if len(data) - len(prefix) != count * DTYPE.itemsize:
            raise ReplyError("bad-encoding", f"{key}: {len(data) - len(prefix)} payload bytes for shape {shape}")
        return np.frombuffer(data, dtype=DTYPE, count=count, offset=len(prefix)).reshape(shape)
    if data[:6] != _NPY_MAGIC or len(data) < 12:
        raise ReplyError("bad-encoding", f"{key}: not an .npy buffer")
    major = data[6]
    if major == 1:
        header_len, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        header_len, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise ReplyError("bad-encoding", f"{key}: .npy version {major}")
    header = data[start : start + header_len].decode("latin1")
    match = _HEADER.match(header)
    if match is None:
        raise ReplyError("bad-encoding", f"{key}: malformed .npy header")
    header_shape = tuple(int(s) for s in match["shape"].replace(" ", "").split(",") if s)
    if match["descr"] != DTYPE.str or match["fortran"] != "False" or header_shape != shape:
        raise ReplyError("bad-encoding", f"{key}: header {match['descr']} {header_shape} disagrees with metadata")
    offset = start + header_len
    if len(data) - offset != count * DTYPE.itemsize:
        raise ReplyError("bad-encoding", f"{key}: {len(data) - offset} payload bytes for shape {shape}")
    if len(_KNOWN_PREFIXES) < 4096:
        _KNOWN_PREFIXES[shape] = bytes(data[:offset])
    return np.frombuffer(data, dtype=DTYPE, count=count, offset=offset).reshape(shape)


def decode_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Zero-copy float32 views of every array of a record, each checked against its own metadata."""
    return {key: decode_array(record[key], key, tuple(record[key].shape)) for key in record.keys()}


@dataclass
class ClientUpdate:
    """One validated training reply."""

    node_id: int
    arrays: dict[str, np.ndarray]
    num_examples: int
    component_weights: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)


def routed_key(modality: str, component: str) -> str:
    return f"{ROUTED_PREFIX}{modality}.{component}"


@dataclass(frozen=True)
class ReplyLimits:
    """What the server knows bounds a training reply's counts, when the config fixes it.

    `max_examples`: local steps x batch size. `tokens_per_example`: fusion tokens an example of each
    modality brings, which bounds the tokens a client can have routed to one expert.
    """

    max_examples: int | None = None
    tokens_per_example: Mapping[str, int] | None = None


_MAX_COUNT = 2**53  # beyond this float64 weights lose integers; no client trains on that many


def _positive_int(value: object, what: str, limit: int | None = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not float(value).is_integer() or not 0 < value < _MAX_COUNT):
        raise ReplyError("bad-count", f"{what} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        raise ReplyError("bad-count", f"{what}={int(value)} exceeds {limit}, the most this round allows")
    return int(value)


TRAIN_STEPS = "train-steps"
LORA_RANK = "lora-rank"  # the rank of the client's adapters, when ranks differ across clients


def validate_train_reply(message: Message, expected: Mapping[str, tuple[int, ...]], components: list[str],
                         limits: ReplyLimits | None = None) -> ClientUpdate:
    """Check a training reply against the component vectors the node was sent; raise ReplyError if unusable.

    `expected` maps each component the node holds to its shape. Every component must come back, except
    experts (fedmm.core.components.is_expert): an expert comes back exactly when the reply reports tokens
    routed to it, and those token counts are its weight. `limits` bounds the counts where the server
    knows the bounds. Finiteness of the arrays is checked during aggregation, where it costs nothing
    extra on the common path (see fedmm.core.aggregation).
    """
    limits = limits or ReplyLimits()
    if message.has_error():
        raise ReplyError("client-error", message.error.reason)
    content: RecordDict = message.content
    if set(content.keys()) != {ARRAYS, METRICS}:
        raise ReplyError("bad-structure", f"expected records {[ARRAYS, METRICS]}, got {sorted(content.keys())}")
    record, metrics = content[ARRAYS], content[METRICS]
    if not isinstance(record, ArrayRecord) or not isinstance(metrics, MetricRecord):
        raise ReplyError("bad-structure", f"{ARRAYS!r} must be an ArrayRecord and {METRICS!r} a MetricRecord")
    keys = set(record.keys())
    if metrics.get(NUM_EXAMPLES) == 0 and metrics.get(TRAIN_STEPS) == 0 and not keys:
        # A client that had nothing to learn from (a language model with no win) trained nothing and
        # sends nothing: counted with its metrics, aggregated into no component.
        return ClientUpdate(message.metadata.src_node_id, {}, 0, {}, _scalars(metrics, components))
    num_examples = _positive_int(metrics.get(NUM_EXAMPLES), NUM_EXAMPLES, limits.max_examples)
    unexpected = sorted(keys - expected.keys())
    if unexpected:
        raise ReplyError("unexpected-key", f"{unexpected[:3]}{' …' if len(unexpected) > 3 else ''}")
    missing = sorted(c for c in expected.keys() - keys if not is_expert(c))
    if missing:
        raise ReplyError("missing-key", f"{missing[:3]}{' …' if len(missing) > 3 else ''}")
    count_keys, _, has_experts = _reply_schema(tuple(components))
    weights = {}
    for component, count_key in count_keys:
        if count_key not in metrics:
            raise ReplyError("bad-count", f"missing {count_key!r}")
        weights[component] = float(_positive_int(metrics[count_key], count_key, num_examples))
    if has_experts:
        weights.update(_expert_weights(metrics, keys, components, num_examples, limits))
    scalars = _scalars(metrics, components)
    arrays = {key: decode_array(record[key], key, expected[key]) for key in record.keys()}
    return ClientUpdate(message.metadata.src_node_id, arrays, num_examples, weights, scalars)


def _scalars(metrics: MetricRecord, components: list[str]) -> dict[str, float]:
    """A training reply's metrics, each a known key and a finite number >= 0."""
    _, allowed, _ = _reply_schema(tuple(components))
    scalars = {}
    for key, value in metrics.items():
        if key not in allowed:
            raise ReplyError("bad-metric", f"unknown metric {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ReplyError("bad-metric", f"{key} must be a finite number >= 0, got {value!r}")
        scalars[key] = float(value)
    return scalars


@functools.lru_cache(maxsize=1024)
def _reply_schema(components: tuple[str, ...]) -> tuple[tuple[tuple[str, str], ...], frozenset[str], bool]:
    """What a training reply of a node holding `components` may carry, worked out once per holding:
    (component, its example-count key) of every non-expert, the metric keys allowed, whether it has experts."""
    count_keys = tuple((c, f"{EXAMPLES_PREFIX}{c}") for c in components if not is_expert(c))
    tasks = [c.split(".", 1)[1] for c in components if c.startswith("head.")]
    routed = {routed_key(m, c) for c in components if is_expert(c) for m in _routing_modalities(c, list(components))}
    allowed = {NUM_EXAMPLES, TRAIN_STEPS, LORA_RANK} | {key for _, key in count_keys} | {
        f"{TRAIN_LOSS_PREFIX}{t}" for t in tasks} | {f"{REPLACED_PREFIX}{t}" for t in tasks} | routed | {
        f"{NORM_BIT_PREFIX}{c}" for c in components}
    if any(c.startswith("lm.") for c in components):
        allowed |= {f"{FEEDBACK_PREFIX}{k}" for k in FEEDBACK_COUNTS + FEEDBACK_LOSSES}
    if routed:
        allowed.add(ROUTING_ENTROPY)
    return count_keys, frozenset(allowed), any(is_expert(c) for c in components)


def _routing_modalities(expert: str, components: list[str]) -> list[str]:
    """Modalities whose tokens can reach `expert`: an encoder's expert sees only its encoder's modality,
    a fusion expert every modality the node encodes."""
    if expert.startswith("encoder."):
        return [expert.split(".")[1]]
    return [c.split(".")[1] for c in components if c.startswith("encoder.") and not is_expert(c)]


def _expert_weights(metrics: MetricRecord, returned: set[str], components: list[str], num_examples: int,
                    limits: ReplyLimits) -> dict[str, float]:
    """Each returned expert's weight: the tokens routed to it, summed over modalities, each count bounded
    by the tokens `num_examples` examples of that modality bring."""
    weights: dict[str, float] = {}
    for component in (c for c in components if is_expert(c)):
        total = 0
        for m in _routing_modalities(component, components):
            key = routed_key(m, component)
            if key in metrics:
                if limits.tokens_per_example is not None and m not in limits.tokens_per_example:
                    raise ReplyError("bad-metric", f"{key}: no token bound is known for modality {m!r}")
                per_example = None if limits.tokens_per_example is None else limits.tokens_per_example[m]
                total += _positive_int(metrics[key], key, None if per_example is None else num_examples * per_example)
        if component in returned and not total:
            raise ReplyError("bad-count", f"expert {component!r} came back with no tokens routed to it")
        if total and component not in returned:
            raise ReplyError("missing-key", f"tokens routed to expert {component!r}, but it did not come back")
        if total:
            weights[component] = float(total)
    return weights


def train_reply_content(arrays: Mapping[str, np.ndarray], num_examples: int,
                        component_examples: Mapping[str, int], metrics: Mapping[str, float]) -> RecordDict:
    record = MetricRecord({NUM_EXAMPLES: int(num_examples)})
    for component, count in component_examples.items():
        record[f"{EXAMPLES_PREFIX}{component}"] = int(count)
    for key, value in metrics.items():
        record[key] = float(value)
    return RecordDict({ARRAYS: to_array_record(arrays), METRICS: record})
