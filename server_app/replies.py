"""What the server does to training replies before any strategy reads them: count the bytes they
carried, and bring lower-rank clients' adapters to the global rank."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message

from fedmm.core import protocol
from fedmm.core.lora_ranks import from_rank
from fedmm.core.schema import RunConfig
from fedmm.models.model import rank_layouts


def uplink_bytes(reply: Message) -> int:
    return sum(len(a.data) for record in reply.content.array_records.values() for a in record.values())


def widen_low_rank(replies: Iterable[Message], run: RunConfig) -> list[Message]:
    """Replies of clients whose adapters have a lower rank (metric `lora-rank` r < model.lora_r), with
    their factors zero-padded to the global rank (the same ΔW, fedmm.core.lora_ranks.from_rank): what
    validation, defences and strategies read. A reply whose arrays do not fit rank r, or that names no
    valid rank, is left as it came, for validation to reject with its reason."""
    out = []
    for reply in replies:
        out.append(reply)
        if reply.has_error() or protocol.ARRAYS not in reply.content or protocol.METRICS not in reply.content:
            continue
        rank = reply.content[protocol.METRICS].get(protocol.LORA_RANK)
        if isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank != int(rank) \
                or not 1 <= rank < run.model.lora_r:
            continue
        low, full = rank_layouts(run, int(rank)), rank_layouts(run, run.model.lora_r)
        record = reply.content[protocol.ARRAYS]
        try:
            arrays = {k: protocol.decode_array(record[k], k, (low[k].size,)) for k in record.keys()}
        except (protocol.ReplyError, KeyError):
            continue
        reply.content[protocol.ARRAYS] = ArrayRecord(protocol.encode_arrays(
            {k: v if low[k] == full[k] else from_rank(v, low[k], full[k]) for k, v in arrays.items()}))
    return out
