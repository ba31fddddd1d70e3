"""The node's side of client-side DP: clip each component's update before it leaves the node.

Flower's `fixedclipping_mod` / `adaptiveclipping_mod` clip a reply's arrays as one vector against one
norm; a fedmm node holds several components, each with its own clipping norm (the server's
per-component wrappers send `clipping-norm.<component>`), so this mod applies Flower's same clipping
maths per component and reports each component's norm bit (`norm-bit.<component>`: 1 when clipped,
Flower's convention) for adaptive clipping. It acts only on train messages that carry clipping norms.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore.differential_privacy import compute_adaptive_clip_model_update

from fedmm.core import protocol


def component_clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN or protocol.CONFIG not in msg.content:
        return call_next(msg, ctxt)
    config = msg.content[protocol.CONFIG]
    prefix = protocol.CLIPPING_NORM_PREFIX
    norms = {key[len(prefix):]: float(value) for key, value in config.items() if key.startswith(prefix)}
    if not norms:
        return call_next(msg, ctxt)
    received = msg.content[protocol.ARRAYS]
    sent_back = call_next(msg, ctxt)
    if sent_back.has_error():
        return sent_back
    arrays = sent_back.content[protocol.ARRAYS]
    clipped = {}
    for component in arrays.keys():
        if component not in norms or component not in received:
            return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION,
                                 reason=f"client-side DP: no clipping norm or received value for {component!r}"),
                           reply_to=msg)
        update = [np.array(arrays[component].numpy(), dtype=np.float32)]
        bit = compute_adaptive_clip_model_update(update, [received[component].numpy()], norms[component])
        clipped[component] = update[0]
        sent_back.content[protocol.METRICS][f"{protocol.NORM_BIT_PREFIX}{component}"] = int(bit)
    sent_back.content[protocol.ARRAYS] = protocol.to_array_record(clipped)
    return sent_back
