"""The simulated adversary: forges the malicious clients' training replies before the defence sees them.

Model-poisoning attacks need what colluding attackers share (each other's updates) and what every
client sees (consecutive global models), so in a simulation they are applied here, in one place,
to the replies of the clients `fedmm.robustness.attacks.malicious_clients` names. Data poisoning happens on
those clients themselves. The defence never learns who is malicious.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from fedmm.core import protocol
from fedmm.robustness.attacks import AttackContext, ModelAttack
from fedmm.core.schema import AttackConfig


def forge_replies(replies: list[Message], malicious_nodes: set[int], attack: ModelAttack, cfg: AttackConfig,
                  sent: Mapping[str, np.ndarray], benign_estimate: Mapping[str, np.ndarray] | None,
                  seed: int) -> list[Message]:
    """Replace the arrays of the malicious nodes' replies with forged ones, component by component.

    `sent` holds the global component vectors of this round; `benign_estimate` the last global update
    per component (None in the first round). Replies that are not well-formed are left alone.
    """
    updates: dict[int, dict[str, np.ndarray]] = {}
    holders: dict[str, int] = {}
    for reply in replies:
        if reply.has_error() or protocol.ARRAYS not in reply.content:
            continue
        record = reply.content[protocol.ARRAYS]
        for key in record.keys():
            holders[key] = holders.get(key, 0) + 1
        node = reply.metadata.src_node_id
        if node in malicious_nodes:
            try:
                updates[node] = {k: protocol.decode_array(record[k], k, sent[k].shape) for k in record.keys()}
            except (protocol.ReplyError, KeyError) as err:
                log(WARNING, "adversary: cannot forge node %d's reply (%s)", node, err)
    if not updates:
        return replies
    forged: dict[int, dict[str, np.ndarray]] = {node: {} for node in updates}
    for component in sorted({c for arrays in updates.values() for c in arrays}):
        nodes = sorted(n for n in updates if component in updates[n])
        deltas = np.stack([updates[n][component] - sent[component] for n in nodes])
        ctx = AttackContext(cfg, np.random.default_rng([seed, len(nodes), *component.encode()]),
                            None if benign_estimate is None else benign_estimate.get(component),
                            holders[component])
        out = np.asarray(attack(deltas, ctx), dtype=np.float32)
        if out.shape != deltas.shape:
            raise ValueError(f"attack returned shape {out.shape} for {component}, expected {deltas.shape}")
        for n, row in zip(nodes, out):
            forged[n][component] = sent[component] + row
    result = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if node in forged:
            reply.content[protocol.ARRAYS] = ArrayRecord(protocol.encode_arrays(forged[node]))
        result.append(reply)
    return result
