"""The fedmm ClientApp: Flower message handling around `fedmm.training.client`.

`app` reads its config from the run config (`flwr run`); `fedmm simulate` builds one with
`make_client_app(config)` because Flower's simulation API passes no run config. With node config
`model-worker`, every message goes to the node's long-lived model worker (`client_apps.worker`).
"""

from __future__ import annotations

import math

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_apps.dp_clipping import component_clipping_mod
from client_apps.forwarding import forward_to_worker
from fedmm.core import protocol
from fedmm.core.config import config_from_flat
from fedmm.core.schema import RunConfig
from fedmm.engine.ray_cluster import keep_flower_simulation_local


def _client():
    """`fedmm.training.client` (torch, the model) is imported only where messages are answered, so a ClientApp
    process that forwards to the node's model worker starts in well under a second."""
    from fedmm.training import client

    return client


def _decode(message: Message) -> dict:
    record = message.content[protocol.ARRAYS]
    return {key: record[key].numpy() for key in record.keys()}


def make_client_app(run: RunConfig | None = None) -> ClientApp:
    # Clipping is outermost: it sees the reply exactly as it leaves the node, whoever trained it.
    app = ClientApp(mods=[component_clipping_mod, forward_to_worker])
    resolved: dict[int, RunConfig] = {}  # by run id: a model worker outlives runs

    def config(context: Context) -> RunConfig:
        if run is not None:
            return run
        if context.run_id not in resolved:
            resolved[context.run_id] = config_from_flat(context.run_config)
        return resolved[context.run_id]

    @app.query()
    def query(message: Message, context: Context) -> Message:
        cfg, client = config(context), _client()
        me = client.identify(cfg, context.node_config)
        record = ConfigRecord({protocol.PARTITION_ID: me.partition_id, protocol.PROFILE: me.profile,
                               protocol.TASKS: ",".join(me.tasks)})
        return Message(RecordDict({protocol.PROFILE: record}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        cfg, client = config(context), _client()
        me = client.identify(cfg, context.node_config)
        config_record = message.content[protocol.CONFIG]
        server_round = int(config_record[protocol.SERVER_ROUND])
        mu = float(config_record.get(protocol.PROXIMAL_MU, 0.0))
        if not (mu >= 0 and math.isfinite(mu)):
            raise ValueError(f"train config {protocol.PROXIMAL_MU}={mu!r}: expected a finite number >= 0")
        arrays, num_examples, counts, metrics = client.train(cfg, me, _decode(message), server_round, mu)
        content = protocol.train_reply_content(arrays, num_examples, counts, metrics)
        return Message(content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        cfg, client = config(context), _client()
        me = client.identify(cfg, context.node_config)
        views = client.evaluate_model(cfg, me, _decode(message))
        metrics = MetricRecord({protocol.NUM_EXAMPLES: sum(s.count for s in views["global"].values())})
        for view, scores in views.items():
            prefix = protocol.VIEW_PREFIXES[view]
            for task, score in scores.items():
                metrics[f"{prefix}{protocol.CORRECT_PREFIX}{task}"] = score.correct
                metrics[f"{prefix}{protocol.COUNT_PREFIX}{task}"] = score.count
                metrics[f"{prefix}{protocol.LOSS_SUM_PREFIX}{task}"] = score.loss_sum
        return Message(RecordDict({protocol.METRICS: metrics}), reply_to=message)

    @app.train("distill")
    def distill(message: Message, context: Context) -> Message:
        cfg, client = config(context), _client()
        me = client.identify(cfg, context.node_config)
        metrics = client.distill(cfg, me, _decode(message))
        return Message(RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=message)

    return app


keep_flower_simulation_local()  # before Flower's Simulation Engine calls ray.init()
app = make_client_app()
